"""What a training method is, to the trainer.

A method owns its host-side work: which tokens it needs from each record (`prepare`), how one
optimizer step's records become a batch (`make_batch`: rollouts, grading, advantages, alignment,
packing) and which pure loss the step differentiates (`loss`). The trainer (jsdr/train.py) owns
everything that is the same for all methods: optimizer, accumulation, logging, evaluation schedule,
checkpoints, signals, export. Methods are registered by name; `--method=NAME` picks one.

Every batch a method returns is stacked for accumulation: each leaf is [grad_accum, micro, ...].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import distributed as dist
from jsdr import run
from jsdr.data.datasets import DataConfig
from jsdr.data.prompts import PromptTemplates, render_student
from jsdr.data.rewards import GradeResult, grade
from jsdr.model.transformer import Model
from jsdr.sampling import SampleOutput, SamplingConfig

# (lora, prompts, sampling config, rng) -> SampleOutput, with the current base weights and mesh
SampleFn = Callable[[Any, Sequence[Sequence[int]], SamplingConfig, Any], SampleOutput]


@dataclasses.dataclass
class Setup:
    """What the trainer hands a method: the run's settings it may read and the tools it may use."""

    model: Model
    tokenizer: Any
    data: DataConfig
    prompts: PromptTemplates
    rollout: SamplingConfig  # stop_token_ids already include EOS and the chat end markers
    options: Any  # the method's own config section (SFTConfig, GRPOConfig, OPSDConfig, ...)
    reward: str  # grader of \boxed{} answers
    pad_id: int
    seq_bucket: int  # lengths are padded to a multiple of this
    grad_accum: int
    micro_batch: int  # sequences per micro-batch over all data-parallel devices
    data_parallel: int  # data-parallel devices
    sample: SampleFn | None = None
    log: Callable[[str], None] = print
    # (attempt, count) -> `count` further records for the step being built, the same on every run and
    # process (GRPO's dynamic sampling refills with them); None: not available
    more_records: Callable[[int, int], list[dict]] | None = None
    # (lora, batch) -> host numpy of `Method.logprobs` over every micro-batch of a [grad_accum, micro, ...]
    # batch, jitted by the trainer with the base weights (exact old log-probs for num_iterations > 1)
    score: Callable[[Any, Any], Any] | None = None


class StepBatch(NamedTuple):
    """A method's batch for one optimizer step and what to log about it."""

    batch: Any  # a NamedTuple of [grad_accum, micro, ...] arrays
    tokens: int  # real (non-padding) tokens the step trains on, for tokens/s
    info: dict[str, float]  # logged with the step's metrics
    rollout_tokens: int = 0  # tokens sampled for this step


