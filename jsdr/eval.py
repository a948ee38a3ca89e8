"""`python -m jsdr.eval --model PATH_OR_ID [--adapter PEFT_DIR] --benchmarks aime24,aime25,hmmt25,amo`

Sampled evaluation with the paper's table 5 settings as defaults (38,912 new tokens, thinking on,
temperature 1.0, top-p 0.95, top-k off, min-p 0, presence penalty 0, 16 samples per prompt).

Results are keyed by everything that produced them (model, adapter and a hash of its files,
tokenizer, benchmarks and their contents, the rendered prompts, every sampling setting, grader,
dtype, seed; not the engine settings such as page size or KV budget, which do not change the
samples): the key is written to `<output_dir>/eval_key.json`, and the default
output directory `eval/<model>[+<adapter>]-<8 hex digits of the key>` differs whenever the key does.
An output directory that holds samples of another key is refused, never mixed or cleared, unless
`--overwrite=true` says so.

Sampling runs on the paged engine by default: every problem left goes into one sampler call whose
decode slots are refilled as samples finish (`--sampling.engine=dense` for the reference engine).
The samples of a problem are appended to `<output_dir>/samples.jsonl` as soon as all of them are
finished (prompt, response, extracted answer, correctness, grader error, length, finish reason), so
a stopped run resumes where it stopped: problems that already have all their samples are skipped,
and every problem draws with its own key (seed, benchmark, index), so a resumed run draws the same
samples as an unbroken one. Progress shows samples/s, tokens/s, running and waiting sequences and
KV pages in use.
The scores (Avg@n, unbiased pass@k, maj@n, mean response length, per benchmark and the unweighted
average over benchmarks) are computed from that file, printed as a table and written to `results.json`.

A benchmark is a registered name (aime24, aime25, hmmt25, amo, math500; loaded from the hub),
`toy` (the embedded toy task's test split; `toy:validation` its validation split), `NAME:PATH` (a registered benchmark from a local copy,
or any local .jsonl/.json/.parquet file with the fields given by --problem_field/--answer_field).

Exit codes: 0 done, 2 configuration error, 1 any other expected error (data, model, adapter, output
directory, I/O: one line on stderr), 130 interrupted (the samples so far are kept; rerun to resume).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jsdr import config, run, sharding, toy
from jsdr import distributed as dist
from jsdr.config import ConfigError, field
from jsdr.data.datasets import BENCHMARKS, DataError, load_records, load_spec
from jsdr.data.prompts import EVAL_TEMPLATE, PromptError, PromptTemplates, render_prompt, stop_token_ids, student_messages
from jsdr.data.rewards import grade
from jsdr.errors import JsdrError, RunError, error_line
from jsdr.metrics import summarize
from jsdr.model import hf
from jsdr.model.hf import CheckpointError
from jsdr.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from jsdr.model.transformer import Model
from jsdr.sampling import ENGINE_FIELDS, Sampler, SamplingConfig

TABLE5 = SamplingConfig(temperature=1.0, top_p=0.95, top_k=-1, min_p=0.0, presence_penalty=0.0, n=16,
                        max_new_tokens=38912)

KEY_FILE, SAMPLES_FILE, RESULTS_FILE = "eval_key.json", "samples.jsonl", "results.json"
KEY_FORMAT = 2  # bump when the meaning of a key field changes (2: per-problem keys; engine settings left out)
DENSE_BATCH_PROMPTS = 8
OUTPUT_PLACEHOLDERS = ("model", "adapter", "name", "key")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = field("toy", "HF hub id or local directory; 'toy' = the embedded toy reasoner")
    adapter: str | None = field(None, "PEFT LoRA adapter directory (merged into the weights for sampling)")
    tokenizer: str | None = field(None, "tokenizer id or directory (default: the model's)")
    benchmarks: tuple[str, ...] = field(("aime24", "aime25", "hmmt25", "amo"),
                                        "registered names, 'toy', or NAME:PATH for local files")
    problem_field: str = field("problem", "problem field of local files that are not registered benchmarks")
    answer_field: str = field("answer", "answer field of local files that are not registered benchmarks")
    limit: int | None = field(None, "only the first N problems of each benchmark")
    thinking: bool = field(True, "Qwen3 thinking mode in the prompt (table 5: on)")
    prompt: str = field(EVAL_TEMPLATE, "user message of every problem ({problem}); default: the public evaluation "
                                       "code's, without the training prompts' 'Problem: ' label")
    sampling: SamplingConfig = field(TABLE5, "")
    batch_prompts: int = field(0, "prompts per sampler call (0 = every problem left in one call: the paged engine "
                                  "keeps its slots full; the dense engine then takes 8 per call)")
    dtype: Literal["bfloat16", "float32"] = field("bfloat16", "weights and KV-cache dtype")
    grader: Literal["math_verify", "string"] = field("math_verify", "how \\boxed{} answers are graded")
    output_dir: str = field("eval/{name}-{key}",
                            "where eval_key.json, samples.jsonl and results.json go; {model}: the model's last "
                            "path part, {adapter}: the adapter's name ('' without one), {name}: {model} or "
                            "{model}+{adapter}, {key}: 8 hex digits of the hash of eval_key.json")
    resume: bool = field(True, "keep the samples already in output_dir (same key) and sample only what is missing")
    overwrite: bool = field(False, "remove samples in output_dir that would otherwise be refused (another key, "
                                   "unknown key, or --resume=false)")
    seed: int = field(0, "sampling seed (each batch folds in its position)")
    mesh: sharding.MeshConfig = field(sharding.MeshConfig(), "")
    dist: dist.DistConfig = field(dist.DistConfig(), "")

    def __post_init__(self):
        config.check(len(self.benchmarks) > 0, "benchmarks", "give at least one benchmark")
        config.check("{problem}" in self.prompt, "prompt", "the template must contain {problem}")
        config.check(self.batch_prompts >= 0, "batch_prompts", "must be >= 0 (0 = all in one call)")
        config.check(self.limit is None or self.limit > 0, "limit", "must be > 0 or None")
        try:
            self.output_dir.format(**{k: "x" for k in OUTPUT_PLACEHOLDERS})
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"output_dir: {self.output_dir!r} is not a valid pattern ({type(e).__name__}: {e}); "
                              f"its placeholders are {', '.join('{' + k + '}' for k in OUTPUT_PLACEHOLDERS)}") from None


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C while sampling; carries where the samples written so far are."""

    def __init__(self, samples_path: Path, n_written: int, resume_hint: str):
        super().__init__(str(samples_path))
        self.samples_path, self.n_written, self.resume_hint = samples_path, n_written, resume_hint


