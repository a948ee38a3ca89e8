"""What a GPU will run, compiled by the real GPU compiler for compile-only H100s (no GPU needed; the
planner's path, `jsdr.plan.compile_devices`): the train steps of sft, grpo and opsd with the Pallas
flash-attention kernels, the sampler's prefill and decode programs (dense engine; paged engine with the
Pallas paged decode kernel; the paged engine with XLA attention, as the entry points sample, is compiled
for 8 H100s in tests/test_plan.py), the two kernels on their own, and the tilings scripts/gpu_check.py
will time. Plus the CPU smoke run of scripts/gpu_check.py, which must print every section.

The kernels pick Triton or interpret mode from `jax.default_backend()` (and their tiles from the first
device's kind), which is the CPU here even when the program is compiled for GPUs, unless
`jsdr_kernels.common.compile_for_gpu(kind)` is active: jsdr.plan enters it whenever it compiles with the
GPU compiler (the train steps here go through jsdr.plan without anything else), and `gpu_host` does for
the programs this file builds itself, so what compiles is what a GPU runs.

Skipped only when the CUDA plugin (jax[cuda12-local], in the test extra) is missing."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jsdr import plan, sharding
from jsdr.model import attention as attention_lib
from jsdr.model import lora as lora_lib
from jsdr.model.transformer import Model
from jsdr.sampling import Sampler, SamplingConfig
from jsdr_kernels import flash_attention as flash
from jsdr_kernels import paged_attention as pa
from jsdr_kernels.common import compile_for_gpu
from tests.test_train import _cfg

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
H100 = plan.TARGETS["h100-80gb"]
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
LAYOUT = {"data": 1, "fsdp": 2, "tensor": 1}  # two devices: the kernels run per shard inside shard_map


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def triton_kernels(hlo: str) -> list[str]:
    """The Pallas kernels (by their pallas_call names) among the Triton custom calls of a compiled program."""
    names = []
    for line in hlo.splitlines():
        if TRITON in line:
            found = re.findall(r"(flash_attention_(?:fwd|dkv|dq)|paged_attention)", line)
            names.append(found[0] if found else "?")
    return sorted(names)


@pytest.fixture(scope="module")
def h100():
    """Two compile-only H100 devices with the GPU compiler (jsdr.plan's topology)."""
    if not HAS_CUDA_PLUGIN:
        pytest.skip("the CUDA plugin (jax[cuda12-local], in the test extra) is not installed: no GPU compiler")
    devices, compiler = plan.compile_devices(H100, 2)
    assert compiler == "gpu", f"the CUDA plugin is installed but the GPU compiler is not used: {plan.WHY_CPU}"
    assert all("H100" in d.device_kind for d in devices)
    return devices


def gpu_host(devices):
    """While active, the kernels build as on a GPU host: Triton, not interpret mode, and the tiles of
    `devices`' kind (jsdr_kernels.common.compile_for_gpu, which jsdr.plan enters itself)."""
    return compile_for_gpu(devices[0].device_kind)


@pytest.fixture(scope="module")
def compiled(h100, toy_tiny_assets, tmp_path_factory):
    """{method: (Row, compiled HLO text)} of every method's train step as jsdr.plan compiles it, and
    {"dense" | "paged": {"prefill" | "decode": HLO text}} of a Sampler whose model asks for Pallas
    attention (the dense engine decodes with XLA attention whatever it asks; the paged engine's decode
    steps take the Pallas paged kernel; "paged" also has "prefill_fresh", a first chunk), with the
    paged engine's geometry under "paged_info"."""
    seen: list = []
    analyse = plan._analyse

    def spy(name, program, *args, **kw):  # the program the planner compiles, with its HLO
        row = analyse(name, program, *args, **kw)
        seen.append((row, program.as_text()))
        return row

    out = {}
    model_dir = str(toy_tiny_assets / "model")
    with pytest.MonkeyPatch.context() as mp:  # no gpu_host: jsdr.plan builds the kernels for the GPU itself
        mp.setattr(plan, "_analyse", spy)
        for method in ("sft", "grpo", "opsd"):
            cfg = _cfg(toy_tiny_assets, method, tmp_path_factory.mktemp(method), mesh={"num_devices": None},
                       model={"attn_impl": "auto", "dtype": "bfloat16"}, data={"max_length": 256})
            seen.clear()
            plan.plan_train(cfg, LAYOUT, "full", H100, h100, "gpu", model_dir, rollout=False)
            out[method] = seen[0]

    mcfg = plan.model_config(model_dir)
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8)
    mesh_cfg = sharding.MeshConfig(**LAYOUT)
    mesh, rules = sharding.make_mesh(mesh_cfg, h100), sharding.effective_rules(mesh_cfg)
    sc = SamplingConfig(n=2, max_new_tokens=64, temperature=1.0, top_p=0.95)
    with gpu_host(h100), sharding.use_mesh(mesh, rules):
        params = plan.abstract_params(mcfg, mesh, rules, jnp.bfloat16)
        lora = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            lora_lib.lora_shapes(mcfg, lcfg), lora_lib.lora_shardings(mcfg, lcfg, mesh, rules))
        sampler = Sampler(Model(mcfg, lora_scale=lcfg.scale, dtype="bfloat16", attn_impl="pallas"), mesh=mesh,
                          pad_id=0, rules=rules)
        dense = sampler.compile_programs(params, lora, 2, 32, sc)
        paged = sampler.compile_paged(params, lora, 2, 32, sc, device_bytes=H100.hbm_bytes, pool_pages=16,
                                      fresh_prefill=True)
    out["dense"] = {name: dense[name].as_text() for name in ("prefill", "decode")}
    out["paged"] = {name: paged[name].as_text() for name in ("prefill", "prefill_fresh", "decode")}
    out["paged_info"] = paged["info"]
    return out


