"""One GPU check of jsdr, in one run of under 8 minutes, printed as one table.

    scripts/gpu_check.sh                         # on a GPU machine (H100 / H200): the real sizes
    python scripts/gpu_check.py --out DIR        # the same without the wrapper
    python scripts/gpu_check.py --smoke          # tiny shapes, seconds: runs anywhere (CPU: Pallas interpret mode)
    python scripts/gpu_check.py --sections a,e --budget 200

Sections (each guarded: a failure is an ERROR row and the next section runs):

  device  what ran where: device kind, jax version, the peak bf16 dense FLOP/s and HBM bandwidth used
  a       Pallas flash attention forward + backward against `reference_attention` (float32, computed
          one kv-head group at a time so 16k tokens fit), bf16 and f32, GQA 16/8, head dim 128, causal,
          T = 2k / 8k / 16k and one packed batch (segment ids, padding tail): max |error| of out, dq,
          dk, dv; pass when max |error| <= tol x max(1, max |reference|) (bf16 1e-2, the unit tests'
          bound; f32 1e-4, which still catches TF32). When the default tiles do not fit the device (f32
          forward tiles of 128 x 128 ask for more shared memory than an H100 has), that is a FAIL row
          and the case is rerun with smaller tiles, named in the row.
  b       attention speed, pallas vs cudnn (`jax.nn.dot_product_attention(implementation="cudnn",
          is_causal=True)`) vs xla (jsdr's `attention(impl="xla")`), forward and forward + backward, bf16,
          B x T = 16k tokens per call: TFLOP/s of the median of several timed calls after warm-up.
          FLOPs as FlashAttention-2 counts them, causal pairs counted exactly: forward 4 x D per visible
          (query, key) pair, B x H x T(T+1)/2 pairs; forward + backward 3.5x the forward.
  c       LoRA train step at Qwen3-1.7B dimensions with random bf16 weights, through jsdr's own jitted
          step (`train.jit_train_step` of the SFT method, the paper's LoRA r=64 on all seven
          projections, remat full, attention auto = Pallas on GPU), 2 x 4096 tokens: step time, tokens/s
          and MFU against the device's peak, with two FLOP counts: jsdr.plan's (6N per token + causal
          attention, as if the weights were trained) and the LoRA step's useful FLOPs (frozen weights: no
          weight gradient, 4N per token + attention forward + backward).
  d       decode throughput of jsdr's Sampler at Qwen3-1.7B dimensions, 64 sequences, 128-token prompts,
          256 new tokens, dense engine, paged engine (XLA attention, the entry points' choice) and paged
          engine with the Pallas paged decode kernel: new tokens / wall time of a warm `generate` call
          (prefill included), against the HBM bound (weights + the KV cache read per decode step, at the
          mean context, / HBM bandwidth).
  e       the Pallas block-size table: a few candidates around the default, timed at 8k tokens (bf16,
          forward and forward + backward); which is fastest, against the default.

A global time budget (--budget, default 420 s) skips what is left once it is spent (a row says so);
every section also stops starting new cases past its own share. Rows go to stderr as they come, the
table to stdout at the end, and DIR/gpu_check.json + DIR/gpu_check.md are rewritten after every row (a
run killed by a timeout still leaves what it measured). DIR: --out, else $OUT, else ./gpu_check_out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# runnable from a checkout without `pip install -e .`: jsdr from the repository root, jsdr_kernels from
# kernels/ (its source root; see docs/attention.md)
_REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_REPO), str(_REPO / "kernels")]

SECTIONS = {
    "a": "a flash numerics",
    "b": "b attention speed",
    "c": "c train step MFU",
    "d": "d decode tokens/s",
    "e": "e block sizes",
}
# each section's share of the budget: past it, a section starts no new case
SHARES = {"a": 0.2, "b": 0.2, "c": 0.2, "d": 0.25, "e": 0.15}

# peak dense bf16 tensor-core FLOP/s and HBM bandwidth (spec sheets), by device kind; H100 SXM and the A100s
# come from jsdr.plan.TARGETS
_EXTRA_SPECS = (("H200", "H200 SXM", 989e12, 4.8e12), ("H100 NVL", "H100 NVL", 835e12, 3.9e12),
                ("H100 PCIE", "H100 PCIe", 756e12, 2.0e12))


# ---------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class Row:
    section: str
    check: str
    value: str
    unit: str = ""
    against: str = ""
    status: str = "info"  # pass | FAIL | info | ERROR | skipped
    note: str = ""
    data: dict = dataclasses.field(default_factory=dict)  # the raw numbers (JSON only)


class Report:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"[gpu_check] {row.section} | {row.check} | {row.value} {row.unit} | {row.against} | {row.status}"
              + (f" | {row.note}" if row.note else ""), file=sys.stderr, flush=True)
        self.write()
        return row

    def table(self) -> str:
        head = ("section", "check", "value", "unit", "against", "status", "note")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = (r.section, r.check, r.value, r.unit, r.against, r.status, r.note)
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        data = dict(self.meta, rows=[dataclasses.asdict(r) for r in self.rows])
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(self.table() + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.total, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if "RESOURCE_EXHAUSTED" in text and "hared memory" not in text:
        return "OOM: " + text[:200]
    return f"{type(e).__name__}: {text[:240]}"


# ---------------------------------------------------------------------------------------------
# shared helpers


class Ctx:
    """What the sections share: sizes, the device facts, the time budget, cached model weights."""

    def __init__(self, args, report: Report, budget: Budget):
        import jax
        self.args, self.report, self.budget = args, report, budget
        self.smoke = args.smoke
        self.device = jax.devices()[0]
        self.on_gpu = self.device.platform == "gpu"
        self.kind = self.device.device_kind
        self.spec = device_spec(self.kind) if self.on_gpu else None  # (name, peak FLOP/s, HBM bytes/s)
        self.warmup, self.repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
        self.cache: dict = {}
        self.deadline = float("inf")

    def time_left(self) -> bool:
        """Whether a new case may start: inside the global budget and the section's share."""
        return self.budget.left() > 0 and time.perf_counter() < self.deadline

    def skip_row(self, section: str, what: str) -> Row:
        why = ("the time budget is spent" if self.budget.left() <= 0 else "the section's share of the budget is spent")
        return self.report.add(Row(section, what, "-", status="skipped",
                                   note=f"{why} ({self.budget.elapsed():.0f} s of {self.budget.total:.0f} s)"))


