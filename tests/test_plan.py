"""jsdr.plan: the planner's bytes equal what jsdr.train places, the model facts match the paper's
sizes, collectives are counted from the compiled HLO (loops by trip count), the GPU compiler path works
on compile-only devices when the CUDA plugin is installed, and bad requests get clear errors."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jsdr import plan, sharding
from jsdr import train as TR
from jsdr.model.params import ModelConfig
from jsdr.sampling.config import SamplingConfig
from tests.test_train import _cfg

HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def _device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.fixture(scope="module")
def opsd_plan(toy_tiny_assets, tmp_path_factory):
    """(trainer, planner rows) for the same OPSD config (EMA teacher) on 8 CPU devices, fsdp=8."""
    cfg = _cfg(toy_tiny_assets, "opsd", tmp_path_factory.mktemp("plan"), mesh={"num_devices": None},
               opsd={"teacher": "ema"}, lora={"rank": 8, "alpha": 16})
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    devices, compiler = plan.compile_devices(None, 8)
    rows = plan.plan_train(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, cfg.model.remat, plan.TARGETS["h100-80gb"],
                           devices, compiler, str(toy_tiny_assets / "model"))
    return tr, rows


def test_planner_bytes_equal_what_the_trainer_places(opsd_plan):
    tr, rows = opsd_plan
    step = rows[0]
    assert step.program == "train_step" and step.compiler == "cpu"
    d0 = tr.mesh.devices.flat[0]
    b = step.bytes_per_device
    assert b["params"] == pytest.approx(_device_bytes(tr.params, d0), rel=0.01)
    assert b["lora"] == pytest.approx(_device_bytes(tr.state.lora, d0), rel=0.01)
    assert b["opt_state"] == pytest.approx(_device_bytes((tr.state.opt_state, tr.state.ema), d0), rel=0.01)
    assert b["total"] >= b["params"] + b["lora"] + b["opt_state"] + b["temp"]
    # the rollout programs of a sampling method are planned too: the dense engine's in the training
    # layout, the paged engine's in its decode layout with the training state held beside them
    assert [(r.engine, r.layout, r.program) for r in rows] == [
        ("", "train", "train_step"), ("dense", "train", "rollout_prefill"), ("dense", "train", "rollout_decode"),
        ("paged", "decode", "rollout_prefill"), ("paged", "decode", "rollout_decode")]
    paged = rows[-1]
    assert paged.run_mesh == {"data": 8, "fsdp": 1, "tensor": 1} and paged.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    assert paged.bytes_per_device["resident"] == b["params"] + b["lora"] + b["opt_state"]


def test_planner_and_trainer_build_the_same_state_shardings(opsd_plan, monkeypatch):
    tr, _ = opsd_plan
    lsh = jax.tree.map(lambda x: x.sharding, tr.state.lora)
    planned = TR.train_state_shardings(tr.optimizer, lsh, tr.state.lora, tr.mesh, ema=True)
    assert jax.tree.map(lambda x: x.sharding, tr.state) == planned
    built = []
    monkeypatch.setattr(TR, "jit_train_step", lambda *a: built.append(a) or (lambda *b: None))
    tr._step_fn = None
    tr.step_fn()
    assert built and built[0][0] is tr.method  # the trainer's step is the function the planner compiles


def test_qwen3_8b_weights_per_device_under_fsdp8():
    """Arithmetic check: Qwen3-8B bf16 weights under fsdp=8 are 2 x 8.19e9 / 8 bytes per device (+-3%)."""
    mcfg = ModelConfig(**plan.MODELS["qwen3-8b"])
    assert mcfg.num_params() == pytest.approx(8.19e9, rel=0.01)
    devices, _ = plan.compile_devices(None, 8)
    mesh_cfg = sharding.MeshConfig(fsdp=8)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    params = plan.abstract_params(mcfg, mesh, sharding.effective_rules(mesh_cfg), jnp.bfloat16)
    assert plan._per_device_bytes(params) == pytest.approx(2 * 8.19e9 / 8, rel=0.03)


@pytest.mark.parametrize("name,size", [("qwen3-0.6b", 0.6e9), ("qwen3-1.7b", 1.7e9), ("qwen3-4b", 4.0e9),
                                       ("qwen3-14b", 14.8e9), ("qwen3-32b", 32.8e9), ("llama3.1-8b", 8.03e9),
                                       ("qwen2.5-7b", 7.6e9)])
def test_model_facts_give_the_published_sizes(name, size):
    assert ModelConfig(**plan.MODELS[name]).num_params() == pytest.approx(size, rel=0.05)
    assert plan.model_config(name.upper()) == ModelConfig(**plan.MODELS[name])


def _scan_program(devices):
    mesh = Mesh(np.array(devices).reshape(1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))
    w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]
    return jax.jit(f).trace(x, w).lower().compile()


def test_collectives_are_read_from_the_compiled_program():
    devices, _ = plan.compile_devices(None, 8)
    found = plan.collectives(_scan_program(devices).as_text())
    assert found["all-gather"]["count"] >= 1
    assert found["all-gather"]["bytes"] >= 512 * 512 * 4  # the gathered weight


def test_device_groups_in_every_hlo_form():
    # explicit, all devices, iota, transposed iota, pairs, and the named-mesh form of newer XLA
    assert plan._groups("x = all-gather(y), replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert plan._groups("x = all-reduce(y), replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert plan._groups("x = all-gather(y), replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan._groups("x = all-gather(y), replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan._groups("x = collective-permute(y), source_target_pairs={{0,1},{1,0}}", 2) == [[0, 1], [1, 0]]
    line = ("x = all-gather(y), replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
            "{'axis_2'}, dimensions={0}")
    assert plan._groups(line, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan._groups(line.replace("{'axis_2'}", "{'axis_0'}"), 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan._groups("x = add(y, z)", 8) is None
    assert plan._crosses_hosts(line, 8, 2) and not plan._crosses_hosts(line.replace("{'axis_2'}", "{'axis_0'}"), 8, 2)
    assert not plan._crosses_hosts(line, 8, 1)


def test_cross_host_bytes_of_a_two_host_layout():
    """data=2 across 2 hosts, fsdp=4 within each: the weight all-gather and the fsdp reduction stay in a
    host, only the data-parallel reduction of the gradient leaves it; under fsdp=8 the gather leaves too."""
    devices, _ = plan.compile_devices(None, 8)

    def program(shape):
        mesh = sharding.make_mesh(shape, devices)
        w = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
        x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        grad = jax.grad(lambda w, x: ((x @ w) ** 2).sum())
        return jax.jit(grad, out_shardings=NamedSharding(mesh, PartitionSpec("fsdp"))).lower(w, x).compile().as_text()

    hsdp, fsdp = program((2, 4, 1)), program((1, 8, 1))
    total = sum(v["bytes"] for v in plan.collectives(hsdp).values())
    cross = plan.cross_host(hsdp, 8, 2)
    assert 0 < cross["bytes"] < total and cross["count"] == 1
    assert plan.cross_host(hsdp, 8, 1)["bytes"] == 0
    assert plan.cross_host(fsdp, 8, 2)["bytes"] == sum(v["bytes"] for v in plan.collectives(fsdp).values())


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the CUDA plugin (jsdr[plan]) is not installed")
def test_gpu_compiler_on_compile_only_devices(toy_tiny_assets, tmp_path):
    """8 compile-only H100s: the loop's all-gather is counted once per iteration (trip count 5), and the
    whole train step + rollout programs of a small config compile with the GPU compiler."""
    devices, compiler = plan.compile_devices(plan.TARGETS["h100-80gb"], 8)
    assert compiler == "gpu" and "H100" in str(devices[0])
    found = plan.collectives(_scan_program(devices).as_text())
    assert found["all-gather"] == {"count": 5, "bytes": 5 * 512 * 512 * 4}
    cfg = _cfg(toy_tiny_assets, "grpo", tmp_path, mesh={"num_devices": None}, model={"attn_impl": "auto"})
    rows = plan.plan_train(cfg, {"data": 1, "fsdp": 4, "tensor": 2}, "full", plan.TARGETS["h100-80gb"], devices,
                           compiler, str(toy_tiny_assets / "model"))
    assert [(r.engine, r.program) for r in rows] == [("", "train_step"), ("dense", "rollout_prefill"),
                                                     ("dense", "rollout_decode"), ("paged", "rollout_prefill"),
                                                     ("paged", "rollout_decode")]
    assert rows[0].attn_impl == "pallas" and all(r.compiler == "gpu" and r.fits for r in rows)
    # a decode step gathers the weights under the training layout, never under the decode layout
    assert rows[2].step_collectives["weight_all_gather"]["count"] > 0
    assert "weight_all_gather" not in rows[4].step_collectives and rows[4].run_mesh["fsdp"] == 1
    assert rows[4].bytes_per_device["total"] <= 0.9 * rows[4].hbm_bytes
    # the eval pool sized by a budget that binds, by the engine's rule: on the GPU the pool is updated in
    # place and the programs fit beside it (the 10% headroom of the paper's models is in docs/sharding.md:
    # the temporaries of this tiny model are a larger share of its 8 MiB "device" than a real model's)
    target = dataclasses.replace(plan.TARGETS["h100-80gb"], hbm_bytes=8 << 20)
    sc = SamplingConfig(n=128, max_new_tokens=400, temperature=1.0, top_p=0.95, max_slots=8)
    paged = plan.plan_eval(str(toy_tiny_assets / "model"), {"data": 1, "fsdp": 8, "tensor": 1}, target, devices,
                           compiler, num_prompts=4, prompt_len=32, sc=sc, engines=("paged",))
    assert 2 < paged[1].paged["pool_pages"] < paged[1].paged["demand_pages"]
    assert all(r.fits and r.bytes_per_device["total"] <= target.hbm_bytes for r in paged)
    assert all(r.paged["temp_growth"] < 0.1 * r.paged["pool_bytes"] and not r.notes for r in paged)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the CUDA plugin (jsdr[plan]) is not installed")
def test_gpu_decode_programs_do_not_copy_the_layer_weights_per_token():
    """XLA's GPU dot merger fuses q/k/v (and gate/up) into one matmul by concatenating their weights;
    inside the decode loop that copy would run at every token. The decode programs of both engines,
    compiled for an H100, hold no concatenation of weight matrices (DECODE_COMPILER_OPTIONS), while the
    same program compiled without the option does (so the check can fail)."""
    import re

    from jsdr.model.transformer import Model
    from jsdr.sampling import Sampler
    from jsdr.sampling import config as sampling_config

    devices, compiler = plan.compile_devices(plan.TARGETS["h100-80gb"], 1)
    assert compiler == "gpu"
    mcfg = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8,
                       num_kv_heads=4, head_dim=64, tie_word_embeddings=True)
    mesh = sharding.make_mesh((1, 1, 1), devices=devices)
    params = plan.abstract_params(mcfg, mesh, sharding.DEFAULT_RULES, jnp.bfloat16)
    sc = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=64, max_slots=8)
    weights = {(512, 512 + 2 * 256), (512, 2 * 1536)}  # [E, q+k+v] and [E, gate+up]

    def concatenated_weights(hlo):
        return {tuple(map(int, m.group(1).split(","))) for m in
                re.finditer(r"= bf16\[([\d,]+)\]\{[\d,]*\} concatenate\(", hlo)} & weights

    sampler = Sampler(Model(mcfg, dtype="bfloat16"), pad_id=0, mesh=mesh, rules=sharding.DEFAULT_RULES)
    dense = sampler.compile_programs(params, None, 4, 32, sc)["decode"].as_text()
    paged = sampler.compile_paged(params, None, 4, 32, sc)["decode"].as_text()
    # both compiled for the GPU (the paged engine kept the one-device mesh: it once fell back to the
    # default backend, the CPU, when the mesh had one device), with their matmuls as Triton gemm fusions
    assert "__triton_nested_gemm_fusion" in dense and "__triton_nested_gemm_fusion" in paged
    assert "outer_dimension_partitions" not in dense + paged  # an XLA:CPU backend config
    assert not concatenated_weights(dense) and not concatenated_weights(paged)
    merged = jax.jit(sampler.dense._decode_impl, static_argnames=("n", "max_new", "greedy", "filtered", "penalty"))
    original, sampler.dense._decode = sampler.dense._decode, merged
    try:
        assert concatenated_weights(sampler.compile_programs(params, None, 4, 32, sc)["decode"].as_text())
    finally:
        sampler.dense._decode = original
    assert sampling_config.DECODE_COMPILER_OPTIONS == {"xla_gpu_dot_merger_threshold_mb": 0}


def test_cli_errors_are_clear(capsys):
    assert plan.main(["--layouts", "fsdp=4", "--devices", "8", "--model", "qwen3-8b", "--eval"]) == 2
    assert "data x fsdp x tensor = 4, but --devices is 8" in capsys.readouterr().err
    assert plan.main(["--layouts", "fsdp=8,pipe=2"]) == 2
    assert "is not AXIS=SIZE" in capsys.readouterr().err
    assert plan.main(["--eval", "--model", "qwen3-8b", "--hosts", "3"]) == 2
    assert "--hosts 3: must be a positive divisor of --devices (8)" in capsys.readouterr().err
    assert plan.main(["--eval", "--model", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-5'" in err and "qwen3-8b" in err


def test_gpu_spec_text_holds_the_target_facts():
    spec = plan.TARGETS["a100-80gb"].gpu_spec()
    assert "core_count: 108" in spec and f"device_memory_size: {80 * 1024 ** 3}" in spec
    assert "major: 8 minor: 0" in spec and 'platform_name: "CUDA"' in spec
    assert dataclasses.asdict(plan.TARGETS["h100-80gb"])["peak_flops"] == 989e12


def test_layout_notes_say_which_axis_is_dropped():
    """A rule whose mesh axis does not divide a dimension: the planner says which and what happens."""
    mcfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=4)
    devices, _ = plan.compile_devices(None, 8)
    mesh_cfg = sharding.MeshConfig(data=1, fsdp=1, tensor=8)
    notes = plan.layout_notes(mcfg, sharding.make_mesh(mesh_cfg, devices), sharding.effective_rules(mesh_cfg))
    assert any("k_proj" in n and "kv_heads=4 is not divisible by tensor=8" in n and "replicated along tensor" in n
               for n in notes), notes
    assert not any("mlp=32" in n for n in notes)  # 32 divides: no note


def test_every_layout_trains_the_configs_global_batch(toy_tiny_assets, tmp_path):
    """Layouts are compared at the same sequences per step: fewer data-parallel devices get more rows each."""
    cfg = _cfg(toy_tiny_assets, "opsd", tmp_path, mesh={"num_devices": None},
               train={"per_device_batch": 1, "grad_accum": 2})  # fsdp=8: 16 sequences per step
    same, note = plan.same_global_batch(cfg, 8, 8)
    assert same is cfg and note is None
    tp, note = plan.same_global_batch(cfg, 2, 8)  # fsdp=2, tensor=4
    assert (tp.train.per_device_batch, tp.train.grad_accum) == (4, 2) and "same 16 sequences" in note
    odd = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, per_device_batch=1, grad_accum=3))
    with pytest.raises(plan.PlanError, match="cannot train the config's 24 sequences"):
        plan.same_global_batch(odd, 16, 8)


def test_eval_plan_reports_the_dense_and_the_paged_engine(toy_tiny_assets):
    """`--eval`: the dense engine in the eval's layout (fsdp=8) all-gathers weights at every decode step;
    the paged engine in its decode layout (data=8) gathers none, and its KV pool is sized like the
    engine sizes it (kv_cache_fraction of what the programs leave free, here below the call's demand)
    and fits with the 10% headroom the planner promises."""
    devices, compiler = plan.compile_devices(None, 8)
    sc = SamplingConfig(n=128, max_new_tokens=400, temperature=1.0, top_p=0.95, max_slots=8)
    target = dataclasses.replace(plan.TARGETS["a100-80gb"], hbm_bytes=8 << 20)  # 8 MiB: the budget binds
    rows = plan.plan_eval(str(toy_tiny_assets / "model"), {"data": 1, "fsdp": 8, "tensor": 1}, target, devices,
                          compiler, num_prompts=4, prompt_len=32, sc=sc)
    assert [(r.engine, r.layout, r.program) for r in rows] == [
        ("dense", "train", "eval_prefill"), ("dense", "train", "eval_decode"),
        ("paged", "decode", "eval_prefill"), ("paged", "decode", "eval_decode")]
    dense, paged = rows[1], rows[3]
    assert dense.step_collectives["weight_all_gather"]["count"] >= 7  # every projection of a layer, every step
    assert "weight_all_gather" not in paged.step_collectives
    assert paged.run_mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    p, b = paged.paged, paged.bytes_per_device
    assert p["decode_tensor"] == 1 and p["slots"] == 8 and p["shards"] == 8
    # sized by the budget (not the call's demand) as the engine sizes it: kv_cache_fraction x what the
    # arguments leave free (the loaded weights jsdr.eval keeps, the decode-layout copy), measured on a
    # 2-page pool
    args = p["besides_pool_args"]
    assert p["pool_pages"] == int(sc.kv_cache_fraction * (target.hbm_bytes - args)) // p["bytes_per_page"]
    assert 2 < p["pool_pages"] < p["demand_pages"]
    assert b["kv_pool"] == p["pool_bytes"] == p["pool_pages"] * p["bytes_per_page"]
    assert b["other"] < p["bytes_per_page"]  # the compiled pool is the pool the rows count
    assert b["resident"] == rows[0].bytes_per_device["params"]
    # what the CPU compiler adds with the pool (it copies it; the GPU compiler does not, see the GPU test)
    assert b["total"] <= 0.9 * target.hbm_bytes + max(r.paged["temp_growth"] for r in rows[2:])
    assert p["tokens_per_shard"] == (p["pool_pages"] - 1) * sc.page_size
    assert p["sequences_at_full_length"] == 8 * ((p["pool_pages"] - 1) // -(-(32 + 400) // sc.page_size))
    assert p["sequences"] == 512 and p["waves"] == -(-512 // min(p["sequences_at_full_length"], 8))
    text = plan.format_decode(rows)
    assert "fsdp=8>data=8" in text and "eval_decode" in text


def test_pool_sizing_is_the_engines_arithmetic():
    """plan.paged_pool_pages gives the pages scheduler.PagedEngine.plan_pool allocates: an explicit
    kv_cache_gb, and the automatic budget capped at the call's (bucketed) demand."""
    from jsdr.model.transformer import Model
    from jsdr.sampling.paged import Programs
    from jsdr.sampling.scheduler import PagedEngine

    mcfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=8)
    engine = PagedEngine(Programs(Model(mcfg)), context_len=4096)
    for sc in (SamplingConfig(n=4, max_new_tokens=300, kv_cache_gb=0.0001), SamplingConfig(n=4, max_new_tokens=300)):
        shape = engine.plan_pool(sc, [40] * 3, [300] * 3, sc.n, jnp.float32)
        got = plan.paged_pool_pages(sc, 3, 40, 1, shape.bytes_per_page(), 1 << 40)
        assert got["pages"] == shape.pages, sc


