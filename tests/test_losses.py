"""Losses: SFT, GRPO, OPSD and the chunked lm-head, each against a plain torch float64 reference
(full logits, autograd), on random inputs with masks; then the loss functions end to end on a tiny
Qwen3 against transformers with LoRA added by forward hooks; then the memory claim."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jsdr import losses as L
from jsdr.data import batches
from jsdr.losses import divergence as D
from jsdr.model import hf
from jsdr.model.transformer import Model
from jsdr.train import TrainConfig

torch.set_default_dtype(torch.float64)

# head-level shapes: B rows, N positions, E hidden, V vocabulary; chunk 4 -> 4 chunks, 3 padded positions
B, N, E, V, CHUNK = 3, 13, 16, 40, 4


def _t(x):
    return torch.tensor(np.asarray(x, np.float64))


def _close(got, want, rtol=2e-5, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1e-6, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale + 1e-7, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def head_inputs():
    rs = np.random.RandomState(0)
    hs = rs.randn(B, N, E).astype(np.float32)
    ht = (hs + 0.8 * rs.randn(B, N, E)).astype(np.float32)  # related but different teacher
    w = (0.4 * rs.randn(E, V)).astype(np.float32)
    y = rs.randint(0, V, (B, N)).astype(np.int32)
    mask = np.ones((B, N), np.float32)
    mask[1, rs.rand(N) < 0.4] = 0.0  # row 1 partially masked
    mask[1, 0] = 1.0
    mask[2] = 0.0  # row 2 empty
    mask[0, -2:] = 0.0
    return hs, ht, w, y, mask


# ---------------------------------------------------------------------------------------------
# torch references (float64, full logits)


def ref_opsd(hs, ht, w, y, mask, cfg):
    """Returns (loss, grad w.r.t. hs, metrics dict) of OPSD written plainly over full logits."""
    hs_t = _t(hs).requires_grad_(True)
    s = hs_t @ _t(w) / cfg.temperature
    t = (_t(ht) @ _t(w) / cfg.temperature).detach()
    ls_full, lt_full = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    s_ent = -(ls_full.exp() * ls_full).sum(-1)
    t_ent = -(lt_full.exp() * lt_full).sum(-1)
    yt = torch.tensor(y, dtype=torch.long)[..., None]
    if cfg.variant == "sampled_token":
        ls_y, lt_y = ls_full.gather(-1, yt)[..., 0], lt_full.gather(-1, yt)[..., 0]
        per_tok = -(lt_y - ls_y).detach() * ls_y
        div = per_tok.detach()
        clipped = torch.zeros_like(div)
    else:
        if cfg.variant == "top_k":
            t_top, idx = torch.topk(t, cfg.top_k, dim=-1)
            lt, ls = torch.log_softmax(t_top, -1), torch.log_softmax(s.gather(-1, idx), -1)
        else:
            lt, ls = lt_full, ls_full
        pt, ps = lt.exp(), ls.exp()
        b = cfg.beta
        if b == 0:
            terms = pt * (lt - ls)
        elif b == 1:
            terms = ps * (ls - lt)
        else:
            m = b * pt + (1 - b) * ps  # mixture in probability space (independent of the log-space code)
            terms = b * pt * (lt - m.log()) + (1 - b) * ps * (ls - m.log())
        div = terms.sum(-1)
        if cfg.clip_tau is None:
            per_tok, clipped = div, torch.zeros_like(div)
        elif cfg.clip_mode == "token":
            per_tok, clipped = torch.clamp(div, max=cfg.clip_tau), (div > cfg.clip_tau).double()
        else:
            per_tok = torch.clamp(terms, max=cfg.clip_tau).sum(-1)
            clipped = (terms > cfg.clip_tau).any(-1).double()
        div = div.detach()
    m = _t(mask)
    if cfg.reduction == "sequence":
        n = m.sum(1)
        rows = [(per_tok[i] * m[i]).sum() / n[i] for i in range(len(n)) if n[i] > 0]
        loss = torch.stack(rows).mean() if rows else (per_tok * 0).sum()
    else:
        loss = (per_tok * m).sum() / m.sum().clamp(min=1)
    loss.backward()
    sel = m > 0
    metrics = {"loss": loss.item(), "div_mean": div[sel].mean().item(), "div_max": div[sel].max().item(),
               "clip_frac": clipped[sel].mean().item(), "student_entropy": s_ent[sel].mean().item(),
               "teacher_entropy": t_ent[sel].mean().item(), "n_tokens": float(m.sum())}
    return loss.item(), hs_t.grad.numpy(), metrics


def ref_logp(h, w, y, temperature=1.0):
    logits = h @ w / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(y, dtype=torch.long)[..., None])[..., 0]


def ref_grpo_objective(logp, old, adv, mask, cfg, ref_logp=None):
    m = _t(mask)
    ratio = torch.exp(logp - _t(old))
    a = _t(adv)[:, None]
    term = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * a)
    if cfg.beta > 0:
        r = ref_logp - logp
        term = term + cfg.beta * (torch.exp(r) - r - 1)
    if cfg.aggregation == "grpo":
        loss = ((term * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif cfg.aggregation == "dapo":
        loss = (term * m).sum() / m.sum().clamp(min=1)
    else:
        loss = (term * m).sum() / (m.shape[0] * (cfg.max_completion_length or m.shape[1]))
    low = ((ratio < 1 - cfg.epsilon_low) & (a < 0)).double()
    high = ((ratio > 1 + cfg.epsilon_high) & (a > 0)).double()
    sel = m > 0
    return loss, {"clip_low": low[sel].mean().item(), "clip_high": high[sel].mean().item(),
                  "ratio_mean": ratio[sel].mean().item()}


def np_group_advantages(rewards, G, std_norm, eps):
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    a = r - r.mean(1, keepdims=True)
    if std_norm:
        a = a / (r.std(1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1)


# ---------------------------------------------------------------------------------------------
# OPSD head: every option against the reference

# every beta with every clip setting; the reduction alternates so that each beta and each clip
# setting is seen with both reductions
OPSD_CASES = []
for _bi, _beta in enumerate((0.0, 0.5, 1.0, 0.3)):
    for _ci, _clip in enumerate((None, "token", "vocab")):
        _red = ("sequence", "token")[(_bi + _ci) % 2]
        OPSD_CASES.append(dict(variant="full", beta=_beta, clip=_clip, reduction=_red))
for _i, (_beta, _clip) in enumerate([(0.0, None), (0.3, "vocab"), (1.0, "token"), (0.5, None)]):
    OPSD_CASES.append(dict(variant="top_k", beta=_beta, clip=_clip, reduction=("token", "sequence")[_i % 2]))
OPSD_CASES += [dict(variant="sampled_token", beta=0.5, clip=None, reduction=r) for r in ("sequence", "token")]


def _clip_tau(hs, ht, w, y, mask, cfg):
    """A tau that clips about half of the unmasked tokens (chosen from the unclipped reference)."""
    probe = dataclasses.replace(cfg, clip_tau=None)
    hs_t, ht_t = _t(hs), _t(ht)
    s, t = hs_t @ _t(w) / cfg.temperature, ht_t @ _t(w) / cfg.temperature
    if cfg.variant == "top_k":
        t, idx = torch.topk(t, cfg.top_k, -1)
        s = s.gather(-1, idx)
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    b = probe.beta
    pt, ps = lt.exp(), ls.exp()
    mix = (b * pt + (1 - b) * ps).log()
    terms = b * pt * (lt - mix) + (1 - b) * ps * (ls - mix) if 0 < b < 1 else \
        (pt * (lt - ls) if b == 0 else ps * (ls - lt))
    per_token = terms.sum(-1) if cfg.clip_mode == "token" else terms.max(-1).values
    v = np.sort(per_token.numpy()[mask > 0])
    k = len(v) // 2  # halfway between two neighbours: no token sits at the clip edge
    return float(0.5 * (v[k - 1] + v[k]))


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_jsd_where_probabilities_underflow(beta):
    """The mixture's log comes from the probabilities (one log, floored at the smallest normal float),
    not from a logaddexp of the log-probabilities: where both underflow in float32 the divergence and
    its gradient stay finite and equal the float64 logaddexp reference."""
    rs = np.random.RandomState(3)
    s = (rs.randn(4, 96) * 60).astype(np.float32)  # log-probabilities down to about -500
    t = (rs.randn(4, 96) * 60).astype(np.float32)
    t[0] = s[0] + rs.randn(96).astype(np.float32) * 0.1  # a near-zero divergence too
    opts = (beta, None, "token")
    def total(a):  # (summed loss, per-row loss), from one call
        per_row = D.divergence_loss(a, jnp.asarray(t), opts)[0]
        return jnp.sum(per_row), per_row

    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(s))
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ls, lt = torch.log_softmax(st, -1), torch.log_softmax(torch.tensor(t, dtype=torch.float64), -1)
    lm = torch.logaddexp(lt + np.log(beta), ls + np.log1p(-beta))
    want = (beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)).sum(-1)
    want.sum().backward()
    assert (ls.detach().numpy() < -88).mean() > 0.3  # many entries underflow in float32
    assert np.all(np.isfinite(np.asarray(loss))) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(loss), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), st.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", OPSD_CASES, ids=lambda c: f"{c['variant']}-b{c['beta']}-{c['clip']}-{c['reduction']}")
def test_opsd_head_matches_reference(head_inputs, case):
    hs, ht, w, y, mask = head_inputs
    cfg = L.OPSDConfig(beta=case["beta"], temperature=1.1 if case["beta"] != 0.5 else 1.0,
                       reduction=case["reduction"], variant=case["variant"], top_k=7, chunk_size=CHUNK,
                       clip_mode=case["clip"] or "token")
    if case["clip"]:
        cfg = dataclasses.replace(cfg, clip_tau=_clip_tau(hs, ht, w, y, mask, cfg))
    want_loss, want_grad, want_m = ref_opsd(hs, ht, w, y, mask, cfg)

    def f(hs_, ht_):
        return L.opsd_head_loss(hs_, ht_, y, mask, jnp.asarray(w), cfg)

    (loss, metrics), (g_s, g_t) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ht)
    _close(loss, want_loss, what="loss")
    _close(g_s, want_grad, rtol=5e-5, what="grad w.r.t. student hidden")
    assert np.all(np.asarray(g_t) == 0), "the teacher must get no gradient"
    assert np.abs(want_grad).max() > 1e-4  # the gradient is not trivially zero
    for k, v in want_m.items():
        _close(metrics[k], v, rtol=5e-5, what=k)
    if case["clip"]:
        assert 0.0 < float(metrics["clip_frac"]) < 1.0, "the case must clip some tokens and not others"


def test_opsd_chunking_is_invisible(head_inputs):
    """Chunk sizes 1, 5 (ragged), N and None give the same loss and gradient."""
    hs, ht, w, y, mask = head_inputs

    def f(h):  # one compile for the four chunk sizes
        return [jax.value_and_grad(lambda h_, c=c: L.opsd_head_loss(
            h_, ht, y, mask, jnp.asarray(w), L.OPSDConfig(beta=0.3, clip_tau=0.5, chunk_size=c))[0])(h)
            for c in (1, 5, N, None)]

    results = jax.jit(f)(hs)
    for loss, g in results[1:]:
        _close(loss, results[0][0], rtol=1e-6, what="loss")
        _close(g, results[0][1], rtol=1e-5, what="grad")


@pytest.mark.parametrize("variant", ["full", "top_k", "sampled_token"])
def test_opsd_identical_teacher_and_student(head_inputs, variant):
    hs, _, w, y, mask = head_inputs
    betas = (0.0, 0.3, 1.0)

    def f(h):  # one compile for the three betas
        out = []
        for beta in betas:
            cfg = L.OPSDConfig(beta=beta, variant=variant, top_k=5, chunk_size=CHUNK,
                               clip_tau=None if variant == "sampled_token" else 0.01, clip_mode="vocab")
            out.append(jax.value_and_grad(lambda h_: L.opsd_head_loss(h_, h, y, mask, jnp.asarray(w), cfg),
                                          has_aux=True)(h))
        return out

    for beta, ((loss, m), g) in zip(betas, jax.jit(f)(hs)):
        assert abs(float(loss)) < 1e-6 and abs(float(m["div_max"])) < 1e-5
        assert float(np.abs(g).max()) < 1e-6, f"beta={beta}: nonzero gradient for identical distributions"


def test_opsd_empty_rollouts_are_finite(head_inputs):
    hs, ht, w, y, _ = head_inputs
    zero = np.zeros((B, N), np.float32)
    for red in ("sequence", "token"):
        cfg = L.OPSDConfig(reduction=red, clip_tau=0.1, chunk_size=CHUNK)
        (loss, m), g = jax.jit(jax.value_and_grad(lambda h: L.opsd_head_loss(h, ht, y, zero, jnp.asarray(w), cfg),
                                                  has_aux=True))(hs)
        assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
        assert all(np.isfinite(float(v)) for v in m.values())


def test_opsd_head_under_mesh(head_inputs):
    """Sharded over (data 2, fsdp 2, tensor 2) - batch on data/fsdp, chunk logits on the vocab -
    the loss and gradient equal the single-device ones."""
    from jsdr import sharding
    hs, ht, w, y, mask = head_inputs
    hs4, ht4 = np.concatenate([hs, hs[:1]]), np.concatenate([ht, ht[:1]])
    y4, m4 = np.concatenate([y, y[:1]]), np.concatenate([mask, mask[:1]])
    cfg = L.OPSDConfig(beta=0.3, clip_tau=0.2, variant="top_k", top_k=6, chunk_size=CHUNK)
    f = jax.value_and_grad(lambda h, t, w_: L.opsd_head_loss(h, t, y4, m4, w_, cfg)[0])
    want = jax.jit(f)(hs4, ht4, w)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    with sharding.use_mesh(mesh):
        act = sharding.logical_sharding(("act_batch", "act_seq", "act_embed"), hs4.shape, mesh)
        ker = sharding.logical_sharding(("embed", "vocab"), w.shape, mesh)
        got = jax.jit(f, in_shardings=(act, act, ker))(hs4, ht4, w)
    _close(got[0], want[0], rtol=1e-6, what="loss")
    _close(got[1], want[1], rtol=1e-5, what="grad")


# ---------------------------------------------------------------------------------------------
# GRPO


@pytest.mark.parametrize("G,std_norm", [(4, True), (4, False), (1, True)])
def test_group_advantages(G, std_norm):
    rs = np.random.RandomState(1)
    rewards = rs.randint(0, 2, 3 * G).astype(np.float32)
    rewards[:G] = 1.0  # one group with all rewards equal
    got = np.asarray(L.group_advantages(rewards, G, "group" if std_norm else "none", 1e-4))
    assert np.all(np.isfinite(got))
    if G == 1:
        assert np.all(got == 0)
        return
    _close(got, np_group_advantages(rewards, G, std_norm, 1e-4), rtol=1e-6, what="advantages")
    assert np.all(got[:G] == 0)
    with pytest.raises(ValueError, match="num_generations"):
        L.group_advantages(rewards[:-1], G)


GRPO_CASES = [dict(aggregation=a, beta=b) for a in ("grpo", "dapo", "dr_grpo") for b in (0.0, 0.04)]
GRPO_CASES.append(dict(aggregation="dr_grpo", beta=0.0, max_completion_length=20))


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_grpo_head_matches_reference(head_inputs, case):
    hs, h_ref, w, y, mask = head_inputs
    cfg = L.GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, chunk_size=CHUNK, **case)
    rs = np.random.RandomState(2)
    with torch.no_grad():
        cur = ref_logp(_t(hs), _t(w), y, 1.2).numpy()
    old = (cur + 0.6 * rs.randn(B, N)).astype(np.float32)  # ratios on both sides of the clip range
    adv = np.asarray(L.group_advantages(np.array([1.0, 0.0, 1.0]), 3), np.float32)  # +, -, +

    hs_t = _t(hs).requires_grad_(True)
    logp_t = ref_logp(hs_t, _t(w), y, 1.2)
    ref_t = ref_logp(_t(h_ref), _t(w), y, 1.2) if cfg.beta > 0 else None
    want, want_m = ref_grpo_objective(logp_t, old, adv, mask, cfg, ref_t)
    want.backward()

    def f(h):
        logp = D.token_logprobs(h, y, jnp.asarray(w), temperature=1.2, chunk_size=CHUNK)
        ref = D.token_logprobs(h_ref, y, jnp.asarray(w), temperature=1.2, chunk_size=CHUNK) if cfg.beta else None
        return L.policy_objective(logp, old, adv, mask, cfg, ref)

    (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(hs)
    _close(loss, want.item(), what="loss")
    _close(g, hs_t.grad.numpy(), rtol=5e-5, what="grad")
    assert np.abs(hs_t.grad.numpy()).max() > 1e-4
    for k, v in want_m.items():
        _close(m[k], v, rtol=1e-5, what=k)
    assert 0 < float(m["clip_low"]) and 0 < float(m["clip_high"]), "both clip sides must be exercised"
    if cfg.beta:
        assert float(m["kl"]) > 0


def test_grpo_edge_cases(head_inputs):
    hs, _, w, y, mask = head_inputs
    cfg = L.GRPOConfig(chunk_size=CHUNK)
    adv = L.group_advantages(np.ones(3, np.float32), 3)  # all rewards equal -> zero advantage
    old = np.zeros((B, N), np.float32)

    def f(h, msk):
        return L.policy_objective(D.token_logprobs(h, y, jnp.asarray(w), chunk_size=CHUNK), old, adv, msk, cfg)

    for msk in (mask, np.zeros_like(mask)):
        (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(hs, msk)
        assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
        assert all(np.isfinite(float(v)) for v in m.values())


# ---------------------------------------------------------------------------------------------
# SFT


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_head_matches_reference(reduction):
    rs = np.random.RandomState(3)
    ex = [(rs.randint(1, V, rs.randint(1, 5)).tolist(), rs.randint(1, V, rs.randint(1, 6)).tolist())
          for _ in range(6)]
    b = batches.pack_sft_examples(ex, 12)
    h = rs.randn(*b.tokens.shape, E).astype(np.float32)
    w = (0.4 * rs.randn(E, V)).astype(np.float32)
    cfg = L.SFTConfig(reduction=reduction, chunk_size=5)

    # reference: per example, cross-entropy of its response tokens
    h_t = _t(h).requires_grad_(True)
    ce = -ref_logp(h_t, _t(w), b.targets)
    per_ex = []
    for row in range(b.tokens.shape[0]):
        for s in set(b.segment_ids[row].tolist()) - {0}:
            sel = (b.segment_ids[row] == s) & (b.mask[row] > 0)
            if sel.any():
                per_ex.append(ce[row][torch.tensor(sel)])
    if reduction == "token":
        want = torch.cat(per_ex).mean()
    else:
        want = torch.stack([x.mean() for x in per_ex]).mean()
    assert sum(len(x) for x in per_ex) == sum(len(r) - (1 if not p else 0) for p, r in ex)
    want.backward()
    f = lambda h_: L.sft_head_loss(h_, b.targets, b.mask, b.segment_ids, jnp.asarray(w), cfg)
    (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(h)
    _close(loss, want.item(), what="loss")
    _close(g, h_t.grad.numpy(), rtol=5e-5, what="grad")
    zero = np.zeros_like(b.mask)
    (loss0, _), g0 = jax.jit(jax.value_and_grad(
        lambda h_: L.sft_head_loss(h_, b.targets, zero, b.segment_ids, jnp.asarray(w), cfg), has_aux=True))(h)
    assert float(loss0) == 0.0 and np.all(np.asarray(g0) == 0)


# ---------------------------------------------------------------------------------------------
# configs and helpers


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^beta: 1.5 must be in \[0.0, 1.0\]"):
        L.OPSDConfig(beta=1.5)
    with pytest.raises(ValueError, match=r"^variant: 'topk'.*'top_k'"):
        L.OPSDConfig(variant="topk")
    with pytest.raises(ValueError, match=r"^teacher: "):
        L.OPSDConfig(teacher="frozen")
    with pytest.raises(ValueError, match=r"^clip_tau: "):
        L.OPSDConfig(variant="sampled_token", clip_tau=0.05)
    with pytest.raises(ValueError, match=r"^reduction: "):
        L.OPSDConfig(reduction="batch")
    with pytest.raises(ValueError, match=r"^aggregation: 'bnpo'"):
        L.GRPOConfig(aggregation="bnpo")
    with pytest.raises(ValueError, match=r"^epsilon_low: "):
        L.GRPOConfig(epsilon_low=1.0)
    with pytest.raises(ValueError, match=r"^chunk_size: "):
        L.SFTConfig(chunk_size=0)
    # through the loader, the message names the option as a user types it
    from jsdr import config
    with pytest.raises(config.ConfigError, match=r"^opsd.beta: 1.5 must be"):
        config.from_dict(TrainConfig, {"opsd": {"beta": 1.5}})
    assert L.OPSDConfig().reduction == "sequence" and L.OPSDConfig().teacher == "fixed"


# ---------------------------------------------------------------------------------------------
# end to end on a tiny Qwen3: our loss functions vs transformers + LoRA hooks (float32)

TARGETS = {"self_attn": ("q_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "down_proj")}
RANK, SCALE = 4, 2.0


@pytest.fixture(scope="module")
def tiny(qwen3_tiny):
    d, model = qwen3_tiny
    params, cfg, _ = hf.load_params(str(d))
    return params, cfg, model


def _lora(params, seed, scale=0.05):
    rs = np.random.RandomState(seed)
    out = {}
    for group, names in TARGETS.items():
        out[group] = {}
        for n in names:
            k = params["layers"][group][n]["kernel"]
            Ln, i, o = k.shape
            out[group][n] = {"lora_a": jnp.asarray(scale * rs.randn(Ln, i, RANK), jnp.float32),
                             "lora_b": jnp.asarray(scale * rs.randn(Ln, RANK, o), jnp.float32)}
    return {"layers": out}


class TorchLoRA:
    """LoRA deltas added to a transformers model with forward hooks: y += SCALE * (x A) B."""

    def __init__(self, model, lora):
        self.model = model
        self.tensors = {}
        self.enabled = True
        self.handles = []
        for group, names in TARGETS.items():
            for n in names:
                a = torch.tensor(np.asarray(lora["layers"][group][n]["lora_a"]), dtype=torch.float32,
                                 requires_grad=True)
                bb = torch.tensor(np.asarray(lora["layers"][group][n]["lora_b"]), dtype=torch.float32,
                                  requires_grad=True)
                self.tensors[(group, n)] = (a, bb)
                for li, layer in enumerate(model.model.layers):
                    mod = getattr(getattr(layer, group), n)
                    self.handles.append(mod.register_forward_hook(self._hook(a, bb, li)))

    def _hook(self, a, bb, li):
        def hook(mod, inputs, out):
            if not self.enabled:
                return out
            return out + SCALE * (inputs[0] @ a[li]) @ bb[li]
        return hook

    def logits(self, ids, lora_on=True):
        """Unpadded single-sequence forward: [len(ids), V] float32 logits."""
        self.enabled = lora_on
        try:
            x = torch.tensor([list(ids)], dtype=torch.long)
            return self.model(input_ids=x).logits[0]
        finally:
            self.enabled = True

    def grads(self):
        return {"layers": {g: {n: {"lora_a": self.tensors[(g, n)][0].grad.numpy(),
                                   "lora_b": self.tensors[(g, n)][1].grad.numpy()} for n in names}
                           for g, names in TARGETS.items()}}

    def close(self):
        for h in self.handles:
            h.remove()


def _check_tree(got, want, rtol, what):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        _close(g, w, rtol=rtol, what=f"{what} {jax.tree_util.keystr(path)}")


def _run(loss_fn, lora, params, batch, model_cfg, **kw):
    model = Model(model_cfg, lora_scale=SCALE)
    f = jax.jit(jax.value_and_grad(lambda lo: loss_fn(lo, params, batch, None, model=model, **kw), has_aux=True))
    return f(lora)


def test_sft_model_packed_matches_torch(tiny):
    params, mcfg, model = tiny
    rs = np.random.RandomState(4)
    ex = [(rs.randint(1, 256, rs.randint(2, 6)).tolist(), rs.randint(1, 256, rs.randint(2, 8)).tolist())
          for _ in range(5)]
    batch = jax.tree.map(jnp.asarray, batches.pack_sft_examples(ex, 16))
    lora = _lora(params, 0)
    (loss, m), g = _run(L.sft_loss, lora, params, batch, mcfg, cfg=L.SFTConfig(chunk_size=8))

    tl = TorchLoRA(model, lora)
    try:
        ces = []
        for p, r in ex:  # each example alone, unpadded
            logits = tl.logits(p + r).double()
            lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
            ces.append(-lp.gather(-1, torch.tensor(r)[:, None])[:, 0])
        want = torch.cat(ces).mean()
        want.backward()
        _close(loss, want.item(), rtol=1e-5, what="SFT loss")
        _check_tree(g, tl.grads(), 2e-4, "SFT LoRA grad")
    finally:
        tl.close()


def test_grpo_model_matches_torch(tiny):
    params, mcfg, model = tiny
    rs = np.random.RandomState(5)
    prompts = [rs.randint(1, 256, n).tolist() for n in (3, 5, 2, 4)]
    comps = [rs.randint(1, 256, n).tolist() for n in (6, 2, 4, 0)]
    batch = batches.build_grpo_batch(prompts, comps)
    cfg = L.GRPOConfig(beta=0.05, epsilon_high=0.28, chunk_size=4)
    lora = _lora(params, 1)
    tl = TorchLoRA(model, lora)
    try:
        logps, refs = [], []
        for p, c in zip(prompts, comps):
            if not c:
                logps.append(None)
                refs.append(None)
                continue
            for lst, on in ((logps, True), (refs, False)):
                lg = tl.logits(p + c, lora_on=on).double()[len(p) - 1:len(p) - 1 + len(c)] / 1.2
                lst.append(torch.log_softmax(lg, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
        # old log-probs: current ones perturbed; advantages from rewards
        Tn = batch.tokens.shape[1]
        P = max(len(p) for p in prompts)
        old = np.zeros((4, Tn), np.float32)
        for i, c in enumerate(comps):
            if c:
                old[i, P - 1:P - 1 + len(c)] = logps[i].detach().numpy() + 0.3 * rs.randn(len(c))
        adv = np.asarray(L.group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), 2), np.float32)
        batch = batch._replace(old_logprobs=old, advantages=adv)
        terms = []
        for i, c in enumerate(comps):
            if not c:
                terms.append(torch.zeros(()))
                continue
            ratio = torch.exp(logps[i] - _t(old[i, P - 1:P - 1 + len(c)]))
            a = float(adv[i])
            t = -torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)
            r = refs[i].detach() - logps[i]
            t = t + 0.05 * (torch.exp(r) - r - 1)
            terms.append(t.mean())
        want = torch.stack(terms).mean()  # "grpo": per-sequence mean, then mean over all rows
        want.backward()
        jb = jax.tree.map(jnp.asarray, batch)
        (loss, m), g = _run(L.grpo_loss, lora, params, jb, mcfg, cfg=cfg, temperature=1.2)
        _close(loss, want.item(), rtol=1e-5, what="GRPO loss")
        _check_tree(g, tl.grads(), 2e-4, "GRPO LoRA grad")
        assert float(m["kl"]) > 0
    finally:
        tl.close()


@pytest.mark.parametrize("teacher,padding", [("fixed", "left"), ("live", "right")])
def test_opsd_model_matches_torch(tiny, teacher, padding):
    """Student and teacher each run unpadded in torch; the loss (beta 0.3, token clip, T = 1.1,
    sequence reduction) and its LoRA gradient must match ours on the padded, aligned batch."""
    params, mcfg, model = tiny
    rs = np.random.RandomState(6)
    sp = [rs.randint(1, 256, n).tolist() for n in (3, 6)]
    tp = [rs.randint(1, 256, n).tolist() for n in (8, 5)]
    ro = [rs.randint(1, 256, n).tolist() for n in (7, 4)]
    batch = jax.tree.map(jnp.asarray, batches.build_opsd_batch(sp, tp, ro, padding=padding))
    lora = _lora(params, 2)
    tl = TorchLoRA(model, lora)
    try:
        divs = []
        for s_p, t_p, r in zip(sp, tp, ro):
            s = tl.logits(s_p + r).double()[len(s_p) - 1:len(s_p) - 1 + len(r)] / 1.1
            with torch.no_grad():
                t = tl.logits(t_p + r, lora_on=(teacher == "live")).double()[len(t_p) - 1:len(t_p) - 1 + len(r)] / 1.1
            lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
            mix = (0.3 * lt.exp() + 0.7 * ls.exp()).log()
            divs.append((0.3 * lt.exp() * (lt - mix) + 0.7 * ls.exp() * (ls - mix)).sum(-1))
        v = np.sort(torch.cat(divs).detach().numpy())
        tau = float(0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2]))  # clips about half of the tokens
        want = torch.stack([torch.clamp(d, max=tau).mean() for d in divs]).mean()
        want.backward()
        cfg = L.OPSDConfig(beta=0.3, temperature=1.1, teacher=teacher, clip_tau=tau, clip_mode="token",
                           reduction="sequence", chunk_size=3)
        (loss, m), g = _run(L.opsd_loss, lora, params, batch, mcfg, cfg=cfg)
        _close(loss, want.item(), rtol=1e-4, what="OPSD loss")
        _check_tree(g, tl.grads(), 2e-4, "OPSD LoRA grad")
        _close(m["clip_frac"], np.mean(v > tau), rtol=1e-6, what="clip fraction")
    finally:
        tl.close()


def test_opsd_teacher_weights(tiny):
    """fixed = base weights whatever the LoRA; live follows the LoRA; ema uses teacher_lora."""
    params, mcfg, model = tiny
    rs = np.random.RandomState(7)
    batch = batches.build_opsd_batch([rs.randint(1, 256, 4).tolist()], [rs.randint(1, 256, 6).tolist()],
                                     [rs.randint(1, 256, 5).tolist()])
    batch = jax.tree.map(jnp.asarray, batch)
    lora1, lora2 = _lora(params, 10, 0.2), _lora(params, 11, 0.2)

    fns = {t: jax.jit(lambda lo, tlo, t=t: L.teacher_logprobs(
        lo, params, batch, model=Model(mcfg, lora_scale=SCALE), cfg=L.OPSDConfig(teacher=t, temperature=1.0),
        teacher_lora=tlo)) for t in L.opsd.TEACHERS}

    def tlp(teacher, lora, teacher_lora=None):
        return np.asarray(fns[teacher](lora, teacher_lora))

    base = tlp("fixed", None)
    # independent check of the base teacher log-probs with transformers (no LoRA)
    with torch.no_grad():
        ids = batch.t_tokens[0][np.asarray(batch.t_segment_ids[0]) > 0].tolist()
        lg = model(input_ids=torch.tensor([ids])).logits[0].double()
        want = torch.log_softmax(lg, -1)[5:10].gather(-1, torch.tensor(np.asarray(batch.rollout_tokens[0]))[:, None])
    _close(base[0], want[:, 0].numpy(), rtol=1e-5, what="base teacher log-probs")
    np.testing.assert_array_equal(tlp("fixed", lora1), base)
    np.testing.assert_array_equal(tlp("fixed", lora2), base)
    live1, live2 = tlp("live", lora1), tlp("live", lora2)
    assert np.abs(live1 - base).max() > 1e-3 and np.abs(live1 - live2).max() > 1e-3
    np.testing.assert_allclose(tlp("ema", lora2, teacher_lora=lora1), live1, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="teacher_lora"):
        tlp("ema", lora1)


# ---------------------------------------------------------------------------------------------
# memory: chunked OPSD head vs the naive full-logits version, Qwen3-1.7B head shape

QWEN3_1_7B_HIDDEN, QWEN3_VOCAB, ROLLOUT = 2048, 151936, 2048


def _load_bench_losses():
    """scripts/bench_losses.py (the naive full-logits OPSD head lives there, beside the figures it prints)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def naive_opsd_head_loss(hs, ht, y, mask, w, cfg):
    """The straightforward version: full [B, N, V] logits of both roles, plain autodiff."""
    return _load_bench_losses().naive_opsd_head_loss(hs, ht, y, mask, w, cfg)


