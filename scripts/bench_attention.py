"""Attention benchmark: Pallas flash attention vs the `xla` and `cudnn` impls of jsdr.model.attention.

    python scripts/bench_attention.py [--batch 1 --heads 16 --kv-heads 8 --head-dim 128
                                       --dtype bfloat16 --lengths 1024,2048,4096,8192,16384
                                       --impls pallas,xla,cudnn --repeats 10 --no-causal
                                       --block-q 128 --block-k 128 ... --json out.json]

For every sequence length T (self-attention, S = T, all tokens in one segment) and every impl it
times the jitted forward and the jitted forward + backward (vjp with a fixed cotangent: dq, dk, dv),
reports medians over `--repeats` runs after `--warmup` runs, and the achieved TFLOP/s counting the
useful matmul FLOPs the way FlashAttention-2 does: forward 4*B*H*T*S*D (halved when causal),
forward + backward 3.5x that. An impl that fails (out of memory, unsupported shape) is reported as
such in the table instead of aborting the run.

On a machine without a GPU the Pallas kernels run in interpret mode, `cudnn` is skipped and the
default lengths are tiny: those numbers say nothing about GPU performance; they only show that the
script and the kernels run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# runnable from a checkout without `pip install -e .`: jsdr from the repository root, jsdr_kernels
# from kernels/ (its source root; see docs/attention.md)
_REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_REPO), str(_REPO / "kernels")]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import time_call  # noqa: E402  (median of timed calls after warm-up)

GPU_LENGTHS = "1024,2048,4096,8192,16384"
CPU_LENGTHS = "128,256"


def flops(batch, heads, t, s, d, causal, backward):
    f = 4.0 * batch * heads * t * s * d * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def _time(fn, args, warmup, repeats):
    return time_call(fn, args, warmup, repeats)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--lengths", default=None,
                    help=f"comma-separated sequence lengths (default GPU: {GPU_LENGTHS}; CPU: {CPU_LENGTHS})")
    ap.add_argument("--impls", default="pallas,xla,cudnn,cudnn_causal",
                    help="pallas, xla, cudnn (the dispatch impl: explicit [B,1,T,S] mask), cudnn_causal "
                         "(jax.nn.dot_product_attention(is_causal=True), no mask: cuDNN's fast path, valid "
                         "here because the benchmark batch is one dense segment)")
    ap.add_argument("--no-causal", dest="causal", action="store_false")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    for name in ("block-q", "block-k", "block-q-dkv", "block-k-dkv", "block-q-dq", "block-k-dq",
                 "num-warps", "num-stages"):
        ap.add_argument(f"--{name}", type=int, default=None, help="override the Pallas default table")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jsdr.model import attention as attn
    from jsdr_kernels import flash_attention as flash

    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    lengths = [int(x) for x in (args.lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS)).split(",")]
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    dtype = jnp.dtype(args.dtype)
    B, H, K, D = args.batch, args.heads, args.kv_heads, args.head_dim

    bs = flash.default_block_sizes(D)
    over = {f: getattr(args, f) for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq",
                                          "block_k_dq", "num_warps", "num_stages") if getattr(args, f) is not None}
    bs = dataclasses.replace(bs, **over)

    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"B={B} H={H} K={K} D={D} dtype={dtype.name} causal={args.causal} "
          f"repeats={args.repeats} (median) warmup={args.warmup}")
    print(f"pallas blocks: {bs}")
    if not on_gpu:
        print("NOTE: no GPU: the Pallas kernels run in INTERPRET mode on the CPU. These numbers say "
              "nothing about GPU performance; they only show that the benchmark runs.")
    if any(i.startswith("cudnn") for i in impls) and not on_gpu:
        print("cudnn, cudnn_causal: skipped (need an NVIDIA GPU)")
        impls = [i for i in impls if not i.startswith("cudnn")]

    def attn_fn(impl):
        if impl == "pallas":
            return lambda q, k, v, s: flash.flash_attention(q, k, v, s, s, 0, causal=args.causal, block_sizes=bs)
        if impl == "cudnn_causal":
            return lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, is_causal=args.causal,
                                                                   implementation="cudnn")
        return lambda q, k, v, s: attn.attention(q, k, v, s, s, 0, args.causal, impl=impl)

    rows = []
    for T in lengths:
        rs = np.random.RandomState(0)
        q = jnp.asarray(rs.randn(B, T, H, D), dtype)
        k = jnp.asarray(rs.randn(B, T, K, D), dtype)
        v = jnp.asarray(rs.randn(B, T, K, D), dtype)
        do = jnp.asarray(rs.randn(B, T, H, D), dtype)
        seg = jnp.ones((B, T), jnp.int32)
        for impl in impls:
            f = attn_fn(impl)
            fwd = jax.jit(f)

            @jax.jit
            def fwd_bwd(q, k, v, s, do, f=f):
                out, pull = jax.vjp(lambda q, k, v: f(q, k, v, s), q, k, v)
                return out, pull(do)

            row = {"impl": impl, "T": T}
            for what, fn, fargs, bwd in (("fwd", fwd, (q, k, v, seg), False),
                                         ("fwd_bwd", fwd_bwd, (q, k, v, seg, do), True)):
                try:
                    sec = _time(fn, fargs, args.warmup, args.repeats)
                    row[f"{what}_ms"] = sec * 1e3
                    row[f"{what}_tflops"] = flops(B, H, T, T, D, args.causal, bwd) / sec / 1e12
                except Exception as e:  # OOM, unsupported configuration, ...
                    msg = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
                    row[f"{what}_error"] = "OOM" if "RESOURCE_EXHAUSTED" in str(e) else msg
            rows.append(row)
            print(_fmt_row(row), flush=True)

    print()
    print(f"| impl | T | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |   ({device.device_kind}, "
          f"B={B} H={H} K={K} D={D} {dtype.name}{' causal' if args.causal else ''})")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_fmt_row(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device.device_kind, "backend": jax.default_backend(),
                                               "args": vars(args), "blocks": dataclasses.asdict(bs),
                                               "rows": rows}, indent=1))


def _fmt_row(row):
    cells = []
    for what in ("fwd", "fwd_bwd"):
        if f"{what}_error" in row:
            cells += [row[f"{what}_error"], "-"]
        else:
            cells += [f"{row[f'{what}_ms']:.3f}", f"{row[f'{what}_tflops']:.3f}"]
    return f"| {row['impl']} | {row['T']} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
