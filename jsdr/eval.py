"""`python -m jsdr.eval --model PATH_OR_ID [--adapter PEFT_DIR] --benchmarks aime24,aime25,hmmt25,amo`

Sampled evaluation with the paper's table 5 settings as defaults (38,912 new tokens, thinking on,
temperature 1.0, top-p 0.95, top-k off, min-p 0, presence penalty 0, 16 samples per prompt).

Every sample is appended to `<output_dir>/samples.jsonl` as soon as its batch finishes (prompt,
response, extracted answer, correctness, grader error, length, finish reason), so a stopped run
resumes where it stopped: problems that already have all their samples are skipped. The scores
(Avg@n, unbiased pass@k, maj@n, mean response length, per benchmark and the unweighted average over
benchmarks) are computed from that file, printed as a table and written to `results.json`.

A benchmark is a registered name (aime24, aime25, hmmt25, amo, math500; loaded from the hub),
`toy` (the embedded toy task's held-out split), `NAME:PATH` (a registered benchmark from a local copy,
or any local .jsonl/.json/.parquet file with the fields given by --problem_field/--answer_field).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import config as C
from jsdr import sharding as S
from jsdr.config import ConfigError, MeshSection, field
from jsdr.sampling import SamplingConfig

TABLE5 = SamplingConfig(temperature=1.0, top_p=0.95, top_k=-1, min_p=0.0, presence_penalty=0.0, n=16,
                        max_new_tokens=38912)


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
    sampling: SamplingConfig = field(TABLE5, "")
    batch_prompts: int = field(8, "prompts per sampler call (each with sampling.n samples)")
    dtype: Literal["bfloat16", "float32"] = field("bfloat16", "weights and KV-cache dtype")
    grader: Literal["math_verify", "string"] = field("math_verify", "how \\boxed{} answers are graded")
    output_dir: str = field("eval/{model}", "where samples.jsonl and results.json go ({model}: its last path part)")
    resume: bool = field(True, "skip problems that already have all their samples in samples.jsonl")
    seed: int = field(0, "sampling seed (each batch folds in its position)")
    mesh: MeshSection = field(MeshSection(), "")

    def __post_init__(self):
        C.check(len(self.benchmarks) > 0, "benchmarks", "give at least one benchmark")
        C.check(self.batch_prompts > 0, "batch_prompts", "must be > 0")
        C.check(self.limit is None or self.limit > 0, "limit", "must be > 0 or None")


# ---------------------------------------------------------------------------------------------
# benchmarks


def load_benchmark(entry: str, cfg: EvalConfig) -> tuple[str, list[dict]]:
    """(name, records with problem/answer) of one --benchmarks entry."""
    from jsdr.data.datasets import BENCHMARKS, load_records, load_spec
    name, _, path = entry.partition(":")
    if name == "toy" and not path:
        from jsdr.data import toy
        return "toy", toy.toy_benchmark(cfg.limit or 128)
    if name in BENCHMARKS:
        return name, load_spec(name, path=path or None, limit=cfg.limit)
    if not path:
        raise ConfigError(f"benchmarks: unknown benchmark {entry!r}; use one of {', '.join(BENCHMARKS)}, toy, "
                          f"or NAME:PATH for a local file")
    fields = {"problem": cfg.problem_field, "answer": cfg.answer_field}
    return name, load_records(path, split="test", fields=fields, limit=cfg.limit)


# ---------------------------------------------------------------------------------------------
# the run


def _done_problems(path: Path, n: int) -> dict[tuple[str, int], int]:
    """{(benchmark, problem index): samples on file} of an earlier run's samples.jsonl."""
    counts: dict[tuple[str, int], int] = {}
    if not path.exists():
        return counts
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key = (r["benchmark"], int(r["problem_index"]))
        except (json.JSONDecodeError, KeyError, ValueError):
            raise ConfigError(f"{path} line {i}: not a jsdr sample record; remove the file or pass "
                              f"--resume=false") from None
        counts[key] = counts.get(key, 0) + 1
    return counts


def summarize_file(path: Path, n: int) -> dict:
    """Scores from samples.jsonl (only problems with all n samples)."""
    from jsdr.metrics import summarize
    per: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        p = per.setdefault((r["benchmark"], r["problem_index"]), {"benchmark": r["benchmark"], "correct": [],
                                                                   "answers": [], "lengths": [], "errors": []})
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


