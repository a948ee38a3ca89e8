"""GRPO options (GRPOConfig): reward scaling, GSPO's sequence ratio, num_iterations with old log-probs
from the trainer's score, truncated-completion masking, DAPO's overlong punishment, dynamic sampling
and token normalisation over the accumulated batch, and the "string_first" grader. Each one against a
plain numpy / torch float64 reference (losses with their gradients), the host side with fake samplers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jsdr import config, methods, toy
from jsdr.data import prompts as prompt_lib
from jsdr.data.datasets import DataConfig
from jsdr.data.rewards import first_boxed, grade
from jsdr.losses.grpo import GRPOConfig, group_advantages, overlong_penalty, policy_objective
from jsdr.model.lora import LoraConfig, init_lora
from jsdr.model.params import ModelConfig
from jsdr.model.transformer import Model, init_params
from jsdr.sampling import SampleOutput, SamplingConfig
from tests.test_losses import _close, _t

torch.set_default_dtype(torch.float64)

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ---------------------------------------------------------------------------------------------
# references


def np_advantages(rewards, G, scale, eps=1e-4):
    """Centred by the group mean; divided by the group's / the whole batch's unbiased std + eps."""
    r = np.asarray(rewards, np.float64)
    groups = r.reshape(-1, G)
    out = groups - groups.mean(1, keepdims=True)
    if scale == "group":
        out = out / (groups.std(1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        out = out / (r.std(ddof=1) + eps)
    return out.reshape(-1)


def ref_terms(logp, old, adv, mask, level="token", beta=0.0, ref=None):
    """Per-token GRPO terms [B, T] (torch, differentiable in logp) and the ratio of every token."""
    m, a = _t(mask), _t(adv)[:, None]
    if level == "token":
        ratio = torch.exp((logp - _t(old)) * m)
    else:  # one ratio per completion: exp(mean of its tokens' log-ratios)
        rows = []
        for b in range(m.shape[0]):
            n = max(float(m[b].sum()), 1.0)
            rows.append(torch.exp(((logp[b] - _t(old[b])) * m[b]).sum() / n))
        ratio = torch.stack(rows)[:, None].expand_as(logp)
    term = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    if beta:
        r = _t(ref) - logp
        term = term + beta * (torch.exp(r) - r - 1)
    return term, ratio


def ref_aggregate(term, mask, aggregation):
    m = _t(mask)
    if aggregation == "grpo":
        return ((term * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return (term * m).sum() / m.sum().clamp(min=1)  # dapo


def _logp_inputs(rs, B, T):
    logp = -np.abs(rs.randn(B, T)).astype(np.float32) - 0.1
    return logp, (logp + 0.3 * rs.randn(B, T)).astype(np.float32)


def _objective_and_grad(logp, old, adv, mask, cfg, **kw):
    f = lambda lp: policy_objective(lp, old, adv, mask, cfg, **kw)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp))


# ---------------------------------------------------------------------------------------------
# scale_rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards(scale):
    rs = np.random.RandomState(0)
    G = 4
    rewards = rs.rand(4 * G).astype(np.float32)
    rewards[G:2 * G] = 0.5  # a group of equal rewards: advantages 0 whatever the scale
    got = np.asarray(group_advantages(rewards, G, scale, 1e-4))
    _close(got, np_advantages(rewards, G, scale), rtol=1e-6, what=scale)
    assert np.all(got[G:2 * G] == 0)
    if scale == "batch":  # one std for all groups: advantages keep the groups' relative spreads
        _close(got, np_advantages(rewards, G, "none") / (rewards.astype(np.float64).std(ddof=1) + 1e-4), rtol=1e-6)
    assert GRPOConfig().scale_rewards == "group"  # the old std_normalization=True
    with pytest.raises(ValueError, match="scale="):
        group_advantages(rewards, G, "std")


@dataclasses.dataclass(frozen=True)
class Sections:
    """A configuration with a `grpo` section, as TrainConfig's."""

    grpo: GRPOConfig = config.field(GRPOConfig(), "GRPO options")


