"""Paged vs dense sampling engine on a long-tailed length workload, at equal or lower KV memory.

    python scripts/bench_paged.py [--sequences 64 --n 1 --prompt 64 --max-new 1024 --short 20 200
                                   --long-frac 0.1 --page-size 16 --kv-mib 0 --max-slots 16
                                   --decode-steps 32 --repeats 3 --hidden 256 --layers 4 --vocab 32000]

Workload. `--sequences` completions of random prompts of `--prompt` tokens (`--n` samples per
prompt; default 64 prompts x n=1 so that every sequence has its own length) from a random Qwen3
(jsdr's own init, nothing downloaded), top-p 0.95 at temperature 1. Lengths are long-tailed: a
`--long-frac` share of the sequences (default 10%, i.e. 6 of 64) runs to `--max-new`, the others
stop after a length drawn log-uniformly from `--short` (default 20..200 tokens). The lengths are
drawn once from a seeded RandomState, placed in a seeded random order, and passed to both engines
as the same per-prompt `max_new_tokens` list; there are no stop tokens. So both engines produce the
same tokens of the same lengths (checked: lengths must match exactly; the share of identical tokens
is printed), and the comparison does not hinge on a random model happening to emit some stop id.
This is what a real long-tailed batch (EOS at varied lengths) costs each engine: the dense engine
decodes every row of the batch until the longest row is done (that is what a dense sampler does;
it then cuts each row to its limit), while the paged engine frees a finished sequence's slot and
pages and admits the next one (continuous batching), and its attention reads only the pages in use.

Memory. Dense KV = its cache of rows x (prompt bucket + max_new) tokens (the widened cache that
XLA's memory analysis puts in the decode program's "temp"; the whole temp, which adds the loop's
token/logprob buffers and logits, is printed too). Paged KV = the pool (`pool_bytes_per_device`),
sized by `--kv-mib` (default 0: half the dense KV cache), never more than the dense KV cache. The
paged engine's peak pages in use are printed as well.

Timing. One warm-up (compiling) call per engine, then `--repeats` timed calls per engine,
interleaved (paged, dense, dense, paged, ...), so a shared machine's varying load hits both alike.
Useful tokens = sum of the returned lengths (the same for both engines). Reported: median, min and
max tokens/s per engine, the ratio paged/dense of the medians and of the fastest runs, and the
paged engine's slots / decode segments / preemptions / peak pages.

`--profile` adds a breakdown of one more paged call: time spent blocked in each of the engine's
jitted programs (decode segments, prefill, slot updates, page copies; each call timed to
`block_until_ready`) against the call's wall time; the rest is the host scheduler.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def long_tailed_lengths(count: int, max_new: int, short: tuple[int, int], long_frac: float, seed: int) -> list[int]:
    """`count` lengths: round(long_frac * count) (at least 1) equal to max_new, the others
    log-uniform in [short[0], short[1]] (capped at max_new), in a seeded random order."""
    rs = np.random.RandomState(seed)
    n_long = max(1, int(round(long_frac * count)))
    lo, hi = math.log(short[0]), math.log(short[1])
    shorts = np.exp(rs.uniform(lo, hi, count - n_long)).round().astype(int)
    lengths = np.concatenate([np.minimum(shorts, max_new), np.full(n_long, max_new)])
    return [int(x) for x in rs.permutation(lengths)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64, help="completions in the batch (prompts x n)")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (lengths are per prompt)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--max-new", type=int, default=1024, help="length of the long tail")
    ap.add_argument("--short", type=int, nargs=2, default=(20, 200), metavar=("LO", "HI"),
                    help="the other lengths: log-uniform in [LO, HI]")
    ap.add_argument("--long-frac", type=float, default=0.1, help="share of sequences that run to --max-new")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-mib", type=float, default=0.0,
                    help="paged KV pool per device in MiB (0 = half the dense KV cache); at most the dense KV")
    ap.add_argument("--max-slots", type=int, default=16, help="paged engine: sequences decoded at once")
    ap.add_argument("--decode-steps", type=int, default=32, help="paged engine: decode steps per segment")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine (after one warm-up)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="time the paged engine's programs vs its host side")
    args = ap.parse_args(argv)
    if args.sequences % args.n:
        ap.error(f"--sequences {args.sequences} must be a multiple of --n {args.n}")

    import jax

    from jsdr.model.params import ModelConfig
    from jsdr.model.transformer import Model, init_params
    from jsdr.sampling import Sampler, SamplingConfig

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.head_dim, qk_norm=True, max_position_embeddings=max(4096, 2 * (
                          args.prompt + args.max_new)))
    params = init_params(cfg, jax.random.PRNGKey(args.seed))
    num_prompts = args.sequences // args.n
    rs = np.random.RandomState(args.seed)
    prompts = list(rs.randint(1, args.vocab, (num_prompts, args.prompt)).astype(np.int32))
    limits = long_tailed_lengths(num_prompts, args.max_new, tuple(args.short), args.long_frac, args.seed + 1)
    useful = args.n * sum(limits)
    sampler = Sampler(Model(cfg), pad_id=0)

    base = SamplingConfig(temperature=args.temperature, top_p=args.top_p, n=args.n, max_new_tokens=args.max_new,
                          seed=args.seed, page_size=args.page_size, max_slots=args.max_slots,
                          decode_steps=args.decode_steps)
    dense_sc = dataclasses.replace(base, engine="dense")

    # ---- memory: the dense engine's KV cache (from its decode program) and the paged pool
    ma = sampler.dense.memory_analysis(params, None, num_prompts, args.prompt, dense_sc)["decode"]
    bucket = next(b for b in sorted(sampler.dense.prompt_buckets) if b >= args.prompt)
    rows = sampler.dense.batch_bucket(num_prompts) * args.n
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(np.float32).itemsize
    dense_kv = rows * (bucket + args.max_new) * per_token
    assert dense_kv <= ma["temp"], (dense_kv, ma)  # the widened cache lives in the decode temp
    kv_bytes = min(dense_kv, args.kv_mib * 2 ** 20 if args.kv_mib > 0 else dense_kv / 2)
    paged_sc = dataclasses.replace(base, engine="paged", kv_cache_gb=kv_bytes / 2 ** 30)

    lens = np.asarray(limits)
    print(f"model: Qwen3 hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"({cfg.num_params() / 1e6:.1f}M params), random init; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}")
    print(f"workload: {num_prompts} prompts x n={args.n} = {args.sequences} sequences, prompt {args.prompt} "
          f"tokens, top_p={args.top_p} T={args.temperature}, no stop tokens; per-prompt max_new_tokens: "
          f"{int((lens == args.max_new).sum())} x {args.max_new}, the rest {lens[lens < args.max_new].min()}.."
          f"{lens[lens < args.max_new].max()} (median {int(np.median(lens[lens < args.max_new]))}); "
          f"useful tokens {useful}, dense decodes {rows} rows x {args.max_new} = {rows * args.max_new}")
    print(f"paged: page_size={args.page_size} max_slots={args.max_slots} decode_steps={args.decode_steps} "
          f"kv_cache_gb={paged_sc.kv_cache_gb:.4f}")

    def run(engine):
        sc = paged_sc if engine == "paged" else dense_sc
        want = np.repeat(lens, args.n)
        t0 = time.perf_counter()
        if engine == "paged":
            out = sampler.generate(params, None, prompts, sc, max_new_tokens=limits)
        else:  # every row to the longest limit, then cut: what Sampler._dense does with per-prompt limits
            out = sampler.generate(params, None, prompts, sc)  # (its in-place cut fails on read-only arrays)
            out.lengths = np.minimum(out.lengths, want)
        dt = time.perf_counter() - t0
        assert (out.lengths == want).all(), (engine, out.lengths, want)
        stats = dict(sampler.last_stats) if engine == "paged" else {}
        return dt, out, stats

    # ---- warm-up (compiles), then interleaved timed calls
    first = {}
    outs = {}
    for engine in ("paged", "dense"):
        first[engine], outs[engine], _ = run(engine)
    same = float(np.mean([(a[:k] == b[:k]).mean() for a, b, k in
                          zip(outs["paged"].tokens, outs["dense"].tokens, outs["paged"].lengths)]))
    times = collections.defaultdict(list)
    stats = {}
    for i in range(args.repeats):
        for engine in (("paged", "dense") if i % 2 == 0 else ("dense", "paged")):
            dt, _, st = run(engine)
            times[engine].append(dt)
            if st:
                stats = st
    compiles = sampler.num_compiles

    def tps(t):
        return useful / t

    mib = lambda b: b / 2 ** 20
    med = {e: statistics.median(times[e]) for e in times}
    print()
    print(f"{args.repeats} timed calls per engine after a warm-up call (first calls: paged {first['paged']:.1f} s, "
          f"dense {first['dense']:.1f} s incl. compile); {compiles} programs compiled; tokens identical in "
          f"{same * 100:.1f}% of positions")
    print()
    print("| engine | tokens/s median | min / max | KV memory MiB | ratio paged/dense (median, best) "
          "| slots / segments / preempted | peak pages |")
    print("|---|---|---|---|---|---|---|")
    pool = stats["pool_bytes_per_device"]
    page_bytes = pool / stats["pages_per_shard"]
    r_med = med["dense"] / med["paged"]
    r_best = min(times["dense"]) / min(times["paged"])
    print(f"| paged | {tps(med['paged']):.0f} | {tps(max(times['paged'])):.0f} / {tps(min(times['paged'])):.0f} "
          f"| {mib(pool):.1f} (pool; peak in use {mib(stats['peak_pages'] * page_bytes):.1f}) "
          f"| **{r_med:.2f}x**, {r_best:.2f}x | {stats['slots']} / {stats['segments']} / {stats['preempted']} "
          f"| {stats['peak_pages']} of {stats['pages_per_shard'] - 1} |")
    print(f"| dense | {tps(med['dense']):.0f} | {tps(max(times['dense'])):.0f} / {tps(min(times['dense'])):.0f} "
          f"| {mib(dense_kv):.1f} (cache; decode temp {mib(ma['temp']):.1f}) | 1 | {rows} rows / 1 / 0 | - |")
    print()
    print("seconds per call: " + "; ".join(f"{e} " + ", ".join(f"{t:.2f}" for t in times[e]) for e in times))

    if args.profile:
        profile(sampler, params, prompts, paged_sc, limits, useful)


def profile(sampler, params, prompts, sc, limits, useful):
    """One more paged call with every jitted program call timed to completion."""
    import jax

    engine = sampler.engine(1)
    prog = engine.programs
    spent = collections.defaultdict(float)
    calls = collections.Counter()
    steps = collections.Counter()  # decode steps run, active slot-steps
    saved = {}
    for name in ("decode", "prefill", "update", "copy"):
        fn = getattr(prog, name)
        saved[name] = fn

        def timed(*a, _fn=fn, _name=name, **k):
            if _name == "decode":
                before = np.asarray(a[3].step)  # (params, lora, pools, slots, ...)
            t0 = time.perf_counter()
            out = jax.block_until_ready(_fn(*a, **k))
            spent[_name] += time.perf_counter() - t0
            calls[_name] += 1
            if _name == "decode":
                k_ = np.asarray(out[2].step) - before
                steps["run"] += int(k_.max())
                steps["active"] += int(k_.sum())
                steps["slots"] = len(k_)
            return out
        setattr(prog, name, timed)
    try:
        t0 = time.perf_counter()
        sampler.generate(params, None, prompts, sc, max_new_tokens=limits)
        wall = time.perf_counter() - t0
    finally:
        for name, fn in saved.items():
            setattr(prog, name, fn)
    st = sampler.last_stats
    print()
    print(f"profile of one paged call: {wall:.2f} s wall, {useful / wall:.0f} tokens/s, {st['segments']} segments")
    print("| part | calls | seconds | share of wall | ms per call |")
    print("|---|---|---|---|---|")
    for name in ("decode", "prefill", "update", "copy"):
        if calls[name]:
            print(f"| {name} | {calls[name]} | {spent[name]:.2f} | {spent[name] / wall * 100:.1f}% "
                  f"| {spent[name] / calls[name] * 1e3:.1f} |")
    if steps["run"]:
        print(f"| (decode) | {steps['run']} steps | - | - | {spent['decode'] / steps['run'] * 1e3:.2f} per step of "
              f"{steps['slots']} slots; slot occupancy {steps['active'] / (steps['run'] * steps['slots']) * 100:.0f}% |")
    host = wall - sum(spent.values())
    print(f"| host (scheduler, transfers) | - | {host:.2f} | {host / wall * 100:.1f}% "
          f"| {host / max(1, st['segments']) * 1e3:.1f} per segment |")


if __name__ == "__main__":
    main()
