"""Forward and forward+backward throughput: jsdr (JAX, jitted) vs transformers (PyTorch), in one run.

A random Qwen3-architecture model is built with `transformers` and saved once; every measurement
runs in its own pair of subprocesses (one jsdr, one torch: peak memory is per measurement and the
frameworks never share a thread pool), on the same token batch. The two workers of a measurement
take turns step by step (alternating who goes first), so a shared machine's varying load hits
both alike:

  forward          logits of the batch (torch under no_grad)
  fwd+bwd full     next-token cross-entropy, gradients of every parameter
  fwd+bwd LoRA     same loss, gradients of a LoRA adapter only (jsdr: lora tree; torch: peft)
                   on q/k/v/o/gate/up/down with the same rank/alpha

Reported: median tokens/s over --repeats timed steps after --warmup steps (and the ratio of the
fastest steps, the less load-sensitive figure); jsdr compile time
(lower + compile); peak memory. Memory on CPU is the growth of the process's peak resident set
(Linux VmHWM, reset through /proc/self/clear_refs once model, batch and compiled step are ready,
before the first execution) over the resident set at that moment, for both frameworks alike; jsdr also reports XLA's compiled.memory_analysis() (temp + output bytes). On GPU torch
reports torch.cuda.max_memory_allocated, jsdr the memory_analysis figure. Malloc: the jsdr worker runs
with the glibc settings that importing jsdr sets for XLA:CPU (`jsdr.hostmem`), the torch worker with
glibc's defaults or, with `--peer-malloc same`, with jsdr's settings too (the "malloc" line says which).

    python scripts/bench_forward.py                     # ~2-3 min on 2 CPU cores
    python scripts/bench_forward.py --hidden 1024 --layers 16 --batch 8 --seq 512   # bigger, GPU
    python scripts/bench_forward.py --baseline /tmp/jsdr-old   # jsdr against another jsdr checkout

With --baseline DIR the peer is jsdr as found in DIR (for example `git archive <commit>` unpacked
there) instead of transformers, measured the same way, turn by turn: a before/after comparison of a
change on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("forward", "fwdbwd_full", "fwdbwd_lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_model_args(p, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                   head_dim: int = 64, vocab: int = 32000) -> None:
    """The random Qwen3's shape options that the benchmark scripts share."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--vocab", type=int, default=vocab)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4)
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pause", type=float, default=0.3, help="seconds between the two sides' steps")
    p.add_argument("--peer-malloc", choices=("default", "same"), default="default",
                   help="glibc malloc of the torch worker: default = glibc's own; same = the settings jsdr sets for "
                        "XLA:CPU (jsdr.hostmem). A --baseline jsdr decides for itself, as jsdr does")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0 = all cores)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--baseline", default="", help="peer = jsdr from this source tree (its scripts/bench_forward.py) "
                                                  "instead of transformers")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "<framework>:<mode>:<model dir>"
    return p.parse_args(argv)


def batch(args):
    import numpy as np
    rs = np.random.RandomState(0)
    return rs.randint(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int64)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_reset() -> int:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_since(base: int) -> int:
    """Peak RSS growth over `base` since the last peak_reset (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = _status_kib("VmHWM")
    peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, peak - base)


# ---------------------------------------------------------------------------------------------
# workers: one process per (framework, measurement). The driver keeps the jsdr and the torch
# worker of a measurement alive side by side and asks them for one timed step in turn, so both
# see the same load on a shared machine.


def _hostmem():
    """jsdr.hostmem of this checkout. Importing jsdr sets glibc's malloc for XLA:CPU where JAX runs on
    the CPU; the driver sets JSDR_CPU_MALLOC for the torch worker."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jsdr import hostmem
    return hostmem


def malloc_status() -> str:
    """What the import of jsdr did to this worker's malloc (both workers call it)."""
    return _hostmem().status()


def peer_malloc_same() -> bool:
    """Whether the jsdr worker (same environment) applies jsdr.hostmem's settings."""
    hostmem = _hostmem()
    return hostmem.decide(os.environ.get(hostmem.ENV), os.environ.get("JAX_PLATFORMS"),
                          hostmem.accelerator_plugins())[0]


