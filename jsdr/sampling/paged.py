"""The device side of the paged engine: KV pools, and the jitted prefill, decode-segment, slot-update
and page-copy programs that the scheduler (scheduler.py) drives.

Pools. Keys and values live in two pools [K, Dn * L * P, S, D] (kv heads, data shards x layers x
pages, tokens per page, head dim; see jsdr.model.attention.PagedKV). Each data shard owns P pages
of every layer, addressed by local ids 1..P-1 (0 is the scratch page). A sequence's page table
lists its pages in position order, so position p lives in slot p % S of page table[p // S].

Slots. The decode program runs a fixed number of slots (rows) at once. A slot holds one sequence:
the token to feed next (`last_token`) at its position (`pos`), the index of the token it samples
next (`step`, which with the sample row's `key` selects the uniforms: the same draws as the dense
engine), its budget of new tokens, and done/stopped flags. Empty slots are done. A decode segment
runs up to `steps` forward+sample steps over all slots inside one `lax.while_loop` and stops early
once `exit_done` slots are done, so that the scheduler can refill them.

Prefill feeds the prompt minus its last token through the same paged forward in chunks; the last
prompt token is fed by the first decode step, whose logits give the first sampled token.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jsdr import sharding
from jsdr.model.attention import PagedKV, _paged_axes, pool_spec
from jsdr.model.transformer import Model
from jsdr.sampling.filters import FILTER_BOUND, Knobs, sample_logits
from jsdr.sampling.config import DECODE_COMPILER_OPTIONS


class Slots(NamedTuple):
    """Per decode slot (S rows, split over the data shards like the pages)."""

    last_token: jax.Array  # [S] int32, fed at the next step
    pos: jax.Array  # [S] int32, the position of last_token
    step: jax.Array  # [S] int32, index of the next sampled token of the sequence
    key: jax.Array  # [S, 2] uint32, the sample row's key (config.row_keys)
    budget: jax.Array  # [S] int32, max new tokens of the sequence
    done: jax.Array  # [S] bool, finished or empty
    stopped: jax.Array  # [S] bool, ended by a stop token
    seen: jax.Array | None  # [S, V] bool, generated tokens (presence penalty only)


class Segment(NamedTuple):
    """What one decode segment sampled: column i is step i of the segment."""

    tokens: jax.Array  # [S, steps] int32 (pad_id where the slot was done)
    logprobs: jax.Array  # [S, steps] float32
    logprobs_raw: jax.Array  # [S, steps] float32


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """Pool geometry: `pages` per data shard and layer (scratch page included)."""

    shards: int
    pages: int
    page_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.kv_heads, self.shards * self.num_layers * self.pages, self.page_size, self.head_dim)

    def bytes_per_page(self, tensor_split: int = 1) -> int:
        """Bytes of one page id (all layers, keys and values) on one device."""
        return (2 * self.num_layers * (self.kv_heads // tensor_split) * self.page_size * self.head_dim
                * jnp.dtype(self.dtype).itemsize)


class Programs:
    """The jitted programs of the paged engine for one model on one (decode) mesh."""

    def __init__(self, model: Model, *, mesh=None, rules: dict | None = None, pad_id: int = 0,
                 filter_bound: int = FILTER_BOUND):
        self.model = dataclasses.replace(model, remat="none", lora_dropout=0.0)
        self.cfg = model.cfg
        self.mesh = mesh
        self.rules = rules
        self.pad_id = int(pad_id)
        self.filter_bound = int(filter_bound)
        self.num_compiles = 0  # traces of the prefill/decode programs (each trace = one compile)
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("k_pool", "v_pool"), static_argnames=("fresh",))
        self._decode = jax.jit(self._decode_impl, donate_argnames=("k_pool", "v_pool", "slots"),
                               static_argnames=("steps", "greedy", "filtered", "penalty"),
                               compiler_options=DECODE_COMPILER_OPTIONS)
        self._update = jax.jit(self._update_impl, donate_argnames=("slots",))
        self._copy = jax.jit(self._copy_impl, donate_argnames=("k_pool", "v_pool"))
        self._zeros: dict = {}

    # ----- layout

    @property
    def shards(self) -> int:
        """Data shards: rows and pages are split this many ways."""
        if self.mesh is None:
            return 1
        axes = sharding.logical_to_spec(("act_batch",), None, self.mesh, self.rules)[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

    @property
    def platform(self) -> str:
        """The platform of the devices the programs run on ("cpu", "gpu", ...)."""
        device = self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]
        return device.platform

    def ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    def tensor_split(self) -> int:
        """How many ways the pools' kv heads are split (1 = every device holds all heads)."""
        if self.mesh is None:
            return 1
        with self.ctx():
            _, _, kv = _paged_axes(self.cfg.num_heads, self.cfg.num_kv_heads, self.mesh)
        kv = () if kv is None else (kv,) if isinstance(kv, str) else kv
        return int(np.prod([self.mesh.shape[a] for a in kv])) if kv else 1

    def pool_sharding(self):
        if self.mesh is None:
            return None
        with self.ctx():
            return NamedSharding(self.mesh, pool_spec(self.cfg.num_heads, self.cfg.num_kv_heads, self.mesh))

    def row_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        return sharding.batch_sharding(ndim, self.mesh, self.rules)

    def put_rows(self, x):
        """A host [rows, ...] array placed like the slots (rows over the data shards)."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self.row_sharding(x.ndim))

    def zeros(self, shape: tuple[int, ...], dtype, where) -> jax.Array:
        """A zeroed array made on the devices (never on the host) with sharding `where`."""
        key = (tuple(shape), jnp.dtype(dtype).name, where)
        if key not in self._zeros:
            self._zeros[key] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=where)
        return self._zeros[key]()

    def new_pools(self, shape: PoolShape) -> tuple[jax.Array, jax.Array]:
        """Zeroed key and value pools."""
        where = self.pool_sharding()
        return self.zeros(shape.shape, shape.dtype, where), self.zeros(shape.shape, shape.dtype, where)

    # ----- traced bodies

    def _prefill_impl(self, params, lora, k_pool, v_pool, tokens, positions, valid, page_table, fresh=False):
        """Feed tokens [R, C] at positions [R, C] (valid marks real tokens) through the model, writing
        their keys and values into the pages of page_table [R, M]; returns the pools. fresh (static):
        every row starts at position 0 (see PagedKV.fresh)."""
        self.num_compiles += 1
        cache = PagedKV(k_pool, v_pool, page_table, valid, fresh)
        _, cache = self.model.hidden(params, lora, tokens=tokens, positions=positions,
                                     segment_ids=valid.astype(jnp.int32), cache=cache)
        return cache.k, cache.v

    def _decode_impl(self, params, lora, k_pool, v_pool, slots: Slots, page_table, knobs: Knobs, stop_ids,
                     exit_done, *, steps, greedy, filtered, penalty):
        self.num_compiles += 1
        S = slots.done.shape[0]
        row_keys = slots.key
        constrain = sharding.constrain

        def cond(c):
            i, _, _, sl, _ = c
            return (i < steps) & ~jnp.all(sl.done) & (jnp.sum(sl.done.astype(jnp.int32)) < exit_done)

        def body(c):
            i, k_pool, v_pool, sl, out = c
            active = ~sl.done
            cache = PagedKV(k_pool, v_pool, page_table, active[:, None])
            h, cache = self.model.hidden(params, lora, tokens=sl.last_token[:, None], positions=sl.pos[:, None],
                                         segment_ids=active[:, None].astype(jnp.int32), cache=cache)
            logits = constrain(self.model.logits(params, h[:, 0]), ("act_batch", "act_vocab"))
            u = jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s), (), jnp.float32))(row_keys,
                                                                                                   sl.step)
            tok, lp, raw = sample_logits(logits, u, temperature=knobs.temperature, top_k=knobs.top_k,
                                         top_p=knobs.top_p, min_p=knobs.min_p,
                                         presence_penalty=knobs.presence_penalty, seen=sl.seen, greedy=greedy,
                                         filtered=filtered, bound=self.filter_bound)
            tok = jnp.where(active, tok, self.pad_id)
            lp, raw = jnp.where(active, lp, 0.0), jnp.where(active, raw, 0.0)
            hit = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
            fin = active & (hit | (sl.step + 1 >= sl.budget))
            out = Segment(*(jax.lax.dynamic_update_slice_in_dim(o, x[:, None], i, axis=1)
                            for o, x in zip(out, (tok, lp, raw))))
            seen = sl.seen
            if seen is not None:
                seen = seen.at[jnp.arange(S), tok].max(active)
            step = active.astype(jnp.int32)
            sl = Slots(last_token=jnp.where(active, tok, sl.last_token), pos=sl.pos + step, step=sl.step + step,
                       key=sl.key, budget=sl.budget, done=sl.done | fin, stopped=sl.stopped | hit, seen=seen)
            return i + 1, cache.k, cache.v, sl, out

        out = Segment(tokens=jnp.full((S, steps), self.pad_id, jnp.int32),
                      logprobs=jnp.zeros((S, steps), jnp.float32), logprobs_raw=jnp.zeros((S, steps), jnp.float32))
        out = Segment(*(constrain(o, ("act_batch", None)) for o in out))
        _, k_pool, v_pool, slots, out = jax.lax.while_loop(
            cond, body, (jnp.asarray(0, jnp.int32), k_pool, v_pool, slots, out))
        return k_pool, v_pool, slots, out

    def _update_impl(self, slots: Slots, mask, new: Slots, seen_tokens):
        """Slots with the rows of `mask` replaced by `new` (whose `seen` is ignored): their seen
        tokens are reset to `seen_tokens` [S, G] (-1 = none), the tokens a resumed sequence has."""
        rows = [jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o) for n, o in zip(new[:-1], slots[:-1])]
        seen = slots.seen
        if seen is not None:
            S, V = seen.shape
            idx = jnp.where(seen_tokens < 0, V, seen_tokens)
            hit = jnp.zeros((S, V + 1), bool).at[jnp.arange(S)[:, None], idx].set(True)[:, :V]
            seen = (seen & ~mask[:, None]) | (hit & mask[:, None])
        return Slots(*rows, seen=seen)

    def _copy_impl(self, k_pool, v_pool, src, dst):
        """Copy pages src -> dst ([Dn * C] local ids, C per shard; 0 -> 0 is a no-op) in every layer."""
        L = self.cfg.num_layers

        def local(k_pool, v_pool, src, dst):
            P = k_pool.shape[1] // L
            base = (jnp.arange(L, dtype=jnp.int32) * P)[:, None]
            s, d = (base + src[None]).reshape(-1), (base + dst[None]).reshape(-1)
            return k_pool.at[:, d].set(k_pool[:, s]), v_pool.at[:, d].set(v_pool[:, s])

        if self.mesh is None or self.mesh.size == 1:
            return local(k_pool, v_pool, src, dst)
        with self.ctx():
            batch, _, kv = _paged_axes(self.cfg.num_heads, self.cfg.num_kv_heads, self.mesh)
        pages, rows = PartitionSpec(kv, batch, None, None), PartitionSpec(batch)
        return jax.shard_map(local, mesh=self.mesh, check_vma=False, in_specs=(pages, pages, rows, rows),
                             out_specs=(pages, pages))(k_pool, v_pool, src, dst)

    # ----- calls (under the decode mesh)

    def prefill(self, params, lora, pools, tokens, positions, valid, page_table, fresh: bool = False):
        """fresh: every row of the call starts at position 0. Only the Pallas model uses it (its first
        chunks attend through the flash kernel); other impls keep one program per shape."""
        fresh = bool(fresh) and self.model.attn_impl == "pallas"
        with self.ctx():
            return self._prefill(params, lora, *pools, self.put_rows(tokens), self.put_rows(positions),
                                 self.put_rows(valid), self.put_rows(page_table), fresh=fresh)

    def decode(self, params, lora, pools, slots, page_table, knobs, stop_ids, exit_done, *, steps, greedy,
               filtered, penalty):
        with self.ctx():
            return self._decode(params, lora, *pools, slots, self.put_rows(page_table), knobs,
                                jnp.asarray(stop_ids), jnp.asarray(exit_done, jnp.int32), steps=steps,
                                greedy=greedy, filtered=filtered, penalty=penalty)

    def update(self, slots, mask, new: Slots, seen_tokens):
        with self.ctx():
            new = Slots(*(self.put_rows(x) for x in new[:-1]), seen=None)
            return self._update(slots, self.put_rows(mask), new, self.put_rows(seen_tokens))

    def copy(self, pools, src, dst):
        with self.ctx():
            return self._copy(*pools, self.put_rows(src), self.put_rows(dst))

    def empty_slots(self, S: int, penalty: bool) -> Slots:
        z = np.zeros((S,), np.int32)
        slots = Slots(last_token=z + self.pad_id, pos=z, step=z, key=np.zeros((S, 2), np.uint32), budget=z + 1,
                      done=np.ones((S,), bool),
                      stopped=np.zeros((S,), bool), seen=None)
        slots = Slots(*(self.put_rows(x) for x in slots[:-1]), seen=None)
        if penalty:
            slots = slots._replace(seen=self.zeros((S, self.cfg.vocab_size), bool, self.row_sharding(2)))
        return slots
