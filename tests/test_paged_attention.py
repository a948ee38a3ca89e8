"""Pallas paged decode attention (interpret mode on the CPU) against its pure-JAX reference, the reference
against an independent numpy loop, garbage outside the lengths, and compilation for an H100 with the real
GPU compiler (compile-only CUDA devices, no GPU needed).

Cases: GQA (H=8, K=2) and MHA, head dims 40/64/128, page sizes 4 and 16, float32 and bfloat16, pools
whose pages are shuffled and shared between sequences (a common prefix), and lengths of 1, a page
boundary, one less, the whole table (M * S) and 0.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsdr_kernels import paged_attention as pa

F32_TOL = 1e-5   # max abs diff relative to max(1, max |reference|)
BF16_TOL = 5e-3  # bfloat16 inputs vs the float32 reference on the same inputs (measured <= 1.7e-3)


def _inputs(B, H, K, D, S, M, dtype, seed=0):
    """q, k_pages, v_pages, page_table, lengths (numpy) of B sequences over a shuffled shared pool."""
    rs = np.random.RandomState(seed)
    P = B * M + 3
    pool = rs.permutation(P)
    page_table = pool[: B * M].reshape(B, M).astype(np.int32)
    if B > 1:
        page_table[1, :2] = page_table[0, :2]  # sequences 0 and 1 share a two-page prefix
    base = [1, 2 * S, 2 * S - 1, M * S, 0]
    lengths = np.array([base[b] if b < len(base) else rs.randint(1, M * S + 1) for b in range(B)], np.int32)
    q = rs.randn(B, H, D).astype(dtype)
    k_pages = rs.randn(K, P, S, D).astype(dtype)
    v_pages = rs.randn(K, P, S, D).astype(dtype)
    return q, k_pages, v_pages, page_table, lengths


def _err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _numpy_attention(q, k_pages, v_pages, page_table, lengths, scale=None):
    """Independent float64 loop: each sequence's keys are its pages concatenated, cut at its length."""
    B, H, D = q.shape
    K, _, S, _ = k_pages.shape
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((B, H, D))
    for b in range(B):
        n = int(lengths[b])
        pages = page_table[b, : math.ceil(n / S)]
        for h in range(H):
            kv = h // (H // K)
            keys = np.concatenate([k_pages[kv, p] for p in pages] or [np.zeros((0, D))])[:n].astype(np.float64)
            vals = np.concatenate([v_pages[kv, p] for p in pages] or [np.zeros((0, D))])[:n].astype(np.float64)
            if n == 0:
                continue
            logits = keys @ q[b, h].astype(np.float64) * scale
            w = np.exp(logits - logits.max())
            out[b, h] = (w / w.sum()) @ vals
    return out


CASES = [  # B, H, K, D, S, M, dtype, pages_per_block
    (6, 8, 2, 64, 4, 5, np.float32, None),
    (6, 8, 2, 128, 16, 4, np.float32, None),
    (6, 4, 4, 64, 16, 3, np.float32, 1),
    (6, 8, 2, 40, 4, 5, np.float32, 2),
    (5, 4, 4, 128, 4, 6, np.float32, 3),
    (6, 8, 2, 128, 16, 4, jnp.bfloat16, None),
    (6, 4, 4, 40, 4, 5, jnp.bfloat16, None),
]


@pytest.mark.parametrize("B,H,K,D,S,M,dtype,ppb", CASES)
def test_kernel_matches_reference(B, H, K, D, S, M, dtype, ppb):
    q, kp, vp, pt, lens = (jnp.asarray(x) for x in _inputs(B, H, K, D, S, M, dtype))
    out = pa.paged_attention(q, kp, vp, pt, lens, pages_per_block=ppb)
    ref = pa.reference_paged_attention(q, kp, vp, pt, lens)
    assert out.shape == (B, H, D) and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert not np.asarray(out[4], np.float32).any(), "length 0 must give zeros"
    tol = F32_TOL if dtype == np.float32 else BF16_TOL
    assert _err(out, ref) <= tol, f"max rel err {_err(out, ref):.2e}"


