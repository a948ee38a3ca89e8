"""Chunked lm-head machinery shared by every loss, and the OPSD divergences.

The vocabulary of modern LLMs is large (151,936 for Qwen3), so the logits of one sequence of a few
thousand positions are gigabytes in float32, and a loss that materializes them (plus their softmax
and their gradient) for a student and a teacher would need several such buffers. Every head here
instead works on *chunks of positions*:

1. the final hidden states are gathered at the positions that matter ([B, N, E]; for OPSD the
   rollout positions of each role, see `gather_positions`),
2. the N axis is cut into chunks of `chunk_size` positions and `lax.map` runs one chunk at a time,
3. the per-chunk function (lm-head matmul, log-softmax, divergence / log-prob / cross-entropy) is
   wrapped in `jax.checkpoint`, so the backward pass recomputes the chunk's logits instead of
   storing them: only [B, c, V] logits exist at any time, forward or backward,
4. the chunk function returns per-position scalars ([B, c] each); reductions over positions and
   sequences happen outside on [B, N] arrays, which are tiny.

The batch axis is kept as the leading axis of every chunk so that data-parallel sharding of the
batch survives the chunking, and the vocabulary axis of the chunk logits is constrained to the
"act_vocab" logical axis (tensor parallel) like the model's own lm-head.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jsdr.sharding import constrain

DEFAULT_CHUNK = 128  # positions per chunk; [B, 128, V] f32 logits = 74 MiB per sequence for Qwen3

Pytree = Any


# ---------------------------------------------------------------------------------------------
# chunking


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, E], index int [B, N] -> hidden[b, index[b, n]] as [B, N, E].

    Indices are clipped into [0, T) so masked entries may hold any value (0 by convention)."""
    T = hidden.shape[1]
    idx = jnp.clip(index.astype(jnp.int32), 0, T - 1)
    return jnp.take_along_axis(hidden, idx[:, :, None], axis=1)


