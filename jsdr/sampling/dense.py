"""The dense engine: one KV cache row of prompt bucket + max_new slots per sample, all samples of a
call decoded together in one `jax.lax.while_loop` until the slowest one stops. Simple and exact: the
reference the paged engine (paged.py) is tested against, and `engine: dense` for small calls.

    sampler = DenseSampler(Model(cfg, lora_scale=lora_cfg.scale), pad_id=tok.pad_token_id)
    out = sampler.generate(params, lora, prompts, SamplingConfig(temperature=1.0, top_p=0.95, n=16,
                                                                  max_new_tokens=2048,
                                                                  stop_token_ids=(eos_id,)))

Prefill runs once per prompt (left-padded to a bucket), the n samples of a prompt copy its cache
rows. The draw of token t of sample row r uses the uniform of `fold_in(fold_in(key, r), t)`
(filters.py), as the paged engine does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr import distributed as dist
from jsdr import sharding
from jsdr.model.transformer import CACHE_AXES, CACHE_SEQ_AXIS, Model, init_cache, positions_from_segments
from jsdr.sampling.config import DECODE_COMPILER_OPTIONS, SampleOutput, SamplingConfig, row_keys
from jsdr.sampling.filters import FILTER_BOUND, Knobs, knobs_of, sample_logits, stop_id_array

DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    top = max(buckets)
    return -(-n // top) * top


def _pad_rows(keys, rows: int) -> np.ndarray:
    keys = np.asarray(keys)
    return np.concatenate([keys, np.zeros((rows - len(keys),) + keys.shape[1:], keys.dtype)])


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class DecodeState(NamedTuple):
    """What the decode loop carries per sample row (B = prompt rows x n)."""

    tokens: jax.Array  # [B, max_new] int32, pad_id after the end
    logprobs: jax.Array  # [B, max_new] float32, under the filtered sampling distribution
    logprobs_raw: jax.Array  # [B, max_new] float32, under the model at temperature 1
    lengths: jax.Array  # [B] int32, tokens generated so far (a stop token counted)
    done: jax.Array  # [B] bool: stopped, or a padding row
    stopped: jax.Array  # [B] bool: ended by a stop token
    seen: jax.Array | None  # [B, V] bool, tokens generated so far (None without a presence penalty)


class _DecodeCarry(NamedTuple):
    step: jax.Array  # int32, the index of the next token to record
    last_token: jax.Array  # [B] int32, the token fed to the next forward
    cache: dict  # the model's KV cache
    state: DecodeState


class DecodeResult(NamedTuple):
    tokens: jax.Array
    logprobs: jax.Array
    logprobs_raw: jax.Array
    lengths: jax.Array
    stopped: jax.Array


class _HostBatch(NamedTuple):
    """Left-padded, bucketed host arrays of one `generate` call."""

    num_prompts: int  # N, the caller's prompts
    prompt_rows: int  # Bp >= N, after padding to the batch bucket
    tokens: np.ndarray  # [Bp, P] int32, left-padded with pad_id
    segment_ids: np.ndarray  # [Bp, P] int32, 1 on prompt tokens, 0 on padding
    prompt_lens: np.ndarray  # [Bp] int32
    active: np.ndarray  # [Bp] bool, False on padding rows
    row_keys: np.ndarray  # [Bp * n, 2] uint32, the key of every decode row (config.row_keys)
    stop_ids: np.ndarray  # [slots] int32, -1 on unused slots
    knobs: Knobs


class DenseSampler:
    """Holds the jitted prefill and decode programs for one model; reuse it across calls.

    Compiled programs are keyed by (prompt bucket, batch bucket, n, max_new_tokens, greedy,
    filtered, penalty on/off, number of stop slots); everything else (temperature, top-k/p, min-p,
    penalty value, stop ids, seed) is a traced value and never recompiles.

    `model` gives the config, lora_scale, attn_impl and compute dtype of the forward. The sampler
    never differentiates and never drops: the model's remat and lora_dropout are ignored. (Sampling
    with a training model whose attn_impl is a training kernel runs that kernel on the decode
    steps too; pass `dataclasses.replace(model, attn_impl="xla")` to decode with XLA attention.)
    """

    def __init__(self, model: Model, *, mesh=None, pad_id: int = 0,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, cache_dtype=None,
                 filter_bound: int = FILTER_BOUND, rules: dict | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"Sampler takes a jsdr.model.transformer.Model (e.g. Model(cfg, lora_scale=...)), "
                            f"got {type(model).__name__}")
        if not prompt_buckets or any(int(b) < 1 for b in prompt_buckets):
            raise ValueError(f"prompt_buckets={prompt_buckets!r}: need at least one positive length")
        if not (0 <= pad_id < model.cfg.vocab_size):
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {model.cfg.vocab_size})")
        if filter_bound < 1:
            raise ValueError(f"filter_bound={filter_bound} must be >= 1")
        self.model = dataclasses.replace(model, remat="none", lora_dropout=0.0)
        self.cfg = model.cfg
        self.mesh = mesh
        self.rules = rules
        self.pad_id = int(pad_id)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.cache_dtype = cache_dtype
        self.filter_bound = int(filter_bound)
        self.num_compiles = 0  # traces of the prefill/decode programs (each trace = one compile)
        self.prefill_rows = 0  # prompt rows that went through prefill (padding rows included)
        self.decode_rows = 0
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("n", "max_new", "greedy", "filtered", "penalty"),
                               compiler_options=DECODE_COMPILER_OPTIONS)

    # ----- traced bodies

    def _ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    def _cache_dtype(self, params):
        if self.cache_dtype is not None:
            return self.cache_dtype
        if self.model.dtype is not None:
            return jnp.dtype(self.model.dtype)
        return params["embed_tokens"]["embedding"].dtype

    def _prefill_impl(self, params, lora, tokens, segment_ids):
        self.num_compiles += 1
        prompt_rows, prompt_len = tokens.shape
        cache = init_cache(self.cfg, prompt_rows, prompt_len, self._cache_dtype(params), static_index=True)
        h, cache = self.model.hidden(params, lora, tokens=tokens, positions=positions_from_segments(segment_ids),
                                     segment_ids=segment_ids, cache=cache)
        logits = self.model.logits(params, h[:, -1])
        return logits, cache["k"], cache["v"]

    def _decode_impl(self, params, lora, logits0, prompt_k, prompt_v, segment_ids, prompt_lens, active, row_keys,
                     knobs: Knobs, stop_ids, *, n, max_new, greedy, filtered, penalty) -> DecodeResult:
        self.num_compiles += 1
        prompt_rows, prompt_len = segment_ids.shape
        B = prompt_rows * n
        V = self.cfg.vocab_size
        constrain = sharding.constrain

        def repeat_rows(x, axis=0):  # the n samples of a prompt are adjacent rows
            return jnp.repeat(x, n, axis=axis) if n > 1 else x

        def widen(x, name):  # n copies of every prompt row, then max_new empty slots
            pad = [(0, 0)] * x.ndim
            pad[CACHE_SEQ_AXIS[name]] = (0, max_new)
            return constrain(jnp.pad(repeat_rows(x, axis=1), pad), CACHE_AXES[name])

        cache = {"k": widen(prompt_k, "k"), "v": widen(prompt_v, "v"),
                 "segment_ids": constrain(jnp.pad(repeat_rows(segment_ids), ((0, 0), (0, max_new))),
                                          ("act_batch", "cache_seq")),
                 "index": jnp.asarray(prompt_len, jnp.int32)}
        logits = constrain(repeat_rows(logits0), ("act_batch", None))
        lens = repeat_rows(prompt_lens)

        def draw(logits, seen, step):
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(row_keys)
            return sample_logits(logits, u, temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p,
                                 min_p=knobs.min_p, presence_penalty=knobs.presence_penalty, seen=seen,
                                 greedy=greedy, filtered=filtered, bound=self.filter_bound)

        def is_stop(tok):
            return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

        def record(st: DecodeState, tok, lp, raw, step) -> tuple[DecodeState, jax.Array]:
            tok = jnp.where(st.done, self.pad_id, tok)
            lp = jnp.where(st.done, 0.0, lp)
            raw = jnp.where(st.done, 0.0, raw)
            hit = ~st.done & is_stop(tok)
            st = DecodeState(
                tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], step, axis=1),
                logprobs=jax.lax.dynamic_update_slice_in_dim(st.logprobs, lp[:, None], step, axis=1),
                logprobs_raw=jax.lax.dynamic_update_slice_in_dim(st.logprobs_raw, raw[:, None], step, axis=1),
                lengths=jnp.where(st.done, st.lengths, step + 1),
                done=st.done | hit,
                stopped=st.stopped | hit,
                seen=None if st.seen is None else st.seen.at[jnp.arange(B), tok].set(True))
            return st, tok

        state = DecodeState(tokens=jnp.full((B, max_new), self.pad_id, jnp.int32),
                            logprobs=jnp.zeros((B, max_new), jnp.float32),
                            logprobs_raw=jnp.zeros((B, max_new), jnp.float32),
                            lengths=jnp.zeros((B,), jnp.int32),
                            done=~repeat_rows(active),
                            stopped=jnp.zeros((B,), bool),
                            seen=jnp.zeros((B, V), bool) if penalty else None)
        tok, lp, raw = draw(logits, state.seen, 0)
        state, tok = record(state, tok, lp, raw, 0)

        def cond(c: _DecodeCarry):
            return (c.step < max_new) & ~jnp.all(c.state.done)

        def body(c: _DecodeCarry) -> _DecodeCarry:
            pos = (lens + c.step - 1)[:, None]
            h, cache = self.model.hidden(params, lora, tokens=c.last_token[:, None], positions=pos,
                                         segment_ids=jnp.ones_like(pos), cache=c.cache)
            logits = constrain(self.model.logits(params, h[:, 0]), ("act_batch", None))
            tok, lp, raw = draw(logits, c.state.seen, c.step)
            state, tok = record(c.state, tok, lp, raw, c.step)
            return _DecodeCarry(step=c.step + 1, last_token=tok, cache=cache, state=state)

        final = jax.lax.while_loop(cond, body, _DecodeCarry(step=jnp.asarray(1, jnp.int32), last_token=tok,
                                                            cache=cache, state=state)).state
        return DecodeResult(tokens=final.tokens, logprobs=final.logprobs, logprobs_raw=final.logprobs_raw,
                            lengths=final.lengths, stopped=final.stopped)

    # ----- host side

    def _check_prompts(self, prompts) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty sequence of token-id sequences")
        out = []
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            a = np.asarray(p)
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids (got shape {a.shape})")
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"prompt {i}: token ids must be integers (got dtype {a.dtype})")
            if a.min() < 0 or a.max() >= V:
                raise ValueError(f"prompt {i}: token id {int(a.min() if a.min() < 0 else a.max())} is outside "
                                 f"the vocabulary [0, {V})")
            out.append(a.astype(np.int32))
        return out

    def batch_bucket(self, num_prompts: int) -> int:
        """Prompt rows after padding: a power of two, rounded up to the data-parallel size."""
        b = _pow2_at_least(num_prompts)
        if self.mesh is not None:
            dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            b = -(-b // dp) * dp
        return b

    def _put(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(x.ndim, self.mesh, self.rules, shape=x.shape))

    def _host_inputs(self, prompts, sc: SamplingConfig, rng, prompt_keys=None) -> _HostBatch:
        if not isinstance(sc, SamplingConfig):
            raise TypeError(f"sc must be a SamplingConfig, got {type(sc).__name__}")
        rows = self._check_prompts(prompts)
        num_prompts = len(rows)
        P = _bucket(max(len(r) for r in rows), self.prompt_buckets)
        if P + sc.max_new_tokens > self.cfg.max_position_embeddings:
            warnings.warn(f"prompt bucket {P} + max_new_tokens {sc.max_new_tokens} exceeds the model's "
                          f"max_position_embeddings={self.cfg.max_position_embeddings}", stacklevel=3)
        prompt_rows = self.batch_bucket(num_prompts)
        tokens = np.full((prompt_rows, P), self.pad_id, np.int32)
        segment_ids = np.zeros((prompt_rows, P), np.int32)
        prompt_lens = np.zeros((prompt_rows,), np.int32)
        for i, r in enumerate(rows):
            tokens[i, P - len(r):] = r
            segment_ids[i, P - len(r):] = 1
            prompt_lens[i] = len(r)
        stop_ids, knobs = stop_id_array(sc.stop_token_ids), knobs_of(sc)
        return _HostBatch(num_prompts=num_prompts, prompt_rows=prompt_rows, tokens=tokens, segment_ids=segment_ids,
                          prompt_lens=prompt_lens, active=np.arange(prompt_rows) < num_prompts,
                          row_keys=row_keys(jax.random.PRNGKey(sc.seed) if rng is None else rng, prompt_rows * sc.n,
                                            sc.n, None if prompt_keys is None else _pad_rows(prompt_keys, prompt_rows)),
                          stop_ids=stop_ids, knobs=knobs)

    def _decode_args(self, x: _HostBatch, logits0, prompt_k, prompt_v, put=None) -> dict:
        put = put or self._put
        return dict(logits0=logits0, prompt_k=prompt_k, prompt_v=prompt_v, segment_ids=put(x.segment_ids),
                    prompt_lens=put(x.prompt_lens), active=put(x.active), row_keys=put(x.row_keys),
                    knobs=x.knobs, stop_ids=jnp.asarray(x.stop_ids))

    @staticmethod
    def _decode_static(sc: SamplingConfig) -> dict:
        return dict(n=sc.n, max_new=sc.max_new_tokens, greedy=sc.greedy, filtered=sc.filtered,
                    penalty=sc.presence_penalty != 0)

    def generate(self, params, lora, prompts: Sequence[Sequence[int]], sc: SamplingConfig,
                 rng: jax.Array | None = None, prompt_keys=None) -> SampleOutput:
        """Sample `sc.n` completions for every prompt; see the module docstring for the semantics."""
        x = self._host_inputs(prompts, sc, rng, prompt_keys)
        rows = x.num_prompts * sc.n
        with self._ctx():
            logits0, prompt_k, prompt_v = self._prefill(params, lora, self._put(x.tokens), self._put(x.segment_ids))
            self.prefill_rows += x.prompt_rows
            self.decode_rows += x.prompt_rows * sc.n
            out = self._decode(params, lora, **self._decode_args(x, logits0, prompt_k, prompt_v),
                               **self._decode_static(sc))
        out = DecodeResult(*(np.array(a[:rows]) for a in dist.fetch(tuple(out))))  # writable copies
        return SampleOutput(tokens=out.tokens, logprobs=out.logprobs, logprobs_raw=out.logprobs_raw,
                            lengths=out.lengths.astype(np.int32),
                            finish_reason=np.where(out.stopped, 0, 1).astype(np.int8),
                            prompt_index=(np.arange(rows) // sc.n).astype(np.int32))

    def compile_programs(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """The compiled (never run) prefill and decode programs of a `generate` call with `num_prompts`
        prompts of `prompt_len` tokens: {"prefill": Compiled, "decode": Compiled}. params and lora may
        be arrays or jax.ShapeDtypeStructs with shardings; every other input is abstract too, so the
        mesh may hold compile-only devices (jsdr.plan)."""
        if num_prompts < 1 or prompt_len < 1:
            raise ValueError(f"num_prompts={num_prompts} and prompt_len={prompt_len} must be >= 1")
        x = self._host_inputs([[self.pad_id] * prompt_len] * num_prompts, sc, None)

        def spec(a):  # a batch input: abstract, split over the data-parallel axes like _put
            a = np.asarray(a)
            where = None if self.mesh is None else sharding.batch_sharding(a.ndim, self.mesh, self.rules, shape=a.shape)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where)
        compiles = self.num_compiles
        with self._ctx():
            tokens, segment_ids = spec(x.tokens), spec(x.segment_ids)
            prefill = self._prefill.lower(params, lora, tokens, segment_ids).compile()
            logits0, prompt_k, prompt_v = jax.eval_shape(self._prefill, params, lora, tokens, segment_ids)
            args = self._decode_args(x, logits0, prompt_k, prompt_v, put=spec)
            for k in ("knobs", "stop_ids"):  # small replicated inputs: abstract, unplaced
                args[k] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args[k])
            decode = self._decode.lower(params, lora, **args, **self._decode_static(sc)).compile()
        self.num_compiles = compiles  # analysis compiles are not generate's programs
        return {"prefill": prefill, "decode": decode}

    def memory_analysis(self, params, lora, num_prompts: int, prompt_len: int, sc: SamplingConfig) -> dict:
        """XLA's memory analysis of the prefill and decode programs of a `generate` call with
        `num_prompts` prompts of `prompt_len` tokens: {"prefill"|"decode": {"argument", "output",
        "temp"}} in bytes (per device under a mesh). The programs are compiled, not run; params and
        lora may be arrays or jax.ShapeDtypeStructs. The decode "argument" holds the params and the
        prompt cache, "temp" the widened KV cache (n samples x (prompt bucket + max_new_tokens)) and
        the loop's buffers: what a rollout batch needs on the device beyond the weights.
        """
        out = {}
        for name, prog in self.compile_programs(params, lora, num_prompts, prompt_len, sc).items():
            ma = prog.memory_analysis()
            out[name] = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
                         "temp": int(ma.temp_size_in_bytes)}
        return out
