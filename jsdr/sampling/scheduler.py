"""The host side of the paged engine: page allocation and continuous batching.

    engine = PagedEngine(programs, context_len=cfg.max_position_embeddings, detokenize=tok.decode)
    out = engine.generate(params, lora, prompts, sc, key)

A call turns every (prompt, sample) pair into a sequence and runs scheduler turns until all are
finished. One turn:

1. admit: waiting sequences (preempted ones first, then in sample-row order) take free slots. A
   slot's data shard must have free pages for what the sequence needs next. The n samples of a
   prompt share its prompt: the prompt (minus its last token) is prefilled once per shard into
   pages the prompt group holds; each sample references its full pages and gets its own copy of
   the partial last page (copy-on-write, done before it writes there). A preempted sequence is
   prefilled again from its prompt and the tokens it had (recompute), then continues with the same
   draws.
2. prefill the admitted work in chunks of at most `prefill_chunk` tokens per row.
3. top up: every running sequence gets the pages its next `decode_steps` tokens need; when a shard
   runs out, the most recently admitted sequence there is preempted (pages freed, back to the front
   of the queue).
4. decode one segment (paged.py); it returns early once enough slots are done to refill.
5. collect the new tokens; sequences that stopped (stop token, stop string, length) return their
   pages and slots.

Page references are counted per shard, so shared prompt pages are freed when the last sequence
holding them ends. Outputs do not depend on the schedule: every draw is keyed by (sample row,
token index), as in the dense engine.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import distributed as dist
from jsdr.errors import JsdrError
from jsdr.sampling.config import SampleOutput, SamplingConfig, find_stop_string, row_keys
from jsdr.sampling.filters import knobs_of, stop_id_array
from jsdr.sampling.paged import PoolShape, Programs, Slots

CPU_POOL_CAP = 4 << 30  # auto KV budget without device memory statistics (CPU): at most this per device
MIN_CONTEXT_TOKENS = 256  # page tables narrower than this many tokens are not bucketed further
MIN_PREFILL_CHUNK = 16
PREFILL_TOKENS = 4096  # prefill rows x chunk per shard and call, at most


def memory_stats(device) -> dict | None:
    """The device's memory statistics with a `bytes_limit` (GPU), or None (CPU, compile-only devices)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without statistics
        return None
    return stats if stats and stats.get("bytes_limit") else None


class SamplingError(JsdrError, ValueError):
    """A sampling call that cannot run as asked (prompt too long, KV budget too small, no prompts)."""

    kind = "sampling"
    exit_code = 2


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


AUTO_SLOTS = {"cpu": 16}  # max_slots=0: per platform (default AUTO_SLOTS_DEFAULT)
AUTO_SLOTS_DEFAULT = 256


