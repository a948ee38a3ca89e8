"""GRPO: n rollouts per prompt from the current policy, graded; group-normalised advantages."""

from __future__ import annotations

import numpy as np

from jsdr.config import ConfigError
from jsdr.data.batches import GRPOBatch, build_grpo_batch
from jsdr.losses.grpo import GRPOConfig, group_advantages, grpo_loss
from jsdr.methods.base import Method, Setup, StepBatch, register


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

    def records_per_step(self, sequences: int) -> int:
        return sequences // self.group

    def prepare(self, record: dict) -> dict | None:
        ids = self.student_prompt(record["problem"])
        if len(ids) > self.setup.data.max_prompt_tokens:
            return None  # a prompt is never cut: the model would see a mangled problem
        return dict(record, prompt_ids=ids)

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """rollout.n completions per prompt from the current adapter; reward 1 for a correct \\boxed{}
        answer (graded against the completion's own problem); advantages within each group."""
        setup, g = self.setup, self.group
        prompts = [r["prompt_ids"] for r in records]
        out = self.rollouts(lora, prompts, g, rng)
        lengths = [int(n) for n in out.lengths]
        grades = self.grades(out, records, g)
        rewards = np.array([float(x.correct) for x in grades], np.float32)
        adv = np.asarray(group_advantages(rewards, g, self.options.std_normalization, self.options.adv_eps),
                         np.float32)
        completions = out.completions()
        batch = build_grpo_batch([prompts[i // g] for i in range(len(completions))], completions,
                                 prompt_len=self.bucket(max(map(len, prompts))),
                                 completion_len=self.bucket(max(lengths + [1])), pad_id=setup.pad_id)
        batch = batch._replace(advantages=adv)
        info = {"reward/mean": float(rewards.mean()), "rollout/length": float(np.mean(lengths)),
                "reward/grader_errors": float(sum(x.error is not None for x in grades))}
        return StepBatch(self.stack(batch), int(batch.segment_ids.astype(bool).sum()), info, sum(lengths))

    def batch_shapes(self):
        t = (self.bucket(self.setup.data.max_prompt_tokens) + self.bucket(self.setup.rollout.max_new_tokens),)
        lengths = {k: t for k in ("tokens", "positions", "segment_ids", "targets", "mask")}
        return self.shapes(GRPOBatch, dict(lengths, advantages=()), floats=("mask", "advantages"))

    def rollout_prompts(self, records_per_step: int) -> int:
        return records_per_step

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        # one update per rollout batch: old_logprobs stay None and the loss uses the current policy's
        return grpo_loss(lora, params, batch, rng, model=self.setup.model, cfg=self.options,
                         temperature=self.setup.rollout.temperature)