@pytest.mark.parametrize("B,H,K,D,S,M", [(6, 8, 2, 64, 4, 5), (7, 4, 4, 40, 16, 3)])
def test_reference_matches_numpy_loop(B, H, K, D, S, M):
    q, kp, vp, pt, lens = _inputs(B, H, K, D, S, M, np.float32, seed=1)
    ref = pa.reference_paged_attention(*(jnp.asarray(x) for x in (q, kp, vp, pt, lens)), scale=0.3)
    assert _err(ref, _numpy_attention(q, kp, vp, pt, lens, scale=0.3)) <= F32_TOL
    ref = pa.reference_paged_attention(*(jnp.asarray(x) for x in (q, kp, vp, pt, lens)))
    assert _err(ref, _numpy_attention(q, kp, vp, pt, lens)) <= F32_TOL


@pytest.mark.parametrize("garbage", [np.nan, 1e30])
def test_only_slots_within_length_are_read(garbage):
    """Every pool slot that no sequence sees within its length is garbage, and page-table entries
    past the lengths point at garbage pages: the result is that of the clean pool, with no NaN."""
    B, H, K, D, S, M = 6, 8, 2, 64, 4, 5
    q, kp, vp, pt, lens = _inputs(B, H, K, D, S, M, np.float32, seed=2)
    clean = pa.reference_paged_attention(*(jnp.asarray(x) for x in (q, kp, vp, pt, lens)))
    seen = np.zeros(kp.shape[1:3], bool)  # [P, S]
    for b in range(B):
        for p in range(lens[b]):
            seen[pt[b, p // S], p % S] = True
    unused = np.flatnonzero(~seen.any(axis=1))
    assert unused.size and (~seen).sum() > unused.size * S, "the case must have partly used pages too"
    for b in range(B):  # entries past the length: any page, here garbage ones
        first_free = math.ceil(lens[b] / S)
        pt[b, first_free:] = unused[np.arange(M - first_free) % unused.size]
    kp, vp = kp.copy(), vp.copy()
    kp[:, ~seen] = garbage
    vp[:, ~seen] = garbage
    args = [jnp.asarray(x) for x in (q, kp, vp, pt, lens)]
    for ppb in (None, 1, 4):
        out = pa.paged_attention(*args, pages_per_block=ppb)
        assert np.isfinite(np.asarray(out)).all()
        assert _err(out, clean) <= F32_TOL
    assert _err(pa.reference_paged_attention(*args), clean) <= F32_TOL


def test_loop_trip_count_follows_the_length():
    """The page loop's bound is read from the length at run time (a while loop), not the table's M
    pages (a static bound would trace to a scan): short sequences cost only their own pages."""
    args = [jnp.asarray(x) for x in _inputs(2, 4, 2, 16, 4, 8, np.float32)]
    jaxpr = jax.make_jaxpr(pa.paged_attention)(*args)
    (call,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    prims = {e.primitive.name for e in call.params["jaxpr"].eqns}
    assert "while" in prims and "scan" not in prims, prims


def test_validation_errors():
    q, kp, vp, pt, lens = (jnp.asarray(x) for x in _inputs(2, 6, 4, 16, 4, 2, np.float32))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        pa.paged_attention(q, kp, vp, pt, lens)
    with pytest.raises(ValueError, match="powers of two"):
        pa.paged_attention(q[:, :4], kp, vp, pt, lens, pages_per_block=2, interpret=False)
    assert pa.default_pages_per_block(16, 64) == 8 and pa.default_pages_per_block(4, 2) == 4


def test_compiles_for_h100_with_the_gpu_compiler():
    """Qwen3-8B decode shapes (H=32, K=8, D=128, pages of 16, B=8, M=64) in bfloat16: lowered through
    Pallas-Triton and compiled to PTX by XLA's GPU compiler for compile-only H100 devices."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        pytest.skip("the CUDA plugin (jax[cuda12-local]) is not installed: no GPU compiler to compile with")
    from jax.experimental import topologies

    from jsdr import plan
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=plan.TARGETS["h100-80gb"].gpu_spec())
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    B, H, K, D, S, M = 8, 32, 8, 128, 16, 64
    P = B * M
    shapes = [jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((K, P, S, D), jnp.bfloat16),
              jax.ShapeDtypeStruct((K, P, S, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, M), jnp.int32),
              jax.ShapeDtypeStruct((B,), jnp.int32)]
    fn = jax.jit(lambda *a: pa.paged_attention(*a, interpret=False), in_shardings=(rep,) * 5, out_shardings=rep)
    compiled = fn.lower(*shapes).compile()
    assert "H100" in str(topo.devices[0])
    text = compiled.as_text()
    assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == 1
    assert "bf16[8,512,16,128]" in text  # the pools go in whole, never gathered or repeated outside
