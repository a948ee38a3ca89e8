"""Sampling throughput: jsdr's jitted sampler vs transformers `generate`, same model, same work.

    python scripts/bench_sampling.py [--hidden 256 --layers 4 --vocab 32000 --batch 8 --prompt 64
                                      --new 128 --top-p 0.95 --temperature 1.0 --repeats 5
                                      --engines paged dense]

A random Qwen3 model is built with transformers, saved, and loaded into jsdr. Every side generates
`--new` tokens for `--batch` prompts of `--prompt` tokens with top-p sampling (transformers with
top_k=0 so only top-p filters, no EOS so every row runs to the end; `--temperature 0` is greedy on
all sides). jsdr runs each of `--engines` (default both: "paged", the default engine -- paged KV
cache, continuous batching -- and "dense", the reference) with the same Sampler. Each side is
warmed up, then timed over `--repeats` calls: the jsdr engines in rounds (one call of each per
round, the order alternating), then transformers (`--interleave`: rounds over all sides, with a
`--pause` between calls of different frameworks; see the timing comment). Reported: median
tokens/s, jsdr's compile time (first call minus a warm call), the ratio of each jsdr engine to
transformers (of the medians and of the fastest runs), and the peak memory beyond the weights
(jsdr dense: XLA's memory analysis of its prefill and decode programs; jsdr paged: its KV pool plus
the temp of its decode program, from XLA's memory analysis; transformers: growth of the process's
peak resident set over its first generate call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import add_model_args, peak_reset, peak_since  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--logit-scale", type=float, default=1.0,
                    help="multiply the lm_head weights (>1 makes the distribution peakier)")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--engines", nargs="+", default=["paged", "dense"], choices=["paged", "dense"],
                    help="jsdr engines to time")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--interleave", action="store_true",
                    help="rounds over jsdr and transformers alike (default: jsdr rounds, then transformers)")
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds of sleep between calls of different frameworks (see the timing comment)")
    args = ap.parse_args(argv)

    import jax
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from jsdr.model import hf
    from jsdr.model.transformer import Model
    from jsdr.sampling import Sampler, SamplingConfig

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hcfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.logit_scale)
    tmp = tempfile.mkdtemp(prefix="bench_sampling_")
    model.save_pretrained(tmp)
    params, cfg, _ = hf.load_params(tmp)

    rs = np.random.RandomState(0)
    prompts = rs.randint(1, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    new_tokens = args.batch * args.new
    print(f"model: Qwen3 hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"({cfg.num_params() / 1e6:.1f}M params); batch={args.batch} prompt={args.prompt} new={args.new} "
          f"top_p={args.top_p} top_k={args.top_k} temperature={args.temperature}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"threads={torch.get_num_threads()}")

    # ---- jsdr
    sampler = Sampler(Model(cfg), pad_id=0, prompt_buckets=(args.prompt,))

    def make_sc(seed, engine):
        return SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.new, seed=seed, engine=engine)

    paged_stats = {}

    def run_jsdr(seed, engine):
        sc = make_sc(seed, engine)
        t0 = time.perf_counter()
        out = sampler.generate(params, None, list(prompts), sc)
        dt = time.perf_counter() - t0
        assert out.lengths.min() == args.new, out.lengths
        if engine == "paged":
            paged_stats.update(sampler.last_stats)
        return dt

    # ---- transformers
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    if args.temperature > 0:
        knobs = dict(do_sample=True, top_p=args.top_p, top_k=args.top_k if args.top_k > 0 else 0,
                     temperature=args.temperature)
    else:  # greedy on both sides
        knobs = dict(do_sample=False, top_p=None, top_k=None, temperature=None)

    def run_hf(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                 min_new_tokens=args.new, pad_token_id=0, eos_token_id=None, **knobs)
        dt = time.perf_counter() - t0
        assert out.shape[1] == args.prompt + args.new, out.shape
        return dt

    # ---- timing. Every side is warmed up first (jsdr: a compiling call and a warm one; transformers:
    # its first call, which also gives its memory). Then the jsdr engines run `--repeats` rounds, one
    # call of each per round in alternating order (so load swings hit both alike), and transformers
    # runs its `--repeats` calls after them. Alternating jsdr and transformers call by call in one
    # process slows both: each framework's thread pool spin-waits after its work and takes the cores
    # from the other on a 2-core machine (measured: back to back 10-100%; even with a 1 s sleep between
    # frameworks jsdr's median call was ~30% slower, 561 vs 419 ms). `--interleave` does it anyway
    # (rounds over all sides, `--pause` seconds between calls of different frameworks), for a machine
    # whose load swings more than that.
    engines = list(dict.fromkeys(args.engines))
    first, compile_s = {}, {}
    for e in engines:
        first[e] = run_jsdr(0, e)
        compile_s[e] = first[e] - run_jsdr(0, e)
    # memory beyond the weights: jsdr's from XLA's analysis of its programs (buffers the programs
    # allocate: KV cache or pool, logits, loop state); transformers' as the growth of the process's
    # peak resident set over its first generate call (the same measure as scripts/bench_forward.py)
    mem, mem_note = {}, {}
    if "dense" in engines:
        ma = sampler.memory_analysis(params, None, args.batch, args.prompt, make_sc(0, "dense"))
        mem["jsdr dense"] = max(m["temp"] + m["output"] for m in ma.values())
    if "paged" in engines:
        pool = paged_stats["pool_bytes_per_device"]
        dec = sampler.compile_paged(params, None, args.batch, args.prompt, make_sc(0, "paged"),
                                    pool_pages=paged_stats["pages_per_shard"])["decode"].memory_analysis()
        mem["jsdr paged"] = pool + dec.temp_size_in_bytes
        mem_note["jsdr paged"] = (f" (KV pool {pool / 2 ** 20:.1f} + decode temp "
                                  f"{dec.temp_size_in_bytes / 2 ** 20:.1f}; {paged_stats['slots']} slots, "
                                  f"{paged_stats['segments']} segments)")
    sides = engines + ([] if args.skip_hf else ["transformers"])
    times = {side: [] for side in sides}
    rounds = sides if args.interleave else engines
    schedule = []
    for i in range(args.repeats):
        order = rounds[i % len(rounds):] + rounds[:i % len(rounds)]
        schedule += [(side, i) for side in (order if i % 2 == 0 else order[::-1])]
    if not args.interleave and not args.skip_hf:
        schedule += [("transformers", i) for i in range(args.repeats)]
    last = None
    for side, i in schedule:
        fw = "torch" if side == "transformers" else "jax"
        if last is not None and fw != last:
            time.sleep(args.pause)
        last = fw
        if side == "transformers" and "transformers" not in mem:  # its warm-up call, before its first timed one
            base = peak_reset()
            run_hf(0)
            mem["transformers"] = peak_since(base)
        times[side].append(run_hf(i + 1) if side == "transformers" else run_jsdr(i + 1, side))
    jsdr_times, hf_times = {e: times[e] for e in engines}, times.get("transformers", [])

    def report(name, times):
        med = statistics.median(times)
        print(f"{name:13s} {new_tokens / med:10.1f} tokens/s  (median {med * 1e3:.1f} ms over {len(times)}: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times)} ms)")
        return med

    meds = {}
    for e in engines:
        meds[e] = report(f"jsdr {e}:", jsdr_times[e])
        print(f"              first call {first[e]:.2f} s, compile ~{compile_s[e]:.2f} s")
    print(f"              programs compiled: {sampler.num_compiles}")
    print("peak memory beyond the weights: "
          + ", ".join(f"{k} {v / 2 ** 20:.1f} MiB{mem_note.get(k, '')}" for k, v in mem.items())
          + " (jsdr: XLA memory analysis; transformers: peak-RSS growth of its first call)")
    if args.skip_hf:
        return
    hf_med = report("transformers:", hf_times)
    for e in engines:
        print(f"ratio jsdr {e} / transformers: {hf_med / meds[e]:.2f}x (medians); "
              f"{min(hf_times) / min(jsdr_times[e]):.2f}x (fastest runs)")


if __name__ == "__main__":
    main()