# ---------------------------------------------------------------------------------------------
# benchmarks


def load_benchmark(entry: str, cfg: EvalConfig) -> tuple[str, list[dict]]:
    """(name, records with problem/answer) of one --benchmarks entry."""
    name, _, path = entry.partition(":")
    if name == "toy" and path in ("", "test", "validation"):  # the toy's test split (or toy:validation)
        return entry, toy.toy_benchmark(cfg.limit or 256, split=path or "test")
    if name in BENCHMARKS:
        return name, load_spec(name, path=path or None, limit=cfg.limit)
    if not path:
        raise ConfigError(f"benchmarks: unknown benchmark {entry!r}; use one of {', '.join(BENCHMARKS)}, toy, "
                          f"or NAME:PATH for a local file")
    fields = {"problem": cfg.problem_field, "answer": cfg.answer_field}
    return name, load_records(path, split="test", fields=fields, limit=cfg.limit)


def _load_benchmarks(cfg: EvalConfig) -> list[tuple[str, list[dict]]]:
    out = []
    for entry in cfg.benchmarks:
        try:
            out.append(load_benchmark(entry, cfg))
        except JsdrError:
            raise
        except ValueError as e:  # a loader's own check of the rows
            raise DataError(f"benchmark {entry!r}: {e}") from e
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    config.check(not dup, "benchmarks", f"{', '.join(dup)} given twice (samples are keyed by benchmark name)")
    return out


