"""The paged, continuously batched engine against the dense reference engine (same seeds -> same
tokens and log-probs), and its own behaviour: refills, preemption, prefix sharing, stop strings,
per-prompt limits and keys, errors, the decode layout and its collectives, the Pallas decode kernel.

Log-probs against `transformers` and greedy parity run through both engines in test_sampling.py."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from jsdr import sharding
from jsdr.model.params import ModelConfig
from jsdr.model.transformer import Model, init_params, param_axes
from jsdr.sampling import Sampler, SamplingConfig, SamplingError

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=256, qk_norm=True)
# mixed lengths: 1 token, a page boundary (page 4) +- 1, longer than a page several times over
PROMPTS = [list(np.random.default_rng(i).integers(1, 97, size=L)) for i, L in enumerate((3, 9, 17, 1, 30, 4, 5))]
STOPS = (5, 7, 11)  # ~3% of the vocabulary: rows stop at different steps
BASE = SamplingConfig(n=3, max_new_tokens=40, stop_token_ids=STOPS, page_size=4, decode_steps=8)
PER_PAGE = 2 * CFG.num_layers * CFG.num_kv_heads * 4 * CFG.head_dim * 4  # bytes of one page id, float32


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.5)
    return params, Sampler(Model(CFG), pad_id=0)


def _same(a, b, what=""):
    np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=what)
    np.testing.assert_array_equal(a.lengths, b.lengths, err_msg=what)
    np.testing.assert_array_equal(a.finish_reason, b.finish_reason, err_msg=what)
    np.testing.assert_array_equal(a.prompt_index, b.prompt_index, err_msg=what)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, err_msg=what)
    np.testing.assert_allclose(a.logprobs_raw, b.logprobs_raw, atol=2e-5, err_msg=what)


SETTINGS = {"greedy": dict(temperature=0.0), "top_p": dict(temperature=1.0, top_p=0.9),
            "top_k_penalty": dict(temperature=0.8, top_k=5, presence_penalty=0.5)}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_paged_equals_dense_with_refills_and_preemption(model, name):
    params, sampler = model
    sc = dataclasses.replace(BASE, **SETTINGS[name])
    dense = sampler.generate(params, None, PROMPTS, dataclasses.replace(sc, engine="dense"))
    assert len(set(dense.lengths.tolist())) > 2 and (dense.finish_reason == 0).any()  # stops at different times
    for what, kw in {"all slots": {}, "4 slots (refills)": dict(max_slots=4),
                     "30 pages (preemption)": dict(kv_cache_gb=30 * PER_PAGE / 2**30)}.items():
        out = sampler.generate(params, None, PROMPTS, dataclasses.replace(sc, **kw))
        _same(dense, out, f"{name}, {what}")
        stats = sampler.last_stats
        if "refills" in what:
            assert stats["slots"] == 4 and stats["segments"] > 5
        if "preemption" in what:
            assert stats["preempted"] > 0 and stats["peak_pages"] <= 29


def test_prompt_pages_are_shared_and_returned(model):
    """n samples of a prompt prefill it once and share its full pages: peak pages stay below n
    private copies; every page comes back."""
    params, sampler = model
    prompt = list(range(1, 61))  # 60 tokens = 15 pages of 4
    sc = dataclasses.replace(BASE, n=8, max_new_tokens=4, stop_token_ids=(), temperature=1.0)
    out = sampler.generate(params, None, [prompt], sc)
    stats = sampler.last_stats
    assert stats["prefill_calls"] == 1
    private = 8 * ((60 + 4) // 4)
    assert stats["peak_pages"] < private // 3, stats
    ref = sampler.generate(params, None, [prompt], dataclasses.replace(sc, engine="dense"))
    _same(ref, out)


def test_no_recompile_in_steady_state(model):
    params, sampler = model
    sc = dataclasses.replace(BASE, temperature=1.0, top_p=0.9, seed=1)
    sampler.generate(params, None, PROMPTS, sc)
    before = sampler.num_compiles
    other = [p[::-1] for p in PROMPTS]
    sampler.generate(params, None, other, dataclasses.replace(sc, seed=2, top_p=0.7, stop_token_ids=(1, 2)))
    assert sampler.num_compiles == before


def test_prompt_keys_make_samples_independent_of_the_call(model):
    params, sampler = model
    sc = dataclasses.replace(BASE, temperature=1.0)
    keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(3), i)) for i in range(len(PROMPTS))])
    done = {}
    full = sampler.generate(params, None, PROMPTS, sc, prompt_keys=keys,
                            on_prompt_done=lambda i, o: done.setdefault(i, o))
    assert sorted(done) == list(range(len(PROMPTS)))
    for i, o in done.items():  # streamed rows equal the final ones
        np.testing.assert_array_equal(o.tokens, full.tokens[i * 3:(i + 1) * 3])
        assert (o.prompt_index == i).all()
    part = sampler.generate(params, None, PROMPTS[2:4], sc, prompt_keys=keys[2:4])
    np.testing.assert_array_equal(part.tokens, full.tokens[6:12])
    dense = sampler.generate(params, None, PROMPTS[2:4], dataclasses.replace(sc, engine="dense"),
                             prompt_keys=keys[2:4])
    _same(dense, part)


def test_per_prompt_max_new_tokens(model):
    params, sampler = model
    sc = dataclasses.replace(BASE, temperature=1.0, stop_token_ids=())
    limits = [5, 40, 1, 12, 8, 3, 20]
    out = sampler.generate(params, None, PROMPTS, sc, max_new_tokens=limits)
    assert out.tokens.shape[1] == 40
    np.testing.assert_array_equal(out.lengths, np.repeat(limits, 3))
    assert (out.finish_reason == 1).all()
    full = sampler.generate(params, None, PROMPTS, sc)
    for r, m in enumerate(np.repeat(limits, 3)):  # a limit cuts the same sample, it does not change it
        np.testing.assert_array_equal(out.tokens[r, :m], full.tokens[r, :m])
    _same(sampler.generate(params, None, PROMPTS, dataclasses.replace(sc, engine="dense"), max_new_tokens=limits),
          out)
    with pytest.raises(SamplingError, match="one integer >= 1 per prompt"):
        sampler.generate(params, None, PROMPTS, sc, max_new_tokens=[3, 4])


def _detok(ids):
    return "".join(chr(65 + (int(i) % 26)) for i in ids)


def test_stop_strings_end_both_engines_at_the_same_token():
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.5)
    sampler = Sampler(Model(CFG), pad_id=0, detokenize=_detok)
    free = sampler.generate(params, None, PROMPTS, dataclasses.replace(BASE, temperature=1.0, stop_token_ids=()))
    text = _detok(free.tokens[0, 10:12])  # a 2-letter string that row 0 writes at tokens 10-11
    sc = dataclasses.replace(BASE, temperature=1.0, stop_token_ids=(), stop_strings=(text, "QQQQQQ"))
    out = sampler.generate(params, None, PROMPTS, sc)
    hits = 0
    for r in range(len(out.lengths)):
        L = int(out.lengths[r])
        whole = _detok(free.tokens[r, :int(free.lengths[r])])
        first = whole.find(text)
        if first >= 0:  # ends at the token completing the first occurrence, finish reason "stop"
            assert L == first + len(text) and out.finish_reason_str[r] == "stop", r
            hits += 1
        else:
            assert L == int(free.lengths[r])
        np.testing.assert_array_equal(out.tokens[r, :L], free.tokens[r, :L])
        assert (out.tokens[r, L:] == 0).all()
    assert hits >= 1 and out.lengths[0] == 12
    _same(sampler.generate(params, None, PROMPTS, dataclasses.replace(sc, engine="dense")), out)
    with pytest.raises(SamplingError, match="detokenize"):
        Sampler(Model(CFG), pad_id=0).generate(params, None, PROMPTS, sc)


def test_bad_input_is_refused_before_any_work(model):
    params, sampler = model
    with pytest.raises(SamplingError, match="prompt 1 has 300 tokens, the model's context is 256"):
        sampler.generate(params, None, [[1, 2], [3] * 300], BASE)
    with pytest.raises(SamplingError, match="budget too small for one sequence: prompt 4"):
        sampler.generate(params, None, PROMPTS, dataclasses.replace(BASE, kv_cache_gb=10 * PER_PAGE / 2**30))
    with pytest.raises(ValueError, match="non-empty"):
        sampler.generate(params, None, [], BASE)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty"):
        sampler.generate(params, None, [[]], BASE)
    with pytest.warns(UserWarning, match="exceeds the model's context"):
        sampler.generate(params, None, [[1] * 250], dataclasses.replace(BASE, n=1, max_new_tokens=10))
    with pytest.raises(Exception, match="engine"):
        SamplingConfig(engine="vllm")
    with pytest.raises(Exception, match="stop_strings"):
        SamplingConfig(stop_strings=("",))


def test_progress_reports_sequences_tokens_and_pages(model):
    params, sampler = model
    seen = []
    sampler.generate(params, None, PROMPTS, dataclasses.replace(BASE, max_slots=8), progress=seen.append)
    assert len(seen) > 2
    last = seen[-1]
    assert last["finished"] == last["total"] == len(PROMPTS) * 3 and last["waiting"] == 0
    assert all(0 < s["pages_in_use"] <= s["pages_total"] for s in seen[:-1])
    assert last["tokens"] > 0 and last["tokens_per_s"] > 0
    assert [s["finished"] for s in seen] == sorted(s["finished"] for s in seen)


def _allgathers_in_loop(compiled) -> int:
    """all-gather ops inside while-loop bodies of a compiled program's HLO."""
    text = compiled.as_text()
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    count, current = 0, None
    for line in text.splitlines():
        m = re.match(r"^\s*%?([\w.\-]+)\s.*\{\s*$", line) if not line.startswith(" ") else None
        if m:
            current = m.group(1)
        if current in bodies and re.search(r"\ball-gather(-start)?\(", line):
            count += 1
    return count


