"""Sampling: exact probability filters, a paged continuously batched engine and a dense reference
engine, behind one `Sampler`.

    sampler = Sampler(Model(cfg, lora_scale=lora_cfg.scale), mesh=mesh, pad_id=tok.pad_token_id,
                      detokenize=tok.decode)
    out = sampler.generate(params, lora, prompts, SamplingConfig(temperature=1.0, top_p=0.95, n=16,
                                                                  max_new_tokens=2048,
                                                                  stop_token_ids=(eos_id,)))
    out.tokens, out.logprobs, out.logprobs_raw, out.lengths, out.finish_reason, out.prompt_index

Modules:
    config.py     SamplingConfig (what to sample + engine settings), SampleOutput, stop strings
    filters.py    presence penalty -> temperature -> top-k -> top-p -> min-p -> draw, exact, no sort
    paged.py      KV pools and the jitted prefill / decode-segment / slot / page-copy programs
    scheduler.py  page allocation, prefix sharing, preemption, continuous batching (host side)
    dense.py      the dense engine: one cache row per sample (the reference)
    sampler.py    Sampler: engine dispatch, the decode layout, per-prompt limits

Token t of sample row r (prompt r // n) is drawn with the uniform of
`fold_in(fold_in(key(seed), r), t)` in both engines, so results do not depend on the engine, the
batch, the slots or the schedule.
"""

from jsdr.sampling.config import (ENGINE_FIELDS, ENGINES, FINISH_REASONS, SampleOutput, SamplingConfig,
                                  cut_at_stop_strings, find_stop_string)
from jsdr.sampling.dense import DEFAULT_PROMPT_BUCKETS, DenseSampler
from jsdr.sampling.filters import FILTER_BOUND, bracket_threshold, filter_threshold, sample_logits, top_candidates
from jsdr.sampling.sampler import Sampler, decode_mesh, decode_tensor_size
from jsdr.sampling.scheduler import PagedEngine, SamplingError

__all__ = ["ENGINE_FIELDS", "ENGINES", "FINISH_REASONS", "SampleOutput", "SamplingConfig", "cut_at_stop_strings",
           "find_stop_string", "DEFAULT_PROMPT_BUCKETS", "DenseSampler", "FILTER_BOUND", "bracket_threshold",
           "filter_threshold", "sample_logits", "top_candidates", "Sampler", "decode_mesh", "decode_tensor_size",
           "PagedEngine", "SamplingError"]