# ---------------------------------------------------------------------------------------------
# the key: everything that produced the samples


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def adapter_sha256(adapter_dir: str | Path) -> str:
    """sha256 over the adapter's adapter_config.json and adapter weights (names and contents)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"{d}: no such adapter directory")
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        f = d / name
        if not f.is_file():
            alt = " (found adapter_model.bin: re-save it with safe_serialization=True)" \
                if name == ADAPTER_WEIGHTS and (d / "adapter_model.bin").exists() else ""
            raise AdapterError(f"{d}: no {name} (not a PEFT adapter directory){alt}")
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _adapter_name(adapter: str | None) -> str:
    """The adapter's directory name; a directory called `adapter` (jsdr.train's runs/<run>/adapter)
    is named after its run directory."""
    if not adapter:
        return ""
    p = Path(adapter.rstrip("/")).expanduser().resolve()
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name


def _local_or_given(path_or_id: str) -> str:
    p = Path(path_or_id).expanduser()
    return str(p.resolve()) if p.exists() else path_or_id


def eval_key(cfg: EvalConfig, benches: Sequence[tuple[str, list[dict]]], model_dir: str | Path, tokenizer,
             prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], adapter_hash: str | None) -> dict:
    """The settings that produced the samples, as plain JSON data (compared field by field on resume)."""
    chat_template = getattr(tokenizer, "chat_template", None)
    key = {
        "format": KEY_FORMAT,
        "model": {"given": cfg.model, "dir": str(Path(model_dir).resolve())},
        "adapter": None if not cfg.adapter else {"given": cfg.adapter, "dir": str(Path(cfg.adapter).resolve()),
                                                 "sha256": adapter_hash},
        "tokenizer": {"given": cfg.tokenizer, "dir": _local_or_given(cfg.tokenizer or str(model_dir))},
        "benchmarks": [{"entry": entry, "name": name, "limit": cfg.limit, "problems": len(recs),
                        "sha256": _sha256_json([[str(r["problem"]), str(r["answer"])] for r in recs])}
                       for entry, (name, recs) in zip(cfg.benchmarks, benches)],
        "prompt": {"template": cfg.prompt, "system": None, "thinking": cfg.thinking,
                   "chat_template_sha256": _sha256_json(chat_template),
                   "rendered_sha256": _sha256_json([list(map(int, x)) for x in prompts])},
        "sampling": _sampling_key(cfg.sampling),
        "stop_token_ids": [int(i) for i in stop_ids],
        "grader": cfg.grader,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }
    return json.loads(json.dumps(key))  # plain JSON types, as read back from eval_key.json


def _sampling_key(sc: SamplingConfig) -> dict:
    """The sampling settings that decide the samples (engine settings such as page size or KV budget
    only decide speed and memory: the engines return the same tokens)."""
    return {k: v for k, v in config.to_dict(sc).items() if k not in ENGINE_FIELDS}


def problem_key(seed: int, benchmark: str, index: int) -> np.ndarray:
    """The PRNG key (uint32 [2]) of one problem's samples: the seed, the benchmark and the index."""
    tag = zlib.crc32(f"{benchmark}:{index}".encode()) & 0x7FFFFFFF
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), tag), np.uint32)


def key_hash(key: dict) -> str:
    """8 hex digits of the key's sha256 (the {key} of output_dir)."""
    return _sha256_json(key)[:8]


def output_dir_of(cfg: EvalConfig, key: dict) -> Path:
    model = Path(cfg.model.rstrip("/")).name
    adapter = _adapter_name(cfg.adapter)
    name = f"{model}+{adapter}" if adapter else model
    return Path(cfg.output_dir.format(model=model, adapter=adapter, name=name, key=key_hash(key)))


_ABSENT = object()


