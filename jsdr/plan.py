"""`python -m jsdr.plan`: does a run fit, and how fast could it be, before a single weight is read.

    python -m jsdr.plan --config configs/paper/grpo-qwen3-8b.yaml --devices 8 --target h100-80gb \\
        --layouts "fsdp=8" "data=2,fsdp=4" "fsdp=4,tensor=2" --remat full,dots --json plan.json --plot plan.png
    python -m jsdr.plan --eval --model qwen3-8b --devices 8 --target a100-80gb --decode-tensor 8

For every layout (mesh shape) x remat policy it lowers and compiles the programs jsdr runs, with the
shardings jsdr gives them, on abstract inputs (no weights are read or allocated): the method's train
step (`train.jit_train_step`, at the micro-batch and the longest bucketed lengths the config allows)
and, for methods that sample, the rollout sampler's prefill and decode programs; with `--eval`, the
evaluation sampler's. Sampler programs are planned for both engines (`--engines`): the dense one in
the layout the weights live in, the paged one in its decode layout with the KV pool it would
allocate on the target (plan_paged). Per program it reports the bytes per device (base weights,
LoRA, optimizer state, batch, KV pool from the arguments' shardings; temporaries and outputs from
XLA's memory analysis), the collectives in the compiled HLO (count and bytes, loops counted by their
trip count; for decode programs also per decode step, weight all-gathers apart), FLOPs, and a
roofline step-time estimate against the target's peak FLOP/s, HBM and interconnect bandwidth.

Compilers: for a GPU target with the CUDA plugin installed (`pip install "jsdr[plan]"`, the plugin
without the NVIDIA libraries) the real GPU compiler compiles for N compile-only devices of the target
(labelled "gpu"); otherwise the CPU compiler over N virtual devices gives an estimate ("cpu").
Without --layouts the config's own mesh and remat are planned: the first row answers "does my run fit?".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from jsdr import eval as evaluation
from jsdr import methods, sharding, train
from jsdr.errors import JsdrError, error_line
from jsdr.model import hf
from jsdr.model import lora as lora_lib
from jsdr.model.attention import resolve_impl
from jsdr.model.params import ModelConfig
from jsdr.model.transformer import Model, param_axes, param_shapes
from jsdr.sampling import Sampler
from jsdr_kernels.common import compile_for_gpu

GIB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# targets: public spec-sheet facts (dense bf16 tensor-core peak, HBM size and bandwidth, NVLink
# bandwidth per GPU) and the GPU compiler's device description (XLA's gpu_device_info fields)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bw: float  # bytes/s
    link_bw: float  # bytes/s per device, one direction (NVLink)
    device: dict | None = None  # XLA GPU device description; None = CPU only
    internode_bw: float = 50e9  # bytes/s per device between hosts (one 400 Gb/s NIC per GPU)
    hosts: int = 1  # the devices are spread over this many hosts (consecutive devices of the mesh per host)

    def gpu_spec(self) -> str:
        """The target in XLA's GpuTargetConfig text form (for compile-only CUDA devices)."""
        d = dict(self.device)
        major, minor = d.pop("compute_capability")
        name = d.pop("name")
        fields = "\n".join(f"  {k}: {v}" for k, v in d.items())
        return (f"gpu_device_info {{\n{fields}\n  device_memory_size: {self.hbm_bytes}\n"
                f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
                f'platform_name: "CUDA"\ndevice_description_str: "{name}"\n')


_AMPERE = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=167936, threads_per_core_limit=2048, core_count=108, fpus_per_core=64,
               block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
               l2_cache_size=41943040, clock_rate_ghz=1.41, shared_memory_per_block_optin=166912,
               registers_per_core_limit=65536, registers_per_block_limit=65536, compute_capability=(8, 0))
_HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
               block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
               l2_cache_size=52428800, clock_rate_ghz=1.98, shared_memory_per_block_optin=232448,
               registers_per_core_limit=65536, registers_per_block_limit=65536, compute_capability=(9, 0))

TARGETS = {
    "a100-40gb": Target("a100-40gb", 40 * GIB, 312e12, 1.555e12, 300e9,
                        dict(_AMPERE, memory_bandwidth=1555000000000, name="NVIDIA A100-SXM4-40GB"), 25e9),
    "a100-80gb": Target("a100-80gb", 80 * GIB, 312e12, 2.039e12, 300e9,
                        dict(_AMPERE, memory_bandwidth=2039000000000, name="NVIDIA A100-SXM4-80GB"), 25e9),
    "h100-80gb": Target("h100-80gb", 80 * GIB, 989e12, 3.35e12, 450e9,
                        dict(_HOPPER, memory_bandwidth=3352320000000, name="NVIDIA H100 80GB HBM3")),
}


# ---------------------------------------------------------------------------------------------
# model facts: the config.json values that matter, so `--model qwen3-8b` needs no hub

_QWEN3 = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
              max_position_embeddings=40960, model_type="qwen3")
_LLAMA3_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA31 = dict(vocab_size=128256, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                max_position_embeddings=131072, model_type="llama")
MODELS: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40, num_kv_heads=8),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                       max_position_embeddings=32768, model_type="qwen2"),
    "llama3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8),
    "llama3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                         num_kv_heads=8),
}
_HUB_NAMES = {"qwen/qwen3-0.6b": "qwen3-0.6b", "qwen/qwen3-1.7b": "qwen3-1.7b", "qwen/qwen3-4b": "qwen3-4b",
              "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-14b": "qwen3-14b", "qwen/qwen3-32b": "qwen3-32b",
              "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
              "meta-llama/llama-3.1-8b": "llama3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama3.1-8b",
              "meta-llama/llama-3.1-70b": "llama3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama3.1-70b"}


class PlanError(Exception):
    """A planning request that cannot be answered; the message says why and what is allowed."""


def model_config(name: str):
    """The ModelConfig of a known name (`qwen3-8b`, or its hub id `Qwen/Qwen3-8B`) or a local directory
    with a config.json."""
    key = _HUB_NAMES.get(name.lower(), name.lower())
    if key in MODELS:
        return ModelConfig(**MODELS[key])
    if Path(name).is_dir():
        return hf.load_config(name)[0]
    raise PlanError(f"unknown model {name!r}: use a local directory with a config.json, or one of "
                    f"{', '.join(MODELS)} (hub ids of those work too)")


# ---------------------------------------------------------------------------------------------
# devices and layouts


def parse_layout(text: str) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}; unnamed axes are 1."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise PlanError(f"layout {text!r}: {part!r} is not AXIS=SIZE with AXIS one of data, fsdp, tensor "
                            f"and SIZE a positive integer")
        sizes[name] = int(value)
    return sizes


WHY_CPU: list[str] = []  # why the last compile_devices call fell back to the CPU compiler


