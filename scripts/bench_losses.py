"""Temporary memory of the OPSD head (loss + gradient) at Qwen3-1.7B's lm-head shape.

Compiles, on abstract shapes only (no weights are allocated), three versions of the loss+gradient
of the OPSD head (student and teacher hidden states at N rollout positions -> lm-head ->
generalized JSD with a token clip -> per-sequence mean), and prints XLA's
`memory_analysis().temp_size_in_bytes` for each:

  naive     full [B, N, V] logits of both roles, plain autodiff (what one writes first)
  unchunked jsdr's head with chunk_size=None (one chunk: full logits, hand-written gradient)
  chunked   jsdr's head with the given chunk size (default: jsdr.losses.DEFAULT_CHUNK)

    python scripts/bench_losses.py [--dtype float32|bfloat16] [--chunk 128] [--rollout 2048]

On CPU a bfloat16 matmul is computed in float32, so XLA adds one float32 copy of the [E, V]
kernel (1.16 GiB here) to every bfloat16 figure; GPUs multiply bfloat16 natively.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import losses


def naive_opsd_head_loss(hs, ht, y, mask, w, cfg):
    s = jnp.einsum("bne,ev->bnv", hs, w, preferred_element_type=jnp.float32) / cfg.temperature
    t = jax.lax.stop_gradient(jnp.einsum("bne,ev->bnv", ht, w, preferred_element_type=jnp.float32)) / cfg.temperature
    lt, ls = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
    b = cfg.beta
    mix = jnp.logaddexp(lt + np.log(b), ls + np.log1p(-b))
    div = jnp.sum(b * jnp.exp(lt) * (lt - mix) + (1 - b) * jnp.exp(ls) * (ls - mix), -1)
    div = jnp.minimum(div, cfg.clip_tau)
    return jnp.sum(jnp.sum(div * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)) / hs.shape[0]


def temp_bytes(fn, B, N, E, V, dtype):
    h = jax.ShapeDtypeStruct((B, N, E), dtype)
    w = jax.ShapeDtypeStruct((E, V), dtype)
    y = jax.ShapeDtypeStruct((B, N), jnp.int32)
    m = jax.ShapeDtypeStruct((B, N), jnp.float32)
    return jax.jit(jax.value_and_grad(fn)).lower(h, h, y, m, w).compile().memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=losses.DEFAULT_CHUNK)
    ap.add_argument("--rollout", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    shape = (a.batch, a.rollout, a.hidden, a.vocab)
    base = losses.OPSDConfig(beta=0.5, clip_tau=0.05)
    rows = {
        "naive": lambda hs, ht, y, m, w: naive_opsd_head_loss(hs, ht, y, m, w, base),
        "unchunked": lambda hs, ht, y, m, w: losses.opsd_head_loss(hs, ht, y, m, w, base.__class__(
            beta=0.5, clip_tau=0.05, chunk_size=None))[0],
        "chunked": lambda hs, ht, y, m, w: losses.opsd_head_loss(hs, ht, y, m, w, base.__class__(
            beta=0.5, clip_tau=0.05, chunk_size=a.chunk))[0],
    }
    print(f"OPSD head loss+grad, B={a.batch} N={a.rollout} E={a.hidden} V={a.vocab} {a.dtype}, "
          f"chunk={a.chunk}, backend={jax.default_backend()}")
    print(f"one full [B, N, V] float32 logits buffer: {a.batch * a.rollout * a.vocab * 4 / 2**20:.0f} MiB")
    res = {k: temp_bytes(f, *shape, dtype) for k, f in rows.items()}
    for k, v in res.items():
        print(f"  {k:10s} temp {v / 2**20:9.1f} MiB")
    print(f"chunked / naive = {res['chunked'] / res['naive']:.4f} (1/{res['naive'] / res['chunked']:.1f}); "
          f"chunked / unchunked = {res['chunked'] / res['unchunked']:.4f}")


if __name__ == "__main__":
    main()
