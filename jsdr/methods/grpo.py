"""GRPO: n rollouts per prompt from the current policy, graded; group-normalised advantages.

Options beyond the plain algorithm (GRPOConfig): DAPO's soft overlong punishment, masking of
truncated completions and dynamic sampling (groups with equal rewards replaced by those of further
prompts), and num_iterations > 1 (each batch trained on several times, the ratio taken to the old
log-probs that the trainer's forward computes at rollout time, `Setup.score`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jsdr.config import ConfigError
from jsdr.data.batches import GRPOBatch, build_grpo_batch
from jsdr.losses.grpo import GRPOConfig, group_advantages, grpo_loss, overlong_penalty, policy_logprobs
from jsdr.methods.base import Method, Setup, StepBatch, register


class Group(NamedTuple):
    """The graded rollouts of one prompt."""

    prompt: list[int]
    completions: list[list[int]]
    rewards: np.ndarray  # [n] f32: 1 for a correct answer, plus the overlong punishment
    penalty: np.ndarray  # [n] f32: the overlong punishment included in rewards (<= 0)
    truncated: np.ndarray  # [n] bool: cut at rollout.max_new_tokens (finish reason "length")
    grader_errors: int

    @property
    def informative(self) -> bool:
        """Rewards not all equal: the group has non-zero advantages."""
        return bool(self.rewards.min() < self.rewards.max())


@register
class GRPO(Method):
    name = "grpo"
    config_cls = GRPOConfig
    defaults = {"rollout": {"temperature": 1.2, "top_p": 1.0, "n": 8, "max_new_tokens": 16000}}

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.group = setup.rollout.n
        rows = setup.micro_batch * setup.grad_accum
        if rows % self.group:
            raise ConfigError(f"GRPO: the batch of {rows} completions per step is not a multiple of "
                              f"rollout.n={self.group} generations per prompt")
        if self.options.overlong_buffer > setup.rollout.max_new_tokens:
            raise ConfigError(f"grpo.overlong_buffer: {self.options.overlong_buffer} exceeds "
                              f"rollout.max_new_tokens={setup.rollout.max_new_tokens}")
        if self.options.dynamic_sampling and self.group < 2:
            raise ConfigError("grpo.dynamic_sampling: needs rollout.n >= 2 (a group of one never has unequal "
                              "rewards)")
        self.updates_per_batch = self.options.num_iterations

    def records_per_step(self, sequences: int) -> int:
        return sequences // self.group

    def prepare(self, record: dict) -> dict | None:
        ids = self.student_prompt(record["problem"])
        if len(ids) > self.setup.data.max_prompt_tokens:
            return None  # a prompt is never cut: the model would see a mangled problem
        return dict(record, prompt_ids=ids)

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """rollout.n completions per prompt from the current adapter; reward 1 for a correct \\boxed{}
        answer (graded against the completion's own problem) plus the overlong punishment; advantages
        within each group. With dynamic sampling, groups of equal rewards are replaced (`refill`);
        with num_iterations > 1 the batch carries the sampling adapter's log-probs (`Setup.score`)."""
        setup, opt, g = self.setup, self.options, self.group
        groups = sampled = self.sample_groups(records, lora, rng)
        info = {}
        if opt.dynamic_sampling:
            groups, sampled, info = self.refill(groups, lora, rng)
        rewards = np.concatenate([x.rewards for x in groups])
        adv = np.asarray(group_advantages(rewards, g, opt.scale_rewards, opt.adv_eps), np.float32)
        completions = [c for x in groups for c in x.completions]
        prompts = [x.prompt for x in groups]
        lengths = [len(c) for c in completions]
        batch = build_grpo_batch([x.prompt for x in groups for _ in x.completions], completions,
                                 prompt_len=self.bucket(max(map(len, prompts))),
                                 completion_len=self.bucket(max(lengths + [1])), pad_id=setup.pad_id)
        truncated = np.concatenate([x.truncated for x in groups])
        if opt.mask_truncated_completions:
            batch.mask[truncated] = 0.0
        batch = batch._replace(advantages=adv)
        if opt.aggregation == "dapo":  # normalised by the tokens of the whole step, not each micro-batch's
            norm = max(float(batch.mask.sum()), 1.0) / setup.grad_accum
            batch = batch._replace(token_norm=np.full(len(completions), norm, np.float32))
        batch = self.stack(batch)
        if opt.num_iterations > 1:  # the ratio's denominator: this adapter's log-probs, by the training forward
            if setup.score is None:
                raise RuntimeError("GRPO with num_iterations > 1 needs the trainer's score function (setup.score)")
            batch = batch._replace(old_logprobs=np.asarray(setup.score(lora, batch), np.float32))
        penalty = np.concatenate([x.penalty for x in groups])
        info.update({"reward/mean": float(rewards.mean()), "rollout/length": float(np.mean(lengths)),
                     "reward/grader_errors": float(sum(x.grader_errors for x in groups)),
                     "rollout/truncated": float(truncated.sum())})
        if opt.overlong_buffer:
            info["reward/overlong_penalty"] = float(penalty.mean())
        rollout_tokens = sum(len(c) for x in sampled for c in x.completions)
        return StepBatch(batch, int(np.asarray(batch.segment_ids).astype(bool).sum()), info, rollout_tokens)

    def sample_groups(self, records: list[dict], lora, rng) -> list[Group]:
        """rollout.n completions of every record's prompt, graded and rewarded, one Group per record."""
        g, opt = self.group, self.options
        prompts = [r["prompt_ids"] for r in records]
        out = self.rollouts(lora, prompts, g, rng)
        grades = self.grades(out, records, g)
        penalty = overlong_penalty(out.lengths, self.setup.rollout.max_new_tokens, opt.overlong_buffer,
                                   opt.overlong_penalty)
        rewards = np.array([float(x.correct) for x in grades], np.float32) + penalty
        truncated = np.array([reason == "length" for reason in out.finish_reason_str], bool)
        completions = out.completions()
        return [Group(p, completions[i * g:(i + 1) * g], rewards[i * g:(i + 1) * g], penalty[i * g:(i + 1) * g],
                      truncated[i * g:(i + 1) * g], sum(x.error is not None for x in grades[i * g:(i + 1) * g]))
                for i, p in enumerate(prompts)]

    def refill(self, groups: list[Group], lora, rng) -> tuple[list[Group], list[Group], dict[str, float]]:
        """DAPO's dynamic sampling: the informative groups of `groups`, then of further records
        (`setup.more_records(attempt, missing groups)`, sampled with rng folded with the attempt) until
        there are len(groups) of them or max_refills attempts were made; a batch still short is
        completed with the first groups of equal rewards (advantages 0).
        Returns (the batch's groups, every group sampled, step info)."""
        want = len(groups)
        sampled = list(groups)
        attempt = 0
        while sum(x.informative for x in sampled) < want and attempt < self.options.max_refills:
            if self.setup.more_records is None:
                raise RuntimeError("GRPO dynamic sampling needs further records from the trainer (setup.more_records)")
            attempt += 1
            missing = want - sum(x.informative for x in sampled)
            sampled += self.sample_groups(self.setup.more_records(attempt, missing), lora,
                                          jax.random.fold_in(rng, attempt))
        kept = [x for x in sampled if x.informative]
        dropped = [x for x in sampled if not x.informative]
        padded = want - len(kept)
        info = {"rollout/groups_dropped": float(len(dropped)), "rollout/refills": float(attempt),
                "rollout/groups_padded": float(padded)}
        return kept + dropped[:padded], sampled, info

    def batch_shapes(self):
        opt = self.options
        t = (self.bucket(self.setup.data.max_prompt_tokens) + self.bucket(self.setup.rollout.max_new_tokens),)
        lengths = {k: t for k in ("tokens", "positions", "segment_ids", "targets", "mask")}
        lengths["advantages"] = ()
        floats = ["mask", "advantages"]
        if opt.num_iterations > 1:
            lengths["old_logprobs"] = t
            floats.append("old_logprobs")
        if opt.aggregation == "dapo":
            lengths["token_norm"] = ()
            floats.append("token_norm")
        return self.shapes(GRPOBatch, lengths, floats=tuple(floats))

    def rollout_prompts(self, records_per_step: int) -> int:
        return records_per_step

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        # old_logprobs None (num_iterations 1): the loss takes the current policy's under stop-gradient
        return grpo_loss(lora, params, batch, rng, model=self.setup.model, cfg=self.options,
                         temperature=self.setup.rollout.temperature)

    def logprobs(self, lora, params, batch):
        """The per-token log-probs of the targets at the rollout temperature, as the loss computes them
        (the old log-probs of num_iterations > 1)."""
        return policy_logprobs(lora, params, batch, model=self.setup.model, temperature=self.setup.rollout.temperature,
                               chunk_size=self.options.chunk_size)