def _short(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if v is None:
        return "none"
    if isinstance(v, dict) and "given" in v:
        v = v["given"]
    s = v if isinstance(v, str) else json.dumps(v)
    if len(s) == 64 and all(c in "0123456789abcdef" for c in s):
        s = s[:12]  # a sha256
    return s if len(s) <= 48 else s[:45] + "..."


def key_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """['sampling.n: 16 -> 4', ...]: the fields in which two keys differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(new) + [k for k in old if k not in new]:
            out += key_diff(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else k)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(x, dict) for x in old + new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in key_diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path or 'key'}: {_short(old)} -> {_short(new)}"]


# ---------------------------------------------------------------------------------------------
# the output directory


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_output_dir(out_dir: Path, key: dict, cfg: EvalConfig, log=print) -> None:
    """Make out_dir hold `key`: resume its samples when their key is the same (and --resume),
    refuse when it holds samples of another key, of no key, or --resume=false, unless --overwrite;
    then remove them and say so. Writes eval_key.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, key_path = out_dir / SAMPLES_FILE, out_dir / KEY_FILE
    if samples.exists() and samples.stat().st_size > 0:
        old, problem = None, None
        try:
            old = json.loads(key_path.read_text())
        except FileNotFoundError:
            problem = f"{out_dir} holds {SAMPLES_FILE} but no {KEY_FILE} (samples of unknown settings)"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"{out_dir} holds {SAMPLES_FILE} but {KEY_FILE} is unreadable ({e})"
        if problem is None:
            diff = key_diff(old, key)
            if diff:
                shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more (see {key_path})" if len(diff) > 6 else "")
                problem = f"{out_dir} holds samples of other settings ({shown})"
            elif not cfg.resume:
                problem = f"{out_dir} already holds samples of these settings and --resume=false"
        if problem is not None:
            if not cfg.overwrite:
                hint = ", or --resume=true to continue them" if problem.endswith("--resume=false") else ""
                raise RunError(f"{problem}; use another --output_dir, or --overwrite=true to replace "
                               f"them{hint}")
            lines = sum(1 for _ in samples.open("rb"))
            removed = [f for f in (samples, out_dir / RESULTS_FILE, key_path) if f.exists()]
            log(f"jsdr.eval: --overwrite=true: removing {', '.join(f.name for f in removed)} ({lines} sample lines) "
                f"from {out_dir}: {problem}")
            for f in removed:
                f.unlink()
    text = json.dumps(key, indent=2) + "\n"
    if not key_path.exists() or key_path.read_text() != text:
        _write_atomic(key_path, text)


def read_done(path: Path, n: int, log=print) -> dict[tuple[str, int], int]:
    """{(benchmark, problem index): samples} of the complete problems in samples.jsonl.

    A torn last line (the run was killed mid-write: no newline) is cut off, and the samples of
    problems with fewer than n samples (a batch cut mid-write) are dropped; both are logged. Any
    other unreadable line is an error."""
    if not path.exists():
        return {}
    counts: dict[tuple[str, int], int] = {}
    good_end, torn = 0, 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # only the last line can lack its newline
                torn = len(line)
                break
            good_end += len(line)
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key = (str(r["benchmark"]), int(r["problem_index"]))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                raise RunError(f"{path} line {i}: not a jsdr sample record; move the file away, or pass "
                               f"--overwrite=true to replace it") from None
            counts[key] = counts.get(key, 0) + 1
    if torn:
        with open(path, "r+b") as f:
            f.truncate(good_end)
        log(f"jsdr.eval: {path}: cut off a torn last line ({torn} bytes without a newline: the run was stopped "
            f"mid-write)")
    over = sorted(k for k, c in counts.items() if c > n)
    if over:
        raise RunError(f"{path}: {over[0][0]} problem {over[0][1]} has {counts[over[0]]} samples, more than "
                       f"sampling.n={n}; the file was edited or written by two runs at once: move it away, or pass "
                       f"--overwrite=true to replace it")
    partial = {k: c for k, c in counts.items() if c < n}
    if partial:
        tmp = path.with_name(f".{path.name}.tmp")
        try:  # the original stays whole until the filtered copy replaces it
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                for line in src:
                    if line.strip():
                        r = json.loads(line)
                        if (str(r["benchmark"]), int(r["problem_index"])) in partial:
                            continue
                    dst.write(line)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"jsdr.eval: {path}: dropped {sum(partial.values())} samples of {len(partial)} problem(s) with fewer "
            f"than {n} (a batch stopped mid-write); their batch is sampled again")
    return {k: c for k, c in counts.items() if c == n}


def summarize_file(path: Path, n: int) -> dict:
    """Scores from samples.jsonl (only problems with all n samples)."""
    per: dict[tuple[str, int], dict] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            p = per.setdefault((r["benchmark"], r["problem_index"]), {
                "benchmark": r["benchmark"], "correct": [], "answers": [], "lengths": [], "errors": []})
            p["correct"].append(bool(r["correct"]))
            p["answers"].append(r["extracted"])
            p["lengths"].append(int(r["length"]))
            p["errors"].append(r["error"])
    complete = [p for p in per.values() if len(p["correct"]) == n]
    return summarize(complete)