def device_spec(kind: str):
    """(name, peak dense bf16 FLOP/s, HBM bytes/s) of a GPU kind, or None when unknown."""
    from jsdr.plan import TARGETS
    k = kind.upper()
    for key, name, peak, bw in _EXTRA_SPECS:
        if key in k:
            return name, peak, bw
    if "H100" in k or "H800" in k:
        t = TARGETS["h100-80gb"]
        return "H100 SXM", t.peak_flops, t.hbm_bw
    if "A100" in k:
        t = TARGETS["a100-80gb" if "80GB" in k else "a100-40gb"]
        return t.device["name"], t.peak_flops, t.hbm_bw
    return None


def time_call(fn, args, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of `repeats` calls of fn(*args) after `warmup` calls, each to block_until_ready."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def compile_timed(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def attn_shapes(ctx: Ctx) -> dict:
    """Attention sizes: the paper's (GQA 16/8, head dim 128) or, with --smoke, tiny ones."""
    if ctx.smoke:
        return dict(H=4, K=2, D=64, lengths=(128, 256), tokens=256, tune_T=256)
    return dict(H=16, K=8, D=128, lengths=(2048, 8192, 16384), tokens=16384, tune_T=8192)


def attn_inputs(B, T, H, K, D, dtype, seed=0, packed=False):
    """Random q [B,T,H,D], k, v [B,T,K,D], a cotangent do, and segment ids: all ones, or (packed) three
    segments of unequal lengths that do not fall on tile edges, then a padding tail (id 0)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32).astype(dtype)
    seg = np.ones((B, T), np.int32)
    if packed:
        edges = [0, int(T * 0.37) + 3, int(T * 0.66) + 5, int(T * 0.9) + 1]
        seg[:] = 0
        for i in range(3):
            seg[:, edges[i]:edges[i + 1]] = i + 1
    return q, k, v, do, jnp.asarray(seg)


def attention_flops(B, H, T, D, backward: bool) -> float:
    """FlashAttention-2's count with the causal pairs counted exactly: 4 D per visible (q, k) pair
    (QK^T and PV), T(T+1)/2 pairs per head; forward + backward 3.5x (the backward's five matmuls)."""
    fwd = 4.0 * D * B * H * T * (T + 1) / 2
    return fwd * 3.5 if backward else fwd


def flash_fwd_bwd(block_sizes, interpret):
    """jit (q, k, v, do, seg) -> (out, dq, dk, dv) of the Pallas kernel, causal."""
    import jax
    from jsdr_kernels import flash_attention as flash

    def f(q, k, v, do, seg):
        out, pull = jax.vjp(lambda q, k, v: flash.flash_attention(q, k, v, seg, seg, 0, causal=True,
                                                                  block_sizes=block_sizes, interpret=interpret),
                            q, k, v)
        return (out, *pull(do))
    return jax.jit(f)


def reference_fwd_bwd():
    """jit (q, k, v, do, seg) -> (out, dq, dk, dv) of `reference_attention` in float32, one kv-head group
    at a time (lax.map), so its [G, T, T] logits fit at 16k tokens."""
    import jax
    import jax.numpy as jnp
    from jsdr_kernels import flash_attention as flash

    def f(q, k, v, do, seg):
        B, T, H, D = q.shape
        K = k.shape[2]
        G = H // K
        f32 = lambda x: x.astype(jnp.float32)
        qg = f32(q).reshape(B, T, K, G, D).transpose(2, 0, 1, 3, 4)  # [K, B, T, G, D]
        dog = f32(do).reshape(B, T, K, G, D).transpose(2, 0, 1, 3, 4)
        kg = f32(k).transpose(2, 0, 1, 3)[:, :, :, None, :]  # [K, B, T, 1, D]
        vg = f32(v).transpose(2, 0, 1, 3)[:, :, :, None, :]

        def group(xs):
            qi, ki, vi, doi = xs
            out, pull = jax.vjp(lambda a, b, c: flash.reference_attention(a, b, c, seg, seg, 0, causal=True),
                                qi, ki, vi)
            return (out, *pull(doi))

        out, dq, dk, dv = jax.lax.map(group, (qg, kg, vg, dog))
        back = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(B, T, -1, D)
        return back(out), back(dq), back(dk), back(dv)
    return jax.jit(f)


def _smaller_tiles(bs):
    """Smaller tiles to retry with when the default ones ask for more shared memory than the device
    has: forward 64 x 64, two stages (what the default gives 4-byte inputs)."""
    return dataclasses.replace(bs, block_q=min(bs.block_q, 64), block_k=min(bs.block_k, 64),
                               num_stages=min(bs.num_stages or 2, 2))


def _tiles_text(bs) -> str:
    return (f"fwd {bs.block_q}x{bs.block_k}, dkv {bs.block_q_dkv}x{bs.block_k_dkv}, dq {bs.block_q_dq}x{bs.block_k_dq}"
            f", warps {bs.num_warps}, stages {bs.num_stages}")


# ---------------------------------------------------------------------------------------------
# sections


def section_device(ctx: Ctx) -> None:
    import jax
    rep, sec = ctx.report, "device"
    rep.add(Row(sec, "device", ctx.kind, "", "", "info",
                f"backend {jax.default_backend()}, {jax.device_count()} device(s), jax {jax.__version__}"))
    stats = {}
    try:
        stats = ctx.device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has them
        pass
    if stats.get("bytes_limit"):
        rep.add(Row(sec, "memory JAX may use", f"{stats['bytes_limit'] / 2**30:.1f}", "GiB", "", "info",
                    "XLA_PYTHON_CLIENT_MEM_FRACTION=" + os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "(default 0.75)")))
    if ctx.spec:
        name, peak, bw = ctx.spec
        rep.add(Row(sec, "peak bf16 dense used for MFU", f"{peak / 1e12:.0f}", "TFLOP/s", name, "info",
                    "spec sheet, dense (no sparsity)"))
        rep.add(Row(sec, "HBM bandwidth used for decode bound", f"{bw / 1e12:.2f}", "TB/s", name, "info", "spec sheet"))
    else:
        rep.add(Row(sec, "peak used for MFU", "n/a", "", "", "info",
                    "no GPU of a known kind: MFU and the HBM bound are left out" +
                    (" (--smoke on CPU: tiny shapes, Pallas interpret mode; the numbers say nothing about speed)"
                     if not ctx.on_gpu else "")))
    rep.add(Row(sec, "mode", "smoke" if ctx.smoke else "full", "", "", "info",
                f"budget {ctx.budget.total:.0f} s; timed calls: median of {ctx.repeats} after {ctx.warmup} warm-up"))


def section_numerics(ctx: Ctx) -> None:
    import jax
    import jax.numpy as jnp
    from jsdr_kernels import flash_attention as flash
    sec, s = SECTIONS["a"], attn_shapes(ctx)
    H, K, D = s["H"], s["K"], s["D"]
    tol = {"bfloat16": 1e-2, "float32": 1e-4}
    interpret = not ctx.on_gpu
    cases = [(dt, T, False) for dt in ("bfloat16", "float32") for T in s["lengths"]]
    cases.append(("bfloat16", s["lengths"][1] if len(s["lengths"]) > 1 else s["lengths"][0], True))
    ref = reference_fwd_bwd()
    errors = jax.jit(lambda a, b: (jnp.max(jnp.abs(a.astype(jnp.float32) - b)), jnp.max(jnp.abs(b))))
    for dt, T, packed in cases:
        name = f"{dt} B=1 T={T} H={H}/K={K} D={D} causal" + (" packed (3 segments + padding)" if packed else "")
        if not ctx.time_left():
            ctx.skip_row(sec, name)
            continue
        try:
            q, k, v, do, seg = attn_inputs(1, T, H, K, D, jnp.dtype(dt), seed=T, packed=packed)
            expect = jax.block_until_ready(ref(q, k, v, do, seg))
            bs, note = flash.default_block_sizes(D, dtype=jnp.dtype(dt)), ""
            try:
                got = jax.block_until_ready(flash_fwd_bwd(bs, interpret)(q, k, v, do, seg))
            except Exception as e:  # noqa: BLE001 - tiles that do not fit the device: say so, retry smaller
                if "hared memory" not in str(e):
                    raise
                ctx.report.add(Row(sec, name + ": default tiles", "does not compile", "", _tiles_text(bs), "FAIL",
                                   _error_text(e)))
                bs = _smaller_tiles(bs)
                note = f"rerun with {_tiles_text(bs)}; "
                got = jax.block_until_ready(flash_fwd_bwd(bs, interpret)(q, k, v, do, seg))
            for label, a, b in zip(("out", "dq", "dk", "dv"), got, expect):
                err, scale = (float(x) for x in errors(a, b))
                bound = tol[dt] * max(1.0, scale)
                ok = err <= bound and math.isfinite(err)
                ctx.report.add(Row(sec, f"{name}: {label}", f"{err:.2e}", "max abs error",
                                   f"<= {bound:.2e} = {tol[dt]:g} x max(1, max abs ref {scale:.3g})",
                                   "pass" if ok else "FAIL", note + ("interpret mode" if interpret else "")))
            del q, k, v, do, got, expect
        except Exception as e:  # noqa: BLE001
            ctx.report.add(Row(sec, name, "error", "", "", "ERROR", _error_text(e)))


def section_attention_speed(ctx: Ctx) -> None:
    import jax
    import jax.numpy as jnp
    from jsdr.model import attention as attn
    from jsdr_kernels import flash_attention as flash
    sec, s = SECTIONS["b"], attn_shapes(ctx)
    H, K, D = s["H"], s["K"], s["D"]
    interpret = not ctx.on_gpu
    bs = flash.default_block_sizes(D)

    def impl_fn(impl):
        if impl == "pallas":
            return lambda q, k, v, sg: flash.flash_attention(q, k, v, sg, sg, 0, causal=True, block_sizes=bs,
                                                             interpret=interpret)
        if impl == "cudnn":
            return lambda q, k, v, sg: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return lambda q, k, v, sg: attn.attention(q, k, v, sg, sg, 0, True, impl="xla")

    impls = ["pallas", "cudnn", "xla"]
    for T in s["lengths"]:
        B = max(1, s["tokens"] // T)
        q, k, v, do, seg = attn_inputs(B, T, H, K, D, jnp.bfloat16, seed=1)
        seen: dict[tuple[str, str], float] = {}
        for impl in impls:
            f = impl_fn(impl)

            def fwd_bwd(q, k, v, sg, do, f=f):
                out, pull = jax.vjp(lambda q, k, v: f(q, k, v, sg), q, k, v)
                return out, pull(do)

            for what, fn, fargs, backward in (("fwd", jax.jit(f), (q, k, v, seg), False),
                                              ("fwd+bwd", jax.jit(fwd_bwd), (q, k, v, seg, do), True)):
                name = f"{impl} {what} B={B} T={T}"
                if impl == "cudnn" and not ctx.on_gpu:
                    ctx.report.add(Row(sec, name, "-", status="skipped", note="cuDNN needs an NVIDIA GPU"))
                    continue
                if not ctx.time_left():
                    ctx.skip_row(sec, name)
                    continue
                try:
                    compiled, ct = compile_timed(fn, *fargs)
                    med, times = time_call(compiled, fargs, ctx.warmup, ctx.repeats)
                    tflops = attention_flops(B, H, T, D, backward) / med / 1e12
                    seen[(impl, what)] = tflops
                    vs = ""
                    if impl != "cudnn" and ("cudnn", what) in seen:
                        vs = f"; {seen[(impl, what)] / seen[('cudnn', what)]:.2f}x cudnn"
                    if impl == "xla" and ("pallas", what) in seen:
                        vs += f"; pallas is {seen[('pallas', what)] / tflops:.2f}x xla"
                    ctx.report.add(Row(sec, name, f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.3g}", "TFLOP/s",
                                       "bf16, H=%d/K=%d D=%d causal" % (H, K, D), "info",
                                       f"median {med * 1e3:.3f} ms of {len(times)}; compile {ct:.1f} s{vs}"
                                       + ("; interpret mode" if impl == "pallas" and interpret else ""),
                                       dict(ms=med * 1e3, times_ms=[t * 1e3 for t in times], tflops=tflops,
                                            compile_s=ct)))
                except Exception as e:  # noqa: BLE001
                    ctx.report.add(Row(sec, name, "error", "", "", "ERROR", _error_text(e)))
        del q, k, v, do


def _model_config(ctx: Ctx):
    from jsdr import plan
    from jsdr.model.params import ModelConfig
    if ctx.smoke:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=32, tie_word_embeddings=True, qk_norm=True, model_type="qwen3")
    return plan.model_config("qwen3-1.7b")


