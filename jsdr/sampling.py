"""Jitted sampling engine: bucketed prefill, n samples per prompt from one prefill, a decode loop
inside `jax.lax.while_loop`, exact probability filters without a full vocabulary sort.

    sampler = Sampler(cfg, pad_id=tok.pad_token_id)
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

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import sharding
from jsdr.model import transformer as T
from jsdr.model.transformer import ModelConfig

FINISH_REASONS = ("stop", "length")
DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
FILTER_BOUND = 64
_STOP_SLOTS = 8  # stop-id arrays are padded to a multiple of this, so their count rarely recompiles


# ---------------------------------------------------------------------------------------------
# configuration and output


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to draw completions. temperature 0 = greedy; top_k -1 = off; top_p 1 = off; min_p 0 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        def bad(field, value, allowed):
            raise ValueError(f"SamplingConfig.{field}={value!r} is invalid: {allowed}")

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        if not is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if not is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            bad("top_k", self.top_k, "must be -1 (off) or an integer >= 1")
        if not is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad("min_p", self.min_p, "must be in [0, 1] (0 = off)")
        if not is_num(self.presence_penalty) or not (-2.0 <= self.presence_penalty <= 2.0):
            bad("presence_penalty", self.presence_penalty, "must be in [-2, 2] (0 = off)")
        if not is_int(self.n) or self.n < 1:
            bad("n", self.n, "must be an integer >= 1 (samples per prompt)")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        stops = self.stop_token_ids
        if isinstance(stops, (int, np.integer)):
            stops = (int(stops),)
        try:
            stops = tuple(int(s) for s in stops)
        except TypeError:
            bad("stop_token_ids", self.stop_token_ids, "must be a sequence of token ids")
        if any(s < 0 for s in stops):
            bad("stop_token_ids", self.stop_token_ids, "token ids must be >= 0")
        object.__setattr__(self, "stop_token_ids", stops)
        if not is_int(self.seed):
            bad("seed", self.seed, "must be an integer")

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


def filtered_probs_reference(logits: np.ndarray, sc: SamplingConfig, seen: np.ndarray | None = None) -> np.ndarray:
    """Float64 numpy statement of the filter rules (for documentation and cross-checks; tests keep
    their own independent version)."""
    lg = np.asarray(logits, np.float64)
    if seen is not None:
        lg = lg - sc.presence_penalty * np.asarray(seen, np.float64)
    if sc.greedy:
        out = np.zeros_like(lg)
        out[np.arange(lg.shape[0]), lg.argmax(-1)] = 1.0
        return out
    s = lg / sc.temperature
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = np.ones_like(p, bool)
    if sc.top_k != -1:
        kth = -np.sort(-p, axis=-1)[:, min(sc.top_k, p.shape[1]) - 1]
        keep &= p >= kth[:, None]
    if sc.top_p < 1:
        pk = np.where(keep, p, 0)
        pk /= pk.sum(-1, keepdims=True)
        above = (pk[:, None, :] * (pk[:, None, :] > pk[:, :, None])).sum(-1)
        keep &= above < sc.top_p
    keep &= p >= sc.min_p * p.max(-1, keepdims=True)
    q = np.where(keep, p, 0)
    return q / q.sum(-1, keepdims=True)


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


class Sampler:
    """Holds the jitted prefill and decode programs for one model config; reuse it across calls.

    Compiled programs are keyed by (prompt bucket, batch bucket, n, max_new_tokens, greedy,
    filtered, penalty on/off, number of stop slots); everything else (temperature, top-k/p, min-p,
    penalty value, stop ids, seed) is a traced value and never recompiles.
    """

    def __init__(self, model_cfg: ModelConfig, *, lora_scale: float = 1.0, mesh=None, pad_id: int = 0,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, cache_dtype=None,
                 attn_impl: str = "xla", filter_bound: int = FILTER_BOUND, rules: dict | None = None):
        if not prompt_buckets or any(int(b) < 1 for b in prompt_buckets):
            raise ValueError(f"prompt_buckets={prompt_buckets!r}: need at least one positive length")
        if not (0 <= pad_id < model_cfg.vocab_size):
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {model_cfg.vocab_size})")
        if filter_bound < 1:
            raise ValueError(f"filter_bound={filter_bound} must be >= 1")
        self.cfg = model_cfg
        self.lora_scale = float(lora_scale)
        self.mesh = mesh
        self.rules = rules
        self.pad_id = int(pad_id)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.cache_dtype = cache_dtype
        self.attn_impl = attn_impl
        self.filter_bound = int(filter_bound)
        self.num_compiles = 0  # traces of the prefill/decode programs (each trace = one compile)
        self.prefill_rows = 0  # prompt rows that went through prefill (padding rows included)
        self.decode_rows = 0
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("n", "max_new", "greedy", "filtered", "penalty"))

    # ----- traced bodies

    def _ctx(self):
        if self.mesh is None:
            import contextlib
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    def _cache_dtype(self, params):
        return self.cache_dtype or params["embed_tokens"]["embedding"].dtype

    def _prefill_impl(self, params, lora, tokens, seg):
        self.num_compiles += 1
        cfg = self.cfg
        Bp, P = tokens.shape
        pos = T.positions_from_segments(seg)
        cache = T.init_cache(cfg, Bp, P, self._cache_dtype(params))
        h, cache = T.forward_hidden(params, tokens, pos, seg, cfg, lora, self.lora_scale, cache=cache,
                                    attn_impl=self.attn_impl)
        logits = T.lm_head(params, h[:, -1], cfg)
        return logits, cache["k"], cache["v"]

    def _decode_impl(self, params, lora, logits0, pk, pv, seg, prompt_lens, active, row_ids, key, knobs,
                     stop_ids, *, n, max_new, greedy, filtered, penalty):
        self.num_compiles += 1
        cfg = self.cfg
        Bp, P = seg.shape
        B = Bp * n
        V = cfg.vocab_size
        con = sharding.constrain

        def rep(x, axis=0):
            return jnp.repeat(x, n, axis=axis) if n > 1 else x

        def widen(x, name):  # n copies of every prompt row, then max_new empty slots
            pad = [(0, 0)] * x.ndim
            pad[T.CACHE_SEQ_AXIS[name]] = (0, max_new)
            return con(jnp.pad(rep(x, 1), pad), T.CACHE_AXES[name])

        cache = {"k": widen(pk, "k"), "v": widen(pv, "v"),
                 "segment_ids": con(jnp.pad(rep(seg), ((0, 0), (0, max_new))), ("act_batch", "cache_seq")),
                 "index": jnp.asarray(P, jnp.int32)}
        logits = con(rep(logits0), ("act_batch", None))
        lens = rep(prompt_lens)
        done = ~rep(active)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)
        temperature, top_p, min_p, pen = knobs[0], knobs[1], knobs[2], knobs[3]
        top_k = knobs[4].astype(jnp.int32)

        def draw(logits, seen, step):
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(row_keys)
            return sample_logits(logits, u, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 presence_penalty=pen, seen=seen, greedy=greedy, filtered=filtered,
                                 bound=self.filter_bound)

        def is_stop(tok):
            return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

        def record(state, tok, lp, raw, step):
            out_t, out_lp, out_raw, lengths, done, stopped, seen = state
            tok = jnp.where(done, self.pad_id, tok)
            lp = jnp.where(done, 0.0, lp)
            raw = jnp.where(done, 0.0, raw)
            out_t = jax.lax.dynamic_update_slice_in_dim(out_t, tok[:, None], step, axis=1)
            out_lp = jax.lax.dynamic_update_slice_in_dim(out_lp, lp[:, None], step, axis=1)
            out_raw = jax.lax.dynamic_update_slice_in_dim(out_raw, raw[:, None], step, axis=1)
            lengths = jnp.where(done, lengths, step + 1)
            hit = ~done & is_stop(tok)
            stopped = stopped | hit
            if seen is not None:
                seen = seen.at[jnp.arange(B), tok].set(True)
            return (out_t, out_lp, out_raw, lengths, done | hit, stopped, seen), tok

        seen0 = jnp.zeros((B, V), bool) if penalty else None
        state = (jnp.full((B, max_new), self.pad_id, jnp.int32), jnp.zeros((B, max_new), jnp.float32),
                 jnp.zeros((B, max_new), jnp.float32), jnp.zeros((B,), jnp.int32), done, jnp.zeros((B,), bool),
                 seen0)
        tok, lp, raw = draw(logits, seen0, 0)
        state, tok = record(state, tok, lp, raw, 0)

        def cond(c):
            step, _, _, st = c
            return (step < max_new) & ~jnp.all(st[4])

        def body(c):
            step, tok, cache, st = c
            pos = (lens + step - 1)[:, None]
            h, cache = T.forward_hidden(params, tok[:, None], pos, jnp.ones_like(pos), cfg, lora, self.lora_scale,
                                        cache=cache, attn_impl=self.attn_impl)
            logits = con(T.lm_head(params, h[:, 0], cfg), ("act_batch", None))
            ntok, lp, raw = draw(logits, st[6], step)
            st, ntok = record(st, ntok, lp, raw, step)
            return step + 1, ntok, cache, st

        _, _, _, state = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), tok, cache, state))
        out_t, out_lp, out_raw, lengths, _, stopped, _ = state
        return out_t, out_lp, out_raw, lengths, stopped

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

    def _host_inputs(self, prompts, sc: SamplingConfig, rng) -> dict:
        """Left-padded, bucketed host arrays of one call (see `generate`)."""
        if not isinstance(sc, SamplingConfig):
            raise TypeError(f"sc must be a SamplingConfig, got {type(sc).__name__}")
        rows = self._check_prompts(prompts)
        N = len(rows)
        P = _bucket(max(len(r) for r in rows), self.prompt_buckets)
        if P + sc.max_new_tokens > self.cfg.max_position_embeddings:
            import warnings
            warnings.warn(f"prompt bucket {P} + max_new_tokens {sc.max_new_tokens} exceeds the model's "
                          f"max_position_embeddings={self.cfg.max_position_embeddings}", stacklevel=3)
        Bp = self.batch_bucket(N)
        tokens = np.full((Bp, P), self.pad_id, np.int32)
        seg = np.zeros((Bp, P), np.int32)
        lens = np.zeros((Bp,), np.int32)
        for i, r in enumerate(rows):
            tokens[i, P - len(r):] = r
            seg[i, P - len(r):] = 1
            lens[i] = len(r)
        stops = list(sc.stop_token_ids)
        slots = max(_STOP_SLOTS, -(-len(stops) // _STOP_SLOTS) * _STOP_SLOTS)
        stop_arr = np.full((slots,), -1, np.int32)
        stop_arr[:len(stops)] = stops
        knobs = np.array([sc.temperature if sc.temperature > 0 else 1.0, sc.top_p, sc.min_p, sc.presence_penalty,
                          sc.top_k], np.float32)
        return dict(N=N, Bp=Bp, tokens=tokens, seg=seg, lens=lens, active=np.arange(Bp) < N,
                    row_ids=np.arange(Bp * sc.n, dtype=np.int32), stop_arr=stop_arr, knobs=knobs,
                    key=jax.random.PRNGKey(sc.seed) if rng is None else rng)

    def _decode_args(self, x: dict, logits0, pk, pv) -> tuple:
        return (logits0, pk, pv, self._put(x["seg"]), self._put(x["lens"]), self._put(x["active"]),
                self._put(x["row_ids"]), x["key"], jnp.asarray(x["knobs"]), jnp.asarray(x["stop_arr"]))

    @staticmethod
    def _decode_static(sc: SamplingConfig) -> dict:
        return dict(n=sc.n, max_new=sc.max_new_tokens, greedy=sc.greedy, filtered=sc.filtered,
                    penalty=sc.presence_penalty != 0)

    def generate(self, params, lora, prompts: Sequence[Sequence[int]], sc: SamplingConfig,
                 rng: jax.Array | None = None) -> SampleOutput:
        """Sample `sc.n` completions for every prompt; see the module docstring for the semantics."""
        x = self._host_inputs(prompts, sc, rng)
        N, n = x["N"], sc.n
        with self._ctx():
            logits0, pk, pv = self._prefill(params, lora, self._put(x["tokens"]), self._put(x["seg"]))
            self.prefill_rows += x["Bp"]
            self.decode_rows += x["Bp"] * n
            out = self._decode(params, lora, *self._decode_args(x, logits0, pk, pv), **self._decode_static(sc))
        out_t, out_lp, out_raw, lengths, stopped = (np.asarray(a)[:N * n] for a in out)
        return SampleOutput(tokens=out_t, logprobs=out_lp, logprobs_raw=out_raw, lengths=lengths.astype(np.int32),
                            finish_reason=np.where(stopped, 0, 1).astype(np.int8),
                            prompt_index=(np.arange(N * n) // n).astype(np.int32))

    def memory_analysis(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """XLA's memory analysis of the prefill and decode programs of a `generate` call with
        `num_prompts` prompts of `prompt_len` tokens: {"prefill"|"decode": {"argument", "output",
        "temp"}} in bytes (per device under a mesh). The programs are compiled, not run; params and
        lora may be arrays or jax.ShapeDtypeStructs. The decode "argument" holds the params and the
        prompt cache, "temp" the widened KV cache (n samples x (prompt bucket + max_new_tokens)) and
        the loop's buffers: what a rollout batch needs on the device beyond the weights.
        """
        if num_prompts < 1 or prompt_len < 1:
            raise ValueError(f"num_prompts={num_prompts} and prompt_len={prompt_len} must be >= 1")
        x = self._host_inputs([[self.pad_id] * prompt_len] * num_prompts, sc, None)
        compiles = self.num_compiles
        with self._ctx():
            tokens, seg = self._put(x["tokens"]), self._put(x["seg"])
            prefill = self._prefill.lower(params, lora, tokens, seg).compile()
            logits0, pk, pv = jax.eval_shape(self._prefill, params, lora, tokens, seg)
            decode = self._decode.lower(params, lora, *self._decode_args(x, logits0, pk, pv),
                                        **self._decode_static(sc)).compile()
        self.num_compiles = compiles  # analysis compiles are not generate's programs
        out = {}
        for name, prog in (("prefill", prefill), ("decode", decode)):
            ma = prog.memory_analysis()
            out[name] = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
                         "temp": int(ma.temp_size_in_bytes)}
        return out


_SAMPLERS: dict[Any, Sampler] = {}


def generate(params, lora, prompts: Sequence[Sequence[int]], sc: SamplingConfig, *, cfg: ModelConfig,
             rng: jax.Array | None = None, **kw) -> SampleOutput:
    """One-call convenience: a cached `Sampler(cfg, **kw)` per (cfg, kw), then `generate`."""
    try:
        k = (cfg, tuple(sorted(kw.items())))
        hash(k)
    except TypeError:
        return Sampler(cfg, **kw).generate(params, lora, prompts, sc, rng)
    if k not in _SAMPLERS:
        if len(_SAMPLERS) >= 8:
            _SAMPLERS.pop(next(iter(_SAMPLERS)))
        _SAMPLERS[k] = Sampler(cfg, **kw)
    return _SAMPLERS[k].generate(params, lora, prompts, sc, rng)
