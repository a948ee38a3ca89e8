"""`python -m jsdr.train --method=NAME [--config FILE.yaml] [--key=value ...]`

One loop for every method (jsdr/methods registers them). Each optimizer step:

    records (problem, solution, answer)  --method.make_batch-->  a batch [grad_accum, micro_batch, ...]
        (rollouts from the current adapter, grading, alignment or packing: the method's business)
    train_step(state, params, batch, rng) -> (state, metrics)   pure, jitted once per shape bucket;
        the gradient of method.loss, averaged over the micro-batches, then AdamW

This module holds the configuration of a run, the optimizer, the train state and the method-free
loop: logging, held-out evaluation schedule, checkpoints and resume, signals, adapter export.

The state holds only what is trained (the LoRA tree, AdamW state, the EMA teacher if any, step);
the frozen base weights are an argument of the step, never part of the state or the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jsdr import config, methods, run, sharding, toy
from jsdr import distributed as dist
from jsdr.checkpoint import Checkpointer, RunDirectory
from jsdr.config import ConfigError, check, field
from jsdr.data.datasets import DataConfig, load_records
from jsdr.data.prompts import PromptTemplates, render_student, stop_token_ids
from jsdr.data.rewards import grade
from jsdr.errors import JsdrError, RunError, error_line
from jsdr.methods import MethodOptions
from jsdr.methods.base import LENGTH_OPTIONS
from jsdr.model.attention import resolve_impl
from jsdr.model.lora import LoraConfig, init_lora, save_peft
from jsdr.model.transformer import Model
from jsdr.sampling import ENGINE_FIELDS, Sampler, SamplingConfig

# the toy's configs ship inside the package (configs/toy in the repository links to them), so the
# default command works from an installed wheel too
TOY_CONFIGS = Path(toy.__file__).resolve().parent / "configs"
DEFAULT_STEPS = 100  # a run's length when neither train.steps nor train.epochs is given


# ---------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = field(2e-5, "peak learning rate of AdamW")
    schedule: Literal["constant", "cosine", "linear"] = field("constant", "decay after warmup")
    warmup_steps: int = field(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = field(0.0, "warmup as a fraction of the run's optimizer steps")
    weight_decay: float = field(0.0, "decoupled weight decay")
    b1: float = field(0.9, "Adam beta1")
    b2: float = field(0.999, "Adam beta2")
    eps: float = field(1e-8, "Adam epsilon")
    max_grad_norm: float = field(1.0, "global gradient-norm clip (0 = off)")

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int | None = field(None, "optimizer steps (None: from train.epochs, else 100)")
    epochs: float | None = field(None, "passes over the training records, instead of train.steps (the run's steps: "
                                       "ceil(epochs x records / records per step); the schedule decays over them)")
    stop_at: int | None = field(None, "end the run after this optimizer step (held-out score, adapter, checkpoint) "
                                      "while the schedule still spans the whole run (the public OPSD runs decay over "
                                      "30 epochs and are read at 100-500 steps); resume with a later stop_at")
    per_device_batch: int = field(1, "sequences per data-parallel device per micro-batch (GRPO: completions)")
    grad_accum: int = field(4, "micro-batches accumulated per optimizer step")
    effective_batch: int | None = field(None, "if set, must equal per_device_batch x data-parallel devices x grad_accum")
    log_every: int = field(1, "log metrics every N steps")
    save_every: int = field(50, "checkpoint every N steps (and always at the end)")
    eval_every: int = field(0, "score the held-out set every N steps (0 = only before and after)")
    keep_checkpoints: int = field(3, "checkpoints kept on disk")
    output_dir: str = field("runs/{method}", "run directory ({method} is replaced)")
    resume: bool = field(False, "continue from the latest checkpoint in output_dir")
    overwrite: bool = field(False, "replace what an earlier run left in output_dir (metrics, checkpoints, "
                                   "adapter); without it a non-empty run directory is refused")
    resume_override: bool = field(False, "resume even though settings that change the run (lr, schedule, "
                                         "steps, clip, method options, data) differ from the saved ones")
    max_nonfinite_steps: int = field(5, "stop after this many consecutive steps whose loss or gradient is "
                                        "not finite (each such step is skipped: weights unchanged)")
    seq_bucket: int = field(64, "sequence lengths are padded to a multiple of this (one compile per bucket)")

    def __post_init__(self):
        for k in ("per_device_batch", "grad_accum", "log_every", "save_every", "keep_checkpoints",
                  "seq_bucket", "max_nonfinite_steps"):
            check(getattr(self, k) > 0, k, "must be > 0")
        check(self.steps is None or self.epochs is None, "epochs",
              f"train.steps={self.steps} and train.epochs={self.epochs} exclude each other: give one")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps > 0), "steps", "must be > 0")
        check(self.epochs is None or self.epochs > 0, "epochs", "must be > 0")
        check(self.stop_at is None or (isinstance(self.stop_at, int) and self.stop_at > 0), "stop_at", "must be > 0")

    def total_steps(self, records: int, records_per_batch: int, updates_per_batch: int = 1) -> int:
        """The run's optimizer steps: train.steps, or enough batches of `records_per_batch` records for
        train.epochs passes over `records` (each batch trained on for `updates_per_batch` steps), else 100."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        return max(1, math.ceil(self.epochs * records / records_per_batch)) * updates_per_batch
        check(self.eval_every >= 0, "eval_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(MethodOptions):
    """The settings of `python -m jsdr.train`: the method and its section (from MethodOptions), then
    the sections every method shares."""

    seed: int = field(0, "seed of LoRA init, data order and sampling")
    reward: Literal["math_verify", "string", "string_first"] = field(
        "math_verify", "grader of \\boxed{} answers (GRPO reward, held-out accuracy); string_first: the public GRPO "
                       "code's v1 reward (first box, lower-cased exact match)")
    model: run.ModelOptions = field(run.ModelOptions(), "")
    lora: LoraConfig = field(LoraConfig(), "")
    data: DataConfig = field(DataConfig(), "")
    prompts: PromptTemplates = field(PromptTemplates(), "")
    optim: OptimConfig = field(OptimConfig(), "")
    train: LoopConfig = field(LoopConfig(), "")
    mesh: sharding.MeshConfig = field(sharding.MeshConfig(), "")
    rollout: SamplingConfig = field(SamplingConfig(), "")
    dist: dist.DistConfig = field(dist.DistConfig(), "")


# ---------------------------------------------------------------------------------------------
# configuration


def build_config(argv: Sequence[str]) -> tuple[TrainConfig, str | None]:
    """TrainConfig from the method's defaults <- YAML <- overrides. With no --config and the default
    model, the embedded toy config of the method is used (and named in the returned note)."""
    cfg_path, rest = config.split_config_arg(argv)
    overrides = config.parse_overrides(TrainConfig, rest)
    yaml_data = config.read_yaml(cfg_path) if cfg_path else {}
    method = overrides.get("method") or yaml_data.get("method") or TrainConfig().method
    method = config.convert(method, config._hints(TrainConfig)["method"], "method")
    toy_note = None
    if cfg_path is None and overrides.get("model", {}).get("path", "toy") == "toy":
        cfg_path = TOY_CONFIGS / f"{method}.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"the embedded toy config {cfg_path} is missing; pass --config FILE.yaml")
        toy_note = f"embedded toy default ({cfg_path})"
    cfg = config.load(TrainConfig, cfg_path, rest, base=methods.get(method).defaults)
    if cfg.method != method:
        cfg = dataclasses.replace(cfg, method=method)
    return cfg, toy_note


# ---------------------------------------------------------------------------------------------
# optimizer


def make_optimizer(o: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warmup = o.warmup_steps or int(round(o.warmup_ratio * steps))
    decay_steps = max(steps - warmup, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
    sched = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup]) \
        if warmup else after
    # the chain has the same structure with or without clipping (both states are empty), so a checkpoint
    # does not depend on optim.max_grad_norm
    clip = optax.clip_by_global_norm(o.max_grad_norm) if o.max_grad_norm > 0 else optax.identity()
    adamw = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(clip, adamw), sched


# ---------------------------------------------------------------------------------------------
# the train state and the pure step


class TrainState(NamedTuple):
    """What is trained and checkpointed: never the frozen base weights (an argument of the step)."""

    step: jax.Array
    lora: Any
    opt_state: Any
    ema: Any = None  # the EMA teacher's LoRA tree, when the method keeps one

    def as_tree(self) -> dict:
        """The checkpointed tree (a dict without the absent EMA)."""
        return {k: v for k, v in self._asdict().items() if v is not None}

    @classmethod
    def from_tree(cls, tree: dict) -> "TrainState":
        return cls(**tree)


def train_state_shardings(optimizer, lora_shardings, abstract_lora, mesh, ema: bool) -> TrainState:
    """Where every leaf of the train state lives: the AdamW moments and the EMA tree in the sharding of
    the LoRA leaf they mirror (never replicated), the counters replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, abstract_lora),
                                lora_shardings, transform_non_params=lambda _: replicated)
    return TrainState(replicated, lora_shardings, opt, lora_shardings if ema else None)


def init_train_state(optimizer, lora, mesh, ema: bool) -> TrainState:
    """The step-0 state, each leaf created directly in its sharding (`train_state_shardings`)."""
    sh = train_state_shardings(optimizer, jax.tree.map(lambda x: x.sharding, lora), lora, mesh, ema)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(lora)
    ema_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=sh.ema)(lora) if ema else None
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), sh.step), lora, opt_state, ema_tree)


def ema_update(ema, lora, decay: float):
    """decay * ema + (1 - decay) * lora, leaf by leaf (each result keeps the dtype of `ema`)."""
    return jax.tree.map(lambda e, x: (decay * e.astype(jnp.float32)
                                      + (1.0 - decay) * jax.lax.stop_gradient(x).astype(jnp.float32)).astype(e.dtype),
                        ema, lora)


def make_train_step(loss_fn, optimizer, *, ema_decay: float | None = None):
    """(state, params, batch, rng) -> (state, metrics). `loss_fn(lora, params, micro_batch, rng,
    teacher_lora)` -> (loss, metrics); `batch` leaves are [grad_accum, micro, ...]; gradients and
    metrics are averaged over the micro-batches with a scan (one micro-batch alive at a time). With
    `ema_decay`, the EMA tree moves towards the *updated* LoRA.

    A step whose loss, gradient or updated weights are not finite is skipped: the LoRA tree, the
    optimizer state and the EMA teacher stay as they were (only the step counter advances) and
    `metrics["skipped"]` is 1.
    """

    def step(state: TrainState, params, batch, rng):
        accum = jax.tree.leaves(batch)[0].shape[0]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(carry, xs):
            g_sum, m_sum = carry
            mb, key = xs
            (loss, metrics), g = grad_fn(state.lora, params, mb, key, state.ema)
            metrics = dict(metrics, loss=loss)
            g_sum = jax.tree.map(jnp.add, g_sum, g)
            m_sum = jax.tree.map(jnp.add, m_sum, metrics)
            return (g_sum, m_sum), None

        keys = jax.random.split(rng, accum)
        first = jax.tree.map(lambda x: x[0], batch)
        m_shape = jax.eval_shape(loss_fn, state.lora, params, first, keys[0], state.ema)[1]
        m0 = {k: jnp.zeros((), jnp.float32) for k in list(m_shape) + ["loss"]}
        g0 = jax.tree.map(jnp.zeros_like, state.lora)
        (g_sum, m_sum), _ = jax.lax.scan(micro, (g0, m0), (batch, keys))
        grads = jax.tree.map(lambda g: g / accum, g_sum)
        metrics = jax.tree.map(lambda m: m / accum, m_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        ema = None if state.ema is None else ema_update(state.ema, lora, ema_decay)
        new = state._replace(lora=lora, opt_state=opt_state, ema=ema)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(lora):
            finite &= jnp.all(jnp.isfinite(leaf))
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        new = new._replace(step=state.step + 1)
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        return new, metrics

    return step


def jit_train_step(method, optimizer, state_shardings: TrainState):
    """The jitted step of `method` that jsdr.train runs (and jsdr.plan compiles): the state keeps its
    shardings and is donated."""
    step = make_train_step(method.loss, optimizer, ema_decay=method.ema_decay)
    return jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# data order: a seeded permutation per epoch; the position is a pure function of the step, so a
# resumed run sees exactly the records the uninterrupted run would have seen.


@functools.lru_cache(maxsize=4)
def _epoch_order(n_records: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_records) if shuffle else np.arange(n_records)


def record_indices(n_records: int, step: int, per_step: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the records of optimizer step `step`: position g of the stream is record
    order_epoch[g mod n] with epoch = g // n and a seeded permutation per epoch."""
    return [int(_epoch_order(n_records, seed, g // n_records, shuffle)[g % n_records])
            for g in range(step * per_step, (step + 1) * per_step)]


def read_metrics(path: Path, log=print) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill in the middle of a write) is dropped
    from the file, and said so; a bad line anywhere else is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines):
                log(f"{path}: dropped a torn last line (line {i}, {len(ln)} characters), left by a stop in the "
                    f"middle of a write")
                path.write_text("".join(json.dumps(r) + "\n" for r in out))
                break
            raise RunError(f"{path} line {i}: not a JSON metrics record; the file is corrupt (move it away "
                           f"to resume without the earlier metrics)") from None
        out.append(rec)
    return out


class _NoLogger:
    """The metrics log of the processes other than 0 (process 0 writes the one file)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Logger:
    """Metrics to JSONL and TensorBoard event files (tensorboardX when installed).

    On resume from step s, the JSONL keeps the records up to s and TensorBoard is told to purge the
    events past s of the interrupted run (`purge_step`), so every step appears exactly once. Both are
    flushed at every record: a kill loses at most the step in progress, which resume recomputes.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0, log=print):
        self.path = run_dir / "metrics.jsonl"
        if resume_step:  # drop lines past the checkpoint we resume from
            keep = [r for r in read_metrics(self.path, log) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) or
                                    hasattr(v, "dtype") else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# the run