def _params(ctx: Ctx, mcfg, mesh, rules):
    """Random bf16 base weights (jsdr's own init) in the mesh's layout, made once and shared."""
    if "params" not in ctx.cache:
        import jax
        import jax.numpy as jnp
        from jsdr import sharding
        from jsdr.model.transformer import init_params, param_axes, param_shapes
        where = sharding.tree_shardings(param_axes(mcfg), param_shapes(mcfg, jnp.bfloat16), mesh, rules)
        ctx.cache["params"] = jax.jit(lambda key: init_params(mcfg, key, jnp.bfloat16),
                                      out_shardings=where)(jax.random.PRNGKey(0))
    return ctx.cache["params"]


def _one_device_mesh():
    import jax
    from jsdr import sharding
    cfg = sharding.MeshConfig(data=1, fsdp=1, tensor=1)
    return sharding.make_mesh(cfg, jax.devices()[:1]), sharding.effective_rules(cfg)


def section_train_step(ctx: Ctx) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jsdr import methods, plan, run, sharding, train
    from jsdr.model import lora as lora_lib
    from jsdr.model.attention import resolve_impl
    from jsdr.model.transformer import Model
    sec = SECTIONS["c"]
    seq, per_device = (128, 2) if ctx.smoke else (4096, 2)
    # the paper's SFT settings for Qwen3-1.7B (LoRA r=64/alpha 128 on all seven projections, dropout 0.05,
    # remat full, bf16, attention auto), one micro-batch of `per_device` rows of `seq` tokens
    cfg, _ = train.build_config(["--config", str(_REPO / "configs/paper/sft-qwen3-1.7b.yaml"),
                                 f"--data.max_length={seq}", f"--train.per_device_batch={per_device}",
                                 "--train.grad_accum=1", "--train.effective_batch=null", "--mesh.fsdp=1"])
    mcfg = _model_config(ctx)
    mesh, rules = _one_device_mesh()
    # auto: Pallas on GPU; --smoke takes the same path on any backend (the kernel in interpret mode)
    attn = "pallas" if ctx.smoke else resolve_impl(cfg.model.attn_impl)
    model = Model(mcfg, lora_scale=cfg.lora.scale, attn_impl=attn, remat=cfg.model.remat, dtype=cfg.model.dtype,
                  lora_dropout=cfg.lora.dropout)
    setup = methods.Setup(model=model, tokenizer=None, data=cfg.data, prompts=cfg.prompts, rollout=cfg.rollout,
                          options=cfg.method_options(), reward=cfg.reward, pad_id=0, seq_bucket=cfg.train.seq_bucket,
                          grad_accum=1, micro_batch=per_device, data_parallel=1)
    method = methods.get("sft")(setup)
    shapes = method.batch_shapes()  # [1, per_device, seq]
    rs = np.random.RandomState(0)
    lead = shapes.tokens.shape
    tokens = rs.randint(0, mcfg.vocab_size, lead).astype(np.int32)
    host = type(shapes)(tokens=tokens, positions=np.broadcast_to(np.arange(seq, dtype=np.int32), lead).copy(),
                        segment_ids=np.ones(lead, np.int32), targets=np.roll(tokens, -1, axis=-1),
                        mask=np.ones(lead, np.float32))
    with sharding.use_mesh(mesh, rules):
        params = _params(ctx, mcfg, mesh, rules)
        lora = lora_lib.init_lora(mcfg, cfg.lora, jax.random.PRNGKey(1), mesh=mesh, rules=rules)
        optimizer, _ = train.make_optimizer(cfg.optim, 100)
        state = train.init_train_state(optimizer, lora, mesh, ema=False)
        batch = run.place_batch(host, mesh, leading=1, rules=rules)
        rng = jax.random.PRNGKey(2)
        step = train.jit_train_step(method, optimizer, jax.tree.map(lambda x: x.sharding, state))
        compiled, ct = compile_timed(step, state, params, batch, rng)
        ctx.report.add(Row(sec, "compile train step", f"{ct:.1f}", "s", "", "info",
                           f"SFT, {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, vocab {mcfg.vocab_size}, "
                           f"attention {attn}, remat {cfg.model.remat}, LoRA r={cfg.lora.rank} on "
                           f"{len(cfg.lora.target_modules)} projections"))
        for _ in range(ctx.warmup):
            state, metrics = compiled(state, params, batch, rng)
        jax.block_until_ready((state, metrics))
        times, losses = [], []
        for i in range(ctx.repeats):
            t0 = time.perf_counter()
            state, metrics = compiled(state, params, batch, jax.random.fold_in(rng, i))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
    med = statistics.median(times)
    ntok = per_device * seq
    finite = all(math.isfinite(x) for x in losses) and float(metrics["skipped"]) == 0.0
    ctx.report.add(Row(sec, "step time", f"{med * 1e3:.1f}", "ms", f"{per_device} x {seq} tokens", "info",
                       f"median of {len(times)} after {ctx.warmup} warm-up; loss {losses[-1]:.3f}",
                       dict(times_ms=[t * 1e3 for t in times], losses=losses)))
    ctx.report.add(Row(sec, "loss finite, step not skipped", str(finite), "", "", "pass" if finite else "FAIL"))
    ctx.report.add(Row(sec, "train tokens/s", f"{ntok / med:,.0f}", "tokens/s", "", "info"))
    # FLOP counts: jsdr.plan's (6N per token + causal attention x3) and the LoRA step's useful FLOPs
    plan_flops = plan._train_flops(mcfg, ntok, seq)
    n = mcfg.num_params() - mcfg.vocab_size * mcfg.hidden_size * (0 if mcfg.tie_word_embeddings else 1)
    attn_fwd = 2 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * seq * ntok  # causal QK^T + PV
    lora_flops = 4 * n * ntok + 3 * attn_fwd  # forward 2N + activation gradients 2N; attention fwd + 2x bwd
    for label, flops in (("MFU, jsdr.plan count (6N/token + attention)", plan_flops),
                         ("MFU, LoRA useful FLOPs (4N/token + attention)", lora_flops)):
        achieved = flops / med
        if ctx.spec:
            ctx.report.add(Row(sec, label, f"{100 * achieved / ctx.spec[1]:.1f}", "% of peak",
                               f"{ctx.spec[1] / 1e12:.0f} TFLOP/s bf16 ({ctx.spec[0]})", "info",
                               f"{achieved / 1e12:.1f} TFLOP/s; {flops / 1e12:.1f} TFLOP per step"))
        else:
            ctx.report.add(Row(sec, label, "n/a", "", "no GPU peak", "info",
                               f"{achieved / 1e12:.3g} TFLOP/s; {flops / 1e12:.3g} TFLOP per step"))
    try:
        peak = (ctx.device.memory_stats() or {}).get("peak_bytes_in_use")
        if peak:
            ctx.report.add(Row(sec, "peak device memory (process so far)", f"{peak / 2**30:.1f}", "GiB", "", "info"))
    except Exception:  # noqa: BLE001
        pass
    del state, batch, compiled


