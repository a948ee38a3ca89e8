"""SFT: the reference solution as the target, packed into rows of one length bucket."""

from __future__ import annotations

from jsdr.data.batches import SFTBatch, pack_sft_examples
from jsdr.data.prompts import render_sft_example
from jsdr.losses.sft import SFTConfig, sft_loss
from jsdr.methods.base import Method, StepBatch, bucket, register


@register
class SFT(Method):
    name = "sft"
    config_cls = SFTConfig
    defaults = {"train": {"per_device_batch": 2, "grad_accum": 4}}
    drop_reason = "too_long"

    def prepare(self, record: dict) -> dict | None:
        """Student prompt + solution ids. Longer than data.max_length: dropped, or (data.overlong=truncate)
        the solution is cut; a prompt that alone fills the limit is always dropped."""
        setup, data = self.setup, self.setup.data
        ex = render_sft_example(setup.tokenizer, record["problem"], record["solution"], setup.prompts)
        prompt, response = list(ex.prompt_ids), list(ex.response_ids)
        out = dict(record)
        if len(prompt) + len(response) > data.max_length:
            if data.overlong == "drop" or len(prompt) >= data.max_length:
                return None
            response = response[:data.max_length - len(prompt)]
            out["truncated"] = True
        out["prompt_ids"], out["response_ids"] = prompt, response
        return out

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """Pack the step's examples into rows of one length bucket; the row count is rounded up to a
        multiple of grad_accum x data-parallel size (all-padding rows carry no loss)."""
        setup = self.setup
        examples = [(r["prompt_ids"], r["response_ids"]) for r in records]
        length = self.bucket(max(len(p) + len(r) for p, r in examples))
        needed = pack_sft_examples(examples, length, pad_id=setup.pad_id).tokens.shape[0]
        rows = bucket(needed, setup.grad_accum * setup.data_parallel)
        batch = pack_sft_examples(examples, length, num_rows=rows, pad_id=setup.pad_id)
        return StepBatch(self.stack(batch), int(batch.segment_ids.astype(bool).sum()), {"sft/rows": rows})

    def batch_shapes(self):
        t = (self.bucket(self.setup.data.max_length),)
        return self.shapes(SFTBatch, {k: t for k in SFTBatch._fields}, floats=("mask",))

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        return sft_loss(lora, params, batch, rng, model=self.setup.model, cfg=self.options)