class Method:
    """Base class of the training methods. Subclasses set `name`, `config_cls` and `defaults` and
    implement `prepare`, `make_batch` and `loss`."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # method defaults that differ from the dataclass defaults (the paper's tables); YAML and the command
    # line override them
    defaults: ClassVar[dict] = {}
    # the decay of an EMA teacher tree the train state must carry (None: no EMA tree)
    ema_decay: float | None = None
    # settings that can never change when a run of this method is resumed (the checkpoint depends on them)
    fixed_on_resume: ClassVar[tuple[str, ...]] = ()
    # why `prepare` drops (returns None) or cuts an example unless it says otherwise (see LENGTH_OPTIONS)
    drop_reason: ClassVar[str] = "prompt_too_long"
    # optimizer steps that train on one batch (GRPO's num_iterations): the trainer builds a batch every
    # `updates_per_batch` steps, from the records of step // updates_per_batch, and reuses it in between
    updates_per_batch: int = 1

    def __init__(self, setup: Setup):
        self.setup = setup
        self.options = setup.options

    def records_per_step(self, sequences: int) -> int:
        """Records (problems) per optimizer step for `sequences` trained sequences per step."""
        return sequences

    def prepare(self, record: dict) -> dict | str | None:
        """The record with the token ids this method needs added; or, for an example that does not fit,
        the reason it is dropped (a key of LENGTH_OPTIONS; None: `drop_reason`). A kept example that
        was cut says so in its "truncated" entry (True or the reason). The trainer counts every reason."""
        raise NotImplementedError

    def make_batch(self, records: list[dict], lora, rng) -> StepBatch:
        """One optimizer step's batch from its records; `lora` is the current adapter (on-policy)."""
        raise NotImplementedError

    def loss(self, lora, params, batch, rng, teacher_lora=None):
        """(loss, metrics) of one micro-batch: pure, jit-able, differentiable w.r.t. `lora`."""
        raise NotImplementedError

    def logprobs(self, lora, params, batch):
        """Per-token log-probs of one micro-batch under (params, lora): pure, jit-able; what
        `setup.score` evaluates (only methods that use `score` implement it)."""
        raise NotImplementedError

    def batch_shapes(self) -> Any:
        """The step batch at the longest lengths the settings allow ([grad_accum, micro, ...]
        jax.ShapeDtypeStructs, bucketed like make_batch's): what jsdr.plan compiles the step for."""
        raise NotImplementedError

    def rollout_prompts(self, records_per_step: int) -> int:
        """Prompts per rollout call of one step (0: the method samples nothing)."""
        return 0

    def shapes(self, cls, lengths: dict[str, tuple[int, ...]], floats: tuple[str, ...] = ()) -> Any:
        """A batch NamedTuple of ShapeDtypeStructs [grad_accum, micro, *lengths[field]]."""
        lead = (self.setup.grad_accum, self.setup.micro_batch)
        return cls(**{name: jax.ShapeDtypeStruct(lead + dims, jnp.float32 if name in floats else jnp.int32)
                      for name, dims in lengths.items()})

    # -- helpers the methods share ---------------------------------------------------------------

    def student_prompt(self, problem: str) -> list[int]:
        return render_student(self.setup.tokenizer, problem, self.setup.prompts)

    def bucket(self, n: int) -> int:
        return bucket(n, self.setup.seq_bucket)

    def rollout_config(self, n: int) -> SamplingConfig:
        return dataclasses.replace(self.setup.rollout, n=n)

    def rollouts(self, lora, prompts: list[list[int]], n: int, rng) -> SampleOutput:
        if self.setup.sample is None:
            raise RuntimeError(f"method {self.name} samples rollouts but the setup has no sampler")
        return self.setup.sample(lora, prompts, self.rollout_config(n), rng)

    def grades(self, out: SampleOutput, records: list[dict], n: int) -> list[GradeResult]:
        """Grade of every sampled row against the answer of its own record (row i is sample i % n of
        record i // n)."""
        lengths = [int(x) for x in out.lengths]
        if len(lengths) != len(records) * n:
            raise ValueError(f"{len(lengths)} samples for {len(records)} records x n={n}")
        texts = run.decode(self.setup.tokenizer, out.tokens, lengths)
        # each sample graded once, on one process; every process receives every grade
        reward = self.setup.reward
        return dist.shared_map(lambda ta: grade(ta[0], ta[1], method=reward),
                               [(t, records[i // n]["answer"]) for i, t in enumerate(texts)], "rollout grades")

    def stack(self, batch: Any) -> Any:
        """[grad_accum * micro, ...] rows -> [grad_accum, micro, ...] (None leaves stay None)."""
        return stack_micro(batch, self.setup.grad_accum)


def bucket(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def stack_micro(batch: Any, accum: int) -> Any:
    """[accum * micro, ...] host arrays -> [accum, micro, ...], for a NamedTuple or dict of arrays."""
    def split(v):
        if v is None:
            return None
        v = np.asarray(v)
        return v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
    if isinstance(batch, dict):
        return {k: split(v) for k, v in batch.items()}
    return type(batch)(*(split(v) for v in batch))


# why an example is dropped or cut -> the option that decides it (named in the trainer's log line; the
# counts go to metrics.jsonl as data/dropped/<reason> and data/truncated/<reason>)
LENGTH_OPTIONS = {"prompt_too_long": "data.max_prompt_tokens",
                  "teacher_prompt_too_long": "data.max_teacher_prompt_tokens",
                  "too_long": "data.max_length"}


# ---------------------------------------------------------------------------------------------
# the registry

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable as `--method=<cls.name>`."""
    if cls.name in METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]
