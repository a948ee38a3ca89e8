"""Host-side batch building: token lists in, fixed-shape numpy batches out.

Each method's loss reads one of the batch types below (NamedTuples, so they are pytrees that cross
`jax.jit` and stack into micro-batches with `jax.tree.map`). Every builder takes the shape it must
produce (static shapes: one compile per bucket) and fails with the row that does not fit.

Conventions shared by all batches: int32 tokens / positions / segment ids, segment id 0 = padding,
positions restart at 0 in every segment, `targets[b, t]` is the token predicted at position t and
`mask[b, t]` (float32) is 1 where that prediction is trained.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class SFTBatch(NamedTuple):
    """Packed prompt + response rows; the mask covers the response tokens."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


class GRPOBatch(NamedTuple):
    """Prompt (left-padded) + completion (right-padded) rows; the mask covers the completion.
    advantages [B], old_logprobs [B, T] and token_norm [B] are added by the method (None until then;
    old_logprobs None means "the current policy's, under stop-gradient": one update per rollout batch;
    token_norm, for aggregation "dapo", is the step's completion-token count / grad_accum on every row,
    None meaning "this micro-batch's own count")."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    advantages: np.ndarray | None = None
    old_logprobs: np.ndarray | None = None
    token_norm: np.ndarray | None = None


class OPSDBatch(NamedTuple):
    """Student and teacher sequences holding the same rollout, and where each rollout token is
    predicted: the hidden state at s_index[b, j] of the student row (t_index[b, j] of the teacher
    row) predicts rollout_tokens[b, j]."""

    s_tokens: np.ndarray
    s_positions: np.ndarray
    s_segment_ids: np.ndarray
    t_tokens: np.ndarray
    t_positions: np.ndarray
    t_segment_ids: np.ndarray
    s_index: np.ndarray
    t_index: np.ndarray
    rollout_tokens: np.ndarray
    rollout_mask: np.ndarray


def pack_sft_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, *,
                      num_rows: int | None = None, pad_id: int = 0) -> SFTBatch:
    """Pack (prompt_ids, response_ids) examples into rows of `seq_len` tokens.

    Greedy first fit in the given order: each example goes into the first row with room for
    len(prompt) + len(response) tokens, else into a new row. Rows are right-padded with `pad_id`
    (segment id 0). `num_rows` fixes the number of rows (static shapes; extra rows are all
    padding); it is an error if more are needed. An example longer than `seq_len` is an error
    (truncating or dropping overlong examples is the caller's decision)."""
    if seq_len < 2:
        raise ValueError(f"pack_sft_examples: seq_len={seq_len} must be at least 2")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []
    for i, (prompt, response) in enumerate(examples):
        p, r = list(prompt), list(response)
        n = len(p) + len(r)
        if n == 0:
            raise ValueError(f"example {i}: prompt and response are both empty")
        if n > seq_len:
            raise ValueError(f"example {i}: prompt ({len(p)}) + response ({len(r)}) = {n} tokens exceed "
                             f"seq_len={seq_len}; truncate or drop it before packing")
        for j in range(len(rows)):
            if used[j] + n <= seq_len:
                rows[j].append((p, r))
                used[j] += n
                break
        else:
            rows.append([(p, r)])
            used.append(n)
    num = len(rows) if num_rows is None else num_rows
    if len(rows) > num:
        raise ValueError(f"pack_sft_examples: the examples need {len(rows)} rows of {seq_len} tokens but "
                         f"num_rows={num_rows}")
    tokens = np.full((num, seq_len), pad_id, np.int32)
    targets = np.full((num, seq_len), pad_id, np.int32)
    positions = np.zeros((num, seq_len), np.int32)
    segment_ids = np.zeros((num, seq_len), np.int32)
    mask = np.zeros((num, seq_len), np.float32)
    for b, row in enumerate(rows):
        off = 0
        for s, (p, r) in enumerate(row, start=1):
            seq = p + r
            n = len(seq)
            tokens[b, off:off + n] = seq
            segment_ids[b, off:off + n] = s
            positions[b, off:off + n] = np.arange(n)
            targets[b, off:off + n - 1] = seq[1:]
            # targets[t] = seq[t + 1] is a response token for t + 1 >= len(p)
            first = max(len(p) - 1, 0)
            mask[b, off + first:off + n - 1] = 1.0
            off += n
    return SFTBatch(tokens, positions, segment_ids, targets, mask)


def build_grpo_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                     prompt_len: int | None = None, completion_len: int | None = None,
                     pad_id: int = 0) -> GRPOBatch:
    """Rows of prompt + completion: the prompt left-padded to `prompt_len`, the completion (already
    cut after its stop token) right-padded to `completion_len` (defaults: the longest). mask[b, t] = 1
    where targets[b, t] is a completion token, so the first completion token is predicted at position
    prompt_len - 1. advantages / old_logprobs / token_norm are left None."""
    if len(prompts) != len(completions):
        raise ValueError(f"build_grpo_batch: {len(prompts)} prompts but {len(completions)} completions")
    plen = max(len(p) for p in prompts) if prompt_len is None else prompt_len
    clen = max([len(c) for c in completions] + [1]) if completion_len is None else completion_len
    rows, length = len(prompts), plen + clen
    tokens = np.full((rows, length), pad_id, np.int32)
    targets = np.full((rows, length), pad_id, np.int32)
    positions = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        p, c = list(p), list(c)
        if not p:
            raise ValueError(f"row {b}: empty prompt")
        if len(p) > plen:
            raise ValueError(f"row {b}: prompt of {len(p)} tokens exceeds prompt_len={plen}")
        if len(c) > clen:
            raise ValueError(f"row {b}: completion of {len(c)} tokens exceeds completion_len={clen}")
        start, end = plen - len(p), plen + len(c)
        seq = p + c
        tokens[b, start:end] = seq
        segment_ids[b, start:end] = 1
        positions[b, start:end] = np.arange(len(seq))
        targets[b, start:end - 1] = seq[1:]
        mask[b, plen - 1:plen - 1 + len(c)] = 1.0
    return GRPOBatch(tokens, positions, segment_ids, targets, mask)