_LOOP_HLO = """HloModule m

%body (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %p = (s32[], bf16[8,64]{1,0}) parameter(0)
  %ag = ((bf16[8,64]{1,0}, bf16[8,32]{1,0}), (bf16[64,64]{1,0}, bf16[64,32]{1,0})) all-gather-start(%a, %b), \
dimensions={0}, metadata={op_name="jit(f)/while/body/q_proj/dot_general"}
  %logits = f32[32,300]{1,0} all-gather(%x), dimensions={0}, metadata={op_name="jit(f)/while/body/top_k"}
  ROOT %t = (s32[], bf16[8,64]{1,0}) tuple(%i, %h)
}

%cond (p: (s32[], bf16[8,64])) -> pred[] {
  %p = (s32[], bf16[8,64]{1,0}) parameter(0)
  ROOT %done = pred[] all-reduce-start(%q), to_apply=%add
}

ENTRY %main (a: bf16[8,64]) -> bf16[8,64] {
  %w = (s32[], bf16[8,64]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[16]{0} all-reduce(%y), to_apply=%add
}
"""


def test_decode_step_collectives_and_weight_gathers():
    """A combined async all-gather counts all its gathered arrays; the collectives of one iteration of a
    loop with a run-time trip count exclude what runs once; weight gathers are told from activations."""
    weights = {("bf16", (64, 64)), ("bf16", (64, 32))}
    assert plan.collectives(_LOOP_HLO, unknown_trip=10) == {
        "all-gather": {"count": 20, "bytes": 10 * ((64 * 64 + 64 * 32) * 2 + 32 * 300 * 4)},
        "all-reduce": {"count": 11, "bytes": 10 * 1 + 16 * 4}}
    step = plan.loop_step_collectives(_LOOP_HLO, weights)
    assert step["weight_all_gather"] == {"count": 1, "bytes": (64 * 64 + 64 * 32) * 2}
    assert step["all-gather"]["count"] == 2 and step["all-reduce"] == {"count": 1, "bytes": 1}
    params = {"layers": {"q": jax.ShapeDtypeStruct((2, 64, 32), jnp.bfloat16)},
              "norm": jax.ShapeDtypeStruct((64,), jnp.bfloat16)}
    assert ("bf16", (64, 32)) in plan.weight_shapes([params]) and ("bf16", (32, 64)) in plan.weight_shapes([params])
    assert not any(dims == (64,) for _, dims in plan.weight_shapes([params]))


