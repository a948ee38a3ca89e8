"""orbax checkpoints of a training run: the train state (LoRA tree, optimizer state, EMA, step) as
sharded arrays, plus a JSON record (data position, rng seed, config, metrics so far); and the run
directory's rules for resuming, replacing or refusing an earlier run (`RunDirectory`).

    ckpt = Checkpointer(run_dir / "checkpoints", max_to_keep=3)
    ckpt.save(step, state, meta)           # asynchronous; `wait()` before exiting
    step = ckpt.latest_step()
    state, meta = ckpt.restore(step, like=state)   # `like`: arrays or ShapeDtypeStructs with shardings

Only the trainable part is saved (never the frozen base weights: they come from the model path in
the config), so a checkpoint of Qwen3-8B with r=64 LoRA is a few hundred MB, not 16 GB.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from jsdr.config import ConfigError
from jsdr.errors import RunError


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int | None, like: Any) -> tuple[Any, dict]:
        """The state at `step` (latest when None), placed with the shardings of `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# the run directory: what may be resumed, replaced or refused

# what a run writes into its directory (train.overwrite removes exactly these)
RUN_FILES = ("metrics.jsonl", "tb", "checkpoints", "adapter", "config.json", "config_history.jsonl", "summary.json")
# settings a resume may change freely: they change what is logged, kept or scored, never the trained weights
RESUME_FREE = frozenset({"train.resume", "train.overwrite", "train.resume_override", "train.log_every",
                         "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.output_dir",
                         "train.max_nonfinite_steps", "train.stop_at", "data.eval", "data.eval_split", "data.eval_limit",
                         "data.eval_max_new_tokens", "data.eval_temperature",
                         # the processes of a run may change between starts (the checkpoint is global arrays)
                         "dist.coordinator", "dist.num_processes", "dist.process_id", "dist.auto",
                         "dist.init_timeout", "dist.heartbeat_timeout", "dist.timeout"})
# settings that can never change within a run: the checkpoint's tree or meaning depends on them
# (each method adds its own, e.g. the OPSD teacher: Method.fixed_on_resume)
RESUME_FIXED = frozenset({"method", "model", "lora"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class RunDirectory:
    """The files of one training run and the rules for reusing them.

    A directory with another run's files is refused unless the user asks to resume (same settings, or
    changed ones with `resume_override`, never the fixed ones) or to overwrite (removing RUN_FILES
    only). Every start appends the configuration in effect to config_history.jsonl.

    `config` is the run's configuration as plain data; `options` has resume, overwrite and
    resume_override (the `train` section); `fixed` adds keys that can never change on resume.
    """

    def __init__(self, path: Path, config: dict, options: Any, fixed: Sequence[str] = (), log=print):
        self.path, self.config, self.options, self.log = Path(path), config, options, log
        self.fixed = RESUME_FIXED | set(fixed)
        self.changes: dict[str, tuple] = {}

    def clear_for_overwrite(self) -> None:
        """train.overwrite: remove what an earlier run wrote here (RUN_FILES only, nothing else)."""
        opts = self.options
        if opts.resume and opts.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other: continue the run in "
                              f"{self.path}, or start it again from step 0")
        ours = [p for p in RUN_FILES if (self.path / p).exists()]
        if opts.overwrite and ours:
            self._remove(ours)
            self.log(f"--train.overwrite: removed {', '.join(ours)} of the earlier run in {self.path}")

    def _remove(self, names) -> None:
        for name in names:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def prepare(self, ckpt: Checkpointer) -> int | None:
        """The checkpoint step to resume from, or None to start from step 0. Refuses to touch an earlier
        run's files unless asked to (resume or overwrite), and a resume whose settings change the run
        unless resume_override."""
        ours = [p for p in RUN_FILES if (self.path / p).exists() and p != "checkpoints"]
        latest = ckpt.latest_step()
        if latest is None:
            # a run that stopped before its first checkpoint, with the same settings, starts again from 0;
            # anything else (another run's files, or a finished run's adapter) is never replaced silently
            same = ours and not {"adapter", "summary.json"} & set(ours) and self._same_config_on_disk()
            if ours and not same:
                raise RunError(f"{self.path} already holds {', '.join(ours)} of another run (no checkpoint); "
                               f"pass --train.overwrite=true to replace it or choose another --train.output_dir")
            if ours:
                self._remove(ours)
                self.log(f"{self.path}: the earlier run with these settings stopped before its first "
                         f"checkpoint; starting again from step 0")
            elif self.options.resume:
                self.log(f"--train.resume: no checkpoint in {ckpt.directory}; starting from step 0")
            return None
        if not self.options.resume:
            raise RunError(f"{self.path} already holds checkpoints (latest step {latest}); pass "
                           f"--train.resume=true to continue that run, --train.overwrite=true to start it again, "
                           f"or choose another --train.output_dir")
        self._check_resume_config()
        return latest

    def _same_config_on_disk(self) -> bool:
        try:
            return not self.config_changes()
        except RunError:
            return False

    def config_changes(self) -> dict[str, tuple]:
        """{dotted key: (saved, now)} of the settings outside RESUME_FREE that differ from the run on disk."""
        saved, now = _flat(self._saved_config()), _flat(self.config)
        return {k: (saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
                if saved.get(k, "<absent>") != now.get(k, "<absent>") and k not in RESUME_FREE}

    def _saved_config(self) -> dict:
        hist = self.path / "config_history.jsonl"
        if hist.exists():
            lines = [ln for ln in hist.read_text().splitlines() if ln.strip()]
            for ln in reversed(lines):
                try:
                    return json.loads(ln)["config"]
                except (ValueError, KeyError):
                    continue  # a torn line: the one before holds the config in effect
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{path}: cannot read the saved configuration of the run to resume ({e})") from None

    def _check_resume_config(self) -> None:
        """Refuse a resume whose configuration changes the run (any setting outside RESUME_FREE)."""
        changed = self.changes = self.config_changes()
        if not changed:
            return
        desc = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        fixed = [k for k in changed if k.split(".")[0] in self.fixed or k in self.fixed]
        if fixed:
            raise RunError(f"--train.resume: {', '.join(fixed)} cannot change within a run ({desc}); start a new "
                           f"run in another --train.output_dir")
        if not self.options.resume_override:
            raise RunError(f"--train.resume: settings differ from the run in {self.path} ({desc}); pass the "
                           f"same settings, or --train.resume_override=true to continue with the new ones")
        self.log(f"--train.resume_override: continuing with changed settings: {desc}")

    def write_config(self, start: int) -> None:
        """config.json (the original, kept) and one line per start in config_history.jsonl."""
        if not (self.path / "config.json").exists():
            (self.path / "config.json").write_text(json.dumps(self.config, indent=2))
        rec = {"start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": self.config,
               "changes": {k: list(v) for k, v in self.changes.items()}}
        with (self.path / "config_history.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