def section_decode(ctx: Ctx) -> None:
    import jax
    import numpy as np
    from jsdr.model.transformer import Model
    from jsdr.sampling import Sampler, SamplingConfig
    sec = SECTIONS["d"]
    mcfg = _model_config(ctx)
    B, prompt, new = (4, 8, 8) if ctx.smoke else (64, 128, 256)
    mesh, rules = _one_device_mesh()
    params = _params(ctx, mcfg, mesh, rules)
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(1, mcfg.vocab_size, prompt)) for _ in range(B)]
    # the rollouts' sampling (temperature 1, top-p 0.95); no stop ids: every row runs to `new` tokens
    base = SamplingConfig(n=1, max_new_tokens=new, temperature=1.0, top_p=0.95, seed=0)
    # bytes a decode step reads: every weight once (the tied embedding as the lm head; an untied
    # embedding table only its rows), and each row's KV cache at the mean context
    wbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not mcfg.tie_word_embeddings:
        wbytes -= mcfg.vocab_size * mcfg.hidden_size * 2
    ctx_mean = prompt + new / 2
    kv_bytes = B * ctx_mean * mcfg.num_layers * 2 * mcfg.num_kv_heads * mcfg.head_dim * 2
    bound = B / ((wbytes + kv_bytes) / ctx.spec[2]) if ctx.spec else None
    engines = (("dense", "xla"), ("paged", "xla"), ("paged", "pallas"))
    for engine, attn in engines:
        name = f"{engine} engine, {attn} attention: B={B}, prompt {prompt}, {new} new"
        if not ctx.time_left():
            ctx.skip_row(sec, name)
            continue
        try:
            sampler = Sampler(Model(mcfg, dtype="bfloat16", attn_impl=attn), pad_id=0)
            sc = dataclasses.replace(base, engine=engine)
            t0 = time.perf_counter()
            out = sampler.generate(params, None, prompts, sc)  # compiles
            first = time.perf_counter() - t0
            runs = []
            for i in range(1 if ctx.smoke else 2):
                t0 = time.perf_counter()
                out = sampler.generate(params, None, prompts, dataclasses.replace(sc, seed=i + 1))
                runs.append(time.perf_counter() - t0)
            wall = min(runs)
            tokens = int(np.sum(out.lengths))
            tps = tokens / wall
            stats = sampler.last_stats if engine == "paged" else {}
            extra = (f"; slots {stats.get('slots')}, segments {stats.get('segments')}" if stats else "")
            if bound:
                against, status = f"HBM bound {bound:,.0f} tokens/s ({100 * tps / bound:.1f}% of it)", "info"
            else:
                against, status = "no HBM bound (no GPU spec)", "info"
            ctx.report.add(Row(sec, name, f"{tps:,.0f}", "new tokens/s", against, status,
                               f"best of {len(runs)} warm calls {wall:.3g} s (prefill included), first call "
                               f"{first:.1f} s (compile); {tokens} tokens{extra}",
                               dict(tokens=tokens, wall_s=runs, first_s=first, bound=bound, stats=stats)))
            del sampler, out
        except Exception as e:  # noqa: BLE001
            ctx.report.add(Row(sec, name, "error", "", "", "ERROR", _error_text(e)))
    ctx.report.add(Row(sec, "bytes read per decode step", f"{(wbytes + kv_bytes) / 2**30:.2f}", "GiB",
                       f"weights {wbytes / 2**30:.2f} + KV {kv_bytes / 2**30:.2f} at mean context {ctx_mean:.0f}",
                       "info", "bound = B / (bytes / HBM bandwidth)"))


