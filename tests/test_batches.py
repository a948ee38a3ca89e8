"""Host-side batch builders (jsdr/data/batches.py): packing, GRPO rows, OPSD alignment."""

import numpy as np
import pytest

from jsdr.data import batches


def test_pack_sft_examples():
    ex = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9]), ([10, 11], [12]), ([13, 14, 15, 16], [17, 18, 19])]
    b = batches.pack_sft_examples(ex, 8)
    # first fit: row 0 = ex0 (5) + ex2 (3); row 1 = ex1 (4); row 2 = ex3 (7)
    assert b.tokens.shape == (3, 8)
    np.testing.assert_array_equal(b.tokens[0], [1, 2, 3, 4, 5, 10, 11, 12])
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(b.targets[0], [2, 3, 4, 5, 0, 11, 12, 0])
    np.testing.assert_array_equal(b.mask[0], [0, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(b.tokens[1], [6, 7, 8, 9, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.mask[1], [1, 1, 1, 0, 0, 0, 0, 0])
    # every masked target is a response token, every response token but none of the prompt is a target
    for row in range(3):
        got = b.targets[row][b.mask[row] > 0].tolist()
        assert got == sum((r for (p, r) in ex if set(r) & set(got)), [])
    assert batches.pack_sft_examples(ex, 8, num_rows=5).tokens.shape == (5, 8)
    with pytest.raises(ValueError, match="example 3"):
        batches.pack_sft_examples(ex, 6)
    with pytest.raises(ValueError, match="num_rows=2"):
        batches.pack_sft_examples(ex, 8, num_rows=2)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_build_opsd_batch_alignment(padding):
    sp = [[1, 2, 3], [4, 5], [6]]
    tp = [[7, 8, 9, 10, 11], [12], [13, 14]]
    ro = [[20, 21, 22], [23], []]
    b = batches.build_opsd_batch(sp, tp, ro, padding=padding, rollout_len=4)
    assert b.rollout_tokens.shape == (3, 4)
    np.testing.assert_array_equal(b.rollout_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    for role, prompts in (("s", sp), ("t", tp)):
        tok, pos, seg, idx = (getattr(b, f"{role}_{k}") for k in ("tokens", "positions", "segment_ids", "index"))
        for r in range(3):
            n = len(ro[r])
            if n == 0:
                continue
            # the first rollout token is predicted by the last prompt position of the role
            assert tok[r, idx[r, 0]] == prompts[r][-1]
            assert pos[r, idx[r, 0]] == len(prompts[r]) - 1
            # every rollout token sits right after the position that predicts it
            for j in range(n):
                assert tok[r, idx[r, j] + 1] == ro[r][j] and seg[r, idx[r, j]] == 1
            real = tok[r][seg[r] > 0].tolist()
            assert real == prompts[r] + ro[r]
            assert pos[r][seg[r] > 0].tolist() == list(range(len(real)))
            assert (seg[r][0] == 0) == (padding == "left" and len(real) < tok.shape[1])
    with pytest.raises(ValueError, match="row 0.*student_len=4"):
        batches.build_opsd_batch(sp, tp, ro, student_len=4)
    with pytest.raises(ValueError, match="row 2: the teacher prompt is empty"):
        batches.build_opsd_batch(sp, [[1], [2], []], ro)


def test_build_grpo_batch():
    b = batches.build_grpo_batch([[1, 2], [3]], [[4, 5, 6], []], prompt_len=3, completion_len=3)
    np.testing.assert_array_equal(b.tokens, [[0, 1, 2, 4, 5, 6], [0, 0, 3, 0, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b.positions, [[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.targets[0], [0, 2, 4, 5, 6, 0])
    np.testing.assert_array_equal(b.mask, [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
