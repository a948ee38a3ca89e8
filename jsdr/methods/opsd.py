"""OPSD: one rollout per problem from the student (current adapter); the same model, prompted with the
reference solution, is the teacher on that rollout. With `opsd.reason_first` the teacher first writes
its own analysis of the solution and scores the rollout after it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jsdr.data.batches import OPSDBatch, build_opsd_batch
from jsdr.data.prompts import reason_first_transition_ids, render_reason_first, render_teacher
from jsdr.losses.opsd import OPSDConfig, opsd_loss
from jsdr.methods.base import Method, Setup, StepBatch, register

# room for the transition text after a reason_first analysis (it is a fixed text of ~80 tokens)
_TRANSITION_ROOM = 128


@register
class OPSD(Method):
    name = "opsd"
    config_cls = OPSDConfig
    fixed_on_resume = ("opsd.teacher",)  # the EMA tree exists only with teacher=ema
    defaults = {"rollout": {"temperature": 1.1, "top_p": 0.95, "top_k": 20, "n": 1, "max_new_tokens": 2048}}

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.ema_decay = self.options.ema_decay if self.options.teacher == "ema" else None
        self.transition = reason_first_transition_ids(setup.tokenizer, setup.prompts) \
            if self.options.reason_first else None

    def _teacher_prompt(self, record: dict) -> list[int]:
        setup = self.setup
        render = render_reason_first if self.options.reason_first else render_teacher
        return render(setup.tokenizer, record["problem"], record["solution"], setup.prompts)

    def prepare(self, record: dict) -> dict | str | None:
        """Student and teacher prompt ids. A student prompt over data.max_prompt_tokens is dropped (never
        cut); a teacher prompt over data.max_teacher_prompt_tokens is dropped, or (data.overlong=truncate)
        its reference solution is cut until it fits."""
        data = self.setup.data
        student = self.student_prompt(record["problem"])
        if len(student) > data.max_prompt_tokens:
            return "prompt_too_long"  # a prompt is never cut: the model would see a mangled problem
        teacher = self._teacher_prompt(record)
        out = dict(record, prompt_ids=student)
        if len(teacher) > data.max_teacher_prompt_tokens:
            if data.overlong == "drop":
                return "teacher_prompt_too_long"
            teacher = self._cut_solution(record, len(teacher))
            if teacher is None:
                return "teacher_prompt_too_long"
            out["truncated"] = "teacher_prompt_too_long"
        out["teacher_ids"] = teacher
        return out

    def _cut_solution(self, record: dict, length: int) -> list[int] | None:
        """The teacher prompt with the reference solution cut (at a token boundary) so that the prompt
        fits data.max_teacher_prompt_tokens; None when even an empty solution does not fit."""
        tok, limit = self.setup.tokenizer, self.setup.data.max_teacher_prompt_tokens
        ids = tok.encode(record["solution"], add_special_tokens=False)
        keep = len(ids) - (length - limit)
        while keep >= 0:  # re-tokenizing the cut text can shift a boundary: shorten until it fits
            teacher = self._teacher_prompt(dict(record, solution=tok.decode(ids[:keep])))
            if len(teacher) <= limit:
                return teacher
            keep -= max(1, len(teacher) - limit)
        return None

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """One rollout per problem from the current adapter; student and teacher rows hold it after
        their own prompts, aligned token by token (reason_first: after the teacher's analysis)."""
        setup = self.setup
        student = [r["prompt_ids"] for r in records]
        rng_rollout, rng_reason = jax.random.split(rng)
        out = self.rollouts(lora, student, 1, rng if not self.options.reason_first else rng_rollout)
        lengths = [int(n) for n in out.lengths]
        rollouts = out.completions()
        teacher, info_extra, reason_tokens = [r["teacher_ids"] for r in records], {}, 0
        if self.options.reason_first:
            teacher, reason_tokens = self._reason_first(records, lora, rng_reason)
            info_extra["teacher/analysis_length"] = reason_tokens / len(records)
        n = self.bucket(max(lengths + [1]))
        batch = build_opsd_batch(student, teacher, rollouts, student_len=self.bucket(max(map(len, student)) + n),
                                 teacher_len=self.bucket(max(map(len, teacher)) + n), rollout_len=n,
                                 padding="left", pad_id=setup.pad_id)
        tokens = int(batch.s_segment_ids.astype(bool).sum() + batch.t_segment_ids.astype(bool).sum())
        info = {"rollout/length": float(np.mean(lengths)),
                "rollout/accuracy": float(np.mean([g.correct for g in self.grades(out, records, 1)])), **info_extra}
        return StepBatch(self.stack(batch), tokens, info, sum(lengths) + reason_tokens)

    def _reason_first(self, records: list[dict], lora, rng) -> tuple[list[list[int]], int]:
        """The teacher's analyses of the reference solutions, sampled with the teacher's weights (fixed:
        the base model; live: the current adapter) and the rollout's filters, up to
        opsd.max_reasoning_tokens; each teacher prompt is analysis prompt + analysis + transition."""
        sc = dataclasses.replace(self.setup.rollout, n=1, max_new_tokens=self.options.max_reasoning_tokens)
        out = self.setup.sample(None if self.options.teacher == "fixed" else lora,
                                [r["teacher_ids"] for r in records], sc, rng)
        analyses = out.completions()
        return ([list(r["teacher_ids"]) + list(a) + self.transition for r, a in zip(records, analyses)],
                sum(len(a) for a in analyses))

    def batch_shapes(self):
        n = self.bucket(self.setup.rollout.max_new_tokens)
        data = self.setup.data
        teacher = data.max_teacher_prompt_tokens + (self.options.max_reasoning_tokens + _TRANSITION_ROOM
                                                    if self.options.reason_first else 0)
        lengths = {f"s_{k}": (self.bucket(data.max_prompt_tokens) + n,) for k in ("tokens", "positions", "segment_ids")}
        lengths.update({f"t_{k}": (self.bucket(teacher) + n,) for k in ("tokens", "positions", "segment_ids")})
        lengths.update({k: (n,) for k in ("s_index", "t_index", "rollout_tokens", "rollout_mask")})
        return self.shapes(OPSDBatch, lengths, floats=("rollout_mask",))

    def rollout_prompts(self, records_per_step: int) -> int:
        return records_per_step

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        return opsd_loss(lora, params, batch, rng, model=self.setup.model, cfg=self.options,
                         teacher_lora=teacher_lora)