def block_candidates(default, smoke: bool) -> list[tuple[str, object]]:
    """A few tilings around the default: larger/smaller forward tiles, other backward tiles, warps, stages."""
    r = dataclasses.replace
    cands = [("default", default),
             ("fwd 128x64", r(default, block_q=128, block_k=64)),
             ("fwd 64x64", r(default, block_q=64, block_k=64)),
             ("bwd dkv 64x128, dq 128x64", r(default, block_q_dkv=64, block_k_dkv=128, block_q_dq=128, block_k_dq=64)),
             ("bwd dkv 128x64, dq 64x128, 2 stages",  # 3 stages ask an H100 for 244 KiB of shared memory
              r(default, block_q_dkv=128, block_k_dkv=64, block_q_dq=64, block_k_dq=128, num_stages=2)),
             ("4 warps", r(default, num_warps=4)),
             ("2 stages", r(default, num_stages=2)),
             ("fwd 128x64, 4 stages", r(default, block_q=128, block_k=64, num_stages=4))]  # 128x128: 290 KiB
    if smoke:
        cands = cands[:3]
    out, seen = [], set()
    for name, bs in cands:
        if bs not in seen:
            seen.add(bs)
            out.append((name, bs))
    return out


def section_block_sizes(ctx: Ctx) -> None:
    import jax
    import jax.numpy as jnp
    from jsdr_kernels import flash_attention as flash
    sec, s = SECTIONS["e"], attn_shapes(ctx)
    H, K, D, T = s["H"], s["K"], s["D"], s["tune_T"]
    interpret = not ctx.on_gpu
    default = flash.default_block_sizes(D)
    q, k, v, do, seg = attn_inputs(1, T, H, K, D, jnp.bfloat16, seed=2)
    results = {}
    for name, bs in block_candidates(default, ctx.smoke):
        label = f"{name}: {_tiles_text(bs)}"
        if not ctx.time_left():
            ctx.skip_row(sec, label)
            continue
        f = lambda q, k, v, sg, bs=bs: flash.flash_attention(q, k, v, sg, sg, 0, causal=True, block_sizes=bs,
                                                             interpret=interpret)

        def fwd_bwd(q, k, v, sg, do, f=f):
            out, pull = jax.vjp(lambda q, k, v: f(q, k, v, sg), q, k, v)
            return out, pull(do)
        try:
            fwd, _ = compile_timed(jax.jit(f), q, k, v, seg)
            both, ct = compile_timed(jax.jit(fwd_bwd), q, k, v, seg, do)
            t_f, _ = time_call(fwd, (q, k, v, seg), ctx.warmup, ctx.repeats)
            t_b, _ = time_call(both, (q, k, v, seg, do), ctx.warmup, ctx.repeats)
            results[name] = (t_f, t_b, bs)
            ctx.report.add(Row(sec, label, f"{t_f * 1e3:.3f} / {t_b * 1e3:.3f}", "ms fwd / fwd+bwd",
                               f"T={T} B=1 H={H}/K={K} D={D} bf16", "info",
                               f"{attention_flops(1, H, T, D, False) / t_f / 1e12:.3g} / "
                               f"{attention_flops(1, H, T, D, True) / t_b / 1e12:.3g} TFLOP/s"
                               + ("; interpret mode" if interpret else ""),
                               dict(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_b * 1e3, blocks=dataclasses.asdict(bs))))
        except Exception as e:  # noqa: BLE001 - a tiling that does not fit the device
            ctx.report.add(Row(sec, label, "error", "", "", "ERROR", _error_text(e)))
    if "default" in results and len(results) > 1:
        for i, what in ((0, "forward"), (1, "forward + backward")):
            best = min(results, key=lambda n: results[n][i])
            speedup = results["default"][i] / results[best][i]
            ctx.report.add(Row(sec, f"fastest {what}", best, "", "the default", "info",
                               f"{speedup:.2f}x the default ({results[best][i] * 1e3:.3f} vs "
                               f"{results['default'][i] * 1e3:.3f} ms)"
                               + ("" if best == "default" else f"; tiles {_tiles_text(results[best][2])}")))