class Trainer:
    """Sets up model, LoRA, optimizer, data and sampler from a TrainConfig, then `run()`s the loop.
    Everything that depends on the method is delegated to `self.method` (jsdr/methods)."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, log=print, sample=None):
        """`sample`: replaces the sampler (lora, prompts, SamplingConfig, rng) -> SampleOutput (tests)."""
        # every process runs this same code (SPMD); process 0 alone prints, logs and writes run files
        self.cfg, self.progress, self.log = cfg, progress and dist.is_main(), dist.quiet_unless_main(log)
        log = self.log
        self.run_dir = Path(cfg.train.output_dir.format(method=cfg.method))
        self.mesh, self.rules = sharding.make_mesh(cfg.mesh), sharding.effective_rules(cfg.mesh)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.micro = cfg.train.per_device_batch * dp
        self.batch = self.micro * cfg.train.grad_accum
        if cfg.train.effective_batch is not None and cfg.train.effective_batch != self.batch:
            raise ConfigError(
                f"train.effective_batch={cfg.train.effective_batch} but per_device_batch "
                f"({cfg.train.per_device_batch}) x data-parallel devices ({dp}) x grad_accum "
                f"({cfg.train.grad_accum}) = {self.batch}")

        opened = run.open_model(cfg.model.path, mesh=self.mesh, rules=self.rules, dtype=cfg.model.dtype,
                                tokenizer=cfg.model.tokenizer, progress=self.progress)
        self.params, self.mcfg, self.tokenizer = opened.params, opened.config, opened.tokenizer
        self.model_dir, self.pad_id = opened.directory, opened.pad_id
        self.model = Model(self.mcfg, lora_scale=cfg.lora.scale, attn_impl=resolve_impl(cfg.model.attn_impl),
                           remat=cfg.model.remat, dtype=cfg.model.dtype, lora_dropout=cfg.lora.dropout)
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.rollout.stop_token_ids)
        self._sampler = None
        self._sample = sample or self._sample_with_sampler
        self.method = methods.get(cfg.method)(methods.Setup(
            model=self.model, tokenizer=self.tokenizer, data=cfg.data, prompts=cfg.prompts,
            rollout=dataclasses.replace(cfg.rollout, stop_token_ids=self.stop_ids), options=cfg.method_options(),
            reward=cfg.reward, pad_id=self.pad_id, seq_bucket=cfg.train.seq_bucket, grad_accum=cfg.train.grad_accum,
            micro_batch=self.micro, data_parallel=dp, sample=self.sample, log=log,
            more_records=self._more_records, score=self._score))
        self.records_per_step = self.method.records_per_step(self.batch)  # records per batch
        self.records = self._prepare(self._load_records())  # only this process's share is kept
        self.eval_records = self._load_eval_records()
        self.updates = self.method.updates_per_batch
        self.steps = cfg.train.total_steps(len(self.records), self.records_per_step, self.updates)
        self.end = min(self.steps, cfg.train.stop_at or self.steps)  # where this run ends
        if cfg.train.epochs is not None:
            log(f"train.epochs={cfg.train.epochs:g}: {self.steps} optimizer steps ({len(self.records)} records, "
                f"{self.records_per_step} per batch" + (f", {self.updates} steps per batch" if self.updates > 1 else "")
                + ")")

        with sharding.use_mesh(self.mesh, self.rules):
            lora = init_lora(self.mcfg, cfg.lora, jax.random.key(cfg.seed), mesh=self.mesh)
        self.optimizer, self.schedule = make_optimizer(cfg.optim, self.steps)
        self.state = init_train_state(self.optimizer, lora, self.mesh, ema=self.method.ema_decay is not None)
        self._batch_cache: tuple[int, Any] | None = None  # (batch index, StepBatch) while a batch is reused
        self._score_fn = None
        self._step_fn = None
        self.rollout_tokens = 0
        self.stop_requested = False
        self.stop_signal: int | None = None
        if cfg.optim.learning_rate >= 0.1:
            log(f"warning: optim.learning_rate={cfg.optim.learning_rate:g} is unusually large for AdamW (LoRA runs "
                f"use about 1e-6 to 1e-2); steps with non-finite values are skipped and "
                f"{cfg.train.max_nonfinite_steps} in a row stop the run")

    # -- data ----------------------------------------------------------------------------------

    def _load_records(self) -> list[dict]:
        d = self.cfg.data
        if d.train == "toy":
            return toy.make_problems(split="train", seed=self.cfg.seed, **toy.TRAIN_DEFAULTS)
        return load_records(d.train, split=d.split, fields=d.fields(), limit=d.limit)

    def _load_eval_records(self) -> list[dict]:
        d = self.cfg.data
        if d.eval is None:
            return []
        if d.eval in ("toy", "toy:test", "toy:validation"):  # the toy's test split, or its validation split
            return toy.toy_benchmark(d.eval_limit, split="validation" if d.eval.endswith("validation") else "test")
        return load_records(d.eval, split=d.eval_split, fields=d.fields(), limit=d.eval_limit)

    def _prepare(self, records: list[dict]) -> dist.OwnedRecords:
        """Tokenize what the method needs once; count (and log) the examples it drops or truncates. With
        several processes each tokenizes and holds its share (dist.OwnedRecords)."""
        d = self.cfg.data
        counts: dict[str, int] = {}  # "dropped/<reason>" and "truncated/<reason>" -> examples

        def prepare(r: dict) -> dict | None:
            prepared = self.method.prepare(r)
            if not isinstance(prepared, dict):  # None or the reason of the drop
                key = f"dropped/{prepared or self.method.drop_reason}"
                counts[key] = counts.get(key, 0) + 1
                return None
            cut = prepared.pop("truncated", False)
            if cut:
                key = f"truncated/{cut if isinstance(cut, str) else self.method.drop_reason}"
                counts[key] = counts.get(key, 0) + 1
            return prepared

        bar = None if not self.progress or len(records) < 2000 else \
            (lambda it: tqdm(it, desc="tokenizing", unit="ex"))
        out = dist.OwnedRecords(records, prepare, progress=bar)
        counts = dist.agree(counts, lambda parts: {k: sum(p.get(k, 0) for p in parts)
                                                   for k in sorted({k for p in parts for k in p})}, "length counts")
        # logged at step 0 of metrics.jsonl, and said here per reason with the option that decides it
        self.data_counts = {"data/records": len(records), "data/kept": len(out),
                            **{f"data/{k}": v for k, v in counts.items()}}
        if counts:
            def said(k):
                reason = k.split("/", 1)[1]
                option = LENGTH_OPTIONS.get(reason)
                return f"{counts[k]} {k.replace('/', ' ')}" + (f" ({option}={getattr(d, option.split('.')[1])})"
                                                              if option else "")
            self.log(f"data: {len(out)} of {len(records)} examples kept; " + "; ".join(said(k) for k in counts)
                     + f" (data.overlong={d.overlong})")
        if not out:
            raise ConfigError(f"data: no example of {len(records)} fits the length limits "
                              f"(data.max_length={d.max_length}, data.max_prompt_tokens={d.max_prompt_tokens}, "
                              f"data.max_teacher_prompt_tokens={d.max_teacher_prompt_tokens})")
        return out

    def take(self, index: int) -> list[dict]:
        """The records of batch `index` (optimizer step // updates per batch): a pure function of the
        index, the seed and the data size."""
        idx = record_indices(len(self.records), index, self.records_per_step, self.cfg.seed, self.cfg.data.shuffle)
        return self.records.take(idx)

    def _more_records(self, attempt: int, count: int) -> list[dict]:
        """`count` further records for the batch being built (GRPO's dynamic sampling): drawn with a
        generator seeded by (seed, batch index, attempt), so a run and its resume draw the same."""
        rng = np.random.default_rng([self.cfg.seed, 1 + self._building, attempt])
        return self.records.take([int(i) for i in rng.choice(len(self.records), count, replace=count > len(self.records))])

    def _score(self, lora, batch):
        """method.logprobs of every micro-batch of a [grad_accum, micro, ...] host batch, on the mesh."""
        if self._score_fn is None:
            def score(lora, params, batch):
                return jax.lax.map(lambda mb: self.method.logprobs(lora, params, mb), batch)
            self._score_fn = jax.jit(score)
        with sharding.use_mesh(self.mesh, self.rules):
            placed = run.place_batch(batch, self.mesh, leading=1, rules=self.rules)
            return dist.fetch(self._score_fn(lora, self.params, placed))

    def batch_for(self, step: int):
        """The StepBatch of optimizer step `step`: built from the records of step // updates per batch
        on its first step, then reused (GRPO's num_iterations)."""
        index = step // self.updates
        if self._batch_cache is None or self._batch_cache[0] != index:
            self._building = index
            rng_data = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), index))[0]
            self._batch_cache = (index, self.method.make_batch(self.take(index), self.state.lora, rng_data))
            return self._batch_cache[1], True
        return self._batch_cache[1], False

    # -- sampling and held-out evaluation --------------------------------------------------------

    def _sample_with_sampler(self, lora, prompts, sc: SamplingConfig, rng):
        if self._sampler is None:
            # decoding needs only the LoRA scale of the training forward (no remat, dropout or training kernel)
            self._sampler = Sampler(Model(self.mcfg, lora_scale=self.model.lora_scale), mesh=self.mesh,
                                    pad_id=self.pad_id, rules=self.rules,
                                    detokenize=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        try:
            with sharding.use_mesh(self.mesh, self.rules):
                return self._sampler.generate(self.params, lora, prompts, sc, rng=rng)
        finally:  # the KV pools and the decode copy of the weights go back before the train step
            self._sampler.release()

    def sample(self, lora, prompts, sc: SamplingConfig, rng):
        return self._sample(lora, prompts, sc, rng)

    def evaluate(self, lora) -> dict:
        """Held-out accuracy of the student prompt (greedy unless data.eval_temperature > 0)."""
        if not self.eval_records:
            return {}
        d = self.cfg.data
        prompts = [render_student(self.tokenizer, r["problem"], self.cfg.prompts) for r in self.eval_records]
        sc = SamplingConfig(temperature=d.eval_temperature, n=1, max_new_tokens=d.eval_max_new_tokens,
                            stop_token_ids=self.stop_ids, seed=self.cfg.seed,
                            **{k: getattr(self.cfg.rollout, k) for k in ENGINE_FIELDS})  # the rollouts' engine
        out = self.sample(lora, prompts, sc, jax.random.PRNGKey(self.cfg.seed + 7))
        texts = run.decode(self.tokenizer, out.tokens, out.lengths)
        grades = dist.shared_map(lambda tr: grade(tr[0], tr[1], method=self.cfg.reward),
                                 [(t, r["answer"]) for t, r in zip(texts, self.eval_records)], "eval grades")
        correct = [g.correct for g in grades]
        return {"eval/accuracy": float(np.mean(correct)), "eval/response_tokens": float(np.mean(out.lengths))}

    # -- the jitted step -----------------------------------------------------------------------

    def step_fn(self):
        if self._step_fn is None:
            self._step_fn = jit_train_step(self.method, self.optimizer, jax.tree.map(lambda x: x.sharding, self.state))
        return self._step_fn

    # -- the run directory ---------------------------------------------------------------------

    def _start(self, ckpt: Checkpointer) -> int:
        """The step to start from: 0, or the latest checkpoint's (restoring the state) on a resume that
        the run directory allows (see RunDirectory)."""
        latest = dist.on_main(lambda: self.run_dir_state.prepare(ckpt), "prepare the run directory")
        if latest is None:
            return 0
        try:
            tree, meta = ckpt.restore(latest, like=self.state.as_tree())
        except Exception as e:  # noqa: BLE001 - orbax raises several types for a tree that does not match
            raise RunError(f"{ckpt.directory} step {latest}: the checkpoint does not match this run's train state "
                           f"({type(e).__name__}: {_first_line(e)})") from None
        self.state = TrainState.from_tree(tree)
        self.rollout_tokens = int(meta.get("rollout_tokens", 0))
        self.nonfinite_total = int(meta.get("nonfinite_steps", 0))
        self.log(f"resumed {self.run_dir} at step {latest}")
        return int(meta["step"])

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_requested, self.stop_signal = True, signum
            self.log(f"\nreceived signal {signum}: finishing this step, writing a checkpoint, then stopping "
                     f"(send it again to stop at once)")
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        return old

    def _save(self, ckpt: Checkpointer, step: int) -> None:
        try:
            ckpt.save(step, self.state.as_tree(), {"step": step, "rollout_tokens": self.rollout_tokens, "seed": self.cfg.seed,
                                         "method": self.cfg.method, "nonfinite_steps": self.nonfinite_total})
        except Exception as e:  # noqa: BLE001 - disk full, permissions, orbax errors: all end the run here
            raise RunError(f"checkpoint of step {step} could not be written to {ckpt.directory} "
                           f"({type(e).__name__}: {_first_line(e)})") from None

    def _wait(self, ckpt: Checkpointer) -> None:
        try:
            ckpt.wait()
        except Exception as e:  # noqa: BLE001
            raise RunError(f"a checkpoint could not be written to {ckpt.directory} "
                           f"({type(e).__name__}: {_first_line(e)})") from None

    def _check_finite(self, step: int, metrics: dict, ckpt: Checkpointer) -> None:
        """Count skipped (non-finite) steps; stop after train.max_nonfinite_steps in a row. Warn when the
        gradient vanishes for several steps in a row (a collapsed model, e.g. far too large a lr)."""
        if metrics.get("skipped", 0.0) > 0:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            k = self.cfg.train.max_nonfinite_steps
            self.log(f"step {step}: non-finite loss or gradient (loss={metrics.get('loss')}, grad_norm="
                     f"{metrics.get('grad_norm')}): step skipped, weights unchanged ({self.nonfinite_run} in a row, "
                     f"stop at {k})")
            if self.nonfinite_run >= k:
                last = ckpt.latest_step()
                where = f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None \
                    else "no checkpoint was written"
                raise RunError(f"{k} consecutive steps with a non-finite loss or gradient (last at step {step}); "
                               f"stopped without saving; {where}. Lower optim.learning_rate or check the data")
            return
        self.nonfinite_run = 0
        if metrics.get("grad_norm", 1.0) == 0.0 and metrics.get("loss", 0.0) != 0.0:
            self.zero_grad_run += 1
            if self.zero_grad_run == 3:
                self.log(f"warning: the gradient norm has been 0 for 3 steps in a row (step {step}) with a non-zero "
                         f"loss: the model has probably collapsed (optim.learning_rate="
                         f"{self.cfg.optim.learning_rate:g} too large?)")
        else:
            self.zero_grad_run = 0

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> dict:
        """Train; returns the last logged metrics (with held-out accuracy before/after when configured).
        `stop_after`: behave as if a stop signal arrived after that many steps of this call.

        Order at the end: held-out score, PEFT adapter, final checkpoint, summary.json. The adapter is
        written before and independently of the final checkpoint, so a failed checkpoint (disk full)
        does not lose the run's result. `summary["stopped"]` is set when a signal stopped the run."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir_state = RunDirectory(self.run_dir, config.to_dict(cfg), cfg.train, self.method.fixed_on_resume,
                                          self.log)
        dist.on_main(self.run_dir_state.clear_for_overwrite, "clear the run directory")
        ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.nonfinite_total = self.nonfinite_run = self.zero_grad_run = 0
        logger = bar = None
        old_handlers = self._install_signal_handlers() if _main_thread() else {}
        summary: dict = {}
        try:
            start = self._start(ckpt)
            dist.on_main(lambda: self.run_dir_state.write_config(start), "write the run's configuration")
            opened: dict = {}  # process 0 opens the metrics log; its failure stops every process
            dist.on_main(lambda: opened.setdefault("log", Logger(self.run_dir, start, log=self.log)) and None,
                         "open the metrics log")
            logger = opened.get("log") or _NoLogger()
            if start == 0 and self.eval_records:
                summary["eval/accuracy_before"] = self.evaluate(self.state.lora).get("eval/accuracy")
                self.log(f"held-out accuracy before training: {summary['eval/accuracy_before']:.3f} "
                         f"({len(self.eval_records)} problems)")
                logger.log(0, {**self.data_counts, "eval/accuracy": summary["eval/accuracy_before"]})
            elif start == 0:
                logger.log(0, self.data_counts)  # what the length policy kept, dropped and truncated
            elif start % self.updates:
                self.log(f"resumed inside a batch's {self.updates} updates (step {start}): its rollouts are drawn "
                         f"again with the current adapter")
            bar = tqdm(total=self.end, initial=start, desc=f"{cfg.method}", unit="step",
                       disable=not self.progress, dynamic_ncols=True)
            base_key = jax.random.PRNGKey(cfg.seed)
            step = start
            saved_at = ckpt.latest_step()
            t_start = time.time()
            while step < self.end and not self.stop_requested:
                t0 = time.time()
                rng_step = jax.random.split(jax.random.fold_in(base_key, step))[1]
                step_batch, fresh = self.batch_for(step)
                self.rollout_tokens += step_batch.rollout_tokens if fresh else 0
                with sharding.use_mesh(self.mesh, self.rules):
                    batch = run.place_batch(step_batch.batch, self.mesh, leading=1, rules=self.rules)
                    self.state, metrics = self.step_fn()(self.state, self.params, batch, rng_step)
                metrics = {k: float(v) for k, v in dist.fetch(metrics).items()}
                step += 1
                n_tok = step_batch.tokens
                metrics.update(step_batch.info)
                metrics["lr"] = float(self.schedule(step - 1))
                metrics["rollout_tokens"] = self.rollout_tokens
                metrics["nonfinite_steps"] = self.nonfinite_total + int(metrics["skipped"] > 0)
                metrics["tokens_per_s"] = n_tok / max(time.time() - t0, 1e-9)
                metrics["time"] = time.time() - t_start
                self._check_finite(step, metrics, ckpt)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self.eval_records:
                    metrics.update(self.evaluate(self.state.lora))
                if step % cfg.train.log_every == 0 or step == self.end:
                    logger.log(step, metrics)
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)
                summary.update(metrics)
                if stop_after is not None and step - start >= stop_after:
                    self.stop_requested = True
                if step < self.end and (step % cfg.train.save_every == 0 or self.stop_requested):
                    self._save(ckpt, step)
                    saved_at = step
            bar.close()
            self._wait(ckpt)
            if self.stop_requested and step < self.end:
                summary["stopped"] = getattr(self, "stop_signal", None) or "stop_after"
                summary["step"] = step
                if saved_at is None:
                    self.log("stopped before the first checkpoint: no checkpoint yet; the same command starts "
                             "again from step 0")
                else:
                    self.log(f"stopped at step {step}; checkpoint of step {saved_at} written to {ckpt.directory}; "
                             f"continue with --train.resume=true")
                return summary
            if self.eval_records:
                after = self.evaluate(self.state.lora)
                summary["eval/accuracy_after"] = after.get("eval/accuracy")
                logger.log(step, after)
                self.log(f"held-out accuracy after training: {summary['eval/accuracy_after']:.3f}")
            summary["step"] = step
            failures = []
            try:
                self.export()
            except (OSError, JsdrError) as e:
                failures.append(f"the adapter could not be written to {self.run_dir / 'adapter'} "
                                f"({type(e).__name__}: {_first_line(e)})")
            try:
                if ckpt.latest_step() != step:
                    self._save(ckpt, step)
                self._wait(ckpt)
            except RunError as e:
                failures.append(str(e) + ("" if failures else f"; the adapter in {self.run_dir / 'adapter'} "
                                                               f"holds the trained weights"))
            try:
                dist.on_main(lambda: (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2)),
                             "write summary.json")
            except OSError as e:
                failures.append(f"{self.run_dir / 'summary.json'}: {e}")
            if failures:
                raise RunError("; ".join(failures))
            return summary
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
            try:
                ckpt.close()
            except Exception:  # noqa: BLE001 - already reported by _save/_wait
                pass
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def export(self) -> Path:
        out = self.run_dir / "adapter"
        base = self.cfg.model.path if self.cfg.model.path != "toy" else str(self.model_dir)
        lora = dist.fetch(self.state.lora)  # every process takes part in the gather; process 0 writes
        dist.on_main(lambda: save_peft(out, lora, self.cfg.lora, self.mcfg, base_model_name_or_path=base),
                     "write the adapter")
        self.log(f"PEFT adapter written to {out}")
        return out


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_SHOW = {"loss": "loss", "reward/mean": "reward", "rollout/accuracy": "acc", "accuracy": "acc",
         "div_mean": "div", "eval/accuracy": "eval_acc", "tokens_per_s": "tok/s"}


def _postfix(m: dict) -> dict:
    """The progress-bar fields: loss, reward or accuracy, divergence, tokens/s (tqdm adds the ETA)."""
    return {short: f"{m[k]:.3g}" for k, short in _SHOW.items() if k in m}


def help_defaults(argv: Sequence[str]) -> tuple[TrainConfig, str]:
    """The configuration that `argv` (without --help) would run, and a line saying where its defaults
    come from: the method's defaults, the toy YAML when it is the one that runs, --config, overrides."""
    try:
        cfg, note = build_config(argv)
    except JsdrError as e:
        default = TrainConfig().method
        return (config.from_dict(TrainConfig, methods.get(default).defaults),
                f"defaults of --method={default} ({e} in the rest)")
    src = note or (f"--config {_config_arg(argv)}" if _config_arg(argv) else "the paper's method defaults")
    return cfg, f"--method={cfg.method}, {src}" + (", and the options given" if argv else "")


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 1 an expected error (data, model, adapter, I/O, diverged run), 2 a configuration
    error, 128 + signal number (130 for SIGINT, 143 for SIGTERM) when a signal stopped the run after
    writing its checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        rest = [a for a in argv if a not in ("-h", "--help")]
        cfg, where = help_defaults(rest)
        print(__doc__.split("\n\n")[0])
        print(f"\nOptions, with the defaults that apply here ({where}); `--config FILE.yaml` and --key=value "
              f"override them:")
        print(config.help_text(TrainConfig, defaults=cfg))
        return 0
    trainer = None
    if "--print_config" in argv:  # the configuration that would run, as YAML that --config reads back
        try:
            cfg, _ = build_config([a for a in argv if a != "--print_config"])
        except JsdrError as e:
            line, code = error_line("jsdr.train", e)
            print(line, file=sys.stderr)
            return code
        print(config.to_yaml(cfg), end="")
        return 0
    try:
        cfg, note = build_config(argv)
        dist.initialize(cfg.dist)  # before anything touches a device
        if note and dist.is_main():
            print(f"jsdr: no --config given: using the {note}")
        trainer = Trainer(cfg)
        summary = trainer.run()
    except (JsdrError, OSError) as e:
        line, code = error_line("jsdr.train" + dist.who(), e)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:  # a second signal while stopping
        print("jsdr.train: interrupted; the last checkpoint written (if any) is intact", file=sys.stderr)
        return 130
    keys = [k for k in ("eval/accuracy_before", "eval/accuracy_after") if summary.get(k) is not None]
    if not dist.is_main():
        keys = []
    elif keys:
        print("  ".join(f"{k.split('/')[-1]}={summary[k]:.3f}" for k in keys))
    if dist.is_main():
        print(f"run directory: {trainer.run_dir}")
    stopped = summary.get("stopped")
    if stopped is not None:
        return 128 + int(stopped) if isinstance(stopped, int) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
