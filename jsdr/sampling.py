"""Jitted sampling engine: bucketed prefill, n samples per prompt from one prefill, a decode loop
inside `jax.lax.while_loop`, exact probability filters without a full vocabulary sort.

    sampler = Sampler(Model(cfg, lora_scale=lora_cfg.scale), pad_id=tok.pad_token_id)
    out = sampler.generate(params, lora, prompts, SamplingConfig(temperature=1.0, top_p=0.95, n=16,
                                                                  max_new_tokens=2048,
                                                                  stop_token_ids=(eos_id,)))
    out.tokens, out.logprobs, out.logprobs_raw, out.lengths, out.finish_reason, out.prompt_index

Order of the logit processing at every step (the order of vLLM's v0 sampler):

    presence penalty -> temperature -> top-k -> top-p -> min-p -> draw

* presence penalty: `penalty` is subtracted from the logit of every token that this sample has
  already *generated* (prompt tokens do not count; the OpenAI / vLLM definition).
* temperature 0 means greedy decoding (argmax of the penalised logits); then `logprobs` is 0 (the
  sampling distribution is a point mass) while `logprobs_raw` is still the model's log-prob.
* top-k keeps every token whose probability is >= the k-th largest probability (tokens tied with
  the k-th are all kept, so more than k tokens can survive a tie).
* top-p works on the distribution left by top-k. A token with probability p survives when the mass of
  the tokens with probability strictly greater than p is < top_p. Equivalently: walk the tokens from
  the most to the least likely and stop once the kept mass reaches top_p, but a block of tied tokens
  is kept or dropped as a whole (all tokens tied with the last kept token are kept).
* min-p keeps tokens whose probability is >= min_p * (probability of the most likely token); the
  ratio does not change when top-k/top-p renormalise, so it is applied on the same scale.
* the kept tokens are renormalised and one is drawn by inverse-CDF sampling with one uniform number
  per row and step; the uniforms come from `fold_in(fold_in(key(seed), sample_row), step)`, so a
  run is reproducible from the seed and a sample's draws do not depend on the batch padding.

All filters reduce to one probability threshold t per row (keep e >= t with e = exp(s - max s)).
t is found inside the `filter_bound` (64) most likely tokens (`top_candidates`, a two-stage top-k)
when the kept set closes inside them; otherwise (top-k > bound, or a top-p mass the bound does not
reach) `bracket_threshold` bisects the float32 bit pattern of t with one masked sum over the
vocabulary per step until few tokens remain in the bracket, and reads t off those exactly. Both
run under `lax.cond`, so no step ever sorts the vocabulary. Ties are decided on the float32
probabilities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import sharding
from jsdr.config import check, field
from jsdr.model.transformer import CACHE_AXES, CACHE_SEQ_AXIS, Model, init_cache, positions_from_segments

FINISH_REASONS = ("stop", "length")
DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
FILTER_BOUND = 64
_STOP_SLOTS = 8  # stop-id arrays are padded to a multiple of this, so their count rarely recompiles


# ---------------------------------------------------------------------------------------------
# configuration and output


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
    seed: int = field(0, "sampling seed")

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
        check(_is_int(self.seed), "seed", f"{self.seed!r} is invalid: must be an integer")

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


# ---------------------------------------------------------------------------------------------
# filters: one threshold per row on e = exp(s - max s) (max e = 1)


def _f2b(x):
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _b2f(b):
    return jax.lax.bitcast_convert_type(b.astype(jnp.int32), jnp.float32)


def _block_for(V: int, k: int) -> int:
    """Block length of the two-stage top-k (a power of two near sqrt(V / k)); 0 = plain lax.top_k."""
    if V < 16 * k:
        return 0
    return max(8, 1 << round(math.log2(math.sqrt(V / k))))


def top_candidates(e: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest values per row of e [B, V] >= 0 (descending) and their indices, equal to
    `lax.top_k(e, k)` including its tie order (lower index first), in two short passes.

    The row is cut into blocks; the k blocks with the largest maxima hold every top-k element (a
    block holding one has a maximum at least that large, and at most k blocks can), so the top-k of
    their k * block elements is the answer. Blocks are gathered in index order, which keeps ties
    resolved like one top_k over the row. On CPU this is 2-4x cheaper than lax.top_k over 32k-152k
    entries.
    """
    B, V = e.shape
    block = _block_for(V, k)
    if not block:
        return jax.lax.top_k(e, k)
    nb = -(-V // block)
    ep = jnp.pad(e, ((0, 0), (0, nb * block - V)), constant_values=-1.0).reshape(B, nb, block)
    _, bids = jax.lax.top_k(jnp.max(ep, axis=-1), k)
    bids = jnp.sort(bids, axis=-1)
    cand = jnp.take_along_axis(ep, bids[:, :, None], axis=1).reshape(B, k * block)
    vals, j = jax.lax.top_k(cand, k)
    return vals, jnp.take_along_axis(bids, j // block, axis=1) * block + j % block


def bracket_threshold(e: jax.Array, target: jax.Array, hi_value: jax.Array, f_hi: jax.Array, active: jax.Array,
                      *, mass: bool, cands: int = FILTER_BOUND, margin: float = 0.5,
                      total: jax.Array | None = None) -> jax.Array:
    """Exact keep-threshold t [B] (keep e >= t) of a descending walk over e [B, V] >= 0.

    f(x) = sum of e over e > x (`mass`) or the count of e > x; t is the smallest value of e with
    f(t) < target: the top-p cut (target = top_p * mass) or the k-th largest value (target = k).
    hi_value [B] must satisfy f(hi_value) < target, and f_hi = f(hi_value). total: the row sums of e
    when the caller has them (mass only; computed otherwise).

    Bisection on the float32 bit pattern keeps f(lo) >= target > f(hi). A row stops early once its
    bracket (lo, hi] holds fewer than `cands` elements (exactly known for counts; for mass, bounded
    by (f(lo) - f(hi)) / lo, which `margin` halves against rounding): the answer is then read off the
    `cands` largest elements <= hi with the same running sum as the bounded path. A row whose
    bracket turns out to hold more (the last candidate lies inside it) finishes the plain bisection
    to a single float, as does a row whose tie block is wider than `cands`. About log2(V / cands)
    masked sums instead of ~25. Rows with `active` False are skipped (their result is meaningless).
    """
    B, V = e.shape
    cands = min(cands, V)
    if mass:
        f_lo = jnp.sum(e, axis=-1) if total is None else total
        target, f_hi = target.astype(jnp.float32), f_hi.astype(jnp.float32)
    else:
        f_lo, target, f_hi = jnp.full((B,), V, jnp.int32), target.astype(jnp.int32), f_hi.astype(jnp.int32)
    hi = _f2b(hi_value)
    lo = jnp.where(active, _f2b(jnp.min(e, axis=-1)) - 1, hi - 1)  # -1 (min e = 0) is never evaluated

    def small_enough(lo, f_lo, f_hi):
        if mass:  # every element of (lo, hi] is > lo, so their count is < (f_lo - f_hi) / lo
            return (lo >= 0) & (f_lo - f_hi <= margin * (cands - 1) * _b2f(lo))
        return f_lo - f_hi <= cands - 1

    def bisect(state, early: bool):
        def is_open(c):
            lo, hi, f_lo, f_hi = c
            return (hi - lo > 1) & ~(early & small_enough(lo, f_lo, f_hi))

        def body(c):
            lo, hi, f_lo, f_hi = c
            op = is_open(c)
            mid = lo + (hi - lo) // 2
            above = e > _b2f(mid)[:, None]
            fm = jnp.sum(jnp.where(above, e, 0.0), axis=-1) if mass else jnp.sum(above.astype(jnp.int32), axis=-1)
            up, down = op & (fm >= target), op & (fm < target)
            return jnp.where(up, mid, lo), jnp.where(down, mid, hi), jnp.where(up, fm, f_lo), jnp.where(down, fm, f_hi)

        return jax.lax.while_loop(lambda c: jnp.any(is_open(c)), body, state)

    lo, hi, f_lo, f_hi = bisect((lo, hi, f_lo, f_hi), True)
    hv, lv = _b2f(hi), _b2f(lo)
    cv, _ = top_candidates(jnp.where(e <= hv[:, None], e, -1.0), cands)
    below_all = (lo < 0)[:, None]
    valid = (cv > lv[:, None]) | (below_all & (cv >= 0))
    w = cv if mass else jnp.ones_like(cv, jnp.int32)
    above = f_hi[:, None] + jnp.cumsum(w, axis=-1) - w  # f just above each candidate (tie blocks: first member)
    t = jnp.min(jnp.where(valid & (above < target[:, None]), cv, jnp.inf), axis=-1)
    # the bracket is covered when the last candidate lies outside it
    redo = (hi - lo > 1) & valid[:, -1]
    lo, hi, _, _ = jax.lax.cond(jnp.any(redo), lambda: bisect((jnp.where(redo, lo, hi - 1), hi, f_lo, f_hi), False),
                                lambda: (lo, hi, f_lo, f_hi))
    return jnp.where(hi - lo <= 1, _b2f(hi), t)  # rows that finished the bisection, ties, inactive rows


def filter_threshold(e: jax.Array, top_k, top_p, min_p, bound: int = FILTER_BOUND):
    """Keep-threshold t [B] of top-k -> top-p -> min-p on e [B, V] (max 1 per row), plus the bounded
    top values/indices and whether the kept set closed inside them (t > the bound-th value).

    The `bound` largest values are only computed when some row can use them: a top-k <= bound, or a
    top-p that the bound can reach (its mass is at most bound - 1 since e <= 1). A flat distribution
    (top-p over most of the vocabulary) goes straight to `bracket_threshold`.
    """
    B, V = e.shape
    KB = min(bound, V)
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
    min_p = jnp.broadcast_to(jnp.asarray(min_p, jnp.float32), (B,))
    ones = jnp.ones((B,), jnp.float32)  # the row maximum: nothing lies above it
    zeros = jnp.zeros((B,), jnp.float32)
    z_all = jnp.sum(e, axis=-1)  # the one full-row sum; the kept masses below are only recomputed under a cut

    # top-k: threshold = k-th largest value (0 = off), and the mass it keeps
    k_eff = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    small_k = (k_eff <= KB) & (k_eff < V)  # cut read off the bounded values
    big_k = (k_eff > KB) & (k_eff < V)  # cut by the bracket search

    def k_bracket():
        t = jnp.where(big_k, bracket_threshold(e, k_eff, ones, zeros, big_k, mass=False, cands=KB), 0.0)
        return t, jnp.sum(jnp.where(e >= t[:, None], e, 0.0), axis=-1)

    tk_big, zk_big = jax.lax.cond(jnp.any(big_k), k_bracket, lambda: (zeros, z_all))  # small-k rows: 0, z_all
    p_off = top_p >= 1.0
    have = jnp.any((k_eff <= KB) | (~p_off & (top_p * zk_big <= KB - 1)))

    def bounded():
        # the barrier keeps XLA from fusing the top-k into its consumers, which turns it back into a
        # full sort of the vocabulary (on CPU ~100x slower than the TopK custom call)
        return tuple(jax.lax.optimization_barrier(tuple(top_candidates(e, KB))))  # descending

    vals, idx = jax.lax.cond(have, bounded, lambda: (jnp.zeros((B, KB), jnp.float32), jnp.zeros((B, KB), jnp.int32)))
    last = jnp.where(have, vals[:, -1], jnp.inf)  # without the bounded values nothing counts as closed
    tk_small = jnp.take_along_axis(vals, jnp.clip(k_eff - 1, 0, KB - 1)[:, None], axis=1)[:, 0]
    tk = jnp.where(small_k, tk_small, tk_big)
    zk = jax.lax.cond(jnp.any(small_k), lambda: jnp.sum(jnp.where(e >= tk[:, None], e, 0.0), axis=-1),
                      lambda: zk_big)

    # top-p on the top-k distribution: keep v when the mass strictly above v is < top_p * Z_k
    p_mass = top_p * zk
    # exclusive running mass. For the first token of a tie block it is exactly the mass strictly above
    # the block; later members only see more, and the threshold is the smallest kept *value*, so a
    # block is always kept or dropped as a whole. If the last value is dropped, every smaller value
    # (all outside the bound) is dropped as well, so the kept set is closed.
    above = jnp.cumsum(vals, axis=-1) - vals  # [B, KB]
    ok = (above < p_mass[:, None]) & (vals >= tk[:, None])
    tp_small = jnp.min(jnp.where(ok, vals, jnp.inf), axis=-1)
    closed_p = p_off | (have & ((above[:, -1] >= p_mass) | (last < tk)))
    need_p = ~closed_p
    tp_big = jax.lax.cond(jnp.any(need_p),
                          lambda: bracket_threshold(e, p_mass, ones, zeros, need_p, mass=True, cands=KB, total=z_all),
                          lambda: jnp.zeros((B,), jnp.float32))
    tp = jnp.where(p_off, 0.0, jnp.where(closed_p, tp_small, tp_big))

    t = jnp.maximum(jnp.maximum(tk, tp), min_p)
    return t, vals, idx, t > last


def _first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum) as two plain reductions; XLA's CPU
    argmax (a variadic reduce) is ~10x slower on 8 x 32k logits. NaN logits are not expected."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1] - 1), axis=-1)


def _pick(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF index per row of non-negative weights [B, M] for uniforms u [B] in [0, 1)."""
    c = jnp.cumsum(weights, axis=-1)
    target = u * c[:, -1]
    j = jnp.sum((c <= target[:, None]).astype(jnp.int32), axis=-1)
    M = weights.shape[-1]
    last_pos = M - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=-1)  # guard against rounding at the top
    return jnp.minimum(j, last_pos)


def _pick_two_level(q: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Inverse-CDF over a full vocabulary row [B, V]: choose a block by its mass, then a token in it
    (two short cumulative sums instead of one over V)."""
    B, V = q.shape
    nb = -(-V // block)
    qp = jnp.pad(q, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    bsum = jnp.sum(qp, axis=-1)
    cb = jnp.cumsum(bsum, axis=-1)
    target = u * cb[:, -1]
    b = jnp.sum((cb <= target[:, None]).astype(jnp.int32), axis=-1)
    b = jnp.minimum(b, nb - 1 - jnp.argmax((bsum > 0)[:, ::-1], axis=-1))
    before = jnp.where(b > 0, jnp.take_along_axis(cb, jnp.maximum(b - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    inner = jnp.take_along_axis(qp, b[:, None, None], axis=1)[:, 0]  # [B, block]
    ci = jnp.cumsum(inner, axis=-1)
    t2 = jnp.clip(target - before, 0.0, None)
    j = jnp.sum((ci <= t2[:, None]).astype(jnp.int32), axis=-1)
    j = jnp.minimum(j, block - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1))
    return b * block + j


def sample_logits(logits: jax.Array, u: jax.Array, *, temperature, top_k=-1, top_p=1.0, min_p=0.0,
                  presence_penalty=0.0, seen: jax.Array | None = None, greedy: bool = False,
                  filtered: bool = True, bound: int = FILTER_BOUND):
    """One draw per row of logits [B, V] (float32) with uniforms u [B] in [0, 1).

    Returns (token [B] int32, logprob under the sampling distribution [B], raw logprob [B] under
    the unpenalised, unfiltered model at temperature 1). `seen` [B, V] bool marks generated tokens
    for the presence penalty. Scalars may be Python numbers or traced arrays; `greedy`, `filtered`
    and `bound` are static.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        greedy = True  # a literal 0 can only mean greedy; traced temperatures must be > 0
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    raw_lse = jax.nn.logsumexp(logits, axis=-1)
    lp = logits
    if seen is not None:
        lp = lp - jnp.asarray(presence_penalty, jnp.float32) * seen.astype(jnp.float32)
    if greedy:
        tok = _first_argmax(lp)
        logprob = jnp.zeros((B,), jnp.float32)
    else:
        s = lp / jnp.asarray(temperature, jnp.float32)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        if filtered:
            t, vals, idx, closed = filter_threshold(e, top_k, top_p, min_p, bound)

            def small():
                q = jnp.where(vals >= t[:, None], vals, 0.0)
                j = _pick(q, u)
                return jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32), jnp.sum(q, axis=-1)

            def full():
                q = jnp.where(e >= t[:, None], e, 0.0)
                return _pick_two_level(q, u).astype(jnp.int32), jnp.sum(q, axis=-1)

            tok, z = jax.lax.cond(jnp.all(closed), small, full)
        else:
            tok, z = _pick_two_level(e, u).astype(jnp.int32), jnp.sum(e, axis=-1)
        s_tok = jnp.take_along_axis(s - m, tok[:, None], axis=1)[:, 0]
        logprob = s_tok - jnp.log(z)
    raw = jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - raw_lse
    return tok, logprob, raw


# ---------------------------------------------------------------------------------------------
# the engine


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    top = max(buckets)
    return -(-n // top) * top


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Knobs(NamedTuple):
    """The traced sampling settings of one call (scalars); changing them never recompiles."""

    temperature: jax.Array  # float32; 1 for greedy calls (unused there)
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    presence_penalty: jax.Array  # float32
    top_k: jax.Array  # int32; -1 = off


class DecodeState(NamedTuple):
    """What the decode loop carries per sample row (B = prompt rows x n)."""

    tokens: jax.Array  # [B, max_new] int32, pad_id after the end
    logprobs: jax.Array  # [B, max_new] float32, under the filtered sampling distribution
    logprobs_raw: jax.Array  # [B, max_new] float32, under the model at temperature 1
    lengths: jax.Array  # [B] int32, tokens generated so far (a stop token counted)
    done: jax.Array  # [B] bool: stopped, or a padding row
    stopped: jax.Array  # [B] bool: ended by a stop token
    seen: jax.Array | None  # [B, V] bool, tokens generated so far (None without a presence penalty)


class _DecodeCarry(NamedTuple):
    step: jax.Array  # int32, the index of the next token to record
    last_token: jax.Array  # [B] int32, the token fed to the next forward
    cache: dict  # the model's KV cache
    state: DecodeState


class DecodeResult(NamedTuple):
    tokens: jax.Array
    logprobs: jax.Array
    logprobs_raw: jax.Array
    lengths: jax.Array
    stopped: jax.Array


class _HostBatch(NamedTuple):
    """Left-padded, bucketed host arrays of one `generate` call."""

    num_prompts: int  # N, the caller's prompts
    prompt_rows: int  # Bp >= N, after padding to the batch bucket
    tokens: np.ndarray  # [Bp, P] int32, left-padded with pad_id
    segment_ids: np.ndarray  # [Bp, P] int32, 1 on prompt tokens, 0 on padding
    prompt_lens: np.ndarray  # [Bp] int32
    active: np.ndarray  # [Bp] bool, False on padding rows
    row_ids: np.ndarray  # [Bp * n] int32, the sample row of every decode row (folded into the key)
    stop_ids: np.ndarray  # [slots] int32, -1 on unused slots
    knobs: Knobs
    key: jax.Array


class Sampler:
    """Holds the jitted prefill and decode programs for one model; reuse it across calls.

    Compiled programs are keyed by (prompt bucket, batch bucket, n, max_new_tokens, greedy,
    filtered, penalty on/off, number of stop slots); everything else (temperature, top-k/p, min-p,
    penalty value, stop ids, seed) is a traced value and never recompiles.

    `model` gives the config, lora_scale, attn_impl and compute dtype of the forward. The sampler
    never differentiates and never drops: the model's remat and lora_dropout are ignored. (Sampling
    with a training model whose attn_impl is a training kernel runs that kernel on the decode
    steps too; pass `dataclasses.replace(model, attn_impl="xla")` to decode with XLA attention.)
    """

    def __init__(self, model: Model, *, mesh=None, pad_id: int = 0,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, cache_dtype=None,
                 filter_bound: int = FILTER_BOUND, rules: dict | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"Sampler takes a jsdr.model.transformer.Model (e.g. Model(cfg, lora_scale=...)), "
                            f"got {type(model).__name__}")
        if not prompt_buckets or any(int(b) < 1 for b in prompt_buckets):
            raise ValueError(f"prompt_buckets={prompt_buckets!r}: need at least one positive length")
        if not (0 <= pad_id < model.cfg.vocab_size):
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {model.cfg.vocab_size})")
        if filter_bound < 1:
            raise ValueError(f"filter_bound={filter_bound} must be >= 1")
        self.model = dataclasses.replace(model, remat="none", lora_dropout=0.0)
        self.cfg = model.cfg
        self.mesh = mesh
        self.rules = rules
        self.pad_id = int(pad_id)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.cache_dtype = cache_dtype
        self.filter_bound = int(filter_bound)
        self.num_compiles = 0  # traces of the prefill/decode programs (each trace = one compile)
        self.prefill_rows = 0  # prompt rows that went through prefill (padding rows included)
        self.decode_rows = 0
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("n", "max_new", "greedy", "filtered", "penalty"))

    # ----- traced bodies

    def _ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    def _cache_dtype(self, params):
        if self.cache_dtype is not None:
            return self.cache_dtype
        if self.model.dtype is not None:
            return jnp.dtype(self.model.dtype)
        return params["embed_tokens"]["embedding"].dtype

    def _prefill_impl(self, params, lora, tokens, segment_ids):
        self.num_compiles += 1
        prompt_rows, prompt_len = tokens.shape
        cache = init_cache(self.cfg, prompt_rows, prompt_len, self._cache_dtype(params))
        h, cache = self.model.hidden(params, lora, tokens=tokens, positions=positions_from_segments(segment_ids),
                                     segment_ids=segment_ids, cache=cache)
        logits = self.model.logits(params, h[:, -1])
        return logits, cache["k"], cache["v"]

    def _decode_impl(self, params, lora, logits0, prompt_k, prompt_v, segment_ids, prompt_lens, active, row_ids, key,
                     knobs: Knobs, stop_ids, *, n, max_new, greedy, filtered, penalty) -> DecodeResult:
        self.num_compiles += 1
        prompt_rows, prompt_len = segment_ids.shape
        B = prompt_rows * n
        V = self.cfg.vocab_size
        constrain = sharding.constrain

        def repeat_rows(x, axis=0):  # the n samples of a prompt are adjacent rows
            return jnp.repeat(x, n, axis=axis) if n > 1 else x

        def widen(x, name):  # n copies of every prompt row, then max_new empty slots
            pad = [(0, 0)] * x.ndim
            pad[CACHE_SEQ_AXIS[name]] = (0, max_new)
            return constrain(jnp.pad(repeat_rows(x, axis=1), pad), CACHE_AXES[name])

        cache = {"k": widen(prompt_k, "k"), "v": widen(prompt_v, "v"),
                 "segment_ids": constrain(jnp.pad(repeat_rows(segment_ids), ((0, 0), (0, max_new))),
                                          ("act_batch", "cache_seq")),
                 "index": jnp.asarray(prompt_len, jnp.int32)}
        logits = constrain(repeat_rows(logits0), ("act_batch", None))
        lens = repeat_rows(prompt_lens)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)

        def draw(logits, seen, step):
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(row_keys)
            return sample_logits(logits, u, temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p,
                                 min_p=knobs.min_p, presence_penalty=knobs.presence_penalty, seen=seen,
                                 greedy=greedy, filtered=filtered, bound=self.filter_bound)

        def is_stop(tok):
            return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

        def record(st: DecodeState, tok, lp, raw, step) -> tuple[DecodeState, jax.Array]:
            tok = jnp.where(st.done, self.pad_id, tok)
            lp = jnp.where(st.done, 0.0, lp)
            raw = jnp.where(st.done, 0.0, raw)
            hit = ~st.done & is_stop(tok)
            st = DecodeState(
                tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], step, axis=1),
                logprobs=jax.lax.dynamic_update_slice_in_dim(st.logprobs, lp[:, None], step, axis=1),
                logprobs_raw=jax.lax.dynamic_update_slice_in_dim(st.logprobs_raw, raw[:, None], step, axis=1),
                lengths=jnp.where(st.done, st.lengths, step + 1),
                done=st.done | hit,
                stopped=st.stopped | hit,
                seen=None if st.seen is None else st.seen.at[jnp.arange(B), tok].set(True))
            return st, tok

        state = DecodeState(tokens=jnp.full((B, max_new), self.pad_id, jnp.int32),
                            logprobs=jnp.zeros((B, max_new), jnp.float32),
                            logprobs_raw=jnp.zeros((B, max_new), jnp.float32),
                            lengths=jnp.zeros((B,), jnp.int32),
                            done=~repeat_rows(active),
                            stopped=jnp.zeros((B,), bool),
                            seen=jnp.zeros((B, V), bool) if penalty else None)
        tok, lp, raw = draw(logits, state.seen, 0)
        state, tok = record(state, tok, lp, raw, 0)

        def cond(c: _DecodeCarry):
            return (c.step < max_new) & ~jnp.all(c.state.done)

        def body(c: _DecodeCarry) -> _DecodeCarry:
            pos = (lens + c.step - 1)[:, None]
            h, cache = self.model.hidden(params, lora, tokens=c.last_token[:, None], positions=pos,
                                         segment_ids=jnp.ones_like(pos), cache=c.cache)
            logits = constrain(self.model.logits(params, h[:, 0]), ("act_batch", None))
            tok, lp, raw = draw(logits, c.state.seen, c.step)
            state, tok = record(c.state, tok, lp, raw, c.step)
            return _DecodeCarry(step=c.step + 1, last_token=tok, cache=cache, state=state)

        final = jax.lax.while_loop(cond, body, _DecodeCarry(step=jnp.asarray(1, jnp.int32), last_token=tok,
                                                            cache=cache, state=state)).state
        return DecodeResult(tokens=final.tokens, logprobs=final.logprobs, logprobs_raw=final.logprobs_raw,
                            lengths=final.lengths, stopped=final.stopped)

    # ----- host side

    def _check_prompts(self, prompts) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty sequence of token-id sequences")
        out = []
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            a = np.asarray(p)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids (got shape {a.shape})")
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"prompt {i}: token ids must be integers (got dtype {a.dtype})")
            if a.min() < 0 or a.max() >= V:
                raise ValueError(f"prompt {i}: token id {int(a.min() if a.min() < 0 else a.max())} is outside "
                                 f"the vocabulary [0, {V})")
            out.append(a.astype(np.int32))
        return out

    def batch_bucket(self, num_prompts: int) -> int:
        """Prompt rows after padding: a power of two, rounded up to the data-parallel size."""
        b = _pow2_at_least(num_prompts)
        if self.mesh is not None:
            dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            b = -(-b // dp) * dp
        return b

    def _put(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(x.ndim, self.mesh, self.rules, shape=x.shape))

    def _host_inputs(self, prompts, sc: SamplingConfig, rng) -> _HostBatch:
        if not isinstance(sc, SamplingConfig):
            raise TypeError(f"sc must be a SamplingConfig, got {type(sc).__name__}")
        rows = self._check_prompts(prompts)
        num_prompts = len(rows)
        P = _bucket(max(len(r) for r in rows), self.prompt_buckets)
        if P + sc.max_new_tokens > self.cfg.max_position_embeddings:
            warnings.warn(f"prompt bucket {P} + max_new_tokens {sc.max_new_tokens} exceeds the model's "
                          f"max_position_embeddings={self.cfg.max_position_embeddings}", stacklevel=3)
        prompt_rows = self.batch_bucket(num_prompts)
        tokens = np.full((prompt_rows, P), self.pad_id, np.int32)
        segment_ids = np.zeros((prompt_rows, P), np.int32)
        prompt_lens = np.zeros((prompt_rows,), np.int32)
        for i, r in enumerate(rows):
            tokens[i, P - len(r):] = r
            segment_ids[i, P - len(r):] = 1
            prompt_lens[i] = len(r)
        stops = list(sc.stop_token_ids)
        slots = max(_STOP_SLOTS, -(-len(stops) // _STOP_SLOTS) * _STOP_SLOTS)
        stop_ids = np.full((slots,), -1, np.int32)
        stop_ids[:len(stops)] = stops
        knobs = Knobs(temperature=jnp.asarray(sc.temperature if sc.temperature > 0 else 1.0, jnp.float32),
                      top_p=jnp.asarray(sc.top_p, jnp.float32), min_p=jnp.asarray(sc.min_p, jnp.float32),
                      presence_penalty=jnp.asarray(sc.presence_penalty, jnp.float32),
                      top_k=jnp.asarray(sc.top_k, jnp.int32))
        return _HostBatch(num_prompts=num_prompts, prompt_rows=prompt_rows, tokens=tokens, segment_ids=segment_ids,
                          prompt_lens=prompt_lens, active=np.arange(prompt_rows) < num_prompts,
                          row_ids=np.arange(prompt_rows * sc.n, dtype=np.int32), stop_ids=stop_ids, knobs=knobs,
                          key=jax.random.PRNGKey(sc.seed) if rng is None else rng)

    def _decode_args(self, x: _HostBatch, logits0, prompt_k, prompt_v, put=None) -> dict:
        put = put or self._put
        return dict(logits0=logits0, prompt_k=prompt_k, prompt_v=prompt_v, segment_ids=put(x.segment_ids),
                    prompt_lens=put(x.prompt_lens), active=put(x.active), row_ids=put(x.row_ids),
                    key=x.key, knobs=x.knobs, stop_ids=jnp.asarray(x.stop_ids))

    @staticmethod
    def _decode_static(sc: SamplingConfig) -> dict:
        return dict(n=sc.n, max_new=sc.max_new_tokens, greedy=sc.greedy, filtered=sc.filtered,
                    penalty=sc.presence_penalty != 0)

    def generate(self, params, lora, prompts: Sequence[Sequence[int]], sc: SamplingConfig,
                 rng: jax.Array | None = None) -> SampleOutput:
        """Sample `sc.n` completions for every prompt; see the module docstring for the semantics."""
        x = self._host_inputs(prompts, sc, rng)
        rows = x.num_prompts * sc.n
        with self._ctx():
            logits0, prompt_k, prompt_v = self._prefill(params, lora, self._put(x.tokens), self._put(x.segment_ids))
            self.prefill_rows += x.prompt_rows
            self.decode_rows += x.prompt_rows * sc.n
            out = self._decode(params, lora, **self._decode_args(x, logits0, prompt_k, prompt_v),
                               **self._decode_static(sc))
        out = DecodeResult(*(np.asarray(a)[:rows] for a in out))
        return SampleOutput(tokens=out.tokens, logprobs=out.logprobs, logprobs_raw=out.logprobs_raw,
                            lengths=out.lengths.astype(np.int32),
                            finish_reason=np.where(out.stopped, 0, 1).astype(np.int8),
                            prompt_index=(np.arange(rows) // sc.n).astype(np.int32))

    def compile_programs(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """The compiled (never run) prefill and decode programs of a `generate` call with `num_prompts`
        prompts of `prompt_len` tokens: {"prefill": Compiled, "decode": Compiled}. params and lora may
        be arrays or jax.ShapeDtypeStructs with shardings; every other input is abstract too, so the
        mesh may hold compile-only devices (jsdr.plan)."""
        if num_prompts < 1 or prompt_len < 1:
            raise ValueError(f"num_prompts={num_prompts} and prompt_len={prompt_len} must be >= 1")
        x = self._host_inputs([[self.pad_id] * prompt_len] * num_prompts, sc, None)

        def spec(a):  # a batch input: abstract, split over the data-parallel axes like _put
            a = np.asarray(a)
            where = None if self.mesh is None else sharding.batch_sharding(a.ndim, self.mesh, self.rules, shape=a.shape)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where)
        compiles = self.num_compiles
        with self._ctx():
            tokens, segment_ids = spec(x.tokens), spec(x.segment_ids)
            prefill = self._prefill.lower(params, lora, tokens, segment_ids).compile()
            logits0, prompt_k, prompt_v = jax.eval_shape(self._prefill, params, lora, tokens, segment_ids)
            args = self._decode_args(x, logits0, prompt_k, prompt_v, put=spec)
            for k in ("key", "knobs", "stop_ids"):  # small replicated inputs: abstract, unplaced
                args[k] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args[k])
            decode = self._decode.lower(params, lora, **args, **self._decode_static(sc)).compile()
        self.num_compiles = compiles  # analysis compiles are not generate's programs
        return {"prefill": prefill, "decode": decode}

    def memory_analysis(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """XLA's memory analysis of the prefill and decode programs of a `generate` call with
        `num_prompts` prompts of `prompt_len` tokens: {"prefill"|"decode": {"argument", "output",
        "temp"}} in bytes (per device under a mesh). The programs are compiled, not run; params and
        lora may be arrays or jax.ShapeDtypeStructs. The decode "argument" holds the params and the
        prompt cache, "temp" the widened KV cache (n samples x (prompt bucket + max_new_tokens)) and
        the loop's buffers: what a rollout batch needs on the device beyond the weights.
        """
        out = {}
        for name, prog in self.compile_programs(params, lora, num_prompts, prompt_len, sc).items():
            ma = prog.memory_analysis()
            out[name] = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
                         "temp": int(ma.temp_size_in_bytes)}
        return out
