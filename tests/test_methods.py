"""Each method's host-side work on its own (jsdr/methods): prompts, batch building, pairing of rollouts
with their prompts and grading against their own problem, with a fake sampler whose answers are right
for one problem and wrong for another; then the trainer's side: rollouts use the current adapter."""

import dataclasses

import jax
import numpy as np
import pytest

from jsdr import methods, run, sharding, toy
from jsdr.data import prompts as prompt_lib
from jsdr.data.datasets import DataConfig
from jsdr.losses.grpo import GRPOConfig
from jsdr.losses.opsd import OPSDConfig
from jsdr.losses.sft import SFTConfig
from jsdr.model.transformer import Model, ModelConfig
from jsdr.sampling import SampleOutput, SamplingConfig
from jsdr.train import Trainer
from tests.test_eval import _sample_output
from tests.test_train import _cfg

TINY = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=4)
RECORDS = [  # two problems whose answers differ
    {"problem": "Start at 0. Add 3.", "solution": "0 + 3 = 3. \\boxed{3}", "answer": "3"},
    {"problem": "Start at 0. Add 7.", "solution": "0 + 7 = 7. \\boxed{7}", "answer": "7"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


class FakeSampler:
    """Returns fixed response texts, row r being sample r % n of prompt r // n; records its calls."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def __call__(self, lora, prompts, sc: SamplingConfig, rng):
        self.calls.append({"lora": lora, "prompts": [list(p) for p in prompts], "sc": sc})
        assert len(self.texts) == len(prompts) * sc.n
        return _sample_output(self.tokenizer, self.texts, sc.n)


def _setup(tokenizer, options, sample=None, rollout=None, grad_accum=1, micro_batch=4, data_parallel=1):
    return methods.Setup(
        model=Model(TINY), tokenizer=tokenizer, data=DataConfig(max_prompt_tokens=400, max_length=400),
        prompts=prompt_lib.PromptTemplates(teacher=toy.TEACHER_PROMPT), rollout=rollout or SamplingConfig(n=1),
        options=options, reward="math_verify", pad_id=0, seq_bucket=8, grad_accum=grad_accum,
        micro_batch=micro_batch, data_parallel=data_parallel, sample=sample, log=lambda *a: None)


def _real(row_tokens, row_segments):
    return [int(t) for t, s in zip(row_tokens, row_segments) if s > 0]


def test_registry_and_defaults():
    assert set(methods.METHODS) == {"sft", "grpo", "opsd"}
    assert methods.get("grpo").defaults["rollout"]["n"] == 8  # paper table 6
    with pytest.raises(KeyError, match="unknown method 'ppo'; registered: grpo, opsd, sft"):
        methods.get("ppo")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(type("Again", (methods.Method,), {"name": "sft"}))


def test_grpo_pairs_every_completion_with_its_own_prompt_and_answer(tokenizer):
    # rows: prompt 0 -> [right, wrong], prompt 1 -> [prompt 0's answer (wrong here), right]
    texts = ["so \\boxed{3}", "so \\boxed{5}", "so \\boxed{3}", "so \\boxed{7}"]
    fake = FakeSampler(tokenizer, texts)
    setup = _setup(tokenizer, GRPOConfig(), sample=fake, rollout=SamplingConfig(n=2, temperature=1.0))
    method = methods.get("grpo")(setup)
    assert method.records_per_step(4) == 2
    recs = [method.prepare(r) for r in RECORDS]
    lora = {"marker": np.ones(1)}
    sb = method.make_batch(recs, lora, jax.random.PRNGKey(0))
    call = fake.calls[0]
    assert call["lora"] is lora and call["sc"].n == 2
    assert call["prompts"] == [recs[0]["prompt_ids"], recs[1]["prompt_ids"]]
    batch = jax.tree.map(lambda x: x[0], sb.batch)  # grad_accum 1
    # rewards [1, 0, 0, 1] -> advantages +, -, -, + (groups of 2, std-normalised)
    assert sb.info["reward/mean"] == 0.5
    adv = np.asarray(batch.advantages)
    assert adv[0] > 0 > adv[1] and adv[2] < 0 < adv[3]
    np.testing.assert_allclose(adv[0] + adv[1], 0, atol=1e-6)
    for row in range(4):
        prompt = recs[row // 2]["prompt_ids"]
        completion = tokenizer.encode(texts[row], add_special_tokens=False)
        assert _real(batch.tokens[row], batch.segment_ids[row]) == prompt + completion
        # the mask selects exactly the completion's tokens as targets
        assert batch.targets[row][batch.mask[row] > 0].tolist() == completion
    assert batch.old_logprobs is None  # on-policy: the loss uses the current log-probs
    assert sb.rollout_tokens == sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)


def test_grpo_rejects_a_batch_that_is_not_whole_groups(tokenizer):
    with pytest.raises(Exception, match="not a multiple of rollout.n=3"):
        methods.get("grpo")(_setup(tokenizer, GRPOConfig(), rollout=SamplingConfig(n=3), micro_batch=4))


def test_opsd_aligns_student_and_teacher_on_the_same_rollout(tokenizer):
    texts = ["0 + 3 = 3. \\boxed{3}", "0 + 7 = 6. \\boxed{3}"]  # right for problem 0, wrong for problem 1
    fake = FakeSampler(tokenizer, texts)
    setup = _setup(tokenizer, OPSDConfig(), sample=fake, micro_batch=2)
    method = methods.get("opsd")(setup)
    recs = [method.prepare(r) for r in RECORDS]
    for r in recs:  # the teacher prompt holds the reference solution, the student's does not
        assert tokenizer.decode(r["teacher_ids"]).count(r["solution"]) == 1
        assert r["solution"] not in tokenizer.decode(r["prompt_ids"])
    lora = {"marker": np.ones(1)}
    sb = method.make_batch(recs, lora, jax.random.PRNGKey(0))
    assert fake.calls[0]["lora"] is lora and fake.calls[0]["sc"].n == 1
    assert sb.info["rollout/accuracy"] == 0.5
    b = jax.tree.map(lambda x: x[0], sb.batch)
    for row, r in enumerate(recs):
        rollout = tokenizer.encode(texts[row], add_special_tokens=False)
        assert _real(b.s_tokens[row], b.s_segment_ids[row]) == r["prompt_ids"] + rollout
        assert _real(b.t_tokens[row], b.t_segment_ids[row]) == r["teacher_ids"] + rollout
        n = len(rollout)
        assert b.rollout_tokens[row][:n].tolist() == rollout and b.rollout_mask[row].sum() == n
        # position s_index[j] (t_index[j]) holds the token before rollout token j in each role
        before_s = b.s_tokens[row][b.s_index[row][:n]].tolist()
        before_t = b.t_tokens[row][b.t_index[row][:n]].tolist()
        assert before_s == [r["prompt_ids"][-1]] + rollout[:-1]
        assert before_t == [r["teacher_ids"][-1]] + rollout[:-1]
    assert b.s_tokens.shape[1] % 8 == 0 and b.t_tokens.shape[1] % 8 == 0  # bucketed lengths


def test_opsd_reason_first_teacher_reads_its_own_analysis(tokenizer):
    """reason_first: the teacher (fixed: LoRA off) first samples an analysis of the solution; its row is
    analysis prompt + analysis + transition + the student's rollout, aligned like the plain teacher's."""
    rollouts, analyses = ["0 + 3 = 3. \\boxed{3}", "0 + 7 = 6. \\boxed{3}"], ["the key is adding", "add 7"]
    calls = []

    def sample(lora, prompts, sc, rng):
        calls.append({"lora": lora, "prompts": [list(p) for p in prompts], "sc": sc})
        return _sample_output(tokenizer, rollouts if len(calls) == 1 else analyses, 1)

    setup = _setup(tokenizer, OPSDConfig(reason_first=True, max_reasoning_tokens=77), sample=sample, micro_batch=2)
    method = methods.get("opsd")(setup)
    recs = [method.prepare(r) for r in RECORDS]
    assert all("Here is a correct reasoning" in tokenizer.decode(r["teacher_ids"]) for r in recs)
    lora = {"marker": np.ones(1)}
    sb = method.make_batch(recs, lora, jax.random.PRNGKey(0))
    assert calls[0]["lora"] is lora and calls[1]["lora"] is None  # the fixed teacher analyses without LoRA
    assert calls[1]["prompts"] == [r["teacher_ids"] for r in recs] and calls[1]["sc"].max_new_tokens == 77
    transition = prompt_lib.reason_first_transition_ids(tokenizer, setup.prompts)
    b = jax.tree.map(lambda x: x[0], sb.batch)
    for row, r in enumerate(recs):
        rollout = tokenizer.encode(rollouts[row], add_special_tokens=False)
        teacher = r["teacher_ids"] + tokenizer.encode(analyses[row], add_special_tokens=False) + transition
        assert _real(b.t_tokens[row], b.t_segment_ids[row]) == teacher + rollout
        assert b.t_tokens[row][b.t_index[row][:len(rollout)]].tolist() == [teacher[-1]] + rollout[:-1]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in rollouts + analyses]
    assert sb.rollout_tokens == sum(lengths)
    with pytest.raises(Exception, match="reason_first"):
        OPSDConfig(reason_first=True, teacher="ema")


def test_opsd_length_policy_names_the_reason_and_cuts_the_solution(tokenizer):
    base = _setup(tokenizer, OPSDConfig())
    full = methods.get("opsd")(base).prepare(RECORDS[0])
    s_len, t_len = len(full["prompt_ids"]), len(full["teacher_ids"])
    student = dataclasses.replace(base, data=DataConfig(max_prompt_tokens=s_len - 1))
    assert methods.get("opsd")(student).prepare(RECORDS[0]) == "prompt_too_long"
    drop = dataclasses.replace(base, data=DataConfig(max_teacher_prompt_tokens=t_len - 3))
    assert methods.get("opsd")(drop).prepare(RECORDS[0]) == "teacher_prompt_too_long"
    cut = dataclasses.replace(base, data=DataConfig(max_teacher_prompt_tokens=t_len - 3, overlong="truncate"))
    out = methods.get("opsd")(cut).prepare(RECORDS[0])
    assert out["truncated"] == "teacher_prompt_too_long" and t_len - 10 <= len(out["teacher_ids"]) <= t_len - 3
    solution = RECORDS[0]["solution"]
    kept = next(solution[:i] for i in range(len(solution), 0, -1)
                if solution[:i] in tokenizer.decode(out["teacher_ids"]))
    assert 0 < len(kept) < len(solution)  # a prefix of the solution is kept, the rest is cut
    tiny = dataclasses.replace(base, data=DataConfig(max_teacher_prompt_tokens=5, overlong="truncate"))
    assert methods.get("opsd")(tiny).prepare(RECORDS[0]) == "teacher_prompt_too_long"  # not even an empty one fits


def test_opsd_ema_teacher_and_resume_rule(tokenizer):
    assert methods.get("opsd")(_setup(tokenizer, OPSDConfig(teacher="ema", ema_decay=0.9))).ema_decay == 0.9
    assert methods.get("opsd")(_setup(tokenizer, OPSDConfig())).ema_decay is None
    assert "opsd.teacher" in methods.get("opsd").fixed_on_resume


def test_sft_packs_the_solution_as_target(tokenizer):
    setup = _setup(tokenizer, SFTConfig(), grad_accum=2, micro_batch=2, data_parallel=2)
    method = methods.get("sft")(setup)
    recs = [method.prepare(r) for r in RECORDS]
    sb = method.make_batch(recs, None, jax.random.PRNGKey(0))
    assert sb.batch.tokens.shape[:2] == (2, 2)  # rows rounded up to grad_accum x data-parallel
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), sb.batch)
    targets = flat.targets[flat.mask > 0].tolist()
    assert targets == recs[0]["response_ids"] + recs[1]["response_ids"] or \
        targets == recs[1]["response_ids"] + recs[0]["response_ids"]
    assert tokenizer.decode(recs[0]["response_ids"]).startswith(RECORDS[0]["solution"])


def test_sft_length_policy(tokenizer):
    base = _setup(tokenizer, SFTConfig())
    n = len(methods.get("sft")(base).prepare(RECORDS[0])["prompt_ids"])
    drop = dataclasses.replace(base, data=DataConfig(max_length=n + 2))
    assert methods.get("sft")(drop).prepare(RECORDS[0]) is None and methods.get("sft").drop_reason == "too_long"
    cut = dataclasses.replace(base, data=DataConfig(max_length=n + 2, overlong="truncate"))
    out = methods.get("sft")(cut).prepare(RECORDS[0])
    assert out["truncated"] and len(out["prompt_ids"]) + len(out["response_ids"]) == n + 2


# -- the trainer hands the method the current adapter and its own records ----------------------------


@pytest.mark.parametrize("method", ["grpo", "opsd"])
def test_rollouts_use_the_current_adapter(toy_tiny_assets, tmp_path, method):
    """On-policy: every rollout is sampled with the LoRA tree of the state being trained at that step."""
    seen, values = [], []

    def sample(lora, prompts, sc, rng):
        seen.append(id(lora))
        values.append([np.asarray(x) for x in jax.tree.leaves(lora)])  # the step donates the old state
        n_rows = len(prompts) * sc.n
        return SampleOutput(np.full((n_rows, 3), 5, np.int32), np.zeros((n_rows, 3), np.float32),
                            np.zeros((n_rows, 3), np.float32), np.full(n_rows, 3, np.int32),
                            np.zeros(n_rows, np.int8), np.arange(n_rows) // sc.n)

    tr = Trainer(_cfg(toy_tiny_assets, method, tmp_path, train={"steps": 2, "save_every": 100, "grad_accum": 4}),
                 progress=False,
                 log=lambda *a: None, sample=sample)
    states = []
    real_take = tr.take

    def take(step):
        states.append(id(tr.state.lora))
        return real_take(step)
    tr.take = take
    tr.run()
    assert len(seen) == 2 and seen == states and values[0]  # a LoRA tree, never None (LoRA off)
    if method == "opsd":  # the second rollout used the adapter after the first update (GRPO's fake
        # completions all get reward 0: zero advantages, no update)
        assert max(float(np.abs(a - b).max()) for a, b in zip(values[0], values[1])) > 0


def test_place_batch_splits_rows_over_data_parallel_devices():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    batch = {"x": np.arange(2 * 8 * 3).reshape(2, 8, 3), "none": None}
    placed = run.place_batch(batch, mesh, leading=1)
    assert placed["none"] is None
    shard_rows = {s.data.shape for s in placed["x"].addressable_shards}
    assert shard_rows == {(2, 1, 3)}