def test_config_checks_name_the_option():
    for key, value in [("scale_rewards", "batches"), ("importance_sampling_level", "seq"), ("num_iterations", 0),
                       ("overlong_buffer", -1), ("overlong_penalty", -0.5), ("max_refills", -1),
                       ("dynamic_sampling", "yes"), ("mask_truncated_completions", 1)]:
        with pytest.raises(config.ConfigError, match=f"^{key}: "):
            GRPOConfig(**{key: value})
    with pytest.raises(config.ConfigError, match="^grpo.num_iterations: "):
        config.from_dict(Sections, {"grpo": {"num_iterations": 0}})
    with pytest.raises(config.ConfigError, match="unknown key grpo.std_normalization"):  # replaced by scale_rewards
        config.from_dict(Sections, {"grpo": {"std_normalization": False}})
    got = config.from_dict(Sections, {"grpo": {"scale_rewards": "none", "importance_sampling_level": "sequence"}})
    assert (got.grpo.scale_rewards, got.grpo.importance_sampling_level) == ("none", "sequence")


# ---------------------------------------------------------------------------------------------
# GSPO: one ratio per completion


@pytest.mark.parametrize("aggregation,beta", [("grpo", 0.0), ("dapo", 0.04)])
def test_sequence_level_ratio_loss_and_gradient(aggregation, beta):
    rs = np.random.RandomState(1)
    B, T = 6, 7
    logp, old = _logp_inputs(rs, B, T)
    old[0] += 0.6  # sequence ratio ~ e^-0.6 < 1 - eps_low with A < 0: clipped below
    old[1] -= 0.6  # ~ e^0.6 > 1 + eps_high with A > 0: clipped above
    mask = np.ones((B, T), np.float32)
    mask[2, 4:] = 0.0
    mask[3] = 0.0  # an empty completion: ratio 1, no loss, not counted in the ratio metrics
    mask[4, :2] = 0.0
    adv = np.array([-1.0, 1.2, 0.7, 0.5, -0.4, 0.9], np.float32)
    ref = (logp + 0.2 * rs.randn(B, T)).astype(np.float32)
    cfg = GRPOConfig(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, aggregation=aggregation,
                     importance_sampling_level="sequence")
    (loss, m), g = _objective_and_grad(logp, old, adv, mask, cfg, ref_logp=ref if beta else None)

    lp = _t(logp).requires_grad_(True)
    term, ratio = ref_terms(lp, old, adv, mask, "sequence", beta, ref)
    want = ref_aggregate(term, mask, aggregation)
    want.backward()
    _close(loss, want.item(), what="loss")
    _close(g, lp.grad.numpy(), rtol=5e-5, what="grad w.r.t. log-probs")
    # a sequence ratio moves every token of its completion: the gradient of an unclipped row is spread
    # over all its tokens, that of a clipped row is 0 (beta 0)
    if not beta:
        assert np.all(np.asarray(g)[:2] == 0) and np.all(np.asarray(g)[5] != 0)
    seq = ratio[:, 0].detach().numpy()
    rows = mask.sum(1) > 0
    _close(m["clip_low"], np.mean(((seq < 1 - EPS_LOW) & (adv < 0))[rows]), what="clip_low")
    _close(m["clip_high"], np.mean(((seq > 1 + EPS_HIGH) & (adv > 0))[rows]), what="clip_high")
    _close(m["ratio_mean"], seq[rows].mean(), what="ratio_mean")
    assert float(m["clip_low"]) == pytest.approx(1 / 5) and float(m["clip_high"]) == pytest.approx(1 / 5)
    # the token-level objective of the same inputs is a different one
    tok, _ = _objective_and_grad(logp, old, adv, mask, GRPOConfig(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                                                  beta=beta, aggregation=aggregation),
                                 ref_logp=ref if beta else None)
    assert abs(float(tok[0]) - float(loss)) > 1e-3