def compile_devices(target: Target | None, n: int, prefer_gpu: bool = True) -> tuple[list, str]:
    """N devices to compile for and the compiler's name: compile-only CUDA devices of `target` when the
    CUDA plugin is installed, else the CPU backend's (virtual) devices (the reason is kept in WHY_CPU)."""
    WHY_CPU.clear()
    if target is not None and target.device is not None and prefer_gpu:
        try:
            topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{n}", target_config=target.gpu_spec())
            return list(topo.devices), "gpu"
        except Exception as e:  # noqa: BLE001 - no plugin, or it cannot describe the target: the CPU estimate
            WHY_CPU.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])
    elif not prefer_gpu:
        WHY_CPU.append("--cpu")
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise PlanError(f"{n} devices asked for, but the CPU backend has {len(cpus)}: run `python -m jsdr.plan` "
                        f"itself (it sets XLA_FLAGS=--xla_force_host_platform_device_count) or set that flag "
                        f"before JAX starts")
    return cpus[:n], "cpu"


# ---------------------------------------------------------------------------------------------
# reading the compiled program

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HLO_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64", "s8": "int8",
               "s32": "int32", "u8": "uint8", "u32": "uint32", "pred": "bool"}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^(?:ROOT\s+)?%?[\w.\-]+\s*=")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation"
                    r"|called_computations|select|scatter)=(?:\{([^}]*)\}|%?([\w.\-]+))")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # metadata strings (op_name, source_file) name no computation
_ASYNC_FOLLOW_UP = re.compile(r"\sasync-(?:update|done)\(")  # they name the computation their start runs
_FEEDS_WEIGHT = re.compile(r'op_name="[^"]*(?:dot_general|/gather)')  # a matmul's or a take's operand
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# who talks to whom: explicit groups {{0,1},{2,3}}, all devices {}, XLA's iota form [2,8]<=[16] (with a
# transpose: [8,2]<=[2,8]T(1,0)), or a collective-permute's pairs
_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=(\{\}|\{\{[\d,{} ]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
# newer XLA: named mesh axes, the device at each mesh position, the axes the collective runs over:
# replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                          r"\s*\{([^}]*)\}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _mesh_groups(m: re.Match) -> list[list[int]]:
    axes = [(name.strip().strip("'"), int(size)) for name, size in
            (a.split("=") for a in m.group(1).split(",") if a.strip())]
    sizes = [s for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if m.group(2):
        ids = ids.reshape(_ints(m.group(2)))
        if m.group(3):
            ids = ids.transpose(_ints(m.group(3)))
    ids = ids.reshape(sizes)
    over = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group(4)]
    rest = [i for i in range(len(axes)) if i not in over]
    group = math.prod(sizes[i] for i in over)
    return ids.transpose(rest + over).reshape(-1, group).tolist()


def _groups(line: str, devices: int) -> list[list[int]] | None:
    """The device groups of a collective's HLO line (positions in the mesh's device order), or None
    when the line names none."""
    mm = _MESH_GROUPS.search(line)
    if mm:
        return _mesh_groups(mm)
    m = _GROUPS.search(line)
    if not m:
        return None
    text = m.group(1)
    if text == "{}":
        return [list(range(devices))]
    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d, ]*)\}", text)]
    shape, dims, perm = _IOTA.match(text).groups()
    ids = np.arange(math.prod(_ints(dims))).reshape(_ints(dims))
    if perm:
        ids = ids.transpose(_ints(perm))
    return ids.reshape(_ints(shape)).tolist()


