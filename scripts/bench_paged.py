"""Paged vs dense sampling engine on a long-tailed length workload, at equal or lower KV memory.

    python scripts/bench_paged.py                  # ~3 min on 2 shared CPU cores
    python scripts/bench_paged.py --max-slots 8 16 64 --profile   # several slot counts + breakdown
    python scripts/bench_paged.py [--sequences 64 --n 1 --prompt 64 --max-new 512 --short 20 200
                                   --long-frac 0.1 --page-size 16 --kv-mib 0 --max-slots 0
                                   --decode-steps 32 --repeats 3 --hidden 256 --layers 4 --vocab 32000]

Workload. `--sequences` completions of random prompts of `--prompt` tokens (`--n` samples per
prompt; default 64 prompts x n=1, so that every sequence has its own length) from a random Qwen3
(jsdr's own init, nothing downloaded), top-p 0.95 at temperature 1. Lengths are long-tailed: a
`--long-frac` share of the sequences (default 10%: 6 of 64) runs to `--max-new`, the others stop
after a length drawn log-uniformly from `--short` (default 20..200 tokens). The lengths are drawn
once from a seeded RandomState, placed in a seeded random order, and given to both engines as the
same per-prompt `max_new_tokens` list; there are no stop tokens. Both engines therefore return
the same lengths (asserted) and the same useful tokens, and the comparison does not hinge on a
random model happening to emit some stop id at some step (which could differ between engines
after a float-level difference in attention). It costs each engine what a real long-tailed batch
(EOS at varied lengths) costs: the dense engine decodes every row until the longest row is done
(`Sampler` runs all its rows to max(max_new_tokens), then cuts each row to its limit), while the
paged engine frees a finished sequence's slot and pages and admits the next waiting sequence
(continuous batching).

Memory. Dense KV = its cache of rows x (prompt bucket + max_new) tokens (the widened cache that
XLA's memory analysis puts in the decode program's "temp"; the whole temp, which adds the loop's
token/logprob buffers and logits, is printed too). Paged KV = the pool (`pool_bytes_per_device`),
sized by `--kv-mib` (default 0: half the dense KV cache), never more than the dense KV cache. The
paged engine's peak pages in use are printed as well.

Slots. `--max-slots` (default 0: the engine's own choice, 16 on CPU; several values give one paged
row each) caps the sequences the paged engine decodes at once. `--max-slots 64` decodes as many
rows as the dense engine, and on CPU each of its steps then costs more than a dense step (its XLA
attention gathers the pages into a copy per layer and step, which leaves the cache at that size),
so it shows the paged engine slower than the dense one here: the reason CPU's automatic cap is 16.

Timing. One warm-up (compiling) call per engine, then `--repeats` timed calls per engine,
interleaved (the order rotates and reverses every round), so a shared machine's varying load hits
all alike. Useful tokens = sum of the returned lengths (the same for every engine). Reported:
median, min and max tokens/s per engine, the ratio paged/dense of the medians and of the fastest
runs, and the paged engine's slots / decode segments / preemptions / peak pages in use.

`--profile` adds a breakdown of one more call per paged setting: time blocked in each of the
engine's jitted programs (decode segments, prefill, slot updates, page copies; each call timed to
`block_until_ready`) against the call's wall time (the rest is the host scheduler), and the decode
segments split into those run while sequences were waiting for a slot and the tail after the
queue drained, with the slot occupancy (active slot-steps / slots x steps) of each.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import add_model_args  # noqa: E402


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
    ap.add_argument("--max-new", type=int, default=512, help="length of the long tail")
    ap.add_argument("--short", type=int, nargs=2, default=(20, 200), metavar=("LO", "HI"),
                    help="the other lengths: log-uniform in [LO, HI]")
    ap.add_argument("--long-frac", type=float, default=0.1, help="share of sequences that run to --max-new")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-mib", type=float, default=0.0,
                    help="paged KV pool per device in MiB (0 = half the dense KV cache); at most the dense KV")
    ap.add_argument("--max-slots", type=int, nargs="+", default=[0],
                    help="paged engine: sequences decoded at once (several: one paged row each)")
    ap.add_argument("--decode-steps", type=int, default=32, help="paged engine: decode steps per segment")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine (after one warm-up)")
    add_model_args(ap, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2)
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
                          seed=args.seed, page_size=args.page_size, decode_steps=args.decode_steps)
    dense_sc = dataclasses.replace(base, engine="dense")

    # ---- memory: the dense engine's KV cache (from its decode program) and the paged pool
    ma = sampler.dense.memory_analysis(params, None, num_prompts, args.prompt, dense_sc)["decode"]
    bucket = next(b for b in sorted(sampler.dense.prompt_buckets) if b >= args.prompt)
    rows = sampler.dense.batch_bucket(num_prompts) * args.n
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(np.float32).itemsize
    dense_kv = rows * (bucket + args.max_new) * per_token
    assert dense_kv <= ma["temp"], (dense_kv, ma)  # the widened cache lives in the decode temp
    kv_bytes = min(dense_kv, args.kv_mib * 2 ** 20 if args.kv_mib > 0 else dense_kv / 2)
    configs = {"dense": dense_sc}
    for m in args.max_slots:
        configs[f"paged max_slots={m}"] = dataclasses.replace(base, engine="paged", kv_cache_gb=kv_bytes / 2 ** 30,
                                                              max_slots=m)
    pagednames = [e for e in configs if e != "dense"]

    lens = np.asarray(limits)
    short = lens[lens < args.max_new]
    print(f"model: Qwen3 hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"({cfg.num_params() / 1e6:.1f}M params), random init; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print(f"workload: {num_prompts} prompts x n={args.n} = {args.sequences} sequences, prompt {args.prompt} "
          f"tokens, top_p={args.top_p} T={args.temperature}, no stop tokens; per-prompt max_new_tokens: "
          f"{int((lens == args.max_new).sum())} x {args.max_new}, the rest {short.min()}..{short.max()} "
          f"(median {int(np.median(short))}); useful tokens {useful}; the dense engine decodes {rows} rows x "
          f"{args.max_new} = {rows * args.max_new}")
    print(f"paged: page_size={args.page_size} decode_steps={args.decode_steps} "
          f"kv_cache_gb={kv_bytes / 2 ** 30:.4f} ({kv_bytes / dense_kv:.2f} x the dense KV cache)")

    want = np.repeat(lens, args.n)

    def run(name):
        sc = configs[name]
        t0 = time.perf_counter()
        out = sampler.generate(params, None, prompts, sc, max_new_tokens=limits)
        dt = time.perf_counter() - t0
        assert (out.lengths == want).all(), (name, out.lengths, want)
        stats = dict(sampler.last_stats) if sc.engine == "paged" else {}
        return dt, out, stats

    # ---- warm-up (compiles), then interleaved timed calls (the order rotates every round)
    first, outs = {}, {}
    for name in configs:
        first[name], outs[name], _ = run(name)
    times = collections.defaultdict(list)
    stats = {}
    names = list(configs)
    for i in range(args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in (order if i % 2 == 0 else order[::-1]):
            dt, _, st = run(name)
            times[name].append(dt)
            if st:
                stats[name] = st
    compiles = sampler.num_compiles

    def tps(t):
        return useful / t

    mib = lambda b: b / 2 ** 20
    med = {e: statistics.median(times[e]) for e in times}
    print()
    print(f"{args.repeats} timed calls per engine after a warm-up call, interleaved (first calls incl. compile: "
          + ", ".join(f"{e} {first[e]:.1f} s" for e in configs) + f"); {compiles} programs compiled")
    for e in pagednames:
        a, b = outs[e], outs["dense"]
        same_rows = sum(bool((a.tokens[r, :k] == b.tokens[r, :k]).all()) for r, k in enumerate(want))
        same_pos = sum(int((a.tokens[r, :k] == b.tokens[r, :k]).sum()) for r, k in enumerate(want)) / want.sum()
        print(f"{e} vs dense: {same_rows} of {len(want)} rows token-identical, {same_pos * 100:.1f}% of positions")
    print()
    print("| engine | tokens/s median | min / max | KV memory MiB | ratio paged/dense: median, best "
          "| slots / segments / preempted | peak pages in use |")
    print("|---|---|---|---|---|---|---|")
    for e in pagednames:
        st = stats[e]
        pool = st["pool_bytes_per_device"]
        page_bytes = pool / st["pages_per_shard"]
        r_med = med["dense"] / med[e]
        r_best = min(times["dense"]) / min(times[e])
        print(f"| {e} | {tps(med[e]):.0f} | {tps(max(times[e])):.0f} / {tps(min(times[e])):.0f} "
              f"| {mib(pool):.1f} (pool) | **{r_med:.2f}x**, {r_best:.2f}x "
              f"| {st['slots']} / {st['segments']} / {st['preempted']} "
              f"| {st['peak_pages']} of {st['pages_per_shard'] - 1} "
              f"({mib(st['peak_pages'] * page_bytes):.1f} MiB) |")
    print(f"| dense | {tps(med['dense']):.0f} | {tps(max(times['dense'])):.0f} / {tps(min(times['dense'])):.0f} "
          f"| {mib(dense_kv):.1f} (cache; decode temp {mib(ma['temp']):.1f}) | 1 | {rows} rows / - / - | - |")
    print()
    print("seconds per call: " + "; ".join(f"{e}: " + ", ".join(f"{t:.2f}" for t in times[e]) for e in configs))

    if args.profile:
        for e in pagednames:
            profile(sampler, params, prompts, configs[e], limits, useful, e)


def profile(sampler, params, prompts, sc, limits, useful, label):
    """One more paged call with every jitted program call timed to completion, and the decode
    segments split into those that ran while sequences were waiting for a slot and the tail after
    the queue drained (where the empty slots of finished sequences are still computed)."""
    import jax

    prog = sampler.engine(1).programs
    spent = collections.defaultdict(float)
    calls = collections.Counter()
    segs = []  # per decode segment: (seconds, steps run, active slot-steps, slots)
    waiting = []  # sequences waiting after each segment (progress callback)
    saved = {}
    for part in ("decode", "prefill", "update", "copy"):
        fn = getattr(prog, part)
        saved[part] = fn

        def timed(*a, _fn=fn, _part=part, **k):
            if _part == "decode":
                before = np.asarray(a[3].step)  # (params, lora, pools, slots, ...)
            t0 = time.perf_counter()
            out = jax.block_until_ready(_fn(*a, **k))
            dt = time.perf_counter() - t0
            spent[_part] += dt
            calls[_part] += 1
            if _part == "decode":
                ran = np.asarray(out[2].step) - before
                segs.append((dt, int(ran.max()), int(ran.sum()), len(ran)))
            return out
        setattr(prog, part, timed)
    try:
        t0 = time.perf_counter()
        sampler.generate(params, None, prompts, sc, max_new_tokens=limits,
                         progress=lambda p: waiting.append(p["waiting"]))
        wall = time.perf_counter() - t0
    finally:
        for part, fn in saved.items():
            setattr(prog, part, fn)
    st = sampler.last_stats
    print()
    print(f"profile of one {label} call: {wall:.2f} s wall, {useful / wall:.0f} tokens/s, {st['segments']} segments")
    print("| part | calls | seconds | share of wall | ms per call |")
    print("|---|---|---|---|---|")
    for part in ("decode", "prefill", "update", "copy"):
        if calls[part]:
            print(f"| {part} | {calls[part]} | {spent[part]:.2f} | {spent[part] / wall * 100:.1f}% "
                  f"| {spent[part] / calls[part] * 1e3:.1f} |")
    host = wall - sum(spent.values())
    print(f"| host (scheduler, transfers) | - | {host:.2f} | {host / wall * 100:.1f}% "
          f"| {host / max(1, st['segments']) * 1e3:.1f} per segment |")
    # decode segments before / after the queue drained (waiting before segment i = after segment i-1)
    queued = [True] + [w > 0 for w in waiting[:-1]]
    for name, pick in (("queue not empty", True), ("tail (queue empty)", False)):
        sel = [s for s, q in zip(segs, queued) if q == pick]
        if not sel:
            continue
        sec, run, act, slots = tuple(sum(x[j] for x in sel) for j in range(3)) + (sel[0][3],)
        print(f"| decode, {name} | {len(sel)} segments, {run} steps | {sec:.2f} | {sec / wall * 100:.1f}% "
              f"| {sec / max(run, 1) * 1e3:.2f} per step of {slots} slots; occupancy "
              f"{act / max(run * slots, 1) * 100:.0f}% |")


if __name__ == "__main__":
    main()