def setup_torch(args, mode, model_dir):
    malloc = malloc_status()
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    data = torch.tensor(batch(args), device=dev)
    inp, labels = data[:, :-1], data[:, 1:]
    if mode == "fwdbwd_lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                 target_modules=TARGETS, lora_dropout=0.0))
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    out = {"threads": torch.get_num_threads(), "device": dev, "malloc": malloc,
           "attn": getattr(model.config, "_attn_implementation", "?")}
    loss_box = {}

    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                return model(input_ids=inp).logits
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        out["trainable"] = sum(p.numel() for p in params)

        def step():
            for p in params:
                p.grad = None
            logits = model(input_ids=inp).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            loss_box["loss"] = float(loss.detach())
            return loss
    def peak_start():
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return 0
        return peak_reset()

    def peak_end(base):
        return torch.cuda.max_memory_allocated() if dev == "cuda" else peak_since(base)

    return out, step, sync, peak_start, peak_end, lambda: loss_box.get("loss")


def setup_jax(args, mode, model_dir):
    if args.threads and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    malloc = malloc_status()
    import jax
    import jax.numpy as jnp
    from jsdr.model import hf, lora as lora_lib
    from jsdr.model import transformer

    params, cfg, _ = hf.load_params(model_dir)
    data = jnp.asarray(batch(args), jnp.int32)
    inp, labels = data[:, :-1], data[:, 1:]
    seg = jnp.ones_like(inp)
    pos = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), inp.shape)

    def ce(logits):
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return jnp.mean(lse - tgt)

    out = {"device": str(jax.devices()[0].platform), "malloc": malloc, "cpus": len(os.sched_getaffinity(0))
           if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if mode == "forward":
        fn = jax.jit(lambda p: transformer.forward(p, inp, pos, seg, cfg))
        fargs = (params,)
    elif mode == "fwdbwd_full":
        fn = jax.jit(jax.value_and_grad(lambda p: ce(transformer.forward(p, inp, pos, seg, cfg))))
        fargs = (params,)
        out["trainable"] = cfg.num_params()
    else:
        lc = lora_lib.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=tuple(TARGETS))
        lora = lora_lib.init_lora(cfg, lc, jax.random.key(0))
        # the base is an argument of the jitted step but not of differentiation
        fn = jax.jit(lambda p, lo: jax.value_and_grad(lambda l_: ce(transformer.forward(p, inp, pos, seg, cfg, l_, lc.scale)))(lo))
        fargs = (params, lora)
        out["trainable"] = lora_lib.count_params(lora)
    t = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    out["compile_s"] = time.perf_counter() - t
    ma = compiled.memory_analysis()
    if ma is not None:
        out["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
        out["xla_arg_bytes"] = int(ma.argument_size_in_bytes)
        out["xla_out_bytes"] = int(ma.output_size_in_bytes)
    loss_box = {}

    def step():
        r = compiled(*fargs)
        if mode != "forward":
            loss_box["loss"] = r[0]
        return r
    def peak_start():
        return peak_reset()

    def peak_end(base):
        if out["device"] == "cpu":
            return peak_since(base)
        return out.get("xla_temp_bytes", 0) + out.get("xla_out_bytes", 0)

    return out, step, jax.block_until_ready, peak_start, peak_end, \
        lambda: float(loss_box["loss"]) if loss_box else None


def serve(args, fw, mode, model_dir):
    """Set up, warm up, then answer "step" (time one step) and "done" (report) from stdin."""
    out, step, sync, peak_start, peak_end, loss = (setup_torch if fw == "torch" else setup_jax)(args, mode, model_dir)
    base = peak_start()  # after setup and compilation, before the first execution
    for _ in range(args.warmup):
        sync(step())
    print("READY", flush=True)
    times = []
    for line in sys.stdin:
        if line.strip() == "step":
            t = time.perf_counter()
            sync(step())
            times.append(time.perf_counter() - t)
            print(f"TIME {times[-1]}", flush=True)
        elif line.strip() == "done":
            break
    out.update(peak_bytes=peak_end(base), times=times, loss=loss())
    print("RESULT " + json.dumps(out), flush=True)


class Worker:
    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        self.cmd = cmd

    def _expect(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        err = self.proc.stderr.read()[-4000:]
        raise SystemExit(f"worker {self.cmd[3]} died (exit {self.proc.wait()}):\n{err}")

    def ready(self):
        self._expect("READY")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        return float(self._expect("TIME "))

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        res = json.loads(self._expect("RESULT "))
        self.proc.stdin.close()
        self.proc.wait()
        return res


# ---------------------------------------------------------------------------------------------
# driver


def build_model(args, out_dir):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    torch.manual_seed(0)
    hc = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=max(
                         4096, args.seq), tie_word_embeddings=args.tied)
    model = AutoModelForCausalLM.from_config(hc, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def worker_argv(args, skip=("worker", "json", "modes", "baseline", "pause", "peer_malloc")) -> list[str]:
    """The driver's options as command-line flags for a worker, less those in `skip`."""
    out = []
    for k, v in vars(args).items():
        if k in skip:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        else:
            out += [flag, str(v)]
    return out


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        fw, mode, model_dir = args.worker.split(":", 2)
        serve(args, fw, mode, model_dir)
        return
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(args, tmp)
        print(f"Qwen3-architecture model: {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}, {'tied' if args.tied else 'untied'}); batch {args.batch} x {args.seq} = "
              f"{tokens} tokens; float32; LoRA r={args.lora_rank} alpha={args.lora_alpha} on 7 projections; "
              f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
        results: dict = {}
        for mode in modes:
            t = time.perf_counter()
            workers = {}
            for fw in ("jax", "torch"):  # set up one after the other (compilation is not timed here)
                script, worker = os.path.abspath(__file__), f"{fw}:{mode}:{tmp}"
                if fw == "torch" and args.baseline:  # the peer: jsdr of the baseline tree
                    script, worker = str(Path(args.baseline) / "scripts" / "bench_forward.py"), f"jax:{mode}:{tmp}"
                env = None
                if fw == "torch" and not args.baseline:  # the peer's malloc: glibc's or jsdr's (--peer-malloc)
                    same = args.peer_malloc == "same" and peer_malloc_same()
                    env = dict(os.environ, JSDR_CPU_MALLOC="1" if same else "0")
                workers[fw] = Worker([sys.executable, script, "--worker", worker] + worker_argv(args), env)
                workers[fw].ready()
            for r in range(args.repeats):  # alternate which goes first
                for fw in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
                    time.sleep(args.pause)  # let the other framework's idle worker threads stop spinning
                    workers[fw].step()
            for fw, w in workers.items():
                res = w.finish()
                ts = sorted(res["times"])
                res["median_s"], res["best_s"] = ts[len(ts) // 2], ts[0]
                results[(fw, mode)] = res
            print(f"  {mode:12s} done in {time.perf_counter() - t:.0f}s", flush=True)

    j0, t0 = results.get(("jax", modes[0]), {}), results.get(("torch", modes[0]), {})
    peer = f"jsdr of {args.baseline}" if args.baseline else \
        f"torch on {t0.get('device')} ({t0.get('threads')} threads, attention {t0.get('attn')})"
    print(f"\njsdr: jax {__import__('jax').__version__} on {j0.get('device')} ({j0.get('cpus')} cpus); peer: {peer}")
    hdr = f"{'measurement':<14}{'jsdr tok/s':>12}{'peer tok/s':>12}{'ratio':>7}{'best ratio':>11}{'compile s':>10}" \
          f"{'jsdr peak':>11}{'peer peak':>11}{'xla temp':>10}{'trainable':>12}{'loss jsdr/peer':>17}"
    print(f"malloc: jsdr: {j0.get('malloc')}; peer: {t0.get('malloc')}")
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for mode in modes:
        j, t = results[("jax", mode)], results[("torch", mode)]
        jt, tt = tokens / j["median_s"], tokens / t["median_s"]
        best = t["best_s"] / j["best_s"]
        loss = "-" if j["loss"] is None else f"{j['loss']:.4f}/{t['loss']:.4f}"
        train = "-" if "trainable" not in j else f"{j['trainable']:,}" + ("" if j["trainable"] == t["trainable"]
                                                                             else f"!={t['trainable']:,}")
        print(f"{mode:<14}{jt:>12.0f}{tt:>12.0f}{jt / tt:>7.2f}{best:>11.2f}{j['compile_s']:>10.1f}"
              f"{fmt_bytes(j['peak_bytes']):>11}{fmt_bytes(t['peak_bytes']):>11}"
              f"{fmt_bytes(j.get('xla_temp_bytes')):>10}{train:>12}{loss:>17}")
        rows[mode] = {"jsdr_tokens_per_s": jt, "peer_tokens_per_s": tt, "ratio": jt / tt, "best_ratio": best,
                      "jsdr": j, "peer": t}
    print("tok/s and ratio (jsdr/peer) from the medians; best ratio from the fastest step of each")
    print("peak = growth of the process's peak RSS (VmHWM) over its RSS before the first step (CPU) / "
          "allocator peak (GPU); "
          "xla temp = compiled.memory_analysis().temp_size_in_bytes")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tokens": tokens, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
