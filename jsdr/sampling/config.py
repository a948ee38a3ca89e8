"""What a sampling call asks for (`SamplingConfig`) and what it returns (`SampleOutput`).

SamplingConfig holds two kinds of settings. The *sampling* settings (temperature, filters, n,
lengths, stops, seed) decide which tokens come out. The *engine* settings (`ENGINE_FIELDS`: which
engine, page size, KV budget, slots, decode layout) only decide how fast and in how much memory:
the paged engine returns the same tokens as the dense one (tested), so eval results are not keyed
by them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from jsdr.config import check, field

FINISH_REASONS = ("stop", "length")
ENGINES = ("paged", "dense")
ENGINE_FIELDS = ("engine", "page_size", "kv_cache_gb", "kv_cache_fraction", "max_slots", "decode_steps",
                 "prefill_chunk", "decode_tensor")
# Compiler options of the decode programs. On GPU, XLA's dot merger fuses the q/k/v projections (and
# gate/up) of a layer into one matmul by concatenating their weights: inside the decode loop that copy
# of the layer's weights runs at every token (64 MiB per layer and token at Qwen3-1.7B, more bytes
# moved than the matmuls themselves read). A threshold of 0 turns the merger off; other backends
# ignore the option.
DECODE_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}
STOP_WINDOW_SLACK = 8  # tokens beyond the longest stop string (in characters) that a stop match may span


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to draw completions. temperature 0 = greedy; top_k -1 = off; top_p 1 = off; min_p 0 = off."""

    temperature: float = field(1.0, "rollout temperature (0 = greedy)")
    top_p: float = field(1.0, "nucleus filter on probabilities (1 = off)")
    top_k: int = field(-1, "keep the k most likely tokens (-1 = off)")
    min_p: float = field(0.0, "drop tokens below min_p x the top probability (0 = off)")
    presence_penalty: float = field(0.0, "subtracted from the logits of tokens already generated (0 = off)")
    n: int = field(1, "samples per prompt (GRPO: the group size)")
    max_new_tokens: int = field(256, "rollouts are cut at this length")
    stop_token_ids: tuple[int, ...] = field((), "extra stop ids (EOS and chat end markers are always added)")
    stop_strings: tuple[str, ...] = field((), "stop when the completion's text contains one of these (the "
                                              "token that completes it is kept)")
    seed: int = field(0, "sampling seed")
    # engine: how, not what (ENGINE_FIELDS)
    engine: str = field("paged", "paged (paged KV cache, continuous batching) | dense (one cache row per "
                                 "sample, the reference)")
    page_size: int = field(16, "paged engine: tokens per KV page")
    kv_cache_gb: float = field(0.0, "paged engine: KV pool per device in GiB (0 = kv_cache_fraction of the free "
                                    "device memory; on CPU, what the call needs up to 4 GiB)")
    kv_cache_fraction: float = field(0.75, "paged engine: share of free device memory for the KV pool when "
                                          "kv_cache_gb is 0")
    max_slots: int = field(0, "paged engine: sequences decoded at once, all devices together (0 = auto: 256 on "
                              "a GPU, 16 on CPU)")
    decode_steps: int = field(32, "paged engine: decode steps between two scheduler turns")
    prefill_chunk: int = field(512, "paged engine: prompt tokens per prefill row and call")
    decode_tensor: int = field(0, "paged engine: tensor-parallel size of the decode layout (0 = auto; the "
                                  "other devices split the sequences)")

    def __post_init__(self):
        t, p, k, m, pen = self.temperature, self.top_p, self.top_k, self.min_p, self.presence_penalty
        check(_is_number(t) and math.isfinite(t) and t >= 0, "temperature",
              f"{t!r} is invalid: must be a finite number >= 0 (0 = greedy)")
        check(_is_number(p) and 0.0 < p <= 1.0, "top_p", f"{p!r} is invalid: must be in (0, 1] (1 = off)")
        check(_is_int(k) and (k == -1 or k >= 1), "top_k", f"{k!r} is invalid: must be -1 (off) or an integer >= 1")
        check(_is_number(m) and 0.0 <= m <= 1.0, "min_p", f"{m!r} is invalid: must be in [0, 1] (0 = off)")
        check(_is_number(pen) and -2.0 <= pen <= 2.0, "presence_penalty",
              f"{pen!r} is invalid: must be in [-2, 2] (0 = off)")
        check(_is_int(self.n) and self.n >= 1, "n",
              f"{self.n!r} is invalid: must be an integer >= 1 (samples per prompt)")
        check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
              f"{self.max_new_tokens!r} is invalid: must be an integer >= 1")
        stops = self.stop_token_ids
        if isinstance(stops, (int, np.integer)):
            stops = (int(stops),)
        try:
            stops = tuple(int(s) for s in stops)
        except (TypeError, ValueError):
            stops = None
        check(stops is not None, "stop_token_ids",
              f"{self.stop_token_ids!r} is invalid: must be a sequence of token ids")
        check(all(s >= 0 for s in stops), "stop_token_ids",
              f"{self.stop_token_ids!r} is invalid: token ids must be >= 0")
        object.__setattr__(self, "stop_token_ids", stops)
        strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
        ok = isinstance(strings, (tuple, list)) and all(isinstance(s, str) and s for s in strings)
        check(ok, "stop_strings", f"{self.stop_strings!r} is invalid: must be a list of non-empty strings")
        object.__setattr__(self, "stop_strings", tuple(strings))
        check(_is_int(self.seed), "seed", f"{self.seed!r} is invalid: must be an integer")
        check(self.engine in ENGINES, "engine", f"{self.engine!r} is invalid: choose one of {list(ENGINES)}")
        for name, low in (("page_size", 1), ("max_slots", 0), ("decode_steps", 1), ("prefill_chunk", 1),
                          ("decode_tensor", 0)):
            v = getattr(self, name)
            check(_is_int(v) and v >= low, name, f"{v!r} is invalid: must be an integer >= {low}")
        g, f = self.kv_cache_gb, self.kv_cache_fraction
        check(_is_number(g) and math.isfinite(g) and g >= 0, "kv_cache_gb",
              f"{g!r} is invalid: must be a finite number >= 0 (0 = from kv_cache_fraction)")
        check(_is_number(f) and 0.0 < f <= 1.0, "kv_cache_fraction", f"{f!r} is invalid: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return self.top_k != -1 or self.top_p < 1.0 or self.min_p > 0.0


@dataclasses.dataclass
class SampleOutput:
    """Per sample row r (prompt r // n, samples of one prompt adjacent), numpy arrays.

    tokens [R, max_new] int32 (pad_id after the end; a stop token is included), logprobs [R, max_new]
    (log-prob under the filtered sampling distribution; 0 for greedy and after the end),
    logprobs_raw [R, max_new] (under the model at temperature 1, no penalty, no filter), lengths [R]
    (tokens generated, stop token counted), finish_reason [R] int8 codes into `finish_reason_names`
    (0 = "stop", 1 = "length"), prompt_index [R].
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    logprobs_raw: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray
    prompt_index: np.ndarray
    finish_reason_names: tuple[str, ...] = FINISH_REASONS

    @property
    def finish_reason_str(self) -> list[str]:
        return [self.finish_reason_names[int(c)] for c in self.finish_reason]

    def completions(self) -> list[list[int]]:
        """The generated tokens of every row, cut at its length."""
        return [self.tokens[i, :int(n)].tolist() for i, n in enumerate(self.lengths)]


def row_keys(key, rows: int, n: int, prompt_keys=None) -> np.ndarray:
    """The PRNG key of every sample row [rows, 2] (uint32, legacy key data): fold_in(key, r), or with
    per-prompt keys [N, 2], fold_in(prompt_keys[r // n], r % n). Token t of row r is drawn with
    uniform(fold_in(row key, t)); the same rule in both engines, so the samples of a prompt do not
    depend on the engine, the batch or (with prompt keys) on the other prompts of the call."""
    import jax  # the config half of this module stays importable without touching a backend

    r = np.arange(rows, dtype=np.int32)
    if prompt_keys is None:
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(_key_data(key), r)
    else:
        pk = np.asarray(_key_data(prompt_keys))
        keys = jax.vmap(jax.random.fold_in)(pk[r // n], r % n)
    return np.asarray(keys, np.uint32)


def _key_data(key):
    import jax

    if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def stop_window(stop_strings: Sequence[str]) -> int:
    """Tokens of the text window in which a stop string is looked for (see `find_stop_string`)."""
    return max(len(s) for s in stop_strings) + STOP_WINDOW_SLACK


def find_stop_string(tokens: Sequence[int], stop_strings: Sequence[str], decode: Callable[[list[int]], str],
                     start: int = 0) -> int | None:
    """The first index i >= start at which the text of the window tokens[i + 1 - W : i + 1] (W =
    `stop_window`) contains a stop string: the token that completes the stop string. None if none.

    The window keeps the check cheap on long completions (each token is decoded a bounded number of
    times); both engines use this one rule, so they stop at the same token.
    """
    if not stop_strings or len(tokens) <= start:
        return None
    w = stop_window(stop_strings)
    toks = list(tokens)
    text = decode(toks[max(0, start + 1 - w):])
    if not any(s in text for s in stop_strings):
        return None
    for i in range(start, len(toks)):
        text = decode(toks[max(0, i + 1 - w):i + 1])
        if any(s in text for s in stop_strings):
            return i
    return None


def cut_at_stop_strings(out: SampleOutput, stop_strings: Sequence[str], decode, pad_id: int) -> SampleOutput:
    """`out` with every row ended at its first stop string (finish reason "stop"); used by the dense
    engine after decoding (the paged engine stops such rows while decoding)."""
    if not stop_strings:
        return out
    for r in range(len(out.lengths)):
        n = int(out.lengths[r])
        i = find_stop_string(out.tokens[r, :n].tolist(), stop_strings, decode)
        if i is not None:
            out.tokens[r, i + 1:] = pad_id
            out.logprobs[r, i + 1:] = 0.0
            out.logprobs_raw[r, i + 1:] = 0.0
            out.lengths[r] = i + 1
            out.finish_reason[r] = 0
    return out