def chunked_positions(fn: Callable[[Pytree], Pytree], xs: Pytree, chunk_size: int | None,
                      remat: bool = True) -> Pytree:
    """Apply `fn` to chunks of positions of `xs` and concatenate the results.

    xs: a pytree of arrays that all start with [B, N, ...]. `fn` receives the same pytree with
    [B, c, ...] leaves and returns a pytree of [B, c, ...] leaves (per-position values). N is padded
    with zeros to a multiple of c; the padded positions are dropped from the result. With
    `remat`, `fn` is wrapped in `jax.checkpoint`, so its intermediates (the [B, c, V] logits) are
    recomputed in the backward pass instead of being stored for all chunks. `chunk_size` None or
    >= N runs one chunk (still rematerialized when `remat`).
    """
    f = jax.checkpoint(fn, prevent_cse=False) if remat else fn
    leaves = jax.tree.leaves(xs)
    B, N = leaves[0].shape[:2]
    if chunk_size is None or chunk_size <= 0 or chunk_size >= N:
        return f(xs)
    c = int(chunk_size)
    nc = math.ceil(N / c)
    pad = nc * c - N

    def split(x):
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, nc, c, *x.shape[2:]), 1, 0)

    def merge(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(B, nc * c, *y.shape[3:])[:, :N]

    ys = jax.lax.map(f, jax.tree.map(split, xs))
    return jax.tree.map(merge, ys)


def gathered_kernel(kernel: jax.Array) -> jax.Array:
    """The [E, V] lm-head with its hidden axis whole on every device (the vocabulary stays split as the
    rules say): constrained once before the chunk loop, so the kernel is all-gathered once per loss
    call instead of once per chunk (jsdr.plan counted the per-chunk gather: most of a GRPO step's
    all-gather traffic under fsdp)."""
    return constrain(kernel, (None, "act_vocab"))


def head_logits(h: jax.Array, kernel: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[B, c, E] hidden x [E, V] kernel -> [B, c, V] float32 logits (divided by `temperature`)."""
    logits = jnp.einsum("bce,ev->bcv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _take(x, idx):
    return jnp.take_along_axis(x, idx[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logp(logp: jax.Array) -> jax.Array:
    """Shannon entropy (nats) over the last axis from log-probabilities."""
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------
# per-position heads (log-probs / cross-entropy)


def token_logprobs(hidden: jax.Array, targets: jax.Array, kernel: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int | None = DEFAULT_CHUNK, with_entropy: bool = False):
    """log p(targets[b, t] | hidden[b, t]) as [B, T] float32, computed chunk by chunk.

    With `with_entropy`, also the entropy of each position's distribution (stop-gradient), so the
    result is (logp, entropy)."""
    kernel = gathered_kernel(kernel)

    def fn(x):
        logits = head_logits(x["h"], kernel, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        out = {"logp": _take(logits, x["y"]) - lse}
        if with_entropy:
            logp = jax.lax.stop_gradient(logits - lse[..., None])
            out["entropy"] = entropy_from_logp(logp)
        return out

    out = chunked_positions(fn, {"h": hidden, "y": targets}, chunk_size)
    return (out["logp"], out["entropy"]) if with_entropy else out["logp"]


def cross_entropy(hidden: jax.Array, targets: jax.Array, kernel: jax.Array, *,
                  chunk_size: int | None = DEFAULT_CHUNK):
    """Next-token cross-entropy [B, T] (nats) and argmax-correctness [B, T] (f32, stop-gradient)."""
    kernel = gathered_kernel(kernel)

    def fn(x):
        logits = head_logits(x["h"], kernel)
        ce = jax.nn.logsumexp(logits, axis=-1) - _take(logits, x["y"])
        correct = (jnp.argmax(jax.lax.stop_gradient(logits), axis=-1) == x["y"]).astype(jnp.float32)
        return {"ce": ce, "correct": correct}

    out = chunked_positions(fn, {"h": hidden, "y": targets}, chunk_size)
    return out["ce"], out["correct"]


# ---------------------------------------------------------------------------------------------
# divergences between a teacher and a student distribution


def jsd_terms(t_logp: jax.Array, s_logp: jax.Array, beta: float) -> jax.Array:
    """Per-vocabulary-entry terms of the generalized JSD (TRL convention); their sum over the last
    axis is the divergence.

    m = beta p_T + (1 - beta) p_S;  JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m);
    beta = 0 is the forward KL(p_T || p_S) and beta = 1 the reverse KL(p_S || p_T) (the limits,
    computed directly)."""
    beta = float(beta)
    p_t, p_s = jnp.exp(t_logp), jnp.exp(s_logp)
    if beta == 0.0:
        return p_t * (t_logp - s_logp)
    if beta == 1.0:
        return p_s * (s_logp - t_logp)
    log_m = _log_mixture(p_t, p_s, beta)
    return beta * p_t * (t_logp - log_m) + (1.0 - beta) * p_s * (s_logp - log_m)


def _log_mixture(p_t: jax.Array, p_s: jax.Array, beta: float) -> jax.Array:
    """log(beta p_T + (1 - beta) p_S) from the probabilities, which the terms need anyway: one log
    per vocabulary entry, where the logaddexp of the log-probabilities costs an exp and a log1p (on
    CPU that was 8% of an OPSD step, see docs/performance.md). The floor at the smallest normal
    float keeps it finite where both probabilities underflow; every term weighs such an entry by a
    probability below 1e-38."""
    mix = beta * p_t + (1.0 - beta) * p_s
    return jnp.log(jnp.maximum(mix, jnp.finfo(mix.dtype).tiny))


def _divergence_grad(s_logp, t_logp, terms, div, beta, clip_tau, clip_mode):
    """d(per-token loss)/d(student logits), written out so the backward pass needs no stored
    intermediates: with H_v = d loss / d log p_S(v) (each term depends on p_S(v) only),
    the gradient through the log-softmax is H - p_S * sum(H)."""
    p_s = jnp.exp(s_logp)
    if beta == 0.0:  # sum p_T (log p_T - log p_S)
        h = -jnp.exp(t_logp)
    elif beta == 1.0:  # sum p_S (log p_S - log p_T)
        h = p_s * (s_logp - t_logp + 1.0)
    else:  # d/dp_S(v) of the JSD terms is (1 - beta) log(p_S(v) / m(v))
        h = (1.0 - beta) * p_s * (s_logp - _log_mixture(jnp.exp(t_logp), p_s, beta))
    if clip_tau is not None:
        if clip_mode == "token":
            h = h * (div <= clip_tau)[..., None].astype(h.dtype)
        else:
            h = jnp.where(terms <= clip_tau, h, 0.0)
    return h - p_s * jnp.sum(h, axis=-1, keepdims=True)


def _divergence_values(s_logits, t_logits, opts):
    beta, clip_tau, clip_mode = opts
    s_logp = jax.nn.log_softmax(s_logits, axis=-1)
    t_logp = jax.nn.log_softmax(t_logits, axis=-1)
    terms = jsd_terms(t_logp, s_logp, beta)
    div = jnp.sum(terms, axis=-1)
    if clip_tau is None:
        loss, clipped = div, jnp.zeros_like(div)
    elif clip_mode == "token":
        loss = jnp.minimum(div, clip_tau)
        clipped = (div > clip_tau).astype(jnp.float32)
    else:  # "vocab": every vocabulary entry's contribution is capped at tau
        loss = jnp.sum(jnp.minimum(terms, clip_tau), axis=-1)
        clipped = jnp.any(terms > clip_tau, axis=-1).astype(jnp.float32)
    aux = {"div": div, "clipped": clipped, "s_ent": entropy_from_logp(s_logp), "t_ent": entropy_from_logp(t_logp)}
    return loss, aux, (s_logp, t_logp, terms, div)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def divergence_loss(s_logits, t_logits, opts):
    """Per-position (optionally clipped) generalized JSD between softmax(t_logits) and
    softmax(s_logits) over the last axis, with a hand-written gradient w.r.t. the student logits
    (the teacher gets none). opts = (beta, clip_tau or None, clip_mode). Returns (loss, aux) with
    aux = {div (unclipped), clipped (0/1), s_ent, t_ent}; aux carries no gradient."""
    loss, aux, _ = _divergence_values(s_logits, t_logits, opts)
    return loss, aux


def _divergence_fwd(s_logits, t_logits, opts):
    loss, aux, _ = _divergence_values(s_logits, t_logits, opts)
    return (loss, aux), (s_logits, t_logits)


def _divergence_bwd(opts, res, cts):
    s_logits, t_logits = res
    g_loss = cts[0]
    _, _, (s_logp, t_logp, terms, div) = _divergence_values(s_logits, t_logits, opts)
    beta, clip_tau, clip_mode = opts
    grad = _divergence_grad(s_logp, t_logp, terms, div, beta, clip_tau, clip_mode)
    return g_loss[..., None] * grad, jnp.zeros_like(t_logits)


divergence_loss.defvjp(_divergence_fwd, _divergence_bwd)


def opsd_token_terms(s_logits: jax.Array, t_logits: jax.Array, targets: jax.Array, *, beta: float,
                     clip_tau: float | None, clip_mode: str, variant: str, top_k: int) -> dict:
    """Per-position OPSD quantities from (already temperature-scaled) f32 logits [..., V].

    Returns "loss" (the per-token term that is averaged into the loss, after clipping), "div" (the
    unclipped divergence, or for "sampled_token" the same as "loss"), "clipped" (1.0 where the clip
    changed the token), "s_ent"/"t_ent" (entropies of the full tempered distributions). The
    teacher logits are treated as constants (stop-gradient)."""
    t_logits = jax.lax.stop_gradient(t_logits)
    opts = (float(beta), None if clip_tau is None else float(clip_tau), clip_mode)
    if variant == "full":
        loss, aux = divergence_loss(s_logits, t_logits, opts)
        out = dict(aux, loss=loss)
    else:
        s_logp = jax.nn.log_softmax(s_logits, axis=-1)
        t_logp = jax.nn.log_softmax(t_logits, axis=-1)
        out = {"s_ent": entropy_from_logp(jax.lax.stop_gradient(s_logp)), "t_ent": entropy_from_logp(t_logp)}
        if variant == "sampled_token":
            ls, lt = _take(s_logp, targets), _take(t_logp, targets)
            term = -jax.lax.stop_gradient(lt - ls) * ls
            out.update(loss=term, div=jax.lax.stop_gradient(term), clipped=jnp.zeros_like(term))
        elif variant == "top_k":
            t_top, idx = jax.lax.top_k(t_logits, top_k)
            s_top = jnp.take_along_axis(s_logits, idx, axis=-1)
            loss, aux = divergence_loss(s_top, t_top, opts)
            out.update(loss=loss, div=aux["div"], clipped=aux["clipped"])
        else:
            raise ValueError(f"OPSD variant {variant!r} unknown; choose one of ('full', 'sampled_token', 'top_k')")
    for k in ("div", "clipped", "s_ent", "t_ent"):
        out[k] = jax.lax.stop_gradient(out[k])
    return out


def opsd_head(s_hidden: jax.Array, t_hidden: jax.Array, targets: jax.Array, kernel: jax.Array, *,
              beta: float = 0.5, temperature: float = 1.0, clip_tau: float | None = None,
              clip_mode: str = "token", variant: str = "full", top_k: int = 20,
              chunk_size: int | None = DEFAULT_CHUNK, t_kernel: jax.Array | None = None) -> dict:
    """Per-position OPSD terms [B, N] from hidden states already gathered at the rollout positions.

    s_hidden, t_hidden: [B, N, E] (student, teacher; the teacher is put under stop_gradient here);
    targets: [B, N] rollout tokens (used by "sampled_token"); kernel: [E, V] lm-head (t_kernel, if
    given, is the teacher's). Neither role's [B, N, V] logits ever exist: see the module doc."""
    kernel = gathered_kernel(kernel)
    t_kernel = kernel if t_kernel is None else gathered_kernel(t_kernel)

    def fn(x):
        s_logits = head_logits(x["s"], kernel, temperature)
        t_logits = jax.lax.stop_gradient(head_logits(x["t"], t_kernel, temperature))
        return opsd_token_terms(s_logits, t_logits, x["y"], beta=beta, clip_tau=clip_tau, clip_mode=clip_mode,
                                variant=variant, top_k=top_k)

    xs = {"s": s_hidden, "t": jax.lax.stop_gradient(t_hidden), "y": targets}
    return chunked_positions(fn, xs, chunk_size)


# ---------------------------------------------------------------------------------------------
# masked reductions


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of x where mask > 0 (entries outside the mask never reach the result, even if not finite)."""
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over all unmasked tokens of the batch (0 when the mask is empty)."""
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sequence_mean(x: jax.Array, mask: jax.Array, nonempty_only: bool = True) -> jax.Array:
    """Mean over each row's unmasked tokens, then over rows: the rows that have at least one token
    (`nonempty_only`, 0 when none has) or all rows."""
    n = jnp.sum(mask, axis=1)
    per_row = masked_sum(x, mask, axis=1) / jnp.maximum(n, 1.0)
    if nonempty_only:
        return jnp.sum(per_row) / jnp.maximum(jnp.sum((n > 0).astype(jnp.float32)), 1.0)
    return jnp.mean(per_row)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max of x over unmasked entries (0 when the mask is empty)."""
    m = jnp.max(jnp.where(mask > 0, x, -jnp.inf))
    return jnp.where(jnp.isfinite(m), m, 0.0)