# ---------------------------------------------------------------------------------------------
# host side: a toy setup and a fake sampler keyed by prompt


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def _records(k):
    return [{"problem": f"Start at 0. Add {i}.", "solution": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(k)]


class PromptSampler:
    """Fixed texts (and finish reasons) per prompt; records every call with its rng."""

    def __init__(self, tokenizer, by_prompt, finish=None):
        self.tokenizer, self.by_prompt, self.finish, self.calls = tokenizer, by_prompt, finish or {}, []

    def __call__(self, lora, prompts, sc, rng):
        self.calls.append({"prompts": [tuple(p) for p in prompts], "rng": np.asarray(rng), "n": sc.n})
        texts, finish = [], []
        for p in prompts:
            assert len(self.by_prompt[tuple(p)]) == sc.n
            texts += self.by_prompt[tuple(p)]
            finish += self.finish.get(tuple(p), [0] * sc.n)
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        R, L = len(ids), max(map(len, ids))
        toks = np.zeros((R, L), np.int32)
        for r, x in enumerate(ids):
            toks[r, :len(x)] = x
        return SampleOutput(toks, np.zeros((R, L), np.float32), np.zeros((R, L), np.float32),
                            np.array([len(x) for x in ids], np.int32), np.array(finish, np.int8),
                            np.arange(R) // sc.n)


def _method(tokenizer, options, sample, n=2, micro=4, accum=1, max_new=64, score=None, model=None):
    setup = methods.Setup(
        model=model or Model(ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=4)),
        tokenizer=tokenizer, data=DataConfig(max_prompt_tokens=400, max_length=400),
        prompts=prompt_lib.PromptTemplates(teacher=toy.TEACHER_PROMPT),
        rollout=SamplingConfig(n=n, temperature=1.0, max_new_tokens=max_new), options=options, reward="string",
        pad_id=0, seq_bucket=8, grad_accum=accum, micro_batch=micro, data_parallel=1, sample=sample,
        log=lambda *a: None, score=score)
    return methods.get("grpo")(setup)


def _prepared(method, records):
    return [method.prepare(r) for r in records]


def _texts(record, correct):
    """One completion per flag: right (its own answer) or wrong."""
    return [f"so \\boxed{{{record['answer'] if ok else 'x'}}}" for ok in correct]


def _rows(batch):
    """[accum, micro, ...] -> [rows, ...]."""
    return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + np.asarray(x).shape[2:]), batch)


def _sampler_for(tokenizer, method, records, flags, finish=None):
    recs = _prepared(method, records)
    by_prompt = {tuple(r["prompt_ids"]): _texts(r, f) for r, f in zip(recs, flags)}
    fin = {tuple(r["prompt_ids"]): f for r, f in zip(recs, finish)} if finish else None
    return recs, PromptSampler(tokenizer, by_prompt, fin)


# ---------------------------------------------------------------------------------------------
# num_iterations


def test_old_logprobs_come_from_score_only_with_num_iterations(tokenizer):
    records = _records(2)
    for iters in (1, 3):
        calls = []

        def score(lora, batch):
            calls.append((lora, jax.tree.map(np.shape, batch)))
            return np.full(batch.tokens.shape, -0.5, np.float64)

        method = _method(tokenizer, GRPOConfig(num_iterations=iters), None, micro=2, accum=2, score=score)
        recs, method.setup.sample = _sampler_for(tokenizer, method, records, [(1, 0), (0, 1)])
        assert method.updates_per_batch == iters
        lora = {"marker": np.ones(1)}
        sb = method.make_batch(recs, lora, jax.random.PRNGKey(0))
        if iters == 1:
            assert calls == [] and sb.batch.old_logprobs is None  # on-policy: no extra forward
        else:
            assert len(calls) == 1 and calls[0][0] is lora
            assert calls[0][1].tokens == sb.batch.tokens.shape and sb.batch.tokens.shape[:2] == (2, 2)
            assert sb.batch.old_logprobs.dtype == np.float32 and np.all(sb.batch.old_logprobs == -0.5)
        shapes = method.batch_shapes()
        assert (shapes.old_logprobs is None) == (iters == 1)
        if iters > 1:
            assert shapes.old_logprobs.shape == shapes.tokens.shape
    method.setup.score = None
    with pytest.raises(RuntimeError, match="setup.score"):
        method.make_batch(recs, lora, jax.random.PRNGKey(0))