@pytest.mark.parametrize("tensor", [0, 2])
def test_eight_devices_decode_layout_matches_and_gathers_no_weights(model, tensor):
    """Weights placed for training (fsdp=8): the paged engine reshards them to its decode layout and
    returns what the dense engine returns on one device; its compiled decode loop all-gathers no
    weights, while the dense engine under fsdp does at every token."""
    params, ref_sampler = model
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
    placed = jax.device_put(params, sharding.tree_shardings(param_axes(CFG), params, mesh))
    sampler = Sampler(Model(CFG), pad_id=0, mesh=mesh)
    sc = dataclasses.replace(BASE, temperature=1.0, top_p=0.9, max_slots=8, decode_tensor=tensor)
    ref = ref_sampler.generate(params, None, PROMPTS, dataclasses.replace(sc, engine="dense"))
    with sharding.use_mesh(mesh):
        out = sampler.generate(placed, None, PROMPTS, sc)
    _same(ref, out)
    assert sampler.last_stats["decode_tensor"] == (tensor or 1)
    paged = sampler.compile_paged(placed, None, len(PROMPTS), 30, sc)
    assert paged["info"]["decode_mesh"] == {"data": 8 // (tensor or 1), "fsdp": 1, "tensor": tensor or 1}
    assert _allgathers_in_loop(paged["decode"]) == 0
    if tensor == 0:
        dense = sampler.compile_programs(placed, None, len(PROMPTS), 30, dataclasses.replace(sc, engine="dense"))
        assert _allgathers_in_loop(dense["decode"]) > 0  # the check can fail


def test_pallas_sampling_equals_xla(model, monkeypatch):
    """attn_impl="pallas" decodes through the Pallas paged-attention kernel and prefills through the
    flash kernel where the new tokens are the whole context: the paged engine's first chunk (every
    row at position 0), the dense engine's prefill (interpret mode here). A later chunk attends to
    the pages of the earlier ones and stays on the XLA path. Same tokens and log-probs as impl xla."""
    from jsdr.model import attention as attn
    traced = []  # (query length, kv length) of every flash-kernel call traced

    def spy(q, k, *args, **kw):
        traced.append((q.shape[1], k.shape[1]))
        return flash_attention(q, k, *args, **kw)

    flash_attention = attn.flash.flash_attention
    monkeypatch.setattr(attn.flash, "flash_attention", spy)
    params, sampler = model
    prompts = [PROMPTS[i] for i in (0, 2, 4)]  # 3, 17 and 30 tokens: the 30-token prompt takes 2 chunks of 16
    sc = dataclasses.replace(BASE, n=2, max_new_tokens=6, temperature=1.0, prefill_chunk=16)
    kernel = Sampler(Model(CFG, attn_impl="pallas"), pad_id=0)
    for engine in ("paged", "dense"):
        traced.clear()
        e_sc = dataclasses.replace(sc, engine=engine)
        _same(sampler.generate(params, None, prompts, e_sc), kernel.generate(params, None, prompts, e_sc), engine)
        if engine == "paged":  # one fresh 16-token chunk program (the second chunk reads pages)
            assert traced == [(16, 16)] * 2, traced  # traced twice by the layer scan
        else:  # the dense prefill over the 32-token prompt bucket
            assert traced and all(t == (32, 32) for t in traced), traced