def _crosses_hosts(line: str, devices: int, hosts: int) -> bool:
    """Whether a collective's groups span more than one host (hosts hold consecutive devices)."""
    if hosts <= 1:
        return False
    per_host = max(devices // hosts, 1)
    groups = _groups(line, devices)
    if groups is None:  # no groups named: every device
        return True
    return any(len({d // per_host for d in g}) > 1 for g in groups)


def _tuple_parts(text: str) -> list[str]:
    """The top-level elements of a tuple shape: "(a, (b, c), d)" -> ["a", "(b, c)", "d"]; a plain
    shape -> [itself]."""
    text = text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i])
                break
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def _results(kind: str, start: bool, shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of the arrays a collective produces, from the shape text before its op name. An
    async start (but all-reduce's, which is its results) is a tuple (operands, results, ...): a
    combined start (several arrays gathered at once) has tuples there."""
    parts = _tuple_parts(shape_text)
    if start and kind != "all-reduce" and len(parts) >= 2:
        shape_text = parts[1]
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(shape_text)]


def _array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return _DTYPE_BYTES.get(dtype, 4) * math.prod(dims)


def _call_weights(comps: dict[str, list[str]], entry: str, unknown_trip: int) -> dict[str, int]:
    """How many times each computation runs per call of `entry`: the sum over its call sites of the
    caller's count x the site's (a while loop's body and condition: XLA's known trip count, else
    `unknown_trip` for a loop bounded at run time; any other site: 1; an async-update/-done: 0, its
    async-start runs the computation). Summed in a topological order of the call graph (every caller
    complete before its callees), so a computation called from several places (a shared reducer,
    both branches of a conditional, a loop's body and condition) passes its whole count on.

    A run-time-bounded loop inside a run-time-bounded loop (the sampler's threshold search in the
    decode loop) counts once per outer iteration: each computation keeps two counts, of the runs
    outside any run-time loop and of those inside one, so the total stays linear in `unknown_trip`
    (loop_step_collectives takes one iteration as tally(1) - tally(0))."""
    sites: dict[str, list[tuple[str, int | None]]] = {}  # caller -> [(callee, trip; None: run time)]
    for name, lines in comps.items():
        for line in lines:
            if _ASYNC_FOLLOW_UP.search(line):
                continue
            bare = _QUOTED.sub('""', line)
            is_while = " while(" in bare
            trip = _TRIP.search(line)
            for m in _CALLS.finditer(bare):
                loop = is_while and m.group(1) in ("body", "condition")
                n = (int(trip.group(1)) if trip else None) if loop else 1
                for callee in (c.strip().lstrip("%") for c in (m.group(2) or m.group(3)).split(",")):
                    if callee in comps:
                        sites.setdefault(name, []).append((callee, n))
    # the computations reachable from the entry, and how many call sites each has among them
    reach, stack = {entry}, [entry]
    while stack:
        for callee, _ in sites.get(stack.pop(), ()):
            if callee not in reach:
                reach.add(callee)
                stack.append(callee)
    pending = {name: 0 for name in reach}
    for name in reach:
        for callee, _ in sites.get(name, ()):
            pending[callee] += 1
    outside = {name: 0 for name in reach}  # runs outside any run-time-bounded loop
    inside = {name: 0 for name in reach}  # runs within one (linear in unknown_trip)
    outside[entry] = 1
    ready = [entry]
    while ready:  # Kahn: a computation is expanded once all its callers have added their runs
        name = ready.pop()
        for callee, n in sites.get(name, ()):
            if n is None:  # a run-time-bounded loop: the outer one runs unknown_trip times, a nested one once
                inside[callee] += outside[name] * unknown_trip + inside[name]
            else:
                outside[callee] += outside[name] * n
                inside[callee] += inside[name] * n
            pending[callee] -= 1
            if pending[callee] == 0:
                ready.append(callee)
    if any(pending.values()):  # HLO call graphs are acyclic
        raise ValueError(f"HLO call graph has a cycle through {sorted(k for k, v in pending.items() if v)}")
    return {name: outside[name] + inside[name] for name in reach}


def _tally(hlo: str, unknown_trip: int, weights: set | None = None, devices: int = 1,
           hosts: int = 1) -> dict[str, dict[str, int]]:
    """collectives() and, with `weights` (see weight_shapes), under "weight_all_gather" the all-gathers
    of weights: for a matmul or a take (their op_name) with a result of a weight's dtype and shape (an
    op gathering several arrays counts once, with the bytes of its weight arrays); with `hosts` > 1,
    under "cross_host" the collectives whose device groups span hosts."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP_HEADER.match(line.strip())
        if m and not _INSTRUCTION.match(line.strip()):
            current = m.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    if entry is None:
        return {}
    weight = _call_weights(comps, entry, unknown_trip)
    out = {k: {"count": 0, "bytes": 0} for k in (*_COLLECTIVES, "weight_all_gather", "cross_host")}
    for name, lines in comps.items():
        w = weight.get(name, 0)  # 0: not reached from the entry computation
        if not w:
            continue
        for line in lines:
            if "=" not in line:
                continue
            rhs = line.split("=", 1)[1]
            for kind in _COLLECTIVES:
                m = re.search(rf"\s{kind}(-start)?\(", rhs)
                if m:  # the result shape(s) precede the op name
                    arrays = _results(kind, bool(m.group(1)), rhs.split(f" {kind}", 1)[0])
                    out[kind]["count"] += w
                    out[kind]["bytes"] += w * sum(_array_bytes(*a) for a in arrays)
                    if _crosses_hosts(rhs, devices, hosts):
                        out["cross_host"]["count"] += w
                        out["cross_host"]["bytes"] += w * sum(_array_bytes(*a) for a in arrays)
                    hit = [a for a in arrays if weights and a in weights]
                    if kind == "all-gather" and hit and _FEEDS_WEIGHT.search(line):
                        out["weight_all_gather"]["count"] += w
                        out["weight_all_gather"]["bytes"] += w * sum(_array_bytes(*a) for a in hit)
                    break
    return {k: v for k, v in out.items() if v["count"]}


def collectives(hlo: str, unknown_trip: int = 1) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives of a compiled (per-device) HLO module, those in a
    while loop counted once per iteration: XLA's known trip count, or `unknown_trip` for a loop whose
    count is decided at run time (the decode loop: its token budget; a run-time loop nested in one,
    such as the sampler's threshold search, counts once per outer iteration). Both branches of a conditional
    are counted (an upper bound). Bytes are the result sizes per device (an all-gather's gathered
    output, an all-reduce's buffer; all of them for a combined op)."""
    return {k: v for k, v in _tally(hlo, unknown_trip).items() if k not in ("weight_all_gather", "cross_host")}


def cross_host(hlo: str, devices: int, hosts: int, unknown_trip: int = 1) -> dict[str, int]:
    """{"count", "bytes"} of the collectives (counted as collectives() does) whose device groups span
    more than one of `hosts` hosts, each holding devices/hosts consecutive devices of the mesh order
    (as jax lays out the processes of a multi-host run): the traffic that leaves a node."""
    return _tally(hlo, unknown_trip, devices=devices, hosts=hosts).get("cross_host", {"count": 0, "bytes": 0})


def loop_step_collectives(hlo: str, weights: set | None = None) -> dict[str, dict[str, int]]:
    """The collectives of one iteration of the program's run-time-bounded loops (a decode loop: one
    decoded token of every row), with "weight_all_gather": those all-gathers whose result is a weight
    array (`weights`, see weight_shapes). Counted as the difference between one iteration and none, so
    what runs once per call is left out and nested (layer) loops count by their trip count."""
    one, none = _tally(hlo, 1, weights), _tally(hlo, 0, weights)
    step = {k: {f: v[f] - none.get(k, {}).get(f, 0) for f in ("count", "bytes")} for k, v in one.items()}
    return {k: v for k, v in step.items() if v["count"]}


def weight_shapes(trees) -> set[tuple[str, tuple[int, ...]]]:
    """(HLO dtype, dims) that a gathered weight matrix can have, from trees of placed arrays (or
    ShapeDtypeStructs with shardings): each dimension whole or as its shard (a gather over some of the
    mesh axes), of every leaf and of a stacked layer's slice (without the layer axis), the matrix also
    transposed, in its dtype or float32 (the CPU compiler converts before gathering). Vectors (norm
    scales, biases) are left out: small, and their shapes are too easily an activation's."""
    out: set[tuple[str, tuple[int, ...]]] = set()
    names = {v: k for k, v in _HLO_DTYPES.items()}
    for tree in trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape = tuple(leaf.shape)
            where = getattr(leaf, "sharding", None)
            local = tuple(where.shard_shape(shape)) if where is not None else shape
            keys = {str(getattr(k, "key", k)) for k in path}
            if "layers" in keys:
                shape, local = shape[1:], local[1:]
            if len(shape) < 2:
                continue
            dtype = names.get(jnp.dtype(leaf.dtype).name, jnp.dtype(leaf.dtype).name)
            for dims in itertools.product(*({d, l} for d, l in zip(shape, local))):
                for d in (dims, dims[:-2] + dims[-2:][::-1]):
                    out.update({(dtype, d), ("f32", d)})
    return out


def abstract_params(mcfg, mesh, rules, dtype):
    """The base weights as jax.ShapeDtypeStructs with the shardings hf.load_params gives them."""

    shapes = param_shapes(mcfg, dtype)
    where = sharding.tree_shardings(param_axes(mcfg), shapes, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, where)


def layout_notes(mcfg, mesh, rules) -> list[str]:
    """What the rules cannot do on this mesh: for each parameter dimension whose rule names a mesh axis
    that does not divide it, which axis is dropped (the dimension is then replicated along it)."""
    notes = []
    axes_tree, shapes = param_axes(mcfg), param_shapes(mcfg)
    flat_axes = jax.tree_util.tree_flatten_with_path(
        axes_tree, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))[0]
    for (path, names), shape in zip(flat_axes, jax.tree.leaves(shapes)):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = sharding.logical_to_spec(names, shape.shape, mesh, rules)
        for i, name in enumerate(names):
            wanted = [a for a in (rules.get(name) or ()) if mesh.shape[a] > 1]
            got = spec[i] if i < len(spec) else None
            got = set(got if isinstance(got, tuple) else () if got is None else (got,))
            for a in wanted:
                if a not in got and shape.shape[i] % mesh.shape[a]:
                    notes.append(f"{where}: dimension {name}={shape.shape[i]} is not divisible by {a}={mesh.shape[a]}; "
                                 f"it is replicated along {a}")
    return notes


def _per_device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


# ---------------------------------------------------------------------------------------------
# planning one layout


@dataclasses.dataclass
class Row:
    model: str
    method: str
    program: str
    mesh: dict
    remat: str
    attn_impl: str
    compiler: str
    target: str
    bytes_per_device: dict
    hbm_bytes: int
    fits: bool
    flops: float
    collectives: dict
    est_step_s: float
    est_mfu: float
    compile_s: float = 0.0
    flops_source: str = "model"
    model_flops: float = 0.0
    terms: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    engine: str = ""  # sampler programs: "dense" or "paged" ("" for the train step)
    layout: str = "train"  # "train": runs on `mesh`; "decode": on the paged engine's decode mesh (run_mesh)
    run_mesh: dict = dataclasses.field(default_factory=dict)  # the mesh the program runs on
    step_collectives: dict = dataclasses.field(default_factory=dict)  # decode programs: per decode step
    paged: dict = dataclasses.field(default_factory=dict)  # paged engine: layout and KV pool facts
    cross_host: dict = dataclasses.field(default_factory=dict)  # --hosts > 1: collectives that leave a host


def _roofline(target: Target, flops: float, hbm_bytes: float, comm: dict, model_flops: float,
              cross: int = 0):
    """(step time, MFU, terms): the slowest of compute, HBM and interconnect (assumed overlapped);
    `cross`: bytes of the collectives that leave a host, at the inter-node bandwidth."""
    terms = {"compute_s": flops / target.peak_flops, "hbm_s": hbm_bytes / target.hbm_bw,
             "interconnect_s": sum(v["bytes"] for v in comm.values()) / target.link_bw}
    if target.hosts > 1:
        terms["internode_s"] = cross / target.internode_bw
    t = max(max(terms.values()), 1e-9)
    return t, (model_flops / (t * target.peak_flops) if model_flops else 0.0), terms


def _analyse(name: str, compiled, groups: dict[str, Any], target: Target, base: dict, model_flops: float,
             loops: int = 1, weights: set | None = None, resident: int = 0, unread: int = 0) -> Row:
    """A Row of a compiled program. groups: argument name -> tree of placed ShapeDtypeStructs, or bytes
    per device; the rest of the arguments is "other". weights (decode programs): the shapes of weight
    arrays, to read the collectives of one decode step (Row.step_collectives). resident: bytes per
    device held outside the program while it runs (counted in the total). unread: bytes of a donated
    argument the roofline does not stream per loop iteration, nor its aliased output (the paged KV
    pool: a step reads the pages of its rows, which the temporaries hold)."""
    ma = compiled.memory_analysis()
    args = {k: v if isinstance(v, int) else _per_device_bytes(v) for k, v in groups.items()}
    temp, out, alias = int(ma.temp_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes)
    args_total = int(ma.argument_size_in_bytes)
    args["other"] = max(args_total - sum(args.values()), 0)
    total = args_total + out - alias + temp + resident
    b = dict(args, temp=temp, output=out - alias, **({"resident": resident} if resident else {}), total=total)
    cost = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    except Exception:  # noqa: BLE001 - the GPU compiler has none
        cost = None
    # XLA's count sees a scanned layer once (not times the trip count) and the GPU compiler gives none:
    # the roofline uses the model's useful FLOPs per device; XLA's figure is kept beside it when given
    flops = model_flops / max(base["devices"], 1)
    source = f"model (xla: {float(cost['flops']):.3g})" if cost and cost.get("flops") else "model"
    hlo = compiled.as_text()
    comm = collectives(hlo, unknown_trip=loops)
    step = loop_step_collectives(hlo, weights) if weights is not None else {}
    cross = cross_host(hlo, base["devices"], target.hosts, unknown_trip=loops) if target.hosts > 1 else {}
    # HBM: every argument, temporary and output touched once per loop iteration (decode: per token), but
    # the `unread` argument (donated: its output too)
    est, mfu, terms = _roofline(target, flops, (args_total + temp + out - 2 * unread) * loops, comm, flops,
                                cross.get("bytes", 0))
    fields = {k: v for k, v in base.items() if k != "devices"}
    fields.setdefault("run_mesh", dict(base["mesh"]))
    fields["notes"] = list(fields.get("notes", ()))  # a row's own list
    return Row(program=name, bytes_per_device=b, hbm_bytes=target.hbm_bytes, fits=total <= target.hbm_bytes, terms=terms,
               flops=flops, collectives=comm, est_step_s=est, est_mfu=mfu, flops_source=source,
               model_flops=model_flops, step_collectives=step, cross_host=cross, **fields)


def _train_flops(mcfg, tokens: int, seq: int, forwards: int = 1) -> float:
    """Useful FLOPs of a LoRA step over `tokens` trained tokens: forward 2 x params x tokens (+ causal
    attention), backward 2x the forward for activations (weights frozen: no weight gradient but LoRA's,
    negligible), plus `forwards - 1` gradient-free forwards of as many tokens (OPSD's teacher)."""
    n = mcfg.num_params() - mcfg.vocab_size * mcfg.hidden_size * (0 if mcfg.tie_word_embeddings else 1)
    attn = 2 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * seq * tokens  # QK^T + PV, causal half x 2
    fwd = 2 * n * tokens + attn
    return fwd * (1 + 2) + fwd * (forwards - 1)


def _kernels_for(fn):
    """Run `fn(..., devices, compiler, ...)` with the Pallas kernels building for `devices`' GPU when
    the compiler is the GPU one: without it they would ask jax.default_backend() (the CPU of a planning
    machine) and the planner would compile and measure their interpret-mode loops, not Triton."""
    @functools.wraps(fn)
    def wrapped(*args, **kw):
        bound = inspect.signature(fn).bind(*args, **kw)
        devices, compiler = bound.arguments["devices"], bound.arguments["compiler"]
        ctx = compile_for_gpu(devices[0].device_kind) if compiler == "gpu" else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kw)
    return wrapped


@_kernels_for
def plan_train(cfg, mesh_sizes: dict, remat: str, target: Target, devices: list, compiler: str,
               model_name: str, rollout: bool = True, engines: Sequence[str] = ("dense", "paged"),
               decode_tensors: Sequence[int] = ()) -> list[Row]:
    """Compile and read the train step (and, with `rollout`, the sampler's programs: they do not
    depend on remat) of TrainConfig `cfg` on `devices`: the dense engine's in the training layout, the
    paged engine's in its decode layout (auto, and once per size in `decode_tensors`; see plan_paged)
    with the training state resident beside them."""
    mesh_cfg = dataclasses.replace(cfg.mesh, num_devices=None, **mesh_sizes)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    rules = sharding.effective_rules(mesh_cfg)
    mcfg = model_config(model_name)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    cfg, note = same_global_batch(cfg, dp, len(devices))
    micro = cfg.train.per_device_batch * dp
    attn = resolve_impl(cfg.model.attn_impl, "gpu" if compiler == "gpu" else "cpu")
    model = Model(mcfg, lora_scale=cfg.lora.scale, attn_impl=attn, remat=remat, dtype=cfg.model.dtype,
                  lora_dropout=cfg.lora.dropout)
    setup = methods.Setup(model=model, tokenizer=None, data=cfg.data, prompts=cfg.prompts, rollout=cfg.rollout,
                          options=cfg.method_options(), reward=cfg.reward, pad_id=0, seq_bucket=cfg.train.seq_bucket,
                          grad_accum=cfg.train.grad_accum, micro_batch=micro, data_parallel=dp)
    method = methods.get(cfg.method)(setup)
    base = dict(model=model_name, method=cfg.method, mesh=dict(mesh_sizes), remat=remat, attn_impl=attn,
                compiler=compiler, target=target.name, devices=len(devices),
                notes=layout_notes(mcfg, mesh, rules) + ([note] if note else []))
    rows = []
    with sharding.use_mesh(mesh, rules):
        params = abstract_params(mcfg, mesh, rules, jnp.dtype(cfg.model.dtype))
        lshapes = lora_lib.lora_shapes(mcfg, cfg.lora)
        lsh = lora_lib.lora_shardings(mcfg, cfg.lora, mesh, rules)
        lora = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), lshapes, lsh)
        optimizer, _ = train.make_optimizer(cfg.optim, cfg.train.steps or train.DEFAULT_STEPS)  # its state only
        state_sh = train.train_state_shardings(optimizer, lsh, lora, mesh, ema=method.ema_decay is not None)
        abstract_state = jax.eval_shape(lambda lo: _state_like(optimizer, lo, method.ema_decay is not None), lora)
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state,
                             state_sh)
        spec = sharding.logical_to_spec(("act_batch",), None, mesh, rules)
        placed = NamedSharding(mesh, PartitionSpec(None, *spec))
        batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed), method.batch_shapes())
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
        t0 = time.time()
        compiled = train.jit_train_step(method, optimizer, state_sh).trace(state, params, batch, rng).lower().compile()
        lengths = [leaf.shape for leaf in jax.tree.leaves(batch)]
        seq = max(s[-1] for s in lengths if len(s) == 3)
        tokens = cfg.train.grad_accum * micro * seq
        forwards = 2 if cfg.method == "opsd" else 1
        row = _analyse("train_step", compiled, {"params": params, "lora": state.lora,
                                                "opt_state": (state.opt_state, state.ema), "batch": batch},
                       target, base, _train_flops(mcfg, tokens, seq, forwards))
        row.compile_s = time.time() - t0
        rows.append(row)
        prompts = method.rollout_prompts(method.records_per_step(micro * cfg.train.grad_accum))
        if prompts and rollout:
            sampler = Sampler(Model(mcfg, lora_scale=cfg.lora.scale, dtype=cfg.model.dtype), mesh=mesh, pad_id=0,
                              rules=rules)
            weights = weight_shapes([params, lora])
            plen, sc = cfg.data.max_prompt_tokens, cfg.rollout
            if "dense" in engines:
                t0 = time.time()
                progs = sampler.compile_programs(params, lora, prompts, plen, sc)
                dt = (time.time() - t0) / 2
                new = prompts * sc.n * sc.max_new_tokens
                for name, prog in progs.items():
                    flops = 2 * mcfg.num_params() * (new if name == "decode" else prompts * plen)
                    r = _analyse(f"rollout_{name}", prog, {"params": params, "lora": lora}, target,
                                 dict(base, engine="dense"), flops,
                                 loops=sc.max_new_tokens if name == "decode" else 1,
                                 weights=weights if name == "decode" else None)
                    r.compile_s = dt
                    rows.append(r)
            if "paged" in engines:
                # the training state stays on the devices while the rollouts are sampled
                held = _per_device_bytes((params, state.lora, state.opt_state, state.ema))
                # (jsdr.train frees the pools and the decode copy of the weights after every rollout phase)
                for t in (0, *decode_tensors):
                    rows.extend(plan_paged(sampler, params, lora, prompts, plen,
                                           dataclasses.replace(sc, decode_tensor=t) if t else sc, target, base,
                                           "rollout", mcfg, resident=held, weights=weights))
    return rows


