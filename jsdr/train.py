"""`python -m jsdr.train --method=sft|grpo|opsd [--config FILE.yaml] [--key=value ...]`

One loop for the three methods. Each optimizer step:

    records (problem, solution, answer)  --method-->  a batch [grad_accum, micro_batch, ...]
        sft : prompt + solution, packed; masked next-token cross-entropy
        grpo: n rollouts per prompt from the live policy, rewards, group advantages
        opsd: 1 rollout per student prompt, student and teacher sequences aligned per rollout token
    train_step(state, batch, rng) -> (state, metrics)        pure, jitted once per shape bucket

The state holds only what is trained (the LoRA tree, AdamW state, the EMA teacher if any, step);
the frozen base weights are an argument of the step, never part of the state or the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsdr import config as C
from jsdr import sharding as S
from jsdr.checkpoint import Checkpointer
from jsdr.config import ConfigError, TrainConfig
from jsdr.errors import JsdrError, RunError, error_line

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ---------------------------------------------------------------------------------------------
# configuration


def build_config(argv: Sequence[str]) -> tuple[TrainConfig, str | None]:
    """TrainConfig from method defaults <- YAML <- overrides. With no --config and the default model,
    the embedded toy config of the method is used."""
    argv = list(argv)
    cfg_path, rest, method = None, [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                cfg_path = a.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                cfg_path, i = argv[i + 1], i + 1
        else:
            rest.append(a)
        i += 1
    overrides = C.parse_overrides(TrainConfig, rest)
    method = overrides.get("method")
    yaml_data = C.read_yaml(cfg_path) if cfg_path else {}
    method = method or yaml_data.get("method") or "opsd"
    method = C.convert(method, C._hints(TrainConfig)["method"], "method")
    base = C.METHOD_DEFAULTS[method]
    toy_note = None
    if cfg_path is None:
        model_path = overrides.get("model", {}).get("path", "toy")
        if model_path == "toy":
            cfg_path = REPO_CONFIGS / "toy" / f"{method}.yaml"
            if not cfg_path.is_file():
                raise ConfigError(f"the embedded toy config {cfg_path} is missing; pass --config FILE.yaml")
            toy_note = f"embedded toy default ({cfg_path})"
    cfg = C.load(TrainConfig, cfg_path, rest, base=base)
    if cfg.method != method:
        cfg = dataclasses.replace(cfg, method=method)
    return cfg, toy_note


# ---------------------------------------------------------------------------------------------
# optimizer


def make_optimizer(o: C.OptimSection, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
# the pure step


def make_train_step(loss_fn, optimizer, *, ema_decay: float | None = None):
    """(state, params, batch, rng) -> (state, metrics). `batch` leaves are [grad_accum, micro, ...];
    gradients are averaged over the micro-batches with a scan (one micro-batch alive at a time).

    A step whose loss, gradient or updated weights are not finite is skipped: the LoRA tree, the
    optimizer state and the EMA teacher stay as they were (only the step counter advances) and
    `metrics["skipped"]` is 1.
    """

    def step(state, params, batch, rng):
        accum = jax.tree.leaves(batch)[0].shape[0]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        extra = {"teacher_lora": state["ema"]} if "ema" in state else {}

        def micro(carry, xs):
            g_sum, m_sum = carry
            mb, key = xs
            (loss, metrics), g = grad_fn(state["lora"], params, mb, key, **extra)
            metrics = dict(metrics, loss=loss)
            g_sum = jax.tree.map(jnp.add, g_sum, g)
            m_sum = jax.tree.map(jnp.add, m_sum, metrics)
            return (g_sum, m_sum), None

        keys = jax.random.split(rng, accum)
        first = jax.tree.map(lambda x: x[0], batch)
        m_shape = jax.eval_shape(loss_fn, state["lora"], params, first, keys[0], **extra)[1]
        m0 = {k: jnp.zeros((), jnp.float32) for k in list(m_shape) + ["loss"]}
        g0 = jax.tree.map(jnp.zeros_like, state["lora"])
        (g_sum, m_sum), _ = jax.lax.scan(micro, (g0, m0), (batch, keys))
        grads = jax.tree.map(lambda g: g / accum, g_sum)
        metrics = jax.tree.map(lambda m: m / accum, m_sum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
        lora = optax.apply_updates(state["lora"], updates)
        new = dict(state, lora=lora, opt_state=opt_state)
        if "ema" in state:
            from jsdr.losses.opsd import ema_update
            new["ema"] = ema_update(state["ema"], lora, ema_decay)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(lora):
            finite &= jnp.all(jnp.isfinite(leaf))
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, dict(state))
        new["step"] = state["step"] + 1
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        return new, metrics

    return step


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


def bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def stack_micro(rows: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """[accum * micro, ...] host arrays -> [accum, micro, ...]."""
    return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in rows.items()}


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


# ---------------------------------------------------------------------------------------------
# the run directory

# what a run writes into its directory (train.overwrite removes exactly these)
RUN_FILES = ("metrics.jsonl", "tb", "checkpoints", "adapter", "config.json", "config_history.jsonl", "summary.json")
# settings a resume may change freely: they change what is logged, kept or scored, never the trained weights
RESUME_FREE = frozenset({"train.resume", "train.overwrite", "train.resume_override", "train.log_every",
                         "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.output_dir",
                         "train.max_nonfinite_steps", "data.eval", "data.eval_split", "data.eval_limit",
                         "data.eval_max_new_tokens", "data.eval_temperature"})
# settings that can never change within a run: the checkpoint's tree or meaning depends on them
RESUME_FIXED = frozenset({"method", "model", "lora", "opsd.teacher"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# the run


class Trainer:
    """Sets up model, LoRA, optimizer, data and sampler from a TrainConfig, then `run()`s the loop."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, log=print):
        from jsdr.model import hf
        from jsdr.model.lora import init_lora

        self.cfg, self.progress, self.log = cfg, progress, log
        self.run_dir = Path(cfg.train.output_dir.format(method=cfg.method))
        devices = jax.devices()
        if cfg.mesh.num_devices is not None:
            if cfg.mesh.num_devices > len(devices):
                raise ConfigError(f"mesh.num_devices={cfg.mesh.num_devices} but only {len(devices)} devices exist")
            devices = devices[:cfg.mesh.num_devices]
        try:
            self.mesh = S.make_mesh(S.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.micro = cfg.train.per_device_batch * dp
        self.batch = self.micro * cfg.train.grad_accum
        if cfg.train.effective_batch is not None and cfg.train.effective_batch != self.batch:
            raise ConfigError(
                f"train.effective_batch={cfg.train.effective_batch} but per_device_batch "
                f"({cfg.train.per_device_batch}) x data-parallel devices ({dp}) x grad_accum "
                f"({cfg.train.grad_accum}) = {self.batch}")
        if cfg.method == "grpo" and self.batch % cfg.rollout.n:
            raise ConfigError(f"GRPO: the batch of {self.batch} completions per step is not a multiple of "
                              f"rollout.n={cfg.rollout.n} generations per prompt")
        self.prompts_per_step = self.batch // cfg.rollout.n if cfg.method == "grpo" else self.batch
        if cfg.method == "grpo" and (cfg.grpo.temperature != cfg.rollout.temperature
                                     or cfg.grpo.num_generations != cfg.rollout.n):
            raise ConfigError(
                f"grpo.temperature={cfg.grpo.temperature} and grpo.num_generations={cfg.grpo.num_generations} "
                f"must equal rollout.temperature={cfg.rollout.temperature} and rollout.n={cfg.rollout.n}: the "
                f"loss scores completions at the temperature they were sampled at, in groups of rollout.n")

        model_dir = cfg.model.path
        if model_dir == "toy":
            from jsdr.data.toy import ensure_toy_assets
            model_dir = str(ensure_toy_assets(progress=progress))
        else:
            model_dir = hf.resolve_model_dir(model_dir)
        self.model_dir = model_dir
        self.tokenizer = hf.load_tokenizer(cfg.model.tokenizer or model_dir)
        self.dtype = jnp.dtype(cfg.model.dtype)
        with S.use_mesh(self.mesh):
            self.params, self.mcfg, self.hf_config = hf.load_params(model_dir, mesh=self.mesh, dtype=self.dtype,
                                                                    progress=progress)
            lora = init_lora(self.mcfg, cfg.lora, jax.random.key(cfg.seed), mesh=self.mesh)
        self.lora_scale = cfg.lora.scale
        self.optimizer, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        state = {"step": jnp.zeros((), jnp.int32), "lora": lora,
                 "opt_state": jax.jit(self.optimizer.init)(lora)}
        if cfg.method == "opsd" and cfg.opsd.teacher == "ema":
            state["ema"] = jax.tree.map(jnp.copy, lora)
        self.state = self._on_mesh(state)
        self.pad_id = self._pad_id()
        self.stop_ids = self._stop_ids()
        self.records = self._prepare(self._load_records())
        self.eval_records = self._load_eval_records()
        self._step_fn = None
        self._sampler = None
        self.rollout_tokens = 0
        self.stop_requested = False
        self.stop_signal: int | None = None
        if cfg.optim.learning_rate >= 0.1:
            log(f"warning: optim.learning_rate={cfg.optim.learning_rate:g} is unusually large for AdamW (LoRA runs "
                f"use about 1e-6 to 1e-2); steps with non-finite values are skipped and "
                f"{cfg.train.max_nonfinite_steps} in a row stop the run")

    # -- setup helpers ---------------------------------------------------------------------------

    def _on_mesh(self, tree):
        """Leaves not yet laid out on the mesh (step counters, optimizer counts) are replicated on it."""
        from jax.sharding import NamedSharding, PartitionSpec as P
        rep = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                            else jax.device_put(x, rep), tree)

    def _pad_id(self) -> int:
        t = self.tokenizer
        return int(t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0))

    def _stop_ids(self) -> tuple[int, ...]:
        from jsdr.data.prompts import stop_token_ids
        return stop_token_ids(self.tokenizer, self.cfg.rollout.stop_token_ids)

    def _load_records(self) -> list[dict]:
        if self.cfg.data.train == "toy":
            from jsdr.data import toy
            return toy.make_problems(split="train", seed=self.cfg.seed, **toy.TRAIN_DEFAULTS)
        return self._read(self.cfg.data.train, self.cfg.data.split, self.cfg.data.limit)

    def _load_eval_records(self) -> list[dict]:
        d = self.cfg.data
        if d.eval is None:
            return []
        if d.eval in ("toy", "toy:test", "toy:validation"):  # the toy's test split, or its validation split
            from jsdr.data import toy
            return toy.toy_benchmark(d.eval_limit, split="validation" if d.eval.endswith("validation") else "test")
        return self._read(d.eval, d.eval_split, d.eval_limit)

    def _read(self, source: str, split: str, limit: int | None) -> list[dict]:
        from jsdr.data.datasets import load_records
        d = self.cfg.data
        fields = {"problem": d.problem_field, "solution": d.solution_field, "answer": d.answer_field}
        return load_records(source, split=split, fields=fields, limit=limit)

    # -- data stream ---------------------------------------------------------------------------

    def take(self, step: int) -> list[dict]:
        """The records of optimizer step `step` (a pure function of step, seed and data size)."""
        idx = record_indices(len(self.records), step, self.prompts_per_step, self.cfg.seed, self.cfg.data.shuffle)
        return [self.records[i] for i in idx]

    # -- sampling ------------------------------------------------------------------------------

    @property
    def sampler(self):
        if self._sampler is None:
            from jsdr.sampling import Sampler
            self._sampler = Sampler(self.mcfg, lora_scale=self.lora_scale, mesh=self.mesh, pad_id=self.pad_id)
        return self._sampler

    def sample(self, lora, prompts: list[list[int]], sc, rng):
        with S.use_mesh(self.mesh):
            return self.sampler.generate(self.params, lora, prompts, sc, rng=rng)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, lora) -> dict:
        """Held-out accuracy of the student prompt (greedy unless data.eval_temperature > 0)."""
        from jsdr.data.rewards import grade
        from jsdr.sampling import SamplingConfig
        if not self.eval_records:
            return {}
        d = self.cfg.data
        prompts = [self.render_student(r["problem"]) for r in self.eval_records]
        sc = SamplingConfig(temperature=d.eval_temperature, n=1, max_new_tokens=d.eval_max_new_tokens,
                            stop_token_ids=self.stop_ids, seed=self.cfg.seed)
        out = self.sample(lora, prompts, sc, jax.random.PRNGKey(self.cfg.seed + 7))
        texts = self.decode(out.tokens, out.lengths)
        correct = [grade(t, r["answer"], method=self.cfg.reward).correct
                   for t, r in zip(texts, self.eval_records)]
        return {"eval/accuracy": float(np.mean(correct)), "eval/response_tokens": float(np.mean(out.lengths))}

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        return [self.tokenizer.decode(list(t[:n]), skip_special_tokens=True) for t, n in zip(tokens, lengths)]

    # -- prompts -------------------------------------------------------------------------------

    def render_student(self, problem: str) -> list[int]:
        from jsdr.data.prompts import render_student
        return render_student(self.tokenizer, problem, self.cfg.prompts)

    def _prepare(self, records: list[dict]) -> list[dict]:
        """Tokenize what the method needs once, count and drop (or truncate) over-long examples."""
        from tqdm import tqdm

        from jsdr.data.prompts import render_sft_example, render_teacher
        cfg, d = self.cfg, self.cfg.data
        out, dropped, truncated = [], 0, 0
        it = tqdm(records, desc="tokenizing", unit="ex", disable=not self.progress or len(records) < 2000)
        for r in it:
            r = dict(r)
            if cfg.method == "sft":
                ex = render_sft_example(self.tokenizer, r["problem"], r["solution"], cfg.prompts)
                prompt, resp = list(ex.prompt_ids), list(ex.response_ids)
                if len(prompt) + len(resp) > d.max_length:
                    if d.overlong == "drop" or len(prompt) >= d.max_length:
                        dropped += 1
                        continue
                    resp = resp[:d.max_length - len(prompt)]
                    truncated += 1
                r["prompt_ids"], r["response_ids"] = prompt, resp
            else:
                r["prompt_ids"] = self.render_student(r["problem"])
                if cfg.method == "opsd":
                    r["teacher_ids"] = render_teacher(self.tokenizer, r["problem"], r["solution"], cfg.prompts)
                longest = max(len(r["prompt_ids"]), len(r.get("teacher_ids", ())))
                if longest > d.max_prompt_tokens:
                    dropped += 1  # a prompt is never cut: the model would see a mangled problem
                    continue
            out.append(r)
        if dropped or truncated:
            what = "prompt + solution > data.max_length" if cfg.method == "sft" else \
                "prompt > data.max_prompt_tokens"
            self.log(f"data: {dropped} of {len(records)} examples dropped and {truncated} truncated "
                     f"({what}; data.overlong={d.overlong})")
        if not out:
            raise ConfigError(f"data: no example of {len(records)} fits the length limits "
                              f"(data.max_length={d.max_length}, data.max_prompt_tokens={d.max_prompt_tokens})")
        return out

    # -- batches per method ----------------------------------------------------------------------

    def make_batch(self, step: int, rng) -> tuple[dict[str, np.ndarray], dict]:
        return getattr(self, f"_batch_{self.cfg.method}")(self.take(step), rng)

    def _rollout_config(self, n: int):
        return dataclasses.replace(self.cfg.rollout, n=n, stop_token_ids=self.stop_ids)

    def _batch_opsd(self, recs, rng):
        from jsdr.losses.opsd import build_opsd_batch
        q = self.cfg.train.seq_bucket
        sp = [r["prompt_ids"] for r in recs]
        tp = [r["teacher_ids"] for r in recs]
        out = self.sample(self.state["lora"], sp, self._rollout_config(1), rng)
        lengths = [int(n) for n in out.lengths]
        rollouts = [list(t[:n]) for t, n in zip(out.tokens, lengths)]
        self.rollout_tokens += sum(lengths)
        N = bucket(max(lengths + [1]), q)
        batch = build_opsd_batch(sp, tp, rollouts, student_len=bucket(max(map(len, sp)) + N, q),
                                 teacher_len=bucket(max(map(len, tp)) + N, q), rollout_len=N,
                                 padding="left", pad_id=self.pad_id)
        info = {"tokens": int(batch["s_segment_ids"].astype(bool).sum() + batch["t_segment_ids"].astype(bool).sum()),
                "rollout/length": float(np.mean(lengths)),
                "rollout/accuracy": self._accuracy(out, recs, 1)}
        return stack_micro(batch, self.cfg.train.grad_accum), info

    def _accuracy(self, out, recs, n) -> float:
        from jsdr.data.rewards import grade
        texts = self.decode(out.tokens, out.lengths)
        return float(np.mean([grade(t, recs[i // n]["answer"], method=self.cfg.reward).correct
                              for i, t in enumerate(texts)]))

    def _batch_sft(self, recs, rng):
        """Pack the step's examples into rows of one length bucket; the row count is rounded up to a
        multiple of grad_accum x data-parallel size (all-padding rows carry no loss)."""
        from jsdr.losses.sft import pack_sft_examples
        q = self.cfg.train.seq_bucket
        examples = [(r["prompt_ids"], r["response_ids"]) for r in recs]
        T = bucket(max(len(p) + len(r) for p, r in examples), q)
        packed = pack_sft_examples(examples, T, pad_id=self.pad_id)
        unit = self.cfg.train.grad_accum * (self.micro // self.cfg.train.per_device_batch)
        rows = bucket(packed["tokens"].shape[0], unit)
        batch = pack_sft_examples(examples, T, num_rows=rows, pad_id=self.pad_id)
        info = {"tokens": int(batch["segment_ids"].astype(bool).sum()), "sft/rows": rows}
        return stack_micro(batch, self.cfg.train.grad_accum), info

    def _batch_grpo(self, recs, rng):
        from jsdr.data.rewards import grade
        from jsdr.losses.grpo import build_grpo_batch, group_advantages
        G, q, g = self.cfg.rollout.n, self.cfg.train.seq_bucket, self.cfg.grpo
        prompts = [r["prompt_ids"] for r in recs]
        out = self.sample(self.state["lora"], prompts, self._rollout_config(G), rng)
        lengths = [int(n) for n in out.lengths]
        self.rollout_tokens += sum(lengths)
        texts = self.decode(out.tokens, out.lengths)
        grades = [grade(t, recs[i // G]["answer"], method=self.cfg.reward) for i, t in enumerate(texts)]
        rewards = np.array([float(x.correct) for x in grades], np.float32)
        adv = np.asarray(group_advantages(rewards, G, g.std_normalization, g.adv_eps), np.float32)
        completions = out.completions()
        batch = build_grpo_batch([prompts[i // G] for i in range(len(completions))], completions,
                                 prompt_len=bucket(max(map(len, prompts)), q),
                                 completion_len=bucket(max(lengths + [1]), q), pad_id=self.pad_id)
        batch["advantages"] = adv
        batch["old_logprobs"] = self.old_logprobs(batch)
        info = {"tokens": int(batch["segment_ids"].astype(bool).sum()),
                "reward/mean": float(rewards.mean()), "rollout/length": float(np.mean(lengths)),
                "reward/grader_errors": float(sum(x.error is not None for x in grades))}
        return stack_micro(batch, self.cfg.train.grad_accum), info

    def old_logprobs(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Log-probs of the completion tokens under the current policy, recomputed with the loss's own
        forward (same temperature, dtype and numerics), one micro-batch at a time."""
        from jsdr.losses.grpo import policy_logprobs
        if getattr(self, "_old_lp", None) is None:
            fn = partial(policy_logprobs, model_cfg=self.mcfg, cfg=self.cfg.grpo, lora_scale=self.lora_scale,
                         remat="none", attn_impl=self.cfg.model.attn_impl, dtype=self.dtype)
            self._old_lp = jax.jit(lambda lora, params, b: fn(lora, params, b))
        keys = ("tokens", "positions", "segment_ids", "targets")
        m = self.micro
        parts = []
        with S.use_mesh(self.mesh):
            for i in range(0, batch["tokens"].shape[0], m):
                mb = self.put_batch({k: batch[k][None, i:i + m] for k in keys})
                mb = {k: v[0] for k, v in mb.items()}
                parts.append(np.asarray(jax.device_get(self._old_lp(self.state["lora"], self.params, mb))))
        return np.concatenate(parts).astype(np.float32)

    def loss_fn(self):
        m = self.cfg.method
        if m == "sft":
            from jsdr.losses.sft import sft_loss as fn
        elif m == "grpo":
            from jsdr.losses.grpo import grpo_loss as fn
        else:
            from jsdr.losses.opsd import opsd_loss as fn
        return partial(fn, model_cfg=self.mcfg, cfg=getattr(self.cfg, m), lora_scale=self.lora_scale,
                       remat=self.cfg.model.remat, attn_impl=self.cfg.model.attn_impl, dtype=self.dtype,
                       lora_dropout=self.cfg.lora.dropout)

    # -- the jitted step -----------------------------------------------------------------------

    def step_fn(self):
        if self._step_fn is None:
            loss_fn = self.loss_fn()
            ema = self.cfg.opsd.ema_decay if "ema" in self.state else None
            step = make_train_step(loss_fn, self.optimizer, ema_decay=ema)
            state_sh = jax.tree.map(lambda x: x.sharding, self.state)
            self._step_fn = jax.jit(step, out_shardings=(state_sh, None), donate_argnums=(0,))
        return self._step_fn

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """[accum, micro, ...] host arrays -> device arrays split over the data-parallel axes."""
        from jax.sharding import NamedSharding, PartitionSpec as P
        spec = S.logical_to_spec(("act_batch",), None, self.mesh, S.DEFAULT_RULES)
        sh = NamedSharding(self.mesh, P(None, *spec))
        return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}

    # -- the run directory ---------------------------------------------------------------------

    def _clear_for_overwrite(self) -> None:
        """train.overwrite: remove what an earlier run wrote here (RUN_FILES only, nothing else)."""
        t = self.cfg.train
        if t.resume and t.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other: continue the run in "
                              f"{self.run_dir}, or start it again from step 0")
        ours = [p for p in RUN_FILES if (self.run_dir / p).exists()]
        if t.overwrite and ours:
            self._remove(ours)
            self.log(f"--train.overwrite: removed {', '.join(ours)} of the earlier run in {self.run_dir}")

    def _remove(self, names) -> None:
        import shutil
        for name in names:
            p = self.run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _prepare_run_dir(self, ckpt: Checkpointer) -> int:
        """The step to start from. Refuses to touch an earlier run's files unless asked to (resume
        or overwrite), and a resume whose settings change the run unless train.resume_override."""
        t = self.cfg.train
        ours = [p for p in RUN_FILES if (self.run_dir / p).exists() and p != "checkpoints"]
        latest = ckpt.latest_step()
        if latest is None:
            # a run that stopped before its first checkpoint, with the same settings, starts again from 0;
            # anything else (another run's files, or a finished run's adapter) is never replaced silently
            same = ours and not {"adapter", "summary.json"} & set(ours) and self._same_config_on_disk()
            if ours and not same:
                raise RunError(f"{self.run_dir} already holds {', '.join(ours)} of another run (no checkpoint); "
                               f"pass --train.overwrite=true to replace it or choose another --train.output_dir")
            if ours:
                self._remove(ours)
                self.log(f"{self.run_dir}: the earlier run with these settings stopped before its first "
                         f"checkpoint; starting again from step 0")
            elif t.resume:
                self.log(f"--train.resume: no checkpoint in {ckpt.directory}; starting from step 0")
            return 0
        if not t.resume:
            raise RunError(f"{self.run_dir} already holds checkpoints (latest step {latest}); pass "
                           f"--train.resume=true to continue that run, --train.overwrite=true to start it again, "
                           f"or choose another --train.output_dir")
        self._check_resume_config()
        try:
            self.state, meta = ckpt.restore(latest, like=self.state)
        except Exception as e:  # noqa: BLE001 - orbax raises several types for a tree that does not match
            raise RunError(f"{ckpt.directory} step {latest}: the checkpoint does not match this run's train state "
                           f"({type(e).__name__}: {_first_line(e)})") from None
        self.rollout_tokens = int(meta.get("rollout_tokens", 0))
        self.nonfinite_total = int(meta.get("nonfinite_steps", 0))
        self.log(f"resumed {self.run_dir} at step {latest}")
        return int(meta["step"])

    def _same_config_on_disk(self) -> bool:
        try:
            return not self._config_changes()
        except RunError:
            return False

    def _config_changes(self) -> dict[str, tuple]:
        """{dotted key: (saved, now)} of the settings outside RESUME_FREE that differ from the run on disk."""
        saved, now = _flat(self._saved_config()), _flat(C.to_dict(self.cfg))
        return {k: (saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
                if saved.get(k, "<absent>") != now.get(k, "<absent>") and k not in RESUME_FREE}

    def _saved_config(self) -> dict:
        hist = self.run_dir / "config_history.jsonl"
        if hist.exists():
            lines = [ln for ln in hist.read_text().splitlines() if ln.strip()]
            for ln in reversed(lines):
                try:
                    return json.loads(ln)["config"]
                except (ValueError, KeyError):
                    continue  # a torn line: the one before holds the config in effect
        path = self.run_dir / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{path}: cannot read the saved configuration of the run to resume ({e})") from None

    def _check_resume_config(self) -> None:
        """Refuse a resume whose configuration changes the run (any setting outside RESUME_FREE)."""
        changed = self.resume_changes = self._config_changes()
        if not changed:
            return
        desc = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        fixed = [k for k in changed if k.split(".")[0] in RESUME_FIXED or k in RESUME_FIXED]
        if fixed:
            raise RunError(f"--train.resume: {', '.join(fixed)} cannot change within a run ({desc}); start a new "
                           f"run in another --train.output_dir")
        if not self.cfg.train.resume_override:
            raise RunError(f"--train.resume: settings differ from the run in {self.run_dir} ({desc}); pass the "
                           f"same settings, or --train.resume_override=true to continue with the new ones")
        self.log(f"--train.resume_override: continuing with changed settings: {desc}")

    def _write_config(self, start: int) -> None:
        d = C.to_dict(self.cfg)
        if not (self.run_dir / "config.json").exists():  # the original stays; every start is appended below
            (self.run_dir / "config.json").write_text(json.dumps(d, indent=2))
        rec = {"start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": d,
               "changes": {k: list(v) for k, v in getattr(self, "resume_changes", {}).items()}}
        with (self.run_dir / "config_history.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

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
            ckpt.save(step, self.state, {"step": step, "rollout_tokens": self.rollout_tokens, "seed": self.cfg.seed,
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
        from tqdm import tqdm
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._clear_for_overwrite()
        ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.nonfinite_total = self.nonfinite_run = self.zero_grad_run = 0
        logger = bar = None
        old_handlers = self._install_signal_handlers() if _main_thread() else {}
        summary: dict = {}
        try:
            start = self._prepare_run_dir(ckpt)
            self._write_config(start)
            logger = Logger(self.run_dir, start, log=self.log)
            if start == 0 and self.eval_records:
                summary["eval/accuracy_before"] = self.evaluate(self.state["lora"]).get("eval/accuracy")
                self.log(f"held-out accuracy before training: {summary['eval/accuracy_before']:.3f} "
                         f"({len(self.eval_records)} problems)")
                logger.log(0, {"eval/accuracy": summary["eval/accuracy_before"]})
            bar = tqdm(total=cfg.train.steps, initial=start, desc=f"{cfg.method}", unit="step",
                       disable=not self.progress, dynamic_ncols=True)
            base_key = jax.random.PRNGKey(cfg.seed)
            step = start
            saved_at = ckpt.latest_step()
            t_start = time.time()
            while step < cfg.train.steps and not self.stop_requested:
                t0 = time.time()
                rng_data, rng_step = jax.random.split(jax.random.fold_in(base_key, step))
                host, info = self.make_batch(step, rng_data)
                with S.use_mesh(self.mesh):
                    self.state, metrics = self.step_fn()(self.state, self.params, self.put_batch(host), rng_step)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                n_tok = int(info.pop("tokens"))
                metrics.update(info)
                metrics["lr"] = float(self.schedule(step - 1))
                metrics["rollout_tokens"] = self.rollout_tokens
                metrics["nonfinite_steps"] = self.nonfinite_total + int(metrics["skipped"] > 0)
                metrics["tokens_per_s"] = n_tok / max(time.time() - t0, 1e-9)
                metrics["time"] = time.time() - t_start
                self._check_finite(step, metrics, ckpt)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self.eval_records:
                    metrics.update(self.evaluate(self.state["lora"]))
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    logger.log(step, metrics)
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)
                summary.update(metrics)
                if stop_after is not None and step - start >= stop_after:
                    self.stop_requested = True
                if step < cfg.train.steps and (step % cfg.train.save_every == 0 or self.stop_requested):
                    self._save(ckpt, step)
                    saved_at = step
            bar.close()
            self._wait(ckpt)
            if self.stop_requested and step < cfg.train.steps:
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
                after = self.evaluate(self.state["lora"])
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
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
        from jsdr.model.lora import save_peft
        out = self.run_dir / "adapter"
        base = self.cfg.model.path if self.cfg.model.path != "toy" else str(self.model_dir)
        save_peft(out, jax.device_get(self.state["lora"]), self.cfg.lora, self.mcfg, base_model_name_or_path=base)
        self.log(f"PEFT adapter written to {out}")
        return out


def _main_thread() -> bool:
    import threading
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
        return C.from_dict(TrainConfig, C.METHOD_DEFAULTS["opsd"]), f"defaults of --method=opsd ({e} in the rest)"
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
        print(C.help_text(TrainConfig, defaults=cfg))
        return 0
    trainer = None
    try:
        cfg, note = build_config(argv)
        if note:
            print(f"jsdr: no --config given: using the {note}")
        trainer = Trainer(cfg)
        summary = trainer.run()
    except (JsdrError, OSError) as e:
        line, code = error_line("jsdr.train", e)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:  # a second signal while stopping
        print("jsdr.train: interrupted; the last checkpoint written (if any) is intact", file=sys.stderr)
        return 130
    keys = [k for k in ("eval/accuracy_before", "eval/accuracy_after") if summary.get(k) is not None]
    if keys:
        print("  ".join(f"{k.split('/')[-1]}={summary[k]:.3f}" for k in keys))
    print(f"run directory: {trainer.run_dir}")
    stopped = summary.get("stopped")
    if stopped is not None:
        return 128 + int(stopped) if isinstance(stopped, int) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