RUNNERS = {"a": section_numerics, "b": section_attention_speed, "c": section_train_step, "d": section_decode,
           "e": section_block_sizes}


# ---------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (seconds; on CPU the kernels run interpreted)")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md (default $OUT, else "
                                                "./gpu_check_out)")
    ap.add_argument("--sections", default="a,b,c,d,e", help="which of a,b,c,d,e to run (default all)")
    ap.add_argument("--budget", type=float, default=None, help="seconds before the remaining sections are skipped "
                                                               "(default 420; --smoke 240)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not chosen or set(chosen) - set(SECTIONS):
        ap.error(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    budget = Budget(args.budget if args.budget is not None else (240.0 if args.smoke else 420.0))
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")

    import jax
    report = Report(out, dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:], smoke=args.smoke,
                              jax=jax.__version__, backend=jax.default_backend(),
                              device_kind=jax.devices()[0].device_kind))
    ctx = Ctx(args, report, budget)
    section_device(ctx)
    share_total = sum(SHARES[s] for s in chosen)
    for key in chosen:
        title = SECTIONS[key]
        if budget.left() <= 0:
            ctx.skip_row(title, "(whole section)")
            continue
        t0 = time.perf_counter()
        # this section's share of what is left, in proportion to the sections still to run
        ctx.deadline = t0 + budget.left() * SHARES[key] / share_total
        share_total -= SHARES[key]
        try:
            RUNNERS[key](ctx)
        except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
            traceback.print_exc(file=sys.stderr)
            report.add(Row(title, "(section)", "error", "", "", "ERROR", _error_text(e)))
        report.add(Row(title, "section wall time", f"{time.perf_counter() - t0:.1f}", "s", "", "info"))
    report.meta["elapsed_s"] = budget.elapsed()
    report.write()
    bad = [r for r in report.rows if r.status in ("FAIL", "ERROR")]
    print(f"\njsdr gpu_check: {ctx.kind} ({jax.default_backend()}), {'smoke' if args.smoke else 'full'} run, "
          f"{budget.elapsed():.0f} s; {len(bad)} FAIL/ERROR rows; written to {out}/gpu_check.json and .md\n")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