@pytest.mark.parametrize("method", ["sft", "grpo", "opsd"])
def test_train_steps_compile_with_the_pallas_kernels(compiled, method):
    row, hlo = compiled[method]
    assert row.program == "train_step" and row.compiler == "gpu" and row.attn_impl == "pallas" and row.fits
    kernels = triton_kernels(hlo)
    # the forward (twice under remat: the backward recomputes it; OPSD's teacher once more) and both
    # backward kernels: the gradient goes through the Pallas kernels
    assert {"flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq"} == set(kernels), kernels
    assert kernels.count("flash_attention_fwd") == (3 if method == "opsd" else 2), kernels


def test_sampler_programs_compile_for_both_engines(compiled):
    # prefills whose tokens are the whole context (the dense engine's; the paged engine's first chunk)
    # run the flash kernel's forward; a later paged chunk and the dense decode attend with XLA; the
    # paged decode step with the Pallas paged kernel
    assert triton_kernels(compiled["dense"]["prefill"]) == ["flash_attention_fwd"]
    assert triton_kernels(compiled["paged"]["prefill_fresh"]) == ["flash_attention_fwd"]
    assert not triton_kernels(compiled["dense"]["decode"]) and not triton_kernels(compiled["paged"]["prefill"])
    assert triton_kernels(compiled["paged"]["decode"]) == ["paged_attention"]
    info = compiled["paged_info"]
    assert info["decode_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and info["pool_pages"] == 16


def test_kernels_build_for_the_gpu_under_compile_for_gpu(h100):
    """Pallas attention of jsdr's dispatch under a mesh of compile-only H100s: under compile_for_gpu
    (what jsdr.plan enters) the program holds the Triton kernel; without it, the kernel asks
    jax.default_backend() (the CPU here) and the program holds its interpret-mode loops."""
    mesh_cfg = sharding.MeshConfig(**LAYOUT)
    mesh = sharding.make_mesh(mesh_cfg, h100)
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16, sharding=spec)
    seg = jax.ShapeDtypeStruct((2, 128), jnp.int32, sharding=spec)

    def hlo():
        with sharding.use_mesh(mesh, sharding.effective_rules(mesh_cfg)):
            return jax.jit(lambda q, k, v, s: attention_lib.attention(q, k, v, s, s, impl="pallas")) \
                .trace(q, kv, kv, seg).lower().compile().as_text()
    with gpu_host(h100):
        assert triton_kernels(hlo()) == ["flash_attention_fwd"]
    assert triton_kernels(hlo()) == []


def test_kernels_compile_on_their_own(h100):
    mesh = jax.sharding.Mesh(np.array(h100[:1]), ("x",))
    rep = NamedSharding(mesh, PartitionSpec())
    B, T, H, K, D = 1, 300, 4, 2, 128  # T not a multiple of the tiles: the padded path
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=rep)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=rep)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rep)
    bs = flash.default_block_sizes(D, h100[0].device_kind)

    def loss(q, k, v, s):
        return flash.flash_attention(q, k, v, s, s, 0, causal=True, block_sizes=bs, interpret=False) \
            .astype(jnp.float32).sum()
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower().compile().as_text()
    assert triton_kernels(hlo) == ["flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"]

    Bp, S, M = 4, 16, 8
    shapes = [jax.ShapeDtypeStruct((Bp, H, D), jnp.bfloat16, sharding=rep),
              jax.ShapeDtypeStruct((K, Bp * M, S, D), jnp.bfloat16, sharding=rep),
              jax.ShapeDtypeStruct((K, Bp * M, S, D), jnp.bfloat16, sharding=rep),
              jax.ShapeDtypeStruct((Bp, M), jnp.int32, sharding=rep), jax.ShapeDtypeStruct((Bp,), jnp.int32, sharding=rep)]
    hlo = jax.jit(lambda *a: pa.paged_attention(*a, interpret=False)).trace(*shapes).lower().compile().as_text()
    assert triton_kernels(hlo) == ["paged_attention"]


