"""The embedded default: a synthetic reasoning task, a local tokenizer and a tiny Qwen3 reasoner.

Nothing here needs a model hub. `ensure_toy_assets()` returns (shipped in the package for the
default settings; otherwise built once, then cached) a Hugging Face directory holding a
~0.8M-parameter Qwen3-architecture model warm-started on the task, so that SFT, GRPO and OPSD can
show learning on a CPU. The toy is built on the library: prompts are filled and rendered by
`jsdr.data.prompts`, answers graded by `jsdr.data.rewards`, the warm start packs with
`jsdr.data.batches` and trains on `jsdr.losses.sft`, accuracy decodes with `jsdr.sampling`.

    task.py        the mod-10 chains: problems, reference solutions, splits, benchmark, prompts,
                   the habit and recovery examples
    tokenizer.py   the BPE tokenizer, its chat template, example encoding
    warm_start.py  ToySettings, the warm start (full-parameter SFT) and greedy accuracy
    assets.py      the shipped warm start (toy_model/), the cache, the build

`from jsdr import toy` gives the public names of all four.
"""

from jsdr.toy.assets import (SHIPPED_DIR, assets_dir, build_assets, default_cache_root, ensure_toy_assets,
                             shipped_assets, weights_sha256)
from jsdr.toy.task import (BENCHMARK_SEED, DEFAULT_DIFFICULTY, HELDOUT_EVERY, INSTRUCTION, MOD, OPS,
                           REFERENCE_HEADER, SPLITS, START, STUDENT_PROMPT, TEACHER_PROMPT, TEMPLATES,
                           TOY_VERSION, TRAIN_DEFAULTS, TRAIN_DIFFICULTY, TRANSITION, habit_example,
                           make_problems, num_distinct, parse_problem, recovery_example, render_problem, solve,
                           split_of, student_prompt, teacher_prompt, toy_benchmark, verify)
from jsdr.toy.tokenizer import (CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, build_tokenizer,
                                encode_completion, encode_example, encode_prompt)
from jsdr.toy.warm_start import (DEFAULT_SETTINGS, ToySettings, accuracy, example_stream, hf_config,
                                 pack_prefix, toy_sampler, warm_start)

__all__ = [
    "BENCHMARK_SEED", "CHAT_TEMPLATE", "DEFAULT_DIFFICULTY", "DEFAULT_SETTINGS", "EOS_TOKEN", "HELDOUT_EVERY",
    "INSTRUCTION", "MOD", "OPS", "PAD_TOKEN", "REFERENCE_HEADER", "SHIPPED_DIR", "SPECIAL_TOKENS", "SPLITS",
    "START", "STUDENT_PROMPT", "TEACHER_PROMPT", "TEMPLATES", "TOY_VERSION", "TRAIN_DEFAULTS",
    "TRAIN_DIFFICULTY", "TRANSITION", "ToySettings", "accuracy", "assets_dir", "build_assets",
    "build_tokenizer", "default_cache_root", "encode_completion", "encode_example", "encode_prompt",
    "ensure_toy_assets", "example_stream", "habit_example", "hf_config", "make_problems", "num_distinct",
    "pack_prefix", "parse_problem", "recovery_example", "render_problem", "shipped_assets", "solve",
    "split_of", "student_prompt", "teacher_prompt", "toy_benchmark", "toy_sampler", "verify", "warm_start",
    "weights_sha256",
]