def format_table(results: dict) -> str:
    rows = list(results["benchmarks"].items()) + [("overall", results["overall"])]
    cols = [k for k in rows[0][1] if k not in ("n_samples", "grader_errors")]
    for _, r in rows:
        cols += [k for k in r if k not in cols and k not in ("n_samples", "grader_errors")]
    width = max(len(n) for n, _ in rows) + 2
    head = "benchmark".ljust(width) + "".join(c.rjust(12) for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("".rjust(12))
            elif c.startswith(("avg@", "pass@", "maj@")):
                cells.append(f"{100 * v:.1f}".rjust(12))
            elif isinstance(v, float):
                cells.append(f"{v:.1f}".rjust(12))
            else:
                cells.append(str(v).rjust(12))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def load_model(cfg: EvalConfig, mesh, progress: bool = True, model_dir: str | Path | None = None, tokenizer=None,
               rules: dict | None = None):
    """(params with the adapter merged, model config, tokenizer, model directory)."""
    opened = run.open_model(cfg.model, mesh=mesh, rules=rules, dtype=cfg.dtype, tokenizer=cfg.tokenizer,
                            directory=None if model_dir is None else str(model_dir), tokenizer_obj=tokenizer,
                            progress=progress)
    params = run.merge_adapter(opened, cfg.adapter) if cfg.adapter else opened.params
    return params, opened.config, opened.tokenizer, opened.directory


def _render_prompts(tok, items, thinking: bool, prompt: str = EVAL_TEMPLATE) -> list[list[int]]:
    try:
        templates = PromptTemplates(student=prompt)
        return [render_prompt(tok, student_messages(r["problem"], templates), thinking) for _, _, r in items]
    except PromptError as e:  # e.g. a tokenizer without a chat template
        raise CheckpointError(str(e)) from e


def evaluate(cfg: EvalConfig, progress: bool = True, log=print) -> dict:
    # every process runs this (SPMD): all sample together; process 0 alone prints and writes the files
    log, progress = dist.quiet_unless_main(log), progress and dist.is_main()
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.effective_rules(cfg.mesh)
    benches = _load_benchmarks(cfg)
    adapter_hash = adapter_sha256(cfg.adapter) if cfg.adapter else None
    model_dir = run.model_dir_of(cfg.model, progress)
    tok = hf.load_tokenizer(cfg.tokenizer or model_dir)  # failures: one-line CheckpointErrors
    items = [(name, i, r) for name, recs in benches for i, r in enumerate(recs)]
    prompts = _render_prompts(tok, items, cfg.thinking, cfg.prompt)
    stops = stop_token_ids(tok, cfg.sampling.stop_token_ids)
    key = eval_key(cfg, benches, model_dir, tok, prompts, stops, adapter_hash)
    out_dir = output_dir_of(cfg, key)
    dist.on_main(lambda: prepare_output_dir(out_dir, key, cfg, log), "prepare the output directory")  # refuses
    samples_path = out_dir / SAMPLES_FILE                                                   # before any weight loads
    n = cfg.sampling.n
    done = dist.on_main(lambda: read_done(samples_path, n, log), "read the samples done")

    params, mcfg, tok, _ = load_model(cfg, mesh, progress, model_dir=model_dir, tokenizer=tok, rules=rules)
    sc = dataclasses.replace(cfg.sampling, stop_token_ids=stops)
    sampler = Sampler(Model(mcfg), mesh=mesh, pad_id=run.pad_id(tok), rules=rules,
                      detokenize=lambda ids: tok.decode(ids, skip_special_tokens=False))

    # every problem draws with its own key (seed, benchmark, index), so its samples do not depend on
    # which problems share a sampler call: a resumed run draws what an unbroken one would
    todo_items = [j for j in range(len(items)) if items[j][:2] not in done]
    bp = cfg.batch_prompts or (len(todo_items) if sc.engine == "paged" else DENSE_BATCH_PROMPTS)
    calls = [todo_items[s:s + bp] for s in range(0, len(todo_items), max(bp, 1))]
    for batch in calls:  # bad input (a prompt beyond the context, a KV budget too small) fails before any write
        sampler.check(params, [prompts[j] for j in batch], sc)
    total = len(items)
    log(f"jsdr.eval: {total} problems x {n} samples over {', '.join(b for b, _ in benches)}; "
        f"{total - len(todo_items)} already done in {samples_path} (key {key_hash(key)}); "
        f"{sc.engine} engine, {len(calls)} sampler call{'s' if len(calls) != 1 else ''}")
    bar = tqdm(total=len(todo_items) * n, unit="sample", disable=not progress, dynamic_ncols=True)
    t0, counts = time.time(), {"tokens": 0, "samples": 0}
    try:
        with (samples_path.open("a") if dist.is_main() else open(os.devnull, "w")) as f:
            def write(batch, i, out):  # all n samples of problem batch[i] are finished
                name, idx, r = items[batch[i]]
                reasons = out.finish_reason_str
                lines = []
                texts = [tok.decode(out.tokens[row, :int(out.lengths[row])].tolist(), skip_special_tokens=True)
                         for row in range(n)]
                grades = dist.shared_map(lambda t: grade(t, r["answer"], method=cfg.grader), texts, "grades")
                for row, (text, g) in enumerate(zip(texts, grades)):  # each sample graded once, on one process
                    length = int(out.lengths[row])
                    lines.append(json.dumps({
                        "benchmark": name, "problem_index": idx, "sample_index": row, "prompt": r["problem"],
                        "response": text, "answer": r["answer"], "extracted": g.extracted,
                        "correct": bool(g.correct), "error": g.error, "length": length,
                        "finish_reason": reasons[row]}) + "\n")
                    counts["tokens"] += length
                f.write("".join(lines))
                f.flush()
                counts["samples"] += n
                bar.update(n)
                show({})

            def show(engine_state):
                dt = max(time.time() - t0, 1e-9)
                post = {"samples/s": f"{counts['samples'] / dt:.2f}"}
                if engine_state:
                    post.update({"tokens/s": f"{engine_state['tokens_per_s']:.0f}",
                                 "running": engine_state["running"], "waiting": engine_state["waiting"],
                                 "pages": f"{engine_state['pages_in_use']}/{engine_state['pages_total']}"})
                else:
                    post["tokens/s"] = f"{counts['tokens'] / dt:.0f}"
                bar.set_postfix(post, refresh=False)

            for batch in calls:
                keys = np.stack([problem_key(cfg.seed, *items[j][:2]) for j in batch])
                with sharding.use_mesh(mesh, rules):
                    sampler.generate(params, None, [prompts[j] for j in batch], sc, prompt_keys=keys,
                                     progress=show, on_prompt_done=lambda i, out, b=batch: write(b, i, out))
    except KeyboardInterrupt:
        hint = "run the same command again to resume" if cfg.resume else "rerun with --resume=true to continue"
        raise EvalInterrupted(samples_path, (total - len(todo_items)) * n + counts["samples"], hint) from None
    finally:
        bar.close()

    def score() -> dict:
        results = summarize_file(samples_path, n)
        results["key"] = key_hash(key)
        results["output_dir"] = str(out_dir)
        results["config"] = config.to_dict(cfg)
        _write_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=2))
        return results

    results = dist.on_main(score, "score the samples")
    log(format_table(results))
    log(f"samples: {samples_path}\nscores: {out_dir / RESULTS_FILE}\nsettings: {out_dir / KEY_FILE}")
    return results


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str]) -> EvalConfig:
    """EvalConfig from `[--config FILE | --config=FILE] [--key=value ...]` (the file: YAML of EvalConfig keys)."""
    path, rest = config.split_config_arg(argv)
    return config.load(EvalConfig, path, rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("Options (table 5 defaults):")
        print(config.help_text(EvalConfig))
        return 0
    try:
        cfg = parse_args(argv)
        dist.initialize(cfg.dist)  # before anything touches a device
        evaluate(cfg)
    except KeyboardInterrupt as e:
        if isinstance(e, EvalInterrupted):
            msg = (f"interrupted; the {e.n_written} samples written so far are kept in {e.samples_path}; "
                   f"{e.resume_hint}")
        else:
            msg = "interrupted before sampling started"
        print(f"jsdr.eval: {msg}", file=sys.stderr)
        return 130
    except (JsdrError, OSError) as e:
        line, code = error_line("jsdr.eval" + dist.who(), e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            line += "; the samples written so far are kept: free some space and run the same command again to resume"
        print(line, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