def slot_count(sequences: int, max_slots: int, shards: int, platform: str = "gpu") -> int:
    """Decode slots of a call: a power of two up to max_slots (0 = the platform's AUTO_SLOTS: on CPU a
    decode step's cost grows faster than its slots once the gathered pages leave the cache), a
    multiple of the data shards."""
    cap = max_slots or AUTO_SLOTS.get(platform, AUTO_SLOTS_DEFAULT)
    S = min(_pow2(sequences), _pow2(cap))
    return -(-S // shards) * shards


class TableWidths:
    """Page-table widths (pages read per row) of a call: powers of two, at least MIN_CONTEXT_TOKENS
    worth of pages and at most the call's longest sequence, so a call compiles a few decode
    programs (one per width) and reads pages in proportion to its current longest sequence."""

    def __init__(self, full_pages: int, page_size: int):
        self.full = int(full_pages)
        self.least = min(_pow2(full_pages), max(1, MIN_CONTEXT_TOKENS // page_size))

    def __call__(self, pages: int) -> int:
        return min(max(self.least, _pow2(pages)), max(self.full, pages))

    def prefill_rows_and_chunk(self, longest: int, jobs: int, chunk: int) -> tuple[int, int]:
        """(rows per shard, chunk length) of a prefill call whose longest job has `longest` tokens left."""
        C = max(MIN_PREFILL_CHUNK, min(_pow2(chunk), _pow2(longest)))
        return min(_pow2(jobs), max(1, PREFILL_TOKENS // C)), C


class _Group:
    """One prompt and its n samples."""

    __slots__ = ("index", "tokens", "pending", "pages")

    def __init__(self, index: int, tokens: np.ndarray, n: int):
        self.index, self.tokens, self.pending = index, tokens, n
        self.pages: dict[int, list[int]] = {}  # shard -> pages holding prompt[:-1]


class _Seq:
    __slots__ = ("row", "key", "group", "max_new", "tokens", "logprobs", "raw", "pages", "shard", "slot", "stopped",
                 "finished", "checked", "admitted_at")

    def __init__(self, row: int, group: _Group, max_new: int):
        self.row, self.group, self.max_new = row, group, max_new
        self.key = np.zeros((2,), np.uint32)  # set by the call (config.row_keys)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.raw: list[float] = []
        self.pages: list[int] = []
        self.shard = self.slot = -1
        self.stopped = self.finished = False
        self.checked = 0  # tokens already searched for stop strings
        self.admitted_at = -1

    @property
    def prompt_len(self) -> int:
        return len(self.group.tokens)

    @property
    def pos(self) -> int:
        """Position of the token fed next (the last prompt token, then the last generated one)."""
        return self.prompt_len - 1 + len(self.tokens)

    @property
    def final_pos(self) -> int:
        """The last position this sequence can write (its last sampled token is never fed)."""
        return self.prompt_len + self.max_new - 2


class _Pages:
    """Free lists and reference counts of the pages of every data shard (page 0 is scratch)."""

    def __init__(self, shards: int, pages: int):
        self.free = [list(range(pages - 1, 0, -1)) for _ in range(shards)]
        self.refs = np.zeros((shards, pages), np.int32)
        self.total = shards * (pages - 1)

    def available(self, shard: int) -> int:
        return len(self.free[shard])

    def take(self, shard: int, count: int) -> list[int]:
        if count > len(self.free[shard]):
            raise RuntimeError("page allocator: asked for more pages than are free (scheduler bug)")
        out = [self.free[shard].pop() for _ in range(count)]
        self.refs[shard, out] = 1
        return out

    def ref(self, shard: int, pages: Sequence[int]) -> None:
        self.refs[shard, list(pages)] += 1

    def release(self, shard: int, pages: Sequence[int]) -> None:
        for p in pages:
            self.refs[shard, p] -= 1
            if self.refs[shard, p] == 0:
                self.free[shard].append(p)

    @property
    def in_use(self) -> int:
        return self.total - sum(len(f) for f in self.free)


class PagedEngine:
    """Continuous batching over a paged KV pool; see the module docstring. Reuse it across calls:
    the pools are kept while their geometry does not change."""

    def __init__(self, programs: Programs, *, context_len: int, detokenize: Callable[[list[int]], str] | None = None):
        self.programs = programs
        self.context_len = int(context_len)
        self.detokenize = detokenize
        self._pools: tuple[PoolShape, tuple] | None = None
        self._auto_pages = 0  # the largest automatic pool so far: later calls reuse its shape
        self.stats: dict = {}

    # ----- sizing

    def _device_budget(self, sc: SamplingConfig, demand_pages: int, shape: PoolShape) -> int:
        """KV pool bytes per device."""
        if sc.kv_cache_gb > 0:
            return int(sc.kv_cache_gb * (1 << 30))
        stats = memory_stats(dist.local_device(self.programs.mesh))
        if stats:
            held = self._pools[0].pages * shape.bytes_per_page(self.programs.tensor_split()) if self._pools else 0
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) + held
            # one budget for every process (each reads its own device): the pools and programs must agree
            return dist.agree(int(free * sc.kv_cache_fraction), min, "KV budget")
        return min(CPU_POOL_CAP, demand_pages * shape.bytes_per_page(self.programs.tensor_split()))

    def plan_pool(self, sc: SamplingConfig, prompt_lens: Sequence[int], max_new: Sequence[int], n: int,
                  dtype) -> PoolShape:
        """The pool for a call: pages per shard from the budget, checked to hold the longest sequence."""
        cfg, prog = self.programs.cfg, self.programs
        ps, shards = sc.page_size, prog.shards
        own = [math.ceil((p + m) / ps) for p, m in zip(prompt_lens, max_new)]  # a sample at full length
        shared = [math.ceil(max(p - 1, 0) / ps) for p in prompt_lens]  # the prompt group's pages
        demand = sum(n * o + s for o, s in zip(own, shared))
        one = max(o + s for o, s in zip(own, shared)) + 1  # + the scratch page
        probe = PoolShape(shards, 1, ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(dtype).name)
        per_page = probe.bytes_per_page(prog.tensor_split())
        per_shard_demand = _pow2(math.ceil(demand / shards) + one)  # bucketed: similar calls share programs
        budget = self._device_budget(sc, max(per_shard_demand, self._auto_pages), probe)
        pages = budget // per_page
        if pages < one:
            i = int(np.argmax([o + s for o, s in zip(own, shared)]))
            raise SamplingError(
                f"KV cache budget too small for one sequence: prompt {i} ({prompt_lens[i]} tokens) + "
                f"max_new_tokens {max_new[i]} needs {one} pages of {ps} tokens ({one * per_page / 2**20:.1f} MiB per "
                f"device), the budget holds {pages} ({budget / 2**20:.1f} MiB); raise kv_cache_gb / kv_cache_fraction "
                f"(sampling.* in jsdr.eval, rollout.* in jsdr.train) or lower max_new_tokens")
        if sc.kv_cache_gb <= 0:  # never more than the call can use (or an earlier call used: the pool's
            pages = min(pages, max(per_shard_demand, self._auto_pages))  # shape is in every program)
            self._auto_pages = max(self._auto_pages, int(pages))
        return PoolShape(shards, int(pages), ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                         jnp.dtype(dtype).name)

    def _pools_for(self, shape: PoolShape):
        """The pools of `shape`: the kept ones when they fit, else new ones (the old freed first). The
        call owns them (they are donated through its programs) until `generate` keeps them again."""
        kept, self._pools = self._pools, None
        if kept is not None and kept[0] == shape:
            return kept[1]
        del kept
        return self.programs.new_pools(shape)

    # ----- the call

    def check(self, prompts: Sequence[np.ndarray], max_new: Sequence[int], stop_strings: Sequence[str] = ()) -> None:
        """Raise on what no call could run: stop strings without a detokenizer, a prompt as long as the
        context; warn when a prompt + its max_new_tokens exceeds the context."""
        if stop_strings and self.detokenize is None:
            raise SamplingError("stop_strings need a detokenizer: build the Sampler with detokenize=tokenizer.decode")
        for i, (p, m) in enumerate(zip(prompts, max_new)):
            if len(p) >= self.context_len:
                raise SamplingError(f"prompt {i} has {len(p)} tokens, the model's context is {self.context_len} "
                                    f"(max_position_embeddings): shorten or drop it")
        worst = max(range(len(prompts)), key=lambda i: len(prompts[i]) + max_new[i])
        if len(prompts[worst]) + max_new[worst] > self.context_len:
            warnings.warn(f"prompt {worst} ({len(prompts[worst])} tokens) + max_new_tokens {max_new[worst]} exceeds "
                          f"the model's context ({self.context_len} tokens)", stacklevel=4)

    def generate(self, params, lora, prompts: Sequence[np.ndarray], sc: SamplingConfig, key: jax.Array,
                 max_new: Sequence[int], *, cache_dtype, prompt_keys=None,
                 progress: Callable[[dict], None] | None = None,
                 on_prompt_done: Callable[[int, SampleOutput], None] | None = None) -> SampleOutput:
        prog = self.programs
        self.check(prompts, max_new, sc.stop_strings)
        n, shards = sc.n, prog.shards
        shape = self.plan_pool(sc, [len(p) for p in prompts], max_new, n, cache_dtype)
        ps, steps = shape.page_size, sc.decode_steps
        groups = [_Group(i, p, n) for i, p in enumerate(prompts)]
        seqs = [_Seq(g.index * n + j, g, max_new[g.index]) for g in groups for j in range(n)]
        for s, k in zip(seqs, row_keys(key, len(seqs), n, prompt_keys)):
            s.key = k
        unfinished = [n] * len(groups)
        S = slot_count(len(seqs), sc.max_slots, shards, prog.platform)
        Sl = S // shards
        full_pages = max(math.ceil((len(p) + m) / ps) for p, m in zip(prompts, max_new))
        widths = TableWidths(full_pages, ps)
        penalty = sc.presence_penalty != 0
        stop_ids, knobs = stop_id_array(sc.stop_token_ids), knobs_of(sc)

        pools = self._pools_for(shape)
        pages = _Pages(shards, shape.pages)
        slots = prog.empty_slots(S, penalty)
        slot_seq: list[_Seq | None] = [None] * S
        waiting = collections.deque(seqs)
        finished = 0
        turn = 0
        t0 = time.perf_counter()
        generated = 0
        self.stats = {"slots": S, "pages_per_shard": shape.pages, "page_size": ps, "turns": 0, "segments": 0,
                      "prefill_calls": 0, "preempted": 0, "peak_pages": 0, "pool_bytes_per_device":
                      shape.pages * shape.bytes_per_page(prog.tensor_split())}

        def coverage(seq: _Seq) -> int:  # page entries the next segment needs
            return min(seq.pos + steps - 1, max(seq.final_pos, seq.pos)) // ps + 1

        def free_seq(seq: _Seq) -> None:
            pages.release(seq.shard, seq.pages)
            seq.pages = []
            if seq.slot >= 0:
                slot_seq[seq.slot] = None
            seq.slot = seq.shard = -1

        def release_group(g: _Group, shard: int | None = None) -> None:
            for d in ([shard] if shard is not None else list(g.pages)):
                pages.release(d, g.pages.pop(d))

        try:
            while waiting or any(s is not None for s in slot_seq):
                turn += 1
                # 1. admit
                admitted: list[_Seq] = []
                jobs: list[tuple[int, np.ndarray, list[int]]] = []  # (shard, tokens from position 0, page table)
                copies: list[tuple[int, int, int]] = []  # (shard, src, dst)
                free_slots = [[s for s in range(d * Sl, (d + 1) * Sl) if slot_seq[s] is None] for d in range(shards)]
                while waiting:
                    seq = waiting[0]
                    g = seq.group
                    fresh = not seq.tokens
                    order = sorted(range(shards), key=lambda d: (not (fresh and d in g.pages), -len(free_slots[d]), d))
                    placed = False
                    need_entries = coverage(seq)
                    for d in order:
                        if not free_slots[d]:
                            continue
                        if fresh:
                            full = (seq.prompt_len - 1) // ps
                            group_new = 0 if d in g.pages else math.ceil((seq.prompt_len - 1) / ps)
                            own = need_entries - full
                        else:
                            full, group_new, own = 0, 0, need_entries
                        if pages.available(d) < group_new + own:
                            continue
                        if fresh and d not in g.pages and seq.prompt_len > 1:
                            g.pages[d] = pages.take(d, group_new)
                            jobs.append((d, g.tokens[:-1], g.pages[d]))
                        if fresh:
                            shared = g.pages.get(d, [])[:full]
                            pages.ref(d, shared)
                            seq.pages = shared + pages.take(d, own)
                            if (seq.prompt_len - 1) % ps:  # the partial prompt page: this sample's copy
                                copies.append((d, g.pages[d][full], seq.pages[full]))
                            g.pending -= 1
                        else:  # resumed after preemption: recompute its prompt and tokens
                            seq.pages = pages.take(d, own)
                            ctx = np.concatenate([g.tokens, np.asarray(seq.tokens[:-1], np.int32)])
                            jobs.append((d, ctx, seq.pages))
                        seq.shard, seq.slot, seq.admitted_at = d, free_slots[d].pop(0), turn
                        slot_seq[seq.slot] = seq
                        admitted.append(seq)
                        waiting.popleft()
                        placed = True
                        break
                    if not placed:
                        break
                # 2. prefill, then the copies of partial prompt pages
                if jobs:
                    pools = self._prefill(params, lora, pools, jobs, shards, ps, widths, sc.prefill_chunk)
                if copies:
                    pools = self._copy(pools, copies, shards)
                for g in dict.fromkeys(s.group for s in admitted):  # admission order: a set's order is id-based and
                    # would differ between runs and between the processes of one run (which must agree)
                    if g.pending == 0 and g.pages:
                        release_group(g)
                if admitted:
                    slots = self._admit(slots, admitted, S, penalty)
                # 3. top up the pages of the next segment, preempting when a shard runs dry
                killed: list[int] = []
                running = sorted((s for s in slot_seq if s is not None), key=lambda s: s.admitted_at)
                for seq in running:
                    if seq.slot < 0:
                        continue  # preempted below
                    need = coverage(seq) - len(seq.pages)
                    while need > pages.available(seq.shard):
                        victims = [s for s in slot_seq if s is not None and s.shard == seq.shard and s is not seq]
                        if victims:
                            victim = max(victims, key=lambda s: (s.admitted_at, s.row))
                            killed.append(victim.slot)
                            free_seq(victim)
                            if not victim.tokens:  # admitted this turn: it comes back as a fresh sample
                                victim.group.pending += 1
                            waiting.appendleft(victim)
                            self.stats["preempted"] += 1
                            continue
                        held = [g for g in groups if seq.shard in g.pages]
                        if not held:
                            raise RuntimeError("paged engine: a sequence does not fit in its shard's pool")
                        release_group(held[-1], seq.shard)
                    if need > 0:
                        seq.pages += pages.take(seq.shard, need)
                if killed:
                    slots = self._kill(slots, killed, S)
                self.stats["peak_pages"] = max(self.stats["peak_pages"], pages.in_use)
                live = [s for s in slot_seq if s is not None]
                if not live:
                    continue
                # 4. one decode segment
                width = widths(max(len(s.pages) for s in live))
                table = np.zeros((S, width), np.int32)
                for s in live:
                    table[s.slot, :len(s.pages)] = s.pages
                done_now = S - len(live)
                exit_done = done_now + max(1, min(len(waiting), S // 8)) if waiting else S + 1
                before = {s.slot: len(s.tokens) for s in live}
                pools_k, pools_v, slots, out = prog.decode(
                    params, lora, pools, slots, table, knobs, stop_ids, exit_done, steps=steps,
                    greedy=sc.greedy, filtered=sc.filtered, penalty=penalty)
                pools = (pools_k, pools_v)
                self.stats["segments"] += 1
                # 5. collect
                # the whole value on every process (each runs this same scheduler, SPMD)
                step, done, stopped = dist.fetch((slots.step, slots.done, slots.stopped))
                toks, lps, raws = dist.fetch(tuple(out))
                killed = []
                for s in live:
                    k = int(step[s.slot]) - before[s.slot]
                    s.tokens += toks[s.slot, :k].tolist()
                    s.logprobs += lps[s.slot, :k].tolist()
                    s.raw += raws[s.slot, :k].tolist()
                    generated += k
                    end = bool(done[s.slot])
                    s.stopped = bool(stopped[s.slot])
                    if sc.stop_strings and not s.stopped:
                        i = find_stop_string(s.tokens, sc.stop_strings, self.detokenize, start=s.checked)
                        s.checked = len(s.tokens)
                        if i is not None:
                            del s.tokens[i + 1:], s.logprobs[i + 1:], s.raw[i + 1:]
                            s.stopped = True
                            if not end:
                                killed.append(s.slot)
                            end = True
                    if end:
                        s.finished = True
                        finished += 1
                        free_seq(s)
                        unfinished[s.group.index] -= 1
                        if on_prompt_done is not None and unfinished[s.group.index] == 0:
                            g = s.group.index
                            on_prompt_done(g, self._output(seqs[g * n:(g + 1) * n], max(max_new), n, prog.pad_id,
                                                           first=g * n))
                if killed:
                    slots = self._kill(slots, killed, S)
                self.stats["turns"] = turn
                if progress is not None:
                    dt = time.perf_counter() - t0
                    progress({"finished": finished, "total": len(seqs), "running": sum(s is not None for s in slot_seq),
                              "waiting": len(waiting), "tokens": generated, "tokens_per_s": generated / max(dt, 1e-9),
                              "pages_in_use": pages.in_use, "pages_total": pages.total, "seconds": dt})
        finally:  # keep the pools for the next call unless an error left them donated
            alive = isinstance(pools, tuple) and not any(x.is_deleted() for x in pools)
            self._pools = (shape, pools) if alive else None
        self.stats["tokens"] = generated
        self.stats["seconds"] = time.perf_counter() - t0
        return self._output(seqs, max(max_new), n, prog.pad_id)

    # ----- pieces of a turn

    def _prefill(self, params, lora, pools, jobs, shards: int, ps: int, widths: TableWidths, chunk: int):
        """Run the prefill jobs (shard, tokens from position 0, page table) in chunked calls; rows of a
        call are grouped by shard (row r of shard d is row d * rows + r)."""
        todo = [[] for _ in range(shards)]
        for d, toks, table in jobs:
            todo[d].append([toks, 0, table])  # [tokens, next position, page table]
        while any(todo):
            longest = max(len(j[0]) - j[1] for jobs_d in todo for j in jobs_d)
            rows, C = widths.prefill_rows_and_chunk(longest, max(len(t) for t in todo), chunk)
            width = 1
            for jobs_d in todo:
                for toks, start, table in jobs_d[:rows]:
                    width = max(width, math.ceil(min(len(toks), start + C) / ps))
            width = widths(width)
            R = rows * shards
            tokens = np.zeros((R, C), np.int32)
            positions = np.zeros((R, C), np.int32)
            valid = np.zeros((R, C), bool)
            tables = np.zeros((R, width), np.int32)
            fresh = all(job[1] == 0 for jobs_d in todo for job in jobs_d[:rows])
            for d in range(shards):
                for r, job in enumerate(todo[d][:rows]):
                    toks, start, table = job
                    piece = toks[start:start + C]
                    i = d * rows + r
                    tokens[i, :len(piece)] = piece
                    positions[i, :len(piece)] = np.arange(start, start + len(piece))
                    valid[i, :len(piece)] = True
                    tables[i, :min(len(table), width)] = table[:width]
                    job[1] = start + len(piece)
                todo[d] = [j for j in todo[d] if j[1] < len(j[0])]
            pools = self.programs.prefill(params, lora, pools, tokens, positions, valid, tables, fresh=fresh)
            self.stats["prefill_calls"] = self.stats.get("prefill_calls", 0) + 1
        return pools

    def _copy(self, pools, copies, shards: int):
        per = [[(s, t) for d, s, t in copies if d == dd] for dd in range(shards)]
        width = _pow2(max(len(p) for p in per))
        src = np.zeros((shards * width,), np.int32)
        dst = np.zeros((shards * width,), np.int32)
        for d, pairs in enumerate(per):
            for i, (s, t) in enumerate(pairs):
                src[d * width + i], dst[d * width + i] = s, t
        return self.programs.copy(pools, src, dst)

    def _admit(self, slots, admitted: list[_Seq], S: int, penalty: bool):
        mask = np.zeros((S,), bool)
        new = [np.zeros((S,), np.int32) for _ in range(5)]  # last_token, pos, step, key (below), budget
        new[3] = np.zeros((S, 2), np.uint32)
        G = 1
        if penalty:
            G = _pow2(max(1, max(len(s.tokens) for s in admitted)))
        seen = np.full((S, G), -1, np.int32)
        for s in admitted:
            mask[s.slot] = True
            last = s.tokens[-1] if s.tokens else int(s.group.tokens[-1])
            for arr, v in zip(new, (last, s.pos, len(s.tokens), s.key, s.max_new)):
                arr[s.slot] = v
            if penalty and s.tokens:
                seen[s.slot, :len(s.tokens)] = s.tokens
        new_slots = Slots(*new, done=np.zeros((S,), bool), stopped=np.zeros((S,), bool), seen=None)
        return self.programs.update(slots, mask, new_slots, seen)

    def _kill(self, slots, which: list[int], S: int):
        mask = np.zeros((S,), bool)
        mask[which] = True
        z = np.zeros((S,), np.int32)
        new = Slots(z, z, z, np.zeros((S, 2), np.uint32), z + 1, done=np.ones((S,), bool), stopped=np.zeros((S,), bool), seen=None)
        return self.programs.update(slots, mask, new, np.full((S, 1), -1, np.int32))

    @staticmethod
    def _output(seqs: list[_Seq], width: int, n: int, pad_id: int, first: int = 0) -> SampleOutput:
        """Rows of `seqs` (sample rows first .. first + len - 1) as a SampleOutput."""
        R = len(seqs)
        tokens = np.full((R, width), pad_id, np.int32)
        logprobs = np.zeros((R, width), np.float32)
        raw = np.zeros((R, width), np.float32)
        lengths = np.zeros((R,), np.int32)
        reason = np.ones((R,), np.int8)
        for s in seqs:
            k = len(s.tokens)
            r = s.row - first
            tokens[r, :k], logprobs[r, :k], raw[r, :k] = s.tokens, s.logprobs, s.raw
            lengths[r] = k
            reason[r] = 0 if s.stopped else 1
        return SampleOutput(tokens=tokens, logprobs=logprobs, logprobs_raw=raw, lengths=lengths,
                            finish_reason=reason, prompt_index=((np.arange(R) + first) // n).astype(np.int32))