def _compile_fwd_bwd(device, bs, dtype, T=512, H=16, K=8, D=128, backward=True):
    rep = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), PartitionSpec())
    q = jax.ShapeDtypeStruct((1, T, H, D), dtype, sharding=rep)
    kv = jax.ShapeDtypeStruct((1, T, K, D), dtype, sharding=rep)
    seg = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=rep)

    def f(q, k, v, s):
        return flash.flash_attention(q, k, v, s, s, 0, causal=True, block_sizes=bs, interpret=False)
    fn = jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))) if backward else jax.jit(f)
    return fn.trace(q, kv, kv, seg).lower().compile()


def test_gpu_check_tilings_fit_an_h100(h100):
    """Every tiling section e of scripts/gpu_check.py times (bf16, head dim 128) and the smaller tiles its
    section a falls back to for float32 compile for an H100: device time is not spent on tilings that
    cannot run."""
    gc = _load_gpu_check()
    default = flash.default_block_sizes(128, h100[0].device_kind)
    cands = gc.block_candidates(default, smoke=False)
    assert cands[0] == ("default", default) and len(cands) >= 6
    for name, bs in cands:
        try:
            _compile_fwd_bwd(h100[0], bs, jnp.bfloat16)
        except Exception as e:
            raise AssertionError(f"candidate {name!r} ({bs}) does not compile for an H100") from e
    _compile_fwd_bwd(h100[0], gc._smaller_tiles(default), jnp.float32)


@pytest.mark.parametrize("target", ["h100-80gb", "a100-80gb"])
def test_default_tiles_compile_for_every_head_dim_and_dtype(target):
    """The default tiles of every head-dim row, for bf16 and float32 inputs, compile (forward and
    backward) for the GPU of each generation: float32 gets smaller forward tiles (the Hopper table's
    128 x 128 in 3 stages asks an H100 for 385 KiB of shared memory in float32; it has 227 KiB)."""
    if not HAS_CUDA_PLUGIN:
        pytest.skip("the CUDA plugin (jax[cuda12-local], in the test extra) is not installed: no GPU compiler")
    devices, compiler = plan.compile_devices(plan.TARGETS[target], 1)
    assert compiler == "gpu", plan.WHY_CPU
    kind = devices[0].device_kind
    for D in (64, 128, 256):
        for dtype in (jnp.bfloat16, jnp.float32):
            bs = flash.default_block_sizes(D, kind, dtype)
            try:
                _compile_fwd_bwd(devices[0], bs, dtype, D=D)
            except Exception as e:
                raise AssertionError(f"{kind}: default tiles {bs} for head dim {D}, {jnp.dtype(dtype).name}") from e
    f32 = flash.default_block_sizes(128, "NVIDIA H100 80GB HBM3", jnp.float32)
    assert (f32.block_q, f32.block_k, f32.num_stages) == (64, 64, 2)
    assert flash.default_block_sizes(128, "NVIDIA H100 80GB HBM3", jnp.bfloat16) == \
        flash.default_block_sizes(128, "NVIDIA H100 80GB HBM3")


def test_gpu_check_smoke_prints_every_section(tmp_path):
    """scripts/gpu_check.py --smoke on the CPU: every section runs (tiny shapes, Pallas interpret mode),
    nothing fails, and the table and its JSON hold every section."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gc = _load_gpu_check()
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = data["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"device", *gc.SECTIONS.values()}, sections
    bad = [r for r in rows if r["status"] in ("FAIL", "ERROR")]
    assert not bad, bad
    for title in gc.SECTIONS.values():
        mine = [r for r in rows if r["section"] == title]
        assert any(r["check"] == "section wall time" for r in mine), title
        assert any(r["status"] in ("pass", "info") and r["check"] != "section wall time" for r in mine), title
        assert title in proc.stdout
    table = proc.stdout[proc.stdout.index("| section | check |"):]
    assert table.count("\n") + 1 >= len(rows) + 2  # one table, every row
    assert (tmp_path / "gpu_check.md").read_text().strip() == table.strip()
    numerics = [r for r in rows if r["section"] == gc.SECTIONS["a"] and r["check"] != "section wall time"]
    assert len(numerics) == 4 * 5 and all(r["status"] == "pass" for r in numerics)  # 5 cases x out/dq/dk/dv
    for check in ("step time", "MFU, jsdr.plan count (6N/token + attention)"):
        assert any(r["check"] == check for r in rows), check
    decode = [r for r in rows if r["section"] == gc.SECTIONS["d"] and "engine" in r["check"]]
    assert [r["check"].split(":")[0] for r in decode] == ["dense engine, xla attention", "paged engine, xla attention",
                                                          "paged engine, pallas attention"]
    assert any(r["check"] == "fastest forward + backward" for r in rows)