def same_global_batch(cfg, dp: int, devices: int):
    """`cfg` with per_device_batch (or else grad_accum) changed so that a layout with `dp` data-parallel
    devices trains the same sequences per step as the config's own layout (a fair comparison), and a
    note saying what changed (None when nothing did)."""
    t = cfg.train
    own = cfg.mesh.resolve(devices)
    rows = t.effective_batch or t.per_device_batch * own[0] * own[1] * t.grad_accum
    if t.per_device_batch * dp * t.grad_accum == rows:
        return cfg, None
    if rows % (dp * t.grad_accum) == 0:
        new = dataclasses.replace(t, per_device_batch=rows // (dp * t.grad_accum), effective_batch=None)
    elif rows % (dp * t.per_device_batch) == 0:
        new = dataclasses.replace(t, grad_accum=rows // (dp * t.per_device_batch), effective_batch=None)
    else:
        raise PlanError(f"a layout with {dp} data-parallel devices cannot train the config's {rows} sequences per "
                        f"step (per_device_batch={t.per_device_batch}, grad_accum={t.grad_accum})")
    note = (f"same {rows} sequences per step: per_device_batch={new.per_device_batch}, grad_accum={new.grad_accum} "
            f"on {dp} data-parallel devices")
    return dataclasses.replace(cfg, train=new), note


def _state_like(optimizer, lora, ema: bool):

    return train.TrainState(jnp.zeros((), jnp.int32), lora, optimizer.init(lora), lora if ema else None)


# ---------------------------------------------------------------------------------------------
# the paged engine: its decode layout and the KV pool it would allocate on the target


def paged_pool_pages(sc, num_prompts: int, prompt_len: int, shards: int, bytes_per_page: int,
                     free_bytes: int) -> dict:
    """The pool the paged engine allocates for a call of `num_prompts` prompts of `prompt_len` tokens
    (sc.n samples of sc.max_new_tokens each) on a device with `free_bytes` free: the arithmetic of
    `scheduler.PagedEngine.plan_pool`, with the target's free memory in place of the device's memory
    statistics. Returns {"pages" (per data shard, scratch page included), "demand" (the call's pages
    per shard, bucketed: the cap of an automatic budget), "one" (the pages one sequence needs),
    "budget" (bytes per device)}."""
    ps = sc.page_size
    own = -(-(prompt_len + sc.max_new_tokens) // ps)  # a sample at full length
    shared = -(-max(prompt_len - 1, 0) // ps)  # its prompt group's pages
    one = own + shared + 1  # + the scratch page
    demand = 1 << max(0, (-(-num_prompts * (sc.n * own + shared) // shards) + one - 1).bit_length())
    if sc.kv_cache_gb > 0:
        budget = int(sc.kv_cache_gb * GIB)
    else:
        budget = int(max(free_bytes, 0) * sc.kv_cache_fraction)
    pages = budget // bytes_per_page
    if sc.kv_cache_gb <= 0:
        pages = min(pages, demand)
    return {"pages": int(pages), "demand": int(demand), "one": int(one), "budget": budget}


def _sharded_bytes(shapes, shardings) -> int:
    """Bytes per device of the arrays `shapes` laid out as `shardings` (a tree of the same structure)."""
    return sum(math.prod(sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def plan_paged(sampler: Sampler, params, lora, num_prompts: int, prompt_len: int, sc, target: Target, base: dict,
               prefix: str, mcfg, *, resident: int = 0, weights: set | None = None) -> list[Row]:
    """The paged engine's prefill and decode programs in its decode layout (Sampler.compile_paged: the
    same devices as a (data = devices / t, fsdp = 1, tensor = t) mesh, t chosen for the target's
    memory or sc.decode_tensor), with the KV pool the engine would allocate on the target.

    Compiled twice: with a 2-page pool, to read what the programs need besides the pool (arguments
    without it, temporaries and outputs, plus `resident`: the arrays the caller holds meanwhile, e.g.
    the training state); then with the pool sized as the engine sizes it: sc.kv_cache_gb, or
    sc.kv_cache_fraction of the device memory the weights and `resident` leave free (the programs'
    temporaries must fit in the rest), at most the call's demand. The rows
    report the second compile's memory analysis, and `Row.paged` the pool: pages and GiB per device,
    the tokens it holds per data shard, and how many sequences at full length (prompt + max_new_tokens,
    every sequence holding its own pages: prompt sharing ignored) it holds at once over the mesh."""
    hbm = target.hbm_bytes
    t0 = time.time()
    probe = sampler.compile_paged(params, lora, num_prompts, prompt_len, sc, device_bytes=hbm, pool_pages=2)
    info = probe["info"]
    bpp, ps = info["bytes_per_page"], info["page_size"]
    shards = info["decode_mesh"]["data"] if info["decode_mesh"] else 1

    def besides_pool(prog, running: bool = True) -> int:
        ma = prog.memory_analysis()
        args = int(ma.argument_size_in_bytes) - info["pool_pages"] * bpp
        return args + (int(ma.temp_size_in_bytes) + int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)
                       if running else 0)

    rest = resident + max(besides_pool(probe["prefill"]), besides_pool(probe["decode"]))
    # the engine sizes the pool before running anything, from the memory the weights and the caller's
    # arrays leave free (the programs' temporaries come out of the kv_cache_fraction's remainder)
    in_use = resident + max(besides_pool(probe["prefill"], False), besides_pool(probe["decode"], False))
    pool = paged_pool_pages(sc, num_prompts, prompt_len, shards, bpp, hbm - in_use)
    pages = max(pool["pages"], 2)
    progs = sampler.compile_paged(params, lora, num_prompts, prompt_len, sc, device_bytes=hbm, pool_pages=pages)
    info = progs["info"]
    dt = (time.time() - t0) / 4
    own = -(-(prompt_len + sc.max_new_tokens) // ps)
    sequences = num_prompts * sc.n
    at_once = shards * ((pages - 1) // own)
    concurrent = min(at_once, info["slots"])
    waves = -(-sequences // max(concurrent, 1))
    facts = dict(decode_mesh=info["decode_mesh"], decode_tensor=info["decode_tensor"], slots=info["slots"],
                 table_width=info["table_width"], page_size=ps, shards=shards, pool_pages=pages,
                 bytes_per_page=bpp, pool_bytes=pages * bpp, tokens_per_shard=(pages - 1) * ps,
                 full_length=prompt_len + sc.max_new_tokens, pages_per_sequence=own,
                 sequences_at_full_length=at_once, sequences=sequences, waves=waves, besides_pool=rest,
                 besides_pool_args=in_use, budget=pool["budget"], demand_pages=pool["demand"],
                 kv_cache_fraction=sc.kv_cache_fraction, kv_cache_gb=sc.kv_cache_gb)
    notes = []
    if pool["pages"] < pool["one"]:
        notes.append(f"paged: the KV budget ({pool['budget'] / GIB:.2f} GiB/device) holds {pool['pages']} pages, "
                     f"one sequence needs {pool['one']}: the engine refuses this call")
    mesh_text = ",".join(f"{k}={v}" for k, v in (info["decode_mesh"] or {}).items() if v > 1) or "1 device"
    fields = dict(base, engine="paged", layout="decode", run_mesh=dict(info["decode_mesh"] or {}),
                  paged=facts, notes=list(base.get("notes", ())) + notes)
    rows = []
    placed = [jax.tree.map(lambda a, w: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=w), tree, where)
              for tree, where in zip((params, lora), progs["decode"].input_shardings[0][:2]) if tree is not None]
    weights = (weights or set()) | weight_shapes(placed)  # as the decode layout lays them out too
    copy = _sharded_bytes(params, progs["decode"].input_shardings[0][0])  # the weights in the decode layout
    for name in ("prefill", "decode"):
        prog = progs[name]
        sh = prog.input_shardings[0]
        groups = {"params": _sharded_bytes(params, sh[0]), "kv_pool": pages * bpp}
        if lora is not None:
            groups["lora"] = _sharded_bytes(lora, sh[1])
        unused = max(copy - groups["params"], 0)  # weights a program does not take (prefill: the lm head)
        if name == "decode":
            new = sequences * sc.max_new_tokens
            r = _analyse(f"{prefix}_decode", prog, groups, target, fields, 2 * mcfg.num_params() * new,
                         loops=sc.max_new_tokens * waves, weights=weights, resident=resident + unused,
                         unread=pages * bpp)
        else:
            r = _analyse(f"{prefix}_prefill", prog, groups, target, fields,
                         2 * mcfg.num_params() * num_prompts * prompt_len, resident=resident + unused)
        r.compile_s = dt
        growth = r.bytes_per_device["temp"] - int(probe[name].memory_analysis().temp_size_in_bytes)
        r.paged = dict(facts, pct_hbm=r.bytes_per_device["total"] / hbm, decode_mesh_text=mesh_text,
                       temp_growth=growth)
        if growth > 0.1 * pages * bpp:
            r.notes.append(f"paged {name}: the temporaries grew with the pool ({growth / GIB:.2f} GiB more with "
                           f"{pages * bpp / GIB:.2f} GiB of pool than with 2 pages)"
                           + (": the CPU compiler copies the pool, the GPU compiler updates it in place"
                              if base["compiler"] == "cpu" else ""))
        rows.append(r)
    return rows


@_kernels_for
def plan_eval(model_name: str, mesh_sizes: dict, target: Target, devices: list, compiler: str, *,
              num_prompts: int = 8, prompt_len: int = 512, dtype: str = "bfloat16", sc=None,
              engines: Sequence[str] = ("dense", "paged"), decode_tensors: Sequence[int] = (),
              paged_prompts: int | None = None) -> list[Row]:
    """The evaluation sampler's prefill and decode programs (table 5 defaults: 16 samples x 38,912
    new tokens), the weights loaded in `mesh_sizes` (jsdr.eval's mesh): the dense engine's in that
    layout for calls of `num_prompts` prompts (jsdr.eval's dense calls take 8), the paged engine's in
    its decode layout (auto, and once per size in `decode_tensors`) for one call of `paged_prompts`
    (default num_prompts; jsdr.eval puts every problem in one paged call), every prompt `prompt_len`
    tokens long, with the loaded weights resident beside the engine's copy of them."""
    sc = sc or evaluation.TABLE5
    mesh_cfg = sharding.MeshConfig(**mesh_sizes)
    mesh, rules = sharding.make_mesh(mesh_cfg, devices), sharding.effective_rules(mesh_cfg)
    mcfg = model_config(model_name)
    base = dict(model=model_name, method="eval", mesh=dict(mesh_sizes), remat="none", attn_impl="xla",
                compiler=compiler, target=target.name, devices=len(devices), notes=layout_notes(mcfg, mesh, rules))
    rows = []
    with sharding.use_mesh(mesh, rules):
        params = abstract_params(mcfg, mesh, rules, jnp.dtype(dtype))
        weights = weight_shapes([params])
        sampler = Sampler(Model(mcfg), mesh=mesh, pad_id=0, rules=rules)
        if "dense" in engines:
            t0 = time.time()
            progs = sampler.compile_programs(params, None, num_prompts, prompt_len, sc)
            dt = (time.time() - t0) / 2
            for name, prog in progs.items():
                new = num_prompts * sc.n * sc.max_new_tokens if name == "decode" else num_prompts * prompt_len
                r = _analyse(f"eval_{name}", prog, {"params": params}, target, dict(base, engine="dense"),
                             2 * mcfg.num_params() * new, loops=sc.max_new_tokens if name == "decode" else 1,
                             weights=weights if name == "decode" else None)
                r.compile_s = dt
                rows.append(r)
        if "paged" in engines:
            for t in (0, *decode_tensors):
                rows.extend(plan_paged(sampler, params, None, paged_prompts or num_prompts, prompt_len,
                                       dataclasses.replace(sc, decode_tensor=t) if t else sc, target, base, "eval",
                                       mcfg, resident=_per_device_bytes(params), weights=weights))
    return rows


# ---------------------------------------------------------------------------------------------
# output


def sort_rows(rows: Sequence[Row]) -> list[Row]:
    """Layouts that fit first, then by estimated time of the layout's programs (a remat policy's train step
    plus the layout's rollout programs); rows of one layout stay together."""
    layouts: dict[tuple, list[Row]] = {}
    for r in rows:
        layouts.setdefault(tuple(r.mesh.items()), []).append(r)

    def key(item):
        group = item[1]
        steps = [r for r in group if r.program == "train_step"] or group
        others = sum(r.est_step_s for r in group if r.program != "train_step")
        best = min(r.est_step_s for r in steps) + (others if steps is not group else 0)
        return (not all(r.fits for r in group), best)
    return [r for _, group in sorted(layouts.items(), key=key) for r in group]


def _layout_text(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'layout':<22} {'engine':<6} {'remat':<6} {'program':<16} {'params':>7} {'lora':>6} {'opt':>6} "
            f"{'batch':>6} {'held':>6} {'kvpool':>7} {'temp':>7} {'total':>7} {'HBM':>5} {'%HBM':>5} {'fits':<4} "
            f"{'coll GiB':>8} {'est s':>8} {'MFU<=':>5}")
    hosts = any(r.cross_host for r in rows)
    if hosts:  # --hosts > 1: the collectives' bytes that leave a host
        head += f" {'xhost GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r.bytes_per_device
        layout = _layout_text(r.run_mesh or r.mesh)
        if r.layout == "decode":
            layout = f"{_layout_text(r.mesh)}>{layout}"
        coll = sum(v["bytes"] for v in r.collectives.values()) / GIB
        lines.append(f"{layout:<22} {r.engine or '-':<6} {r.remat:<6} {r.program:<16} {b.get('params', 0) / GIB:7.2f} "
                     f"{b.get('lora', 0) / GIB:6.2f} {b.get('opt_state', 0) / GIB:6.2f} {b.get('batch', 0) / GIB:6.2f} "
                     f"{b.get('resident', 0) / GIB:6.2f} "
                     f"{b.get('kv_pool', 0) / GIB:7.2f} {b['temp'] / GIB:7.2f} {b['total'] / GIB:7.2f} "
                     f"{r.hbm_bytes / GIB:5.0f} {b['total'] / r.hbm_bytes:5.0%} {'yes' if r.fits else 'NO':<4} "
                     f"{coll:8.2f} {r.est_step_s:8.3f} {r.est_mfu:5.2f}"
                     + (f" {r.cross_host.get('bytes', 0) / GIB:9.2f}" if hosts else ""))
    return "\n".join(lines)


def format_decode(rows: Sequence[Row]) -> str:
    """The decode programs side by side: the layout they run in, the collectives of one decode step
    (every row one token) and, for the paged engine, its KV pool."""
    rows = [r for r in rows if r.program.endswith("_decode")]
    if not rows:
        return ""
    head = (f"{'layout':<22} {'engine':<6} {'program':<16} {'total':>7} {'%HBM':>5} {'AG/step':>7} {'AG GiB':>7} "
            f"{'wAG/step':>8} {'wAG GiB':>7} {'coll/step':>9} {'slots':>5} {'t':>2} {'pool GiB':>8} {'pages':>7} "
            f"{'tok/shard':>10} {'full-length seqs':>16}")
    lines = ["per decode step (one token of every row), per device; AG = all-gathers, wAG = those of weights", head,
             "-" * len(head)]
    for r in rows:
        s, p, b = r.step_collectives, r.paged, r.bytes_per_device
        ag, wag = s.get("all-gather", {}), s.get("weight_all_gather", {})
        other = sum(v["count"] for k, v in s.items() if k != "weight_all_gather")
        layout = _layout_text(r.run_mesh or r.mesh)
        if r.layout == "decode":
            layout = f"{_layout_text(r.mesh)}>{layout}"
        pool = (f"{p['slots']:5d} {p['decode_tensor']:2d} {p['pool_bytes'] / GIB:8.2f} {p['pool_pages']:7d} "
                f"{p['tokens_per_shard']:10,d} {p['sequences_at_full_length']:>7,d} of {p['sequences']:<5,d}"
                if p else f"{'':5} {'':2} {'':8} {'':7} {'':10} {'':16}")
        lines.append(f"{layout:<22} {r.engine or '-':<6} {r.program:<16} {b['total'] / GIB:7.2f} "
                     f"{b['total'] / r.hbm_bytes:5.0%} {ag.get('count', 0):7d} {ag.get('bytes', 0) / GIB:7.3f} "
                     f"{wag.get('count', 0):8d} {wag.get('bytes', 0) / GIB:7.3f} {other:9d} {pool}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib (pip install matplotlib)") from None
    parts = ("params", "lora", "opt_state", "batch", "resident", "kv_pool", "other", "temp", "output")
    labels = [f"{_layout_text(r.mesh)}{'>' + _layout_text(r.run_mesh) if r.layout == 'decode' else ''} "
              f"{r.remat} {r.engine + ' ' if r.engine else ''}{r.program}" for r in rows]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.55 * len(rows))), 5.5))
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [r.bytes_per_device.get(part, 0) / GIB for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(rows[0].hbm_bytes / GIB, color="k", ls="--", lw=1, label=f"HBM ({rows[0].target})")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("GiB per device")
    ax.set_title(f"{rows[0].model} {rows[0].method}: memory per device ({rows[0].compiler} compiler)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# command line


def _args(argv: Sequence[str]):
    ap = argparse.ArgumentParser(prog="python -m jsdr.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any other --key=value overrides the config as for jsdr.train (e.g. "
                                        "--train.per_device_batch=2 --mesh.rules.act_seq=tensor). "
                                        "See docs/sharding.md.")
    ap.add_argument("--config", help="a jsdr.train YAML config (its method, lengths, batch, mesh and remat)")
    ap.add_argument("--eval", action="store_true", help="plan table-5 evaluation sampling instead of training")
    ap.add_argument("--model", help=f"known name ({', '.join(MODELS)}), hub id of one, or a local directory; "
                                    f"default: the config's model.path")
    ap.add_argument("--devices", type=int, default=8, help="devices to plan for (default 8)")
    ap.add_argument("--target", default="h100-80gb", choices=sorted(TARGETS), help="device type (default h100-80gb)")
    ap.add_argument("--hosts", type=int, default=1,
                    help="the devices are on this many hosts (each with devices/hosts consecutive devices of the "
                         "mesh): report the bytes of collectives that leave a host ('xhost GiB') and time them at "
                         "the inter-node bandwidth")
    ap.add_argument("--layouts", nargs="*", help='mesh shapes, e.g. "fsdp=8" "data=2,fsdp=4" (default: the config\'s)')
    ap.add_argument("--remat", help="comma-separated remat policies (default: the config's)")
    ap.add_argument("--cpu", action="store_true", help="use the CPU compiler even when the GPU one is available")
    ap.add_argument("--json", help="write one JSON object per layout x program to this file")
    ap.add_argument("--plot", help="write a PNG of memory per device by layout")
    ap.add_argument("--prompt-len", type=int, default=512, help="--eval: prompt tokens (default 512)")
    ap.add_argument("--prompts", type=int, default=8,
                    help="--eval: prompts per dense sampler call (default 8, as jsdr.eval's dense calls)")
    ap.add_argument("--paged-prompts", type=int, default=140,
                    help="--eval: prompts of the paged engine's call (default 140: jsdr.eval puts every problem "
                         "in one call, and its default benchmarks have 30 + 30 + 30 + 50)")
    ap.add_argument("--engines", default="dense,paged",
                    help="sampler engines to plan: dense (in the training layout), paged (in its decode layout); "
                         "default both")
    ap.add_argument("--decode-tensor", type=int, nargs="*", default=[],
                    help="paged engine: also plan these decode-layout tensor sizes (default: only the automatic one)")
    return ap.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _args(argv)
    # the planner never runs a program: JAX must not try to open a GPU (compile-only devices need none)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(args.devices, 1)}").strip()
    try:
        rows = run_plan(args, rest)
    except PlanError as e:
        print(f"jsdr.plan: {e}", file=sys.stderr)
        return 2
    except JsdrError as e:
        line, code = error_line("jsdr.plan", e)
        print(line, file=sys.stderr)
        return code
    rows = sort_rows(rows)
    print(format_table(rows))
    decode = format_decode(rows)
    if decode:
        print("\n" + decode)
    notes = sorted({f"{','.join(f'{k}={v}' for k, v in r.mesh.items())}: {n}" for r in rows for n in r.notes})
    for n in notes[:20]:
        print(f"note: {n}")
    if len(notes) > 20:
        print(f"note: ... and {len(notes) - 20} more (see --json)")
    compilers = {r.compiler for r in rows}
    why = f" (no GPU compiler: {WHY_CPU[0]})" if WHY_CPU else ""
    print(f"\nfigures from the {'GPU compiler' if compilers == {'gpu'} else 'CPU compiler (an estimate for the GPU)' + why}"
          f" for {args.devices} x {args.target}"
          + (f" on {args.hosts} hosts" if args.hosts > 1 else "")
          + "; est s = roofline step time (max of compute, HBM and interconnect terms"
          + (f"; xhost GiB: collectives leaving a host, at {TARGETS[args.target].internode_bw / 1e9:.0f} GB/s "
             f"per device)" if args.hosts > 1 else ")"))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(rows, args.plot)
        except PlanError as e:
            print(f"jsdr.plan: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0


def run_plan(args, rest: Sequence[str]) -> list[Row]:
    target = TARGETS[args.target]
    if args.hosts < 1 or args.devices % args.hosts:
        raise PlanError(f"--hosts {args.hosts}: must be a positive divisor of --devices ({args.devices})")
    target = dataclasses.replace(target, hosts=args.hosts)
    layouts = [parse_layout(x) for x in (args.layouts or [])]
    for lay in layouts:
        if math.prod(lay.values()) != args.devices:
            raise PlanError(f"layout {lay}: data x fsdp x tensor = {math.prod(lay.values())}, but --devices is "
                            f"{args.devices}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"dense", "paged"}:
        raise PlanError(f"--engines {args.engines!r}: give dense, paged or both (comma-separated)")
    for t in args.decode_tensor:
        if t < 1 or args.devices % t:
            raise PlanError(f"--decode-tensor {t}: must be a positive divisor of --devices ({args.devices})")
    devices, compiler = compile_devices(target, args.devices, prefer_gpu=not args.cpu)
    if args.eval:
        if rest:
            raise PlanError(f"--eval takes no training options: {' '.join(rest)}")
        name = args.model or "qwen3-8b"
        return [r for lay in (layouts or [{"data": 1, "fsdp": args.devices, "tensor": 1}])
                for r in plan_eval(name, lay, target, devices, compiler, num_prompts=args.prompts,
                                   prompt_len=args.prompt_len, engines=engines, decode_tensors=args.decode_tensor,
                                   paged_prompts=args.paged_prompts)]
    cfg, _ = train.build_config((["--config", args.config] if args.config else []) + list(rest))
    name = args.model or cfg.model.path
    if not layouts:
        sizes = cfg.mesh.resolve(args.devices)
        layouts = [dict(zip(("data", "fsdp", "tensor"), sizes))]
    remats = [r.strip() for r in (args.remat or cfg.model.remat).split(",") if r.strip()]
    rows = []
    for lay in layouts:
        for i, remat in enumerate(remats):
            rows.extend(plan_train(cfg, lay, remat, target, devices, compiler, name, rollout=i == 0,
                                   engines=engines, decode_tensors=args.decode_tensor))
    return rows


if __name__ == "__main__":
    sys.exit(main())
