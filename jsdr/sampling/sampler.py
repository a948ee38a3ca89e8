"""`Sampler`: the one entry point for sampling (eval, GRPO/OPSD rollouts, the toy), over two engines.

    sampler = Sampler(Model(cfg, lora_scale=lora_cfg.scale), mesh=mesh, pad_id=pad, detokenize=tok.decode)
    out = sampler.generate(params, lora, prompts, SamplingConfig(temperature=1.0, top_p=0.95, n=16,
                                                                  max_new_tokens=38912, stop_token_ids=(eos,)))

`sc.engine` picks the engine per call: "paged" (scheduler.py + paged.py: paged KV pool, continuous
batching, decode layout) or "dense" (dense.py, the reference). Both return the same tokens for the
same seed; see the package docstring for the sampling semantics.

Decode layout. Under a training mesh whose weights are sharded for training (fsdp), decoding would
all-gather every layer's weights at every token. The paged engine instead decodes on a mesh of the
same devices shaped (data = devices / t, fsdp = 1, tensor = t) with the default rules: the base
weights are resharded to it once per phase (and cached while the same params object is passed:
base weights do not change during LoRA training), the LoRA tree is replicated per call (it is
small), and the training arrays are left as they are. `t` is `sc.decode_tensor`, or (0 = auto) the
smallest power of two dividing the kv heads and the devices with which the weights take at most
`DECODE_WEIGHT_SHARE` of a device's memory (1 on CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jsdr import distributed as dist
from jsdr import sharding
from jsdr.model.transformer import Model, param_axes
from jsdr.sampling.config import SampleOutput, SamplingConfig, cut_at_stop_strings
from jsdr.sampling.dense import DEFAULT_PROMPT_BUCKETS, DenseSampler
from jsdr.sampling.filters import FILTER_BOUND
from jsdr.sampling.filters import Knobs
from jsdr.sampling.paged import PoolShape, Programs, Slots
from jsdr.sampling.scheduler import PagedEngine, SamplingError, TableWidths, memory_stats, slot_count

DECODE_WEIGHT_SHARE = 0.25


def decode_tensor_size(num_devices: int, num_kv_heads: int, weight_bytes: int, device_bytes: int | None,
                       asked: int = 0) -> int:
    """The tensor-parallel size of the decode layout (see the module docstring)."""
    if asked:
        if num_devices % asked:
            raise SamplingError(f"decode_tensor={asked} does not divide the {num_devices} devices")
        return asked
    sizes = [t for t in (1 << i for i in range(num_devices.bit_length()))
             if num_devices % t == 0 and num_kv_heads % t == 0]
    if device_bytes is None:
        return 1
    for t in sizes:
        if weight_bytes / t <= DECODE_WEIGHT_SHARE * device_bytes:
            return t
    return sizes[-1]


def decode_mesh(mesh, tensor: int):
    """The decode mesh over `mesh`'s devices: (data = devices / tensor, fsdp = 1, tensor)."""
    devices = list(np.asarray(mesh.devices).flat)
    return sharding.make_mesh((len(devices) // tensor, 1, tensor), devices=devices)


class Sampler:
    """Holds both engines' compiled programs for one model; reuse it across calls.

    `model` gives the config, lora_scale, attn_impl and compute dtype of the forward (its remat and
    lora_dropout are ignored). `mesh`/`rules`: the layout the caller's params live in (the dense
    engine decodes in it; the paged engine reshards to its decode layout). `detokenize` (token ids
    -> text) is needed for stop strings.
    """

    def __init__(self, model: Model, *, mesh=None, pad_id: int = 0, rules: dict | None = None,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, cache_dtype=None,
                 filter_bound: int = FILTER_BOUND, detokenize: Callable[[list[int]], str] | None = None):
        self.dense = DenseSampler(model, mesh=mesh, pad_id=pad_id, prompt_buckets=prompt_buckets,
                                  cache_dtype=cache_dtype, filter_bound=filter_bound, rules=rules)
        self.model, self.cfg, self.mesh, self.rules = self.dense.model, self.dense.cfg, mesh, rules
        self.pad_id, self.filter_bound, self.detokenize = self.dense.pad_id, self.dense.filter_bound, detokenize
        self._engines: dict[int, PagedEngine] = {}
        self._placed: tuple | None = None  # (params object, tensor size, params in the decode layout)
        self.last_stats: dict = {}

    @property
    def num_compiles(self) -> int:
        return self.dense.num_compiles + sum(e.programs.num_compiles for e in self._engines.values())

    # ----- the decode layout

    def decode_tensor(self, params, sc: SamplingConfig, device_bytes: int | None = None, measure: bool = True) -> int:
        """The decode layout's tensor size for `params` (see `decode_tensor_size`); the device memory is
        `device_bytes`, or (with `measure`) read from the mesh's first device."""
        if self.mesh is None or self.mesh.size == 1:
            return 1
        if device_bytes is None and measure:
            stats = memory_stats(dist.local_device(self.mesh))
            device_bytes = dist.agree(int(stats["bytes_limit"]) if stats else None,
                                      lambda v: None if None in v else min(v), "device memory")
        weight_bytes = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
        return decode_tensor_size(self.mesh.size, self.cfg.num_kv_heads, weight_bytes, device_bytes, sc.decode_tensor)

    def engine(self, tensor: int) -> PagedEngine:
        if tensor not in self._engines:
            # a one-device mesh is kept: it names the device the programs compile for (a compile-only
            # GPU in jsdr.plan), which the default backend is not
            mesh = None if self.mesh is None else decode_mesh(self.mesh, tensor)
            programs = Programs(self.model, mesh=mesh, rules=None if mesh is None else dict(sharding.DEFAULT_RULES),
                                pad_id=self.pad_id, filter_bound=self.filter_bound)
            self._engines[tensor] = PagedEngine(programs, context_len=self.cfg.max_position_embeddings,
                                                detokenize=self.detokenize)
        return self._engines[tensor]

    def place(self, params, lora, engine: PagedEngine, tensor: int):
        """params and lora in the engine's decode layout (params cached by identity)."""
        mesh = engine.programs.mesh
        if mesh is None:
            return params, lora
        if self._placed is not None and self._placed[0] is params and self._placed[1] == tensor:
            placed = self._placed[2]
        else:
            self._placed = None
            shardings = sharding.tree_shardings(param_axes(self.cfg), params, mesh, engine.programs.rules)
            placed = jax.device_put(params, shardings)
            self._placed = (params, tensor, placed)
        if lora is not None:
            lora = jax.device_put(lora, NamedSharding(mesh, PartitionSpec()))
        return placed, lora

    def release(self, weights: bool = True) -> None:
        """Free the KV pools (sized from the free memory of the moment) and, with `weights`, the
        decode-layout copy of the base weights; the next call recreates them. jsdr.train frees both
        after every rollout phase, so the train step gets its memory back (resharding the weights
        again costs one all-gather per rollout phase, not one per token)."""
        if weights:
            self._placed = None
        for e in self._engines.values():
            e._pools = None

    # ----- calls

    def generate(self, params, lora, prompts: Sequence[Sequence[int]], sc: SamplingConfig,
                 rng: jax.Array | None = None, *, max_new_tokens: Sequence[int] | None = None,
                 prompt_keys=None, progress: Callable[[dict], None] | None = None,
                 on_prompt_done: Callable[[int, SampleOutput], None] | None = None) -> SampleOutput:
        """Sample `sc.n` completions for every prompt.

        rng: the call's key (default PRNGKey(sc.seed)); sample row r draws with fold_in(rng, r).
        prompt_keys: [N, 2] per-prompt keys instead: sample j of prompt i draws with
        fold_in(prompt_keys[i], j), so a prompt's samples do not depend on the other prompts of the
        call (jsdr.eval: resumable in any batching). max_new_tokens: per prompt (default
        sc.max_new_tokens for all). progress: called after every decode segment of the paged engine
        with {"finished", "total", "running", "waiting", "tokens", "tokens_per_s", "pages_in_use",
        "pages_total", "seconds"}. on_prompt_done(i, out_i): called once all samples of prompt i are
        finished (paged: as they finish; dense: after the call), out_i holding its n rows."""
        if not isinstance(sc, SamplingConfig):
            raise TypeError(f"sc must be a SamplingConfig, got {type(sc).__name__}")
        rows = self.dense._check_prompts(prompts)
        limits = self._limits(max_new_tokens, len(rows), sc)
        key = jax.random.PRNGKey(sc.seed) if rng is None else rng
        if prompt_keys is not None and len(prompt_keys) != len(rows):
            raise SamplingError(f"prompt_keys: {len(prompt_keys)} keys for {len(rows)} prompts")
        if sc.engine == "dense":
            self.engine(1).check(rows, limits, sc.stop_strings)  # as the paged engine checks its calls
            out = self._dense(params, lora, rows, sc, key, limits, prompt_keys)
            if on_prompt_done is not None:
                for i in range(len(rows)):
                    sl = slice(i * sc.n, (i + 1) * sc.n)
                    on_prompt_done(i, SampleOutput(out.tokens[sl], out.logprobs[sl], out.logprobs_raw[sl],
                                                   out.lengths[sl], out.finish_reason[sl], out.prompt_index[sl]))
            return out
        tensor = self.decode_tensor(params, sc)
        engine = self.engine(tensor)
        placed, lora = self.place(params, lora, engine, tensor)
        out = engine.generate(placed, lora, rows, sc, key, limits, cache_dtype=self.dense._cache_dtype(params),
                              prompt_keys=prompt_keys, progress=progress, on_prompt_done=on_prompt_done)
        self.last_stats = dict(engine.stats, decode_tensor=tensor)
        return out

    def check(self, params, prompts: Sequence[Sequence[int]], sc: SamplingConfig,
              max_new_tokens: Sequence[int] | None = None) -> None:
        """Raise the error a `generate` call with these arguments would raise on bad input (prompts,
        limits, the model's context, a KV budget too small for one sequence), without running
        anything: callers check before they write anything (jsdr.eval)."""
        rows = self.dense._check_prompts(prompts)
        limits = self._limits(max_new_tokens, len(rows), sc)
        engine = self.engine(self.decode_tensor(params, sc) if sc.engine == "paged" else 1)
        engine.check(rows, limits, sc.stop_strings)
        if sc.engine == "paged":
            engine.plan_pool(sc, [len(r) for r in rows], limits, sc.n, self.dense._cache_dtype(params))

    @staticmethod
    def _limits(max_new_tokens, count: int, sc: SamplingConfig) -> list[int]:
        if max_new_tokens is None:
            return [sc.max_new_tokens] * count
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != count or any(m < 1 for m in limits):
            raise SamplingError(f"max_new_tokens must give one integer >= 1 per prompt ({count} prompts), "
                                f"got {list(max_new_tokens)!r}")
        return limits

    def _dense(self, params, lora, rows, sc: SamplingConfig, key, limits: list[int], prompt_keys=None) -> SampleOutput:
        width = max(limits)
        if width != sc.max_new_tokens:
            sc = dataclasses.replace(sc, max_new_tokens=width)
        out = self.dense.generate(params, lora, rows, sc, rng=key, prompt_keys=prompt_keys)
        for r, p in enumerate(out.prompt_index):  # per-prompt limits: cut the longer rows
            m = limits[int(p)]
            if out.lengths[r] > m:
                out.tokens[r, m:], out.logprobs[r, m:], out.logprobs_raw[r, m:] = self.pad_id, 0.0, 0.0
                out.lengths[r], out.finish_reason[r] = m, 1
        return cut_at_stop_strings(out, sc.stop_strings, self.detokenize, self.pad_id)

    # ----- compiled programs without running them (jsdr.plan)

    def compile_programs(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """The dense engine's compiled prefill and decode programs (see DenseSampler.compile_programs)."""
        return self.dense.compile_programs(params, lora, num_prompts, prompt_len, sc)

    def memory_analysis(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        return self.dense.memory_analysis(params, lora, num_prompts, prompt_len, sc)

    def compile_paged(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig, *,
                      device_bytes: int | None = None, pool_pages: int | None = None,
                      fresh_prefill: bool = False) -> dict:
        """The paged engine's compiled (never run) prefill and decode programs for a call of `num_prompts`
        prompts of `prompt_len` tokens, the decode program at its widest page table (every slot at full
        length). params / lora may be jax.ShapeDtypeStructs in the training layout (compile-only devices:
        jsdr.plan); they are given the decode layout here. `device_bytes` (a device's memory) drives the
        auto decode layout; `pool_pages` (per shard, default 2) sizes the pool. Returns {"prefill",
        "decode": Compiled, "info": {...}} with the decode mesh, slots, page-table width and pool.
        "prefill" is a later chunk's program (it reads the pages of the earlier chunks; with Pallas
        attention the larger of the two); fresh_prefill=True adds "prefill_fresh", the program of a
        call whose rows all start at position 0 (with Pallas attention it runs the flash kernel)."""
        shapes = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
        params, lora = shapes(params), None if lora is None else shapes(lora)
        tensor = self.decode_tensor(params, sc, device_bytes, measure=False)  # the target's memory, not this machine's
        prog = self.engine(tensor).programs
        ps, shards = sc.page_size, prog.shards
        dtype = self.dense._cache_dtype(params)
        shape = PoolShape(shards, int(pool_pages or 2), ps, self.cfg.num_layers, self.cfg.num_kv_heads,
                          self.cfg.head_dim, jnp.dtype(dtype).name)
        S = slot_count(num_prompts * sc.n, sc.max_slots, shards, prog.platform)
        full = -(-(prompt_len + sc.max_new_tokens) // ps)
        widths = TableWidths(full, ps)
        rows, C = widths.prefill_rows_and_chunk(prompt_len - 1, num_prompts, sc.prefill_chunk)
        mesh = prog.mesh

        def spec(shape_, dtype_, where=None):
            return jax.ShapeDtypeStruct(shape_, dtype_, sharding=where)

        def rowspec(shape_, dtype_):
            return spec(shape_, dtype_, prog.row_sharding(len(shape_)))

        if mesh is not None:
            with prog.ctx():
                where = sharding.tree_shardings(param_axes(self.cfg), params, mesh, prog.rules)
            params = jax.tree.map(lambda a, w: spec(a.shape, a.dtype, w), params, where)
            if lora is not None:
                rep = NamedSharding(mesh, PartitionSpec())
                lora = jax.tree.map(lambda a: spec(a.shape, a.dtype, rep), lora)
        pool = spec(shape.shape, shape.dtype, prog.pool_sharding())
        penalty = sc.presence_penalty != 0
        slots = Slots(*(rowspec((S,), jnp.int32) for _ in range(3)), key=rowspec((S, 2), jnp.uint32),
                      budget=rowspec((S,), jnp.int32), done=rowspec((S,), jnp.bool_), stopped=rowspec((S,), jnp.bool_),
                      seen=rowspec((S, self.cfg.vocab_size), jnp.bool_) if penalty else None)
        scalar = lambda t: spec((), t)
        knobs = Knobs(*(scalar(jnp.float32) for _ in range(4)), top_k=scalar(jnp.int32))
        compiles = prog.num_compiles
        with prog.ctx():
            R = rows * shards
            prefill_args = (params, lora, pool, pool, rowspec((R, C), jnp.int32), rowspec((R, C), jnp.int32),
                            rowspec((R, C), jnp.bool_), rowspec((R, widths(-(-prompt_len // ps))), jnp.int32))
            prefill = prog._prefill.lower(*prefill_args).compile()
            fresh = prog._prefill.lower(*prefill_args, fresh=True).compile() if fresh_prefill else None
            decode = prog._decode.lower(params, lora, pool, pool, slots, rowspec((S, widths(full)), jnp.int32),
                                        knobs, spec((8,), jnp.int32), scalar(jnp.int32), steps=sc.decode_steps,
                                        greedy=sc.greedy, filtered=sc.filtered, penalty=penalty).compile()
        prog.num_compiles = compiles
        info = {"decode_mesh": None if mesh is None else dict(mesh.shape), "decode_tensor": tensor, "slots": S,
                "table_width": widths(full), "prefill_rows": R, "prefill_chunk": C, "pool_pages": shape.pages,
                "bytes_per_page": shape.bytes_per_page(prog.tensor_split()), "page_size": ps}
        out = {"prefill": prefill, "decode": decode, "info": info}
        if fresh is not None:
            out["prefill_fresh"] = fresh
        return out