def opsd_head_temp_bytes(loss_fn, dtype=jnp.float32, batch=1):
    h = jax.ShapeDtypeStruct((batch, ROLLOUT, QWEN3_1_7B_HIDDEN), dtype)
    w = jax.ShapeDtypeStruct((QWEN3_1_7B_HIDDEN, QWEN3_VOCAB), dtype)
    y = jax.ShapeDtypeStruct((batch, ROLLOUT), jnp.int32)
    m = jax.ShapeDtypeStruct((batch, ROLLOUT), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(h, h, y, m, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_opsd_head_memory_qwen3_1_7b():
    cfg = L.OPSDConfig(beta=0.5, clip_tau=0.05)  # default chunk size
    chunked = opsd_head_temp_bytes(lambda hs, ht, y, m, w: L.opsd_head_loss(hs, ht, y, m, w, cfg)[0])
    naive = opsd_head_temp_bytes(lambda hs, ht, y, m, w: naive_opsd_head_loss(hs, ht, y, m, w, cfg))
    full_logits = ROLLOUT * QWEN3_VOCAB * 4
    print(f"\nOPSD head loss+grad temp bytes, N={ROLLOUT}, E={QWEN3_1_7B_HIDDEN}, V={QWEN3_VOCAB}, f32: "
          f"chunked {chunked / 2**20:.0f} MiB, naive {naive / 2**20:.0f} MiB, ratio {chunked / naive:.4f}")
    assert naive >= 2 * full_logits  # the naive version really holds full logits
    assert chunked < full_logits  # the chunked one never holds one full [N, V] f32 buffer
    assert chunked * 8 <= naive