def test_num_iterations_loss_on_the_old_logprobs_of_score(tokenizer):
    """make_batch's old log-probs, from a trainer-like jitted score over the micro-batches, are the
    loss's own: the first update equals the on-policy loss and gradient; later updates (the adapter
    moved) follow the clipped ratio of the torch reference, LoRA gradient included."""
    mcfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=4)
    lcfg = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = init_params(mcfg, jax.random.PRNGKey(0), std=0.3)
    leaves, tree = jax.tree.flatten(init_lora(mcfg, lcfg, jax.random.PRNGKey(1)))
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))  # B = 0 at init: make the adapter matter
    lora = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    model = Model(mcfg, lora_scale=lcfg.scale)
    score_fn = jax.jit(lambda lo, p, b: jax.lax.map(lambda mb: method.logprobs(lo, p, mb), b))
    score = lambda lo, b: np.asarray(score_fn(lo, params, jax.tree.map(jnp.asarray, b)))  # noqa: E731
    cfg = GRPOConfig(num_iterations=2, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, chunk_size=4)
    method = _method(tokenizer, cfg, None, micro=2, accum=2, score=score, model=model)
    recs, method.setup.sample = _sampler_for(tokenizer, method, _records(2), [(1, 0), (0, 1)])
    sb = method.make_batch(recs, lora, jax.random.PRNGKey(0))
    mb = jax.tree.map(lambda x: jnp.asarray(x[1]), sb.batch)
    grad = jax.jit(jax.value_and_grad(lambda lo, b: method.loss(lo, params, b, None), has_aux=True))

    (loss, m), g = grad(lora, mb)
    (loss_on, _), g_on = grad(lora, mb._replace(old_logprobs=None))
    _close(m["ratio_mean"], 1.0, rtol=1e-6, what="first update ratio")
    _close(loss, loss_on, rtol=1e-5, what="first update loss")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_on)):
        _close(a, b, rtol=1e-4, what="first update grad")

    # a later update: the adapter moved, old_logprobs stay the sampling adapter's
    moved = jax.tree.map(lambda x: x * 1.6, lora)
    (loss2, m2), g2 = grad(moved, mb)
    logp = score(moved, sb.batch)[1]
    lp = _t(logp).requires_grad_(True)
    mask = np.asarray(mb.mask)
    term, _ = ref_terms(lp, np.asarray(mb.old_logprobs), np.asarray(mb.advantages), mask)
    want = ref_aggregate(term, mask, "grpo")
    want.backward()
    _close(loss2, want.item(), rtol=1e-5, what="later update loss")
    # d loss / d LoRA = (d logp / d LoRA)^T (the reference's d loss / d logp)
    chain = jax.jit(jax.grad(lambda lo, ct: jnp.sum(method.logprobs(lo, params, mb) * ct)))
    want_g = chain(moved, jnp.asarray(lp.grad.numpy(), jnp.float32))
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(want_g)):
        _close(a, b, rtol=1e-4, what="later update LoRA grad")
    assert abs(float(m2["ratio_mean"]) - 1) > 1e-3 and float(m2["clip_low"]) > 0 and float(m2["clip_high"]) > 0
    (loss2_on, _), _ = grad(moved, mb._replace(old_logprobs=None))
    assert abs(float(loss2) - float(loss2_on)) > 1e-4  # off-policy: not the on-policy loss


