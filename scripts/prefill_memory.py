"""What prefilling through the flash kernel saves: the sampler's prefill programs compiled by XLA's GPU
compiler for one compile-only GPU (no GPU needed: jsdr.plan's path), with XLA attention and with
Pallas attention, and their memory analysis side by side.

    python scripts/prefill_memory.py                       # Qwen3-1.7B, H100, bf16 (~2 min)
    python scripts/prefill_memory.py --model qwen3-8b --prompt-len 4096

Rows: the dense engine's prefill of `--rows` prompts of `--prompt-len` tokens (Pallas: the flash kernel
over the prompt; XLA: attention over the whole cache), and the paged engine's prefill call of its
chunk (`--chunk` tokens per row): a first chunk (every row at position 0: Pallas runs the flash kernel
on the chunk's own keys) and a later chunk (it attends to the pages of the earlier ones: XLA gathers
them whatever the impl). Temporaries are what the attention changes; arguments (weights, pools) and
outputs are the same on both sides. Needs jax[cuda12-local] (the test extra)."""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jsdr import plan, sharding  # noqa: E402
from jsdr.model.transformer import Model  # noqa: E402
from jsdr.sampling import Sampler, SamplingConfig  # noqa: E402
from jsdr_kernels.common import compile_for_gpu  # noqa: E402

MIB = 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-1.7b", choices=sorted(plan.MODELS))
    ap.add_argument("--target", default="h100-80gb", choices=sorted(plan.TARGETS))
    ap.add_argument("--rows", type=int, default=8, help="prompts per prefill call (default 8)")
    ap.add_argument("--prompt-len", type=int, default=2048, help="dense prefill prompt tokens (default 2048)")
    ap.add_argument("--chunk", type=int, default=512, help="paged prefill chunk (the engine's default, 512)")
    args = ap.parse_args(argv)

    target = plan.TARGETS[args.target]
    devices, compiler = plan.compile_devices(target, 1)
    if compiler != "gpu":
        raise SystemExit(f"no GPU compiler here ({plan.WHY_CPU}); install jax[cuda12-local] (the test extra)")
    mcfg = plan.model_config(args.model)
    mesh_cfg = sharding.MeshConfig(data=1, fsdp=1, tensor=1)
    mesh, rules = sharding.make_mesh(mesh_cfg, devices), sharding.effective_rules(mesh_cfg)
    sc = SamplingConfig(n=1, max_new_tokens=256, temperature=1.0, prefill_chunk=args.chunk)
    rows = []
    with compile_for_gpu(devices[0].device_kind), sharding.use_mesh(mesh, rules):
        params = plan.abstract_params(mcfg, mesh, rules, jnp.bfloat16)
        for impl in ("xla", "pallas"):
            sampler = Sampler(Model(mcfg, dtype="bfloat16", attn_impl=impl), mesh=mesh, pad_id=0, rules=rules)
            dense = sampler.compile_programs(params, None, args.rows, args.prompt_len, sc)
            paged = sampler.compile_paged(params, None, args.rows, args.chunk * 2, sc,
                                          device_bytes=target.hbm_bytes, pool_pages=64, fresh_prefill=True)
            info = paged["info"]
            for name, prog, what in (
                    ("dense prefill", dense["prefill"], f"{args.rows} x {args.prompt_len} tokens"),
                    ("paged prefill, first chunk", paged["prefill_fresh"],
                     f"{info['prefill_rows']} x {info['prefill_chunk']} tokens"),
                    ("paged prefill, later chunk", paged["prefill"],
                     f"{info['prefill_rows']} x {info['prefill_chunk']} tokens")):
                ma = prog.memory_analysis()
                rows.append((name, what, impl, ma.temp_size_in_bytes / MIB, ma.argument_size_in_bytes / MIB,
                             "flash_attention_fwd" in prog.as_text()))
    print(f"\n{args.model}, bf16, compiled by XLA's GPU compiler for one compile-only {target.name} "
          f"(jax {jax.__version__})\n")
    print("| program | tokens | attention | temporaries MiB | arguments MiB | flash kernel |")
    print("|---|---|---|---:|---:|---|")
    for name, what, impl, temp, arg, kernel in rows:
        print(f"| {name} | {what} | {impl} | {temp:,.0f} | {arg:,.0f} | {'yes' if kernel else 'no'} |")


if __name__ == "__main__":
    main()