def load_model(cfg: EvalConfig, mesh, progress: bool = True):
    """(params with the adapter merged, model config, tokenizer, model directory)."""
    from transformers import AutoTokenizer

    from jsdr.model import hf
    from jsdr.model.lora import load_peft, merge
    model_dir = cfg.model
    if model_dir == "toy":
        from jsdr.data.toy import ensure_toy_assets
        model_dir = str(ensure_toy_assets(progress=progress))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or model_dir)
    dtype = jnp.dtype(cfg.dtype)
    with S.use_mesh(mesh):
        params, mcfg, _ = hf.load_params(model_dir, mesh=mesh, dtype=dtype, progress=progress)
        if cfg.adapter:
            lora, lcfg = load_peft(cfg.adapter, mcfg, dtype=jnp.float32, mesh=mesh)
            params = jax.jit(merge, static_argnums=2)(params, lora, lcfg.scale)
    return params, mcfg, tokenizer, model_dir


def evaluate(cfg: EvalConfig, progress: bool = True, log=print) -> dict:
    from tqdm import tqdm

    from jsdr.data.prompts import render_prompt, stop_token_ids, student_messages
    from jsdr.data.rewards import grade
    from jsdr.sampling import Sampler

    mesh = S.make_mesh(S.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor),
                       jax.devices()[:cfg.mesh.num_devices] if cfg.mesh.num_devices else None)
    benches = [load_benchmark(b, cfg) for b in cfg.benchmarks]
    params, mcfg, tok, model_dir = load_model(cfg, mesh, progress)
    out_dir = Path(cfg.output_dir.format(model=Path(cfg.model.rstrip("/")).name))
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    n = cfg.sampling.n
    if not cfg.resume and samples_path.exists():
        samples_path.unlink()
    done = _done_problems(samples_path, n)
    if any(c != n for c in done.values()):  # a batch cut mid-write: drop its partial problems
        keep = [ln for ln in samples_path.read_text().splitlines() if ln.strip() and
                done[(json.loads(ln)["benchmark"], json.loads(ln)["problem_index"])] == n]
        samples_path.write_text("".join(ln + "\n" for ln in keep))
        done = {k: c for k, c in done.items() if c == n}
    sc = dataclasses.replace(cfg.sampling, stop_token_ids=stop_token_ids(tok, cfg.sampling.stop_token_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    sampler = Sampler(mcfg, mesh=mesh, pad_id=int(pad))

    todo = [(name, i, r) for name, recs in benches for i, r in enumerate(recs) if (name, i) not in done]
    total = sum(len(r) for _, r in benches)
    log(f"jsdr.eval: {total} problems x {n} samples over {', '.join(b for b, _ in benches)}; "
        f"{total - len(todo)} already done in {samples_path}")
    bar = tqdm(total=len(todo) * n, unit="sample", disable=not progress, dynamic_ncols=True)
    t0, n_tokens, n_samples = time.time(), 0, 0
    with samples_path.open("a") as f:
        for start in range(0, len(todo), cfg.batch_prompts):
            chunk = todo[start:start + cfg.batch_prompts]
            prompts = [render_prompt(tok, student_messages(r["problem"]), cfg.thinking) for _, _, r in chunk]
            # the key depends only on the seed and the batch's first problem, not on what was resumed
            tag = zlib.crc32(f"{chunk[0][0]}:{chunk[0][1]}".encode()) & 0x7FFFFFFF
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), tag)
            with S.use_mesh(mesh):
                out = sampler.generate(params, None, prompts, sc, rng=key)
            reasons = out.finish_reason_str
            for row in range(len(chunk) * n):
                name, i, r = chunk[row // n]
                length = int(out.lengths[row])
                text = tok.decode(out.tokens[row, :length].tolist(), skip_special_tokens=True)
                g = grade(text, r["answer"], method=cfg.grader)
                f.write(json.dumps({"benchmark": name, "problem_index": i, "sample_index": row % n,
                                    "prompt": r["problem"], "response": text, "answer": r["answer"],
                                    "extracted": g.extracted, "correct": bool(g.correct), "error": g.error,
                                    "length": length, "finish_reason": reasons[row]}) + "\n")
                n_tokens += length
            f.flush()
            n_samples += len(chunk) * n
            dt = max(time.time() - t0, 1e-9)
            bar.update(len(chunk) * n)
            bar.set_postfix({"samples/s": f"{n_samples / dt:.2f}", "tokens/s": f"{n_tokens / dt:.0f}"},
                            refresh=False)
    bar.close()
    results = summarize_file(samples_path, n)
    results["config"] = C.to_dict(cfg)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log(format_table(results))
    log(f"samples: {samples_path}\nscores: {out_dir / 'results.json'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("Options (table 5 defaults):")
        print(C.help_text(EvalConfig))
        return 0
    try:
        cfg_path = None
        if "--config" in argv:
            i = argv.index("--config")
            cfg_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
        cfg = C.load(EvalConfig, cfg_path, argv)
        evaluate(cfg)
    except ConfigError as e:
        print(f"jsdr.eval: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