# ---------------------------------------------------------------------------------------------
# truncated completions and the overlong punishment


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_mask_truncated_completions(tokenizer, mask_truncated):
    method = _method(tokenizer, GRPOConfig(mask_truncated_completions=mask_truncated), None)
    # finish reasons per row: 1 = "length" (cut at max_new_tokens)
    recs, method.setup.sample = _sampler_for(tokenizer, method, _records(2), [(1, 0), (0, 1)],
                                             finish=[(0, 1), (1, 1)])
    sb = method.make_batch(recs, None, jax.random.PRNGKey(0))
    batch = _rows(sb.batch)
    assert sb.info["rollout/truncated"] == 3  # counted whether masked or not
    truncated = np.array([False, True, True, True])
    completions = [tokenizer.encode(t, add_special_tokens=False) for r, f in zip(recs, [(1, 0), (0, 1)])
                   for t in _texts(r, f)]
    for row, completion in enumerate(completions):
        trained = batch.targets[row][batch.mask[row] > 0].tolist()
        assert trained == ([] if mask_truncated and truncated[row] else completion)
    # advantages still come from every completion's reward (TRL): rewards [1, 0, 0, 1]
    _close(batch.advantages, np_advantages([1, 0, 0, 1], 2, "group"), rtol=1e-6)
    # the loss and its gradient ignore the masked completions
    rs = np.random.RandomState(2)
    logp, old = (x.reshape(batch.mask.shape) for x in _logp_inputs(rs, 4, batch.mask.shape[-1]))
    cfg = GRPOConfig(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    (loss, _), g = _objective_and_grad(logp, old, batch.advantages, batch.mask, cfg)
    lp = _t(logp).requires_grad_(True)
    term, _ = ref_terms(lp, old, batch.advantages, batch.mask)
    want = ref_aggregate(term, batch.mask, "grpo")
    want.backward()
    _close(loss, want.item(), what="loss")
    _close(g, lp.grad.numpy(), rtol=5e-5, what="grad")
    if mask_truncated:
        assert np.all(np.asarray(g)[truncated] == 0)


def test_overlong_penalty_values_at_the_boundaries():
    M, buf, pen = 100, 20, 0.5
    lengths = np.array([0, 50, 80, 81, 90, 99, 100])
    want = np.array([0, 0, 0, -0.5 / 20, -0.25, -0.5 * 19 / 20, -0.5])
    _close(overlong_penalty(lengths, M, buf, pen), want, rtol=1e-6)
    assert np.all(overlong_penalty(lengths, M, 0, pen) == 0)  # off
    _close(overlong_penalty([100], 100, 100, 1.0), [-1.0])  # the whole range
    assert overlong_penalty(lengths, M, buf, pen).dtype == np.float32


def test_overlong_penalty_shapes_the_rewards(tokenizer):
    texts = ["so \\boxed{0}", "we add 0 and so \\boxed{0}", "so \\boxed{x}", "we add 1 and so \\boxed{1}"]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    M = max(lengths) + 1
    buf = M - min(lengths) + 1  # every completion is inside the buffer
    opts = GRPOConfig(overlong_buffer=buf, overlong_penalty=0.4)
    method = _method(tokenizer, opts, None, max_new=M)
    recs = _prepared(method, _records(2))
    method.setup.sample = PromptSampler(tokenizer, {tuple(recs[0]["prompt_ids"]): texts[:2],
                                                    tuple(recs[1]["prompt_ids"]): texts[2:]})
    sb = method.make_batch(recs, None, jax.random.PRNGKey(0))
    correct = np.array([1, 1, 0, 1], np.float64)
    penalty = -np.minimum((np.array(lengths) - (M - buf)) / buf, 1) * 0.4
    assert np.all(penalty < 0)
    rewards = correct + penalty
    _close(sb.info["reward/overlong_penalty"], penalty.mean(), rtol=1e-6)
    _close(sb.info["reward/mean"], rewards.mean(), rtol=1e-6)
    _close(_rows(sb.batch).advantages, np_advantages(rewards, 2, "group"), rtol=1e-5)
    assert "reward/overlong_penalty" not in _method(tokenizer, GRPOConfig(), PromptSampler(
        tokenizer, method.setup.sample.by_prompt), max_new=M).make_batch(recs, None, jax.random.PRNGKey(0)).info
    with pytest.raises(config.ConfigError, match="overlong_buffer"):
        _method(tokenizer, GRPOConfig(overlong_buffer=M + 1), None, max_new=M)


# ---------------------------------------------------------------------------------------------
# dynamic sampling


def _dynamic(tokenizer, flags, max_refills=3, refill_flags=()):
    """A GRPO with n=2, 4 groups per step (micro 4 x accum 2), a sampler that knows the step's records
    (flags) and the refill records (refill_flags, handed out in order by more_records)."""
    asked = []
    method = _method(tokenizer, GRPOConfig(dynamic_sampling=True, max_refills=max_refills), None, accum=2)
    all_records = _records(len(flags) + len(refill_flags))
    recs, method.setup.sample = _sampler_for(tokenizer, method, all_records, list(flags) + list(refill_flags))
    pool = recs[len(flags):]

    def more_records(attempt, count):
        asked.append((attempt, count))
        out = pool[:count]
        del pool[:count]
        return out
    method.setup.more_records = more_records
    return method, recs, asked


def test_dynamic_sampling_refills_until_the_batch_is_informative(tokenizer):
    # step: 0 mixed, 1 all right, 2 all wrong, 3 mixed; refill 1 (2 asked): 4 all right, 5 mixed;
    # refill 2 (1 asked): 6 mixed
    flags = [(1, 0), (1, 1), (0, 0), (0, 1)]
    method, recs, asked = _dynamic(tokenizer, flags, refill_flags=[(1, 1), (1, 0), (0, 1)])
    rng = jax.random.PRNGKey(7)
    sb = method.make_batch(recs[:4], None, rng)
    assert asked == [(1, 2), (2, 1)]
    calls = method.setup.sample.calls
    assert [len(c["prompts"]) for c in calls] == [4, 2, 1]
    for attempt, call in enumerate(calls):  # each refill attempt samples with rng folded with its number
        want = rng if attempt == 0 else jax.random.fold_in(rng, attempt)
        assert np.array_equal(call["rng"], np.asarray(want))
    batch = _rows(sb.batch)
    assert batch.tokens.shape[0] == 8 and sb.batch.tokens.shape[:2] == (2, 4)
    kept = [0, 3, 5, 6]
    for row in range(8):
        prompt = recs[kept[row // 2]]["prompt_ids"]
        assert [int(t) for t, s in zip(batch.tokens[row], batch.segment_ids[row]) if s][:len(prompt)] == prompt
    rewards = np.array([f for i in kept for f in (flags + [(1, 1), (1, 0), (0, 1)])[i]], np.float64)
    _close(batch.advantages, np_advantages(rewards, 2, "group"), rtol=1e-6)
    assert np.all(batch.advantages != 0)
    assert sb.info["rollout/groups_dropped"] == 3 and sb.info["rollout/refills"] == 2
    assert sb.info["rollout/groups_padded"] == 0
    sampled = sum(len(method.setup.tokenizer.encode(t, add_special_tokens=False))
                  for c in calls for p in c["prompts"] for t in method.setup.sample.by_prompt[p])
    assert sb.rollout_tokens == sampled  # every sampled completion counts, dropped ones included


def test_dynamic_sampling_pads_with_dropped_groups_when_refills_run_out(tokenizer):
    flags = [(1, 0), (1, 1), (0, 0), (0, 1)]
    method, recs, asked = _dynamic(tokenizer, flags, max_refills=1, refill_flags=[(0, 0), (1, 1)])
    sb = method.make_batch(recs[:4], None, jax.random.PRNGKey(0))
    assert asked == [(1, 2)]
    batch = _rows(sb.batch)
    order = [0, 3, 1, 2]  # the informative groups, then the first dropped ones
    for row in range(8):
        prompt = recs[order[row // 2]]["prompt_ids"]
        assert [int(t) for t, s in zip(batch.tokens[row], batch.segment_ids[row]) if s][:len(prompt)] == prompt
    assert np.all(batch.advantages[4:] == 0) and np.all(batch.advantages[:4] != 0)
    assert sb.info == {**sb.info, "rollout/groups_dropped": 4, "rollout/refills": 1, "rollout/groups_padded": 2}
    # nothing to refill: no further records asked, nothing dropped
    method, recs, asked = _dynamic(tokenizer, [(1, 0), (0, 1), (1, 0), (0, 1)])
    sb = method.make_batch(recs, None, jax.random.PRNGKey(0))
    assert asked == [] and sb.info["rollout/refills"] == 0 and sb.info["rollout/groups_dropped"] == 0
    with pytest.raises(config.ConfigError, match="rollout.n >= 2"):
        _method(tokenizer, GRPOConfig(dynamic_sampling=True), None, n=1)


# ---------------------------------------------------------------------------------------------
# aggregation "dapo": normalised over the accumulated batch


def test_dapo_normalises_over_every_micro_batch_of_the_step(tokenizer):
    method = _method(tokenizer, GRPOConfig(aggregation="dapo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH),
                     None, micro=2, accum=2)
    recs = _prepared(method, _records(2))
    texts = {tuple(recs[0]["prompt_ids"]): ["\\boxed{0}", "a long wrong answer: \\boxed{5} and more words"],
             tuple(recs[1]["prompt_ids"]): ["no", "we add 1 and so \\boxed{1}"]}
    method.setup.sample = PromptSampler(tokenizer, texts)
    sb = method.make_batch(recs, None, jax.random.PRNGKey(0))
    batch = sb.batch  # [accum 2, micro 2, ...]
    counts = batch.mask.sum(axis=(1, 2))
    assert counts[0] != counts[1]  # micro-batches of unequal token counts
    total = float(batch.mask.sum())
    assert np.all(batch.token_norm == total / 2)
    assert method.batch_shapes().token_norm.shape == (2, 2)

    rs = np.random.RandomState(3)
    logp, old = (x.reshape(batch.mask.shape) for x in _logp_inputs(rs, 4, batch.mask.shape[-1]))

    def step_loss(lp, norm):  # the trainer: the mean of the micro-batch losses (and so of their gradients)
        losses = [policy_objective(lp[i], old[i], batch.advantages[i], batch.mask[i], method.options,
                                   token_norm=None if norm is None else norm[i])[0] for i in range(2)]
        return sum(losses) / 2

    loss, g = jax.value_and_grad(step_loss)(jnp.asarray(logp), batch.token_norm)
    lp = _t(logp).requires_grad_(True)
    flat = lambda x: np.asarray(x).reshape(4, -1)  # noqa: E731
    term, _ = ref_terms(lp.reshape(4, -1), flat(old), batch.advantages.reshape(-1), flat(batch.mask))
    want = (term * _t(flat(batch.mask))).sum() / total
    want.backward()
    _close(loss, want.item(), what="step loss")
    _close(g, lp.grad.numpy(), rtol=5e-5, what="step grad")
    per_micro, _ = jax.value_and_grad(step_loss)(jnp.asarray(logp), None)
    assert abs(float(per_micro) - float(loss)) > 1e-4  # the old per-micro-batch mean differs
    assert _method(tokenizer, GRPOConfig(), PromptSampler(tokenizer, texts), micro=2, accum=2).make_batch(
        recs, None, jax.random.PRNGKey(0)).batch.token_norm is None  # other aggregations carry nothing


# ---------------------------------------------------------------------------------------------
# the "string_first" grader


@pytest.mark.parametrize("text,answer,correct,extracted", [
    ("first \\boxed{12} then \\boxed{13}", "12", True, "12"),  # the first box counts ...
    ("first \\boxed{12} then \\boxed{13}", "13", False, "12"),  # ... not the last
    ("\\boxed{  Yes }", " yes", True, "  Yes "),  # case and surrounding whitespace
    ("\\boxed{x y}", "xy", False, "x y"),  # inner whitespace is kept
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\frac{1}{2}}", "1/2", False, "\\frac{1}{2}"),  # no math equivalence
    ("the answer is 12", "12", False, None),  # no box
    ("\\boxed{12", "12", False, None),  # never closed
    ("\\boxed{}", "", False, ""),  # an empty reference is never matched
])
def test_string_first_grader(text, answer, correct, extracted):
    res = grade(text, answer, method="string_first")
    assert (res.correct, res.extracted, res.error) == (correct, extracted, None)
    assert first_boxed(text) == extracted
    if text.startswith("first"):  # the last-box graders disagree
        assert grade(text, "13", method="string").correct