def _pad_row(prompt: Sequence[int], rollout: Sequence[int], length: int, padding: str, pad_id: int, role: str,
             row: int):
    p, r = list(prompt), list(rollout)
    n = len(p) + len(r)
    if not p:
        raise ValueError(f"row {row}: the {role} prompt is empty; the first rollout token needs a prompt "
                         f"position to be predicted from")
    if n > length:
        raise ValueError(f"row {row}: {role} prompt ({len(p)}) + rollout ({len(r)}) = {n} tokens do not fit "
                         f"{role}_len={length}")
    off = length - n if padding == "left" else 0
    tokens = np.full(length, pad_id, np.int32)
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    tokens[off:off + n] = p + r
    seg[off:off + n] = 1
    pos[off:off + n] = np.arange(n)
    return tokens, pos, seg, off + len(p) - 1  # the position that predicts rollout token 0


def build_opsd_batch(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
                     rollouts: Sequence[Sequence[int]], *, student_len: int | None = None,
                     teacher_len: int | None = None, rollout_len: int | None = None, padding: str = "left",
                     pad_id: int = 0) -> OPSDBatch:
    """Student and teacher sequences (prompt + rollout, each role with its own prompt) and the
    explicit alignment of the rollout tokens.

    Row b of each role is `prompt_b + rollout_b`, left- or right-padded to the role's length
    (default: the longest row), positions 0.. over the real tokens, segment id 1 (0 = padding).
    Rollout token j of row b is predicted by the hidden state at s_index[b, j] = (start of the
    student prompt) + len(student prompt) - 1 + j, and likewise t_index in the teacher sequence: the
    first rollout token is predicted by the *last prompt position* of each role. Rollouts shorter
    than `rollout_len` (default: the longest) are padded with `pad_id`, mask 0 and index 0."""
    if padding not in ("left", "right"):
        raise ValueError(f"build_opsd_batch: padding={padding!r}; choose 'left' or 'right'")
    if not (len(student_prompts) == len(teacher_prompts) == len(rollouts)):
        raise ValueError(f"build_opsd_batch: {len(student_prompts)} student prompts, {len(teacher_prompts)} teacher "
                         f"prompts and {len(rollouts)} rollouts; the counts must match")
    rows = len(rollouts)
    lens = [len(r) for r in rollouts]
    n_max = max(lens + [1]) if rollout_len is None else rollout_len
    for b, n in enumerate(lens):
        if n > n_max:
            raise ValueError(f"row {b}: rollout of {n} tokens exceeds rollout_len={n_max}")
    s_len = max(len(p) + n for p, n in zip(student_prompts, lens)) if student_len is None else student_len
    t_len = max(len(p) + n for p, n in zip(teacher_prompts, lens)) if teacher_len is None else teacher_len
    roles = {"student": (student_prompts, s_len), "teacher": (teacher_prompts, t_len)}
    seqs = {role: [np.zeros((rows, length), np.int32) for _ in range(3)] for role, (_, length) in roles.items()}
    index = {role: np.zeros((rows, n_max), np.int32) for role in roles}
    rollout_tokens = np.full((rows, n_max), pad_id, np.int32)
    rollout_mask = np.zeros((rows, n_max), np.float32)
    for b in range(rows):
        r = list(rollouts[b])
        for role, (prompts, length) in roles.items():
            tok, pos, seg, first = _pad_row(prompts[b], r, length, padding, pad_id, role, b)
            for arr, row in zip(seqs[role], (tok, pos, seg)):
                arr[b] = row
            index[role][b, :len(r)] = first + np.arange(len(r))
        rollout_tokens[b, :len(r)] = r
        rollout_mask[b, :len(r)] = 1.0
    return OPSDBatch(*seqs["student"], *seqs["teacher"], index["student"], index["teacher"], rollout_tokens,
                     rollout_mask)
