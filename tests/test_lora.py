"""LoRA as a tree delta: PEFT round trips (both directions), merge, gradients, sharding, errors.

References are `peft` + `transformers` in float32 on the tiny random models of tests/tiny_models.py.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jsdr import sharding
from jsdr.config import ConfigError
from jsdr.model import hf, lora as LR
from jsdr.model import transformer
from tests.tiny_models import build_tiny_model, jsdr_logits, left_padded_batch, logit_tol, torch_logits

B, L = 3, 20
ATTN_SUBSET = ("q_proj", "v_proj", "down_proj")


def _batch(seed=0, vocab=256):
    return left_padded_batch(seed, B, L, [0, 6, 13], vocab)


_tol, _torch_logits, _jsdr_logits = logit_tol, torch_logits, jsdr_logits


def _peft_model(model_dir, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable).eval()


def random_lora(model_cfg, lora_cfg, seed=0, std=0.15):
    """A and B both random (unlike init_lora), so the delta is clearly non-zero."""
    shapes = LR.lora_shapes(model_cfg, lora_cfg)
    leaves, tdef = jax.tree.flatten(shapes)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tdef, [jnp.asarray(rs.normal(0, std, s.shape).astype(np.float32)) for s in leaves])


def _masked_err(a, b, seg):
    return np.abs(a - b)[np.asarray(seg) == 1].max()


@pytest.fixture(scope="module")
def qwen3(qwen3_tiny):
    d, model = qwen3_tiny
    params, cfg, hfc = hf.load_params(str(d))
    return d, model, params, cfg, hfc


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_lora")
    model = build_tiny_model("qwen2", d, num_key_value_heads=1)
    params, cfg, hfc = hf.load_params(str(d))
    return d, model, params, cfg, hfc


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_lora")
    model = build_tiny_model("llama", d, attention_bias=True, tie_word_embeddings=True)
    params, cfg, hfc = hf.load_params(str(d))
    return d, model, params, cfg, hfc


# ---------------------------------------------------------------------------------------------
# config


def test_config_scale_and_validation():
    c = LR.LoraConfig()
    assert c.rank == 64 and c.alpha == 128.0 and c.scale == 2.0 and c.target_modules == LR.ALL_TARGETS
    assert LR.LoraConfig(rank=16, alpha=32, use_rslora=True).scale == pytest.approx(32 / 4)
    assert LR.LoraConfig(target_modules=["down_proj", "q_proj", "q_proj"]).target_modules == ("q_proj", "down_proj")
    assert LR.LoraConfig(target_modules="all-linear").target_modules == LR.ALL_TARGETS
    assert LR.LoraConfig(target_modules=("all-linear",)).target_modules == LR.ALL_TARGETS
    with pytest.raises(ConfigError, match=r"target_modules: \['qkv_proj'\] unknown"):
        LR.LoraConfig(target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(ConfigError, match=r"rank: must be a positive integer \(got 0\)"):
        LR.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="got -2"):
        LR.LoraConfig(rank=-2)
    with pytest.raises(ConfigError, match=r"dropout: must be in \[0, 1\) \(got 1.0\)"):
        LR.LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="empty"):
        LR.LoraConfig(target_modules=())
    with pytest.raises(ConfigError, match="all-linear stands for all seven"):
        LR.LoraConfig(target_modules=("all-linear", "q_proj"))


def test_config_fields_have_help_and_choices_from_the_command_line():
    """The help texts sit on the fields; target_modules is a Literal, so --help lists the choices and a
    typo is rejected by the loader (naming the option)."""
    import typing

    from jsdr.config import from_dict
    for f in dataclasses.fields(LR.LoraConfig):
        assert f.metadata.get("help"), f.name
    choices = typing.get_args(typing.get_args(typing.get_type_hints(LR.LoraConfig)["target_modules"])[0])
    assert choices == ("all-linear",) + LR.ALL_TARGETS
    assert from_dict(LR.LoraConfig, {"target_modules": "q_proj,down_proj"}).target_modules == ("q_proj", "down_proj")
    assert from_dict(LR.LoraConfig, {"target_modules": "all-linear"}).target_modules == LR.ALL_TARGETS
    with pytest.raises(ConfigError, match="target_modules"):
        from_dict(LR.LoraConfig, {"target_modules": "q_prj"})


def test_axes_shapes_and_param_count_equal_peft(qwen3):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    d, _, params, cfg, _ = qwen3
    for targets in (LR.ALL_TARGETS, ATTN_SUBSET):
        lc = LR.LoraConfig(rank=8, alpha=16, target_modules=targets)
        lora = LR.init_lora(cfg, lc, jax.random.key(0))
        pm = get_peft_model(build_tiny_model("qwen3"), PeftLoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
        trainable, _ = pm.get_nb_trainable_parameters()
        assert LR.count_params(lora) == trainable
        assert jax.tree.structure(LR.lora_axes(cfg, lc), is_leaf=lambda x: isinstance(x, tuple)) == \
            jax.tree.structure(lora)
    ax = LR.lora_axes(cfg, LR.LoraConfig())["layers"]
    assert ax["self_attn"]["o_proj"] == {"lora_a": ("layers", "q_heads", "lora_rank"),
                                         "lora_b": ("layers", "lora_rank", "embed")}
    assert ax["mlp"]["down_proj"]["lora_a"] == ("layers", "mlp", "lora_rank")


def test_init_matches_peft_distribution_and_zero_delta_is_bit_identical(qwen3):
    """A ~ U(+-1/sqrt(in)) like PEFT's kaiming_uniform(a=sqrt(5)); B = 0; logits == base bit for bit."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=16, alpha=32)
    lora = LR.init_lora(cfg, lc, jax.random.key(1))
    pm = get_peft_model(build_tiny_model("qwen3"), PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name in ("q_proj", "down_proj"):
        block = LR.TARGETS[name].block
        a = np.asarray(lora["layers"][block][name]["lora_a"])
        ref = getattr(getattr(pm.base_model.model.model.layers[0], block), name).lora_A["default"].weight
        ref = ref.detach().numpy()
        bound = 1 / np.sqrt(a.shape[1])
        assert np.abs(a).max() <= bound and np.abs(ref).max() <= bound
        assert np.abs(a).max() > 0.95 * bound
        np.testing.assert_allclose(a.std(), ref.std(), rtol=0.1)
        assert not np.any(np.asarray(lora["layers"][block][name]["lora_b"]))
    assert not np.array_equal(np.asarray(lora["layers"]["mlp"]["up_proj"]["lora_a"]),
                              np.asarray(lora["layers"]["mlp"]["gate_proj"]["lora_a"]))
    tokens, seg = _batch(1)
    base = _jsdr_logits(params, cfg, tokens, seg)
    with_lora = _jsdr_logits(params, cfg, tokens, seg, lora, lc.scale)
    np.testing.assert_array_equal(with_lora, base)


# ---------------------------------------------------------------------------------------------
# export to peft, import from peft


EXPORT_CASES = {
    "qwen3_all7": ("qwen3", dict(rank=4, alpha=8.0)),
    "qwen3_subset_rslora": ("qwen3", dict(rank=8, alpha=6.0, target_modules=ATTN_SUBSET, use_rslora=True)),
    "qwen2_all7_rslora": ("qwen2", dict(rank=4, alpha=16.0, use_rslora=True)),
    "llama_subset": ("llama", dict(rank=2, alpha=3.0, target_modules=("k_proj", "o_proj", "gate_proj", "up_proj"))),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_with_same_logits(case, request, tmp_path):
    family, kw = EXPORT_CASES[case]
    d, model, params, cfg, _ = request.getfixturevalue(family)
    lc = LR.LoraConfig(**kw)
    lora = random_lora(cfg, lc, seed=3)
    out = LR.save_peft(tmp_path / "adapter", lora, lc, cfg, base_model_name_or_path=str(d))
    tokens, seg = _batch(2)
    ours = _jsdr_logits(params, cfg, tokens, seg, lora, lc.scale)
    ref = _torch_logits(_peft_model(d, out), tokens, seg)
    base = _torch_logits(model, tokens, seg)
    assert _masked_err(ref, base, seg) > 100 * _tol(ref), "adapter too weak for the test to mean anything"
    err = _masked_err(ours, ref, seg)
    assert err <= _tol(ref), f"{case}: max abs diff {err}"
    # and it reads back bit-exactly
    lora2, lc2 = LR.load_peft(out, cfg, base_model_name_or_path=str(d))
    assert lc2 == lc
    assert jax.tree.structure(lora2) == jax.tree.structure(lora)
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _peft_saved_adapter(model_dir, out_dir, seed=0, **kw):
    """An adapter made by peft.get_peft_model with randomised B (and A), saved with save_pretrained."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(base, PeftLoraConfig(**kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(out_dir)
    return pm.eval()


@pytest.mark.parametrize("family,kw", [
    ("qwen3", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    ("qwen2", dict(r=6, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], use_rslora=True,
                   lora_dropout=0.1)),
])
def test_peft_adapter_imports_with_same_logits(family, kw, request, tmp_path):
    d, model, params, cfg, _ = request.getfixturevalue(family)
    pm = _peft_saved_adapter(d, tmp_path / "a", **kw)
    lora, lc = LR.load_peft(tmp_path / "a", cfg)
    assert lc.rank == kw["r"] and lc.alpha == kw["lora_alpha"] and lc.use_rslora == kw.get("use_rslora", False)
    assert lc.dropout == kw.get("lora_dropout", 0.0)
    tokens, seg = _batch(4)
    ref = _torch_logits(pm, tokens, seg)
    assert _masked_err(ref, _torch_logits(model, tokens, seg), seg) > 100 * _tol(ref)
    err = _masked_err(_jsdr_logits(params, cfg, tokens, seg, lora, lc.scale), ref, seg)
    assert err <= _tol(ref), f"max abs diff {err}"


def test_peft_key_spellings_are_accepted(qwen3, tmp_path):
    """With the adapter name (".default") and without the "base_model.model." prefix."""
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=2, alpha=2, target_modules=ATTN_SUBSET)
    lora = random_lora(cfg, lc, seed=5)
    src = LR.save_peft(tmp_path / "src", lora, lc, cfg)
    tensors = dict(LR.peft_tensors(lora))
    for variant, fix in (("default", lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default.")), ("noprefix", lambda k: k.removeprefix("base_model.model."))):
        out = tmp_path / variant
        out.mkdir()
        (out / LR.ADAPTER_CONFIG).write_text((src / LR.ADAPTER_CONFIG).read_text())
        hf.write_safetensors(out / LR.ADAPTER_WEIGHTS, {fix(k): v for k, v in tensors.items()})
        lora2, _ = LR.load_peft(out, cfg)
        for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_equals_unmerged_and_exports_to_transformers(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM
    d, _, params, cfg, hfc = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))
    lora = random_lora(cfg, lc, seed=7)
    before = jax.tree.map(np.asarray, params)
    merged = LR.merge(params, lora, lc.scale)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # base untouched
        np.testing.assert_array_equal(a, np.asarray(b))
    assert merged["layers"]["self_attn"]["v_proj"]["kernel"] is params["layers"]["self_attn"]["v_proj"]["kernel"]
    assert not np.array_equal(np.asarray(merged["layers"]["self_attn"]["q_proj"]["kernel"]),
                              before["layers"]["self_attn"]["q_proj"]["kernel"])
    tokens, seg = _batch(8)
    unmerged = _jsdr_logits(params, cfg, tokens, seg, lora, lc.scale)
    m = _jsdr_logits(merged, cfg, tokens, seg)
    assert _masked_err(m, unmerged, seg) <= _tol(unmerged)
    assert _masked_err(unmerged, _jsdr_logits(params, cfg, tokens, seg), seg) > 100 * _tol(unmerged)
    out = hf.save_params(merged, cfg, hfc, tmp_path / "merged")
    ref = _torch_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), tokens, seg)
    assert _masked_err(ref, unmerged, seg) <= _tol(ref)
    # peft's own merge_and_unload of the same adapter agrees too
    ad = LR.save_peft(tmp_path / "ad", lora, lc, cfg)
    pm = _peft_model(d, ad).merge_and_unload()
    assert _masked_err(_torch_logits(pm, tokens, seg), unmerged, seg) <= _tol(ref)


# ---------------------------------------------------------------------------------------------
# gradients


def test_gradients_only_for_lora_and_equal_peft(qwen3, tmp_path):
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8)
    lora = random_lora(cfg, lc, seed=9, std=0.05)
    tokens, seg = _batch(10)
    w = np.random.RandomState(11).normal(size=(B, L, cfg.vocab_size)).astype(np.float32) * seg[..., None]
    pos = transformer.positions_from_segments(jnp.asarray(seg))

    def loss(lo):  # the base tree is closed over: not an argument of differentiation
        return jnp.sum(transformer.forward(params, tokens, pos, seg, cfg, lo, lc.scale) * w)

    grads = jax.jit(jax.grad(loss))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    for path, g in jax.tree.flatten_with_path(grads)[0]:
        per_layer = np.abs(np.asarray(g)).max(axis=(1, 2))
        assert np.all(per_layer > 0), f"zero gradient for {jax.tree_util.keystr(path)}: {per_layer}"

    pm = _peft_model(d, LR.save_peft(tmp_path / "ad", lora, lc, cfg), trainable=True)
    logits = pm(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg, dtype=torch.long)).logits
    (logits * torch.tensor(w)).sum().backward()
    n_trainable = 0
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        n_trainable += p.numel()
        parts = name.split(".")
        i, block, mod, ab = int(parts[parts.index("layers") + 1]), parts[-5], parts[-4], parts[-3]
        ours = np.asarray(grads["layers"][block][mod]["lora_a" if ab == "lora_A" else "lora_b"][i]).T
        ref = p.grad.numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0, err_msg=name)
    assert n_trainable == LR.count_params(lora)


def test_zero_init_gradients_like_peft(qwen3):
    """At init (B = 0) only B receives gradient, exactly as in PEFT; the step still moves the model."""
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8, target_modules=ATTN_SUBSET)
    lora = LR.init_lora(cfg, lc, jax.random.key(2))
    tokens, seg = _batch(12)
    pos = transformer.positions_from_segments(jnp.asarray(seg))
    g = jax.jit(jax.grad(lambda lo: transformer.forward(params, tokens, pos, seg, cfg, lo, lc.scale)[..., :5].sum()))(lora)
    for name in ATTN_SUBSET:
        leaves = g["layers"][LR.TARGETS[name].block][name]
        assert not np.any(np.asarray(leaves["lora_a"])) and np.all(np.abs(np.asarray(leaves["lora_b"])).max((1, 2)) > 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_delta_backward_equals_autodiff_and_torch(dtype):
    """transformer.lora_delta's hand-written backward against autodiff of the same expression and
    against torch autograd (float64), for dX, dA and dB, with two batch axes."""
    rs = np.random.RandomState(3)
    x, a, b = (rs.normal(size=s).astype(np.float32) for s in ((3, 7, 24), (24, 5), (5, 40)))
    w = rs.normal(size=(3, 7, 40)).astype(np.float32)  # a random cotangent, through a weighted sum
    dt = jnp.dtype(dtype)

    def loss(f):
        return lambda x_, a_, b_: jnp.sum(f(x_, a_, b_).astype(jnp.float32) * w)

    plain = lambda x_, a_, b_: 1.7 * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x_, a_), b_)
    args = [jnp.asarray(v, dt) for v in (x, a, b)]
    ours = jax.grad(loss(lambda *t: transformer.lora_delta(*t, 1.7)), argnums=(0, 1, 2))(*args)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2))(*args)
    tx, ta, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, a, b))
    (1.7 * (tx @ ta) @ tb * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for name, o, r, t in zip("xab", ours, ref, (tx.grad, ta.grad, tb.grad)):
        assert o.dtype == dt and o.shape == r.shape
        o, r, t = np.asarray(o, np.float32), np.asarray(r, np.float32), t.numpy()
        tol = (1e-5 if dtype == "float32" else 3e-2) * np.abs(t).max()
        np.testing.assert_allclose(o, t, atol=tol, rtol=0, err_msg=f"d{name} vs torch")
        np.testing.assert_allclose(o, r, atol=tol, rtol=0, err_msg=f"d{name} vs autodiff")


# ---------------------------------------------------------------------------------------------
# dropout


def test_dense_lora_dropout_semantics():
    """dropout acts on the LoRA input only: delta = scale * (mask * x / (1-p)) A B with mask ~ Bernoulli(1-p)."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(4, 50, 16)).astype(np.float32)) + 3.0
    p = {"kernel": jnp.asarray(rs.normal(size=(16, 16)).astype(np.float32))}
    lo = {"lora_a": jnp.eye(16), "lora_b": jnp.eye(16)}
    rate, scale = 0.25, 2.0
    base = np.asarray(transformer.dense(x, p, None, scale))
    y = np.asarray(transformer.dense(x, p, lo, scale, (rate, jax.random.key(3))))
    delta = (y - base) / scale
    xs = np.asarray(x)
    kept = np.isclose(delta, xs / (1 - rate), rtol=1e-5, atol=1e-5)
    dropped = np.abs(delta) < 1e-5
    assert np.all(kept | dropped)
    assert abs(dropped.mean() - rate) < 0.03
    np.testing.assert_allclose(np.asarray(transformer.dense(x, p, lo, scale, (0.0, jax.random.key(3)))),
                               np.asarray(transformer.dense(x, p, lo, scale)), rtol=0, atol=0)
    y2 = np.asarray(transformer.dense(x, p, lo, scale, (rate, jax.random.key(4))))
    assert not np.array_equal(y, y2)


def test_forward_lora_dropout(qwen3):
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8, dropout=0.3)
    lora = random_lora(cfg, lc, seed=13)
    tokens, seg = _batch(14)
    pos = transformer.positions_from_segments(jnp.asarray(seg))
    fwd = jax.jit(lambda lo, key, rate: transformer.forward(params, tokens, pos, seg, cfg, lo, lc.scale,
                                                  lora_dropout=(rate, key)), static_argnums=2)
    plain = _jsdr_logits(params, cfg, tokens, seg, lora, lc.scale)
    d1, d1b, d2 = (np.asarray(fwd(lora, jax.random.key(k), lc.dropout)) for k in (0, 0, 1))
    np.testing.assert_array_equal(d1, d1b)
    assert _masked_err(d1, plain, seg) > 100 * _tol(plain) and _masked_err(d1, d2, seg) > 100 * _tol(plain)
    # dropout never touches the base path: with a zero delta nothing changes
    zero = jax.tree.map(jnp.zeros_like, lora)
    base = jax.jit(lambda: transformer.forward(params, tokens, pos, seg, cfg))()
    np.testing.assert_array_equal(np.asarray(fwd(zero, jax.random.key(0), lc.dropout)), np.asarray(base))
    with pytest.raises(ValueError, match="lora_dropout rate"):
        _jsdr_logits(params, cfg, tokens, seg, lora, lc.scale, lora_dropout=(1.0, jax.random.key(0)))


# ---------------------------------------------------------------------------------------------
# sharding


def test_lora_on_mesh_same_logits(qwen3, tmp_path):
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8)
    lora = random_lora(cfg, lc, seed=15)
    ad = LR.save_peft(tmp_path / "ad", lora, lc, cfg)
    rs = np.random.RandomState(16)
    tokens = rs.randint(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[2, :4] = 0
    pos = np.asarray(transformer.positions_from_segments(seg))
    ref = np.asarray(transformer.forward(params, tokens, pos, seg, cfg, lora, lc.scale))

    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    sparams, _, _ = hf.load_params(str(d), mesh=mesh)
    slora, _ = LR.load_peft(ad, cfg, mesh=mesh)
    P = jax.sharding.PartitionSpec
    # every leaf is split over fsdp: A on its embed (input) axis, B on its rank where its output is not embed
    assert slora["layers"]["self_attn"]["q_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
    assert slora["layers"]["self_attn"]["q_proj"]["lora_b"].sharding.spec == P(None, "fsdp", "tensor")
    assert slora["layers"]["mlp"]["down_proj"]["lora_a"].sharding.spec == P(None, "tensor", "fsdp")
    assert slora["layers"]["mlp"]["down_proj"]["lora_b"].sharding.spec == P(None, "fsdp", None)
    init = LR.init_lora(cfg, lc, jax.random.key(0), mesh=mesh)
    assert init["layers"]["mlp"]["up_proj"]["lora_b"].sharding.spec == P(None, "fsdp", "tensor")
    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch({"tokens": tokens, "pos": pos, "seg": seg}, mesh)
        fwd = jax.jit(lambda p, lo, b: transformer.forward(p, b["tokens"], b["pos"], b["seg"], cfg, lo, lc.scale))
        out = fwd(sparams, slora, batch)
        merged = jax.jit(LR.merge, static_argnums=2)(sparams, slora, lc.scale)
        out_m = fwd(merged, None, batch)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * max(1, np.abs(ref).max()), rtol=0)
    np.testing.assert_allclose(np.asarray(out_m), ref, atol=1e-4 * max(1, np.abs(ref).max()), rtol=0)


# ---------------------------------------------------------------------------------------------
# errors


def _edit_config(src, dst, **changes):
    dst.mkdir()
    c = json.loads((src / LR.ADAPTER_CONFIG).read_text())
    c.update(changes)
    (dst / LR.ADAPTER_CONFIG).write_text(json.dumps(c))
    (dst / LR.ADAPTER_WEIGHTS).write_bytes((src / LR.ADAPTER_WEIGHTS).read_bytes())
    return dst


def test_errors_for_adapters_that_do_not_fit(qwen3, qwen2, tmp_path):
    d, _, params, cfg, _ = qwen3
    lc = LR.LoraConfig(rank=4, alpha=8, target_modules=ATTN_SUBSET)
    src = LR.save_peft(tmp_path / "src", random_lora(cfg, lc), lc, cfg, base_model_name_or_path="org/Qwen3-tiny")
    E = LR.AdapterError

    with pytest.raises(E, match=r"lora_A\.weight has shape \(4, 64\), expected \(8, 64\) \(wrong rank"):
        LR.load_peft(_edit_config(src, tmp_path / "rank", r=8), cfg)
    with pytest.raises(E, match=r"target_modules \['c_attn'\] are not supported"):
        LR.load_peft(_edit_config(src, tmp_path / "tgt", target_modules=["q_proj", "c_attn"]), cfg)
    with pytest.raises(E, match=r"targets \['q_proj', 'k_proj', 'v_proj', 'down_proj'\] but .* has LoRA tensors "
                                r"for \['q_proj', 'v_proj', 'down_proj'\]"):
        LR.load_peft(_edit_config(src, tmp_path / "tgt2", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
                     cfg)
    with pytest.raises(E, match=r"lm_head"):
        LR.load_peft(_edit_config(src, tmp_path / "tgt3", target_modules=".*(q_proj|lm_head)"), cfg)
    small = transformer.ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, qk_norm=True)
    with pytest.raises(E, match=r"q_proj\.lora_A\.weight has shape \(4, 64\), expected \(4, 32\) \(wrong shape.*"
                                r"hidden=32"):
        LR.load_peft(src, small)
    with pytest.raises(E, match=r"layer 1, but the model has 1 layers"):
        LR.load_peft(src, transformer.ModelConfig(**{**cfg.__dict__, "num_layers": 1}))
    with pytest.raises(E, match=r"made for a Qwen3ForCausalLM, the model is a Qwen2ForCausalLM"):
        LR.load_peft(src, qwen2[3])
    with pytest.raises(E, match=r"base model 'org/Qwen3-tiny' does not match '/models/Llama-3.2-1B'"):
        LR.load_peft(src, cfg, base_model_name_or_path="/models/Llama-3.2-1B")
    LR.load_peft(src, cfg, base_model_name_or_path="/local/models/Qwen3-tiny/")  # same name: fine

    # unsupported PEFT features are named
    for field, value, what in (("use_dora", True, "DoRA"), ("bias", "all", "trained biases"),
                               ("modules_to_save", ["lm_head"], "modules_to_save"),
                               ("layers_to_transform", [0], "layers_to_transform"),
                               ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
                               ("init_lora_weights", "pissa", "pissa"), ("peft_type", "IA3", "IA3")):
        with pytest.raises(E, match=what):
            LR.load_peft(_edit_config(src, tmp_path / f"f_{field}", **{field: value}), cfg)

    # tensors the config does not explain (a DoRA magnitude) and missing layers
    tensors = dict(LR.peft_tensors(random_lora(cfg, lc)))
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / LR.ADAPTER_CONFIG).write_text((src / LR.ADAPTER_CONFIG).read_text())
    hf.write_safetensors(bad / LR.ADAPTER_WEIGHTS, {**tensors, "base_model.model.model.layers.0.self_attn.q_proj."
                                                    "lora_magnitude_vector": np.ones(64, np.float32)})
    with pytest.raises(E, match="unsupported tensors.*lora_magnitude_vector"):
        LR.load_peft(bad, cfg)
    hf.write_safetensors(bad / LR.ADAPTER_WEIGHTS, {k: v for k, v in tensors.items() if ".layers.1.mlp" not in k})
    with pytest.raises(E, match=r"no down_proj\.lora_A for layers \[1\]"):
        LR.load_peft(bad, cfg)
    with pytest.raises(E, match="no adapter_config.json"):
        LR.load_peft(tmp_path / "nowhere", cfg)

    # save_peft refuses a tree that does not match its config
    with pytest.raises(ValueError, match="rank 4 but lora_cfg.rank=8"):
        LR.save_peft(tmp_path / "x", random_lora(cfg, lc), LR.LoraConfig(rank=8, target_modules=ATTN_SUBSET), cfg)
    with pytest.raises(ValueError, match="do not fit the model"):
        LR.save_peft(tmp_path / "y", random_lora(cfg, lc), lc, small)