# A decode program's call graph: `layer` (whose all-reduce sits one call further down, in `inner`) runs
# once before the decode loop, once in its body and in each of 4 iterations of a known-trip layer loop
# in it; the sampler's run-time-bounded `search` loop runs in the decode body and in each layer
# iteration; an async-start runs `send` (its async-done names the same computation).
_CALL_GRAPH_HLO = """HloModule calls

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%layer (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %c = f32[8]{0} call(%p), to_apply=%inner
}

%search_body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %g = f32[16]{0} all-gather(%x), dimensions={0}
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %g)
}

%search_cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%layers_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %l = f32[8]{0} call(%h), to_apply=%layer
  %s = (s32[], f32[16]{0}) while(%t1), condition=%search_cond, body=%search_body
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %l)
}

%layers_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%send (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %cp = f32[4]{0} collective-permute(%p), channel_id=1, source_target_pairs={{0,1},{1,0}}
}

%decode_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %l = f32[8]{0} call(%h), to_apply=%layer
  %k = (s32[], f32[8]{0}) while(%t0), condition=%layers_cond, body=%layers_body, \
backend_config={"known_trip_count":{"n":"4"}}
  %s = (s32[], f32[16]{0}) while(%t1), condition=%search_cond, body=%search_body
  %as = ((f32[4]{0}), f32[4]{0}, u32[]) async-start(%y), calls=%send
  %ad = f32[4]{0} async-done(%as), calls=%send
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %l)
}

%decode_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %pre = f32[8]{0} call(%x), to_apply=%layer
  %w = (s32[], f32[8]{0}) while(%t0), condition=%decode_cond, body=%decode_body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("trip", [0, 1, 7, 38912])
def test_collective_counts_follow_the_whole_call_graph(trip):
    """Each computation runs the sum over its call sites of caller runs x site runs, callers complete
    before callees: `inner` 1 + 5T times (not only the first caller's 1), the nested run-time `search`
    loop once per outer iteration and per layer iteration (5T), the async computation once per start."""
    assert plan.collectives(_CALL_GRAPH_HLO, unknown_trip=trip) == {
        k: v for k, v in {"all-reduce": {"count": 1 + 5 * trip, "bytes": 32 * (1 + 5 * trip)},
                          "all-gather": {"count": 5 * trip, "bytes": 64 * 5 * trip},
                          "collective-permute": {"count": trip, "bytes": 16 * trip}}.items() if v["count"]}
    # so the total is the once-per-call part plus the decode step's collectives x the trip count
    step = plan.loop_step_collectives(_CALL_GRAPH_HLO, set())
    assert {k: v["count"] for k, v in step.items()} == {"all-reduce": 5, "all-gather": 5, "collective-permute": 1}
