"""OPSD: one rollout per problem from the student (current adapter); the same model, prompted with the
reference solution, is the teacher on that rollout."""

from __future__ import annotations

import numpy as np

from jsdr.data.batches import OPSDBatch, build_opsd_batch
from jsdr.data.prompts import render_teacher
from jsdr.losses.opsd import OPSDConfig, opsd_loss
from jsdr.methods.base import Method, Setup, StepBatch, register


@register
class OPSD(Method):
    name = "opsd"
    config_cls = OPSDConfig
    fixed_on_resume = ("opsd.teacher",)  # the EMA tree exists only with teacher=ema
    defaults = {"rollout": {"temperature": 1.1, "top_p": 0.95, "top_k": 20, "n": 1, "max_new_tokens": 2048}}

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.ema_decay = self.options.ema_decay if self.options.teacher == "ema" else None

    def prepare(self, record: dict) -> dict | None:
        setup = self.setup
        student = self.student_prompt(record["problem"])
        teacher = render_teacher(setup.tokenizer, record["problem"], record["solution"], setup.prompts)
        if max(len(student), len(teacher)) > setup.data.max_prompt_tokens:
            return None  # a prompt is never cut: the model would see a mangled problem
        return dict(record, prompt_ids=student, teacher_ids=teacher)

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """One rollout per problem from the current adapter; student and teacher rows hold it after
        their own prompts, aligned token by token."""
        setup = self.setup
        student = [r["prompt_ids"] for r in records]
        teacher = [r["teacher_ids"] for r in records]
        out = self.rollouts(lora, student, 1, rng)
        lengths = [int(n) for n in out.lengths]
        rollouts = out.completions()
        n = self.bucket(max(lengths + [1]))
        batch = build_opsd_batch(student, teacher, rollouts, student_len=self.bucket(max(map(len, student)) + n),
                                 teacher_len=self.bucket(max(map(len, teacher)) + n), rollout_len=n,
                                 padding="left", pad_id=setup.pad_id)
        tokens = int(batch.s_segment_ids.astype(bool).sum() + batch.t_segment_ids.astype(bool).sum())
        info = {"rollout/length": float(np.mean(lengths)),
                "rollout/accuracy": float(np.mean([g.correct for g in self.grades(out, records, 1)]))}
        return StepBatch(self.stack(batch), tokens, info, sum(lengths))

    def batch_shapes(self):
        n = self.bucket(self.setup.rollout.max_new_tokens)
        t = (self.bucket(self.setup.data.max_prompt_tokens) + n,)
        lengths = {f"{role}_{k}": t for role in "st" for k in ("tokens", "positions", "segment_ids")}
        lengths.update({k: (n,) for k in ("s_index", "t_index", "rollout_tokens", "rollout_mask")})
        return self.shapes(OPSDBatch, lengths, floats=("rollout_mask",))

    def rollout_prompts(self, records_per_step: int) -> int:
        return records_per_step

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        return opsd_loss(lora, params, batch, rng, model=self.setup.model, cfg=self.options,
                         teacher_lora=teacher_lora)
