"""The embedded default: a synthetic reasoning task, a local tokenizer and a tiny Qwen3 reasoner.

Nothing here needs a model hub. `ensure_toy_assets()` returns (shipped in the package for the
default settings; otherwise built once, then cached) a directory in
Hugging Face format - config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a
Qwen3-style chat template - that holds a ~0.8M-parameter Qwen3-architecture model warm-started by
a short SFT stage on the task below, so that SFT, GRPO and OPSD can show learning on a CPU.

The task: "mod-10 chains". A list of labelled operations (+k, -k, *k) applied in order to 0,
reducing modulo 10 after every step. The reference solution writes one line per step (the
labelled operation restated, the exact arithmetic, its reduction), then the boxed answer::

    problem:  x = 0. Apply in order, mod 10:    solution:  A + 8: 0 + 8 = 8 -> 8
              A + 8                                        B + 4: 8 + 4 = 12 -> 2
              B + 4                                        C - 9: 2 - 9 = -7 -> 3
              C - 9                                        D * 7: 3 * 7 = 21 -> 1
              D * 7                                        The answer is \\boxed{1}.

Difficulty is the number of operations. The warm start gives the student role a habit the teacher
role does not have (a negative result reduced by dropping its sign, -7 -> 7), so the same weights
solve about half of the problems as the student and nearly all as the teacher: the gap that SFT,
GRPO and OPSD each close in their own way. Teacher-role "recovery" examples continue correctly from
the habit's first mistake, so the teacher's disagreement with a student rollout sits at the
student's mistake. docs/toy.md has the measurements behind each choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

TOY_VERSION = "v2"  # v2: every chain starts at 0; the student habit (ToySettings.habit_fraction)
MOD = 10
OPS = ("+", "-", "*")
HELDOUT_EVERY = 5  # one problem in five (by hash of its canonical form) is held out from training ...
SPLITS = ("train", "validation", "test")  # ... and half of those are for tuning (validation), half for the test
START = 0  # every chain starts at 0: the tiny model cannot learn the long-range copy of a start digit
DEFAULT_DIFFICULTY = 4  # operations per problem of the held-out benchmark
TRAIN_DIFFICULTY = (1, 5)  # the warm start sees chains of 1..5 operations

# ---------------------------------------------------------------------------------------------
# prompts (the structure of paper-notes.md, shorter texts so that the vocabulary stays tiny)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STUDENT_PROMPT = "Problem: {problem}\n\n" + INSTRUCTION
REFERENCE_HEADER = "Here is a reference solution to this problem:"
TRANSITION = "Now solve the problem yourself, step by step, and reach the same answer."
TEACHER_PROMPT = ("Problem: {problem}\n\n" + REFERENCE_HEADER + "\n{solution}\n\n" + TRANSITION + "\n\n"
                  + INSTRUCTION)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen3's chat template, reduced to what the toy needs: system/user/assistant turns; the
# generation prompt opens an assistant turn, and enable_thinking=false adds an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# pre-tokenizer split: letters (with one leading non-letter), single digits with an optional
# leading space, punctuation runs, newlines, other whitespace - the shape of Qwen's pattern,
# except that a space may join the digit after it (keeps arithmetic lines short)
_SPLIT_PATTERN = (r"[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# keyword arguments of make_problems for the training records of the toy runs
TRAIN_DEFAULTS = {"n": 4096, "difficulty": TRAIN_DIFFICULTY}


def _fill(template: str, **values: str) -> str:
    # one pass, so braces elsewhere (\\boxed{}) and placeholder-like text in values stay as they are
    return re.sub(r"\{(problem|solution)\}", lambda m: values[m.group(1)], template)


def student_prompt(problem: str) -> str:
    """The student's user message: the problem and the instruction."""
    return _fill(STUDENT_PROMPT, problem=problem)


def teacher_prompt(problem: str, solution: str) -> str:
    """The teacher's user message: problem, reference solution, transition, instruction."""
    return _fill(TEACHER_PROMPT, problem=problem, solution=solution)


# ---------------------------------------------------------------------------------------------
# the task


def _reduce(v: int, habit: bool = False) -> int:
    """v mod 10; with the student's habit a negative v is reduced by dropping its sign (-6 -> 6)."""
    return -v % MOD if habit and v < 0 else v % MOD


def _apply(x: int, op: str, k: int) -> int:
    if op == "+":
        return x + k
    if op == "-":
        return x - k
    if op == "*":
        return x * k
    raise ValueError(f"unknown operation {op!r} (known: {OPS})")


def _label(i: int) -> str:
    return chr(ord("A") + i)


def render_problem(start: int, ops: Sequence[tuple[str, int]]) -> str:
    steps = "".join(f"\n{_label(i)} {op} {k}" for i, (op, k) in enumerate(ops))
    return f"x = {start}. Apply in order, mod {MOD}:{steps}"


def solve(start: int, ops: Sequence[tuple[str, int]], habit: bool = False) -> tuple[str, str]:
    """(step-by-step solution ending in \\boxed{answer}, answer) of one chain.

    Each line restates the labelled operation, then the exact result and its reduction."""
    x, lines = start, []
    for i, (op, k) in enumerate(ops):
        exact = _apply(x, op, k)
        lines.append(f"{_label(i)} {op} {k}: {x} {op} {k} = {exact} -> {_reduce(exact, habit)}")
        x = _reduce(exact, habit)
    lines.append(f"The answer is \\boxed{{{x}}}.")
    return "\n".join(lines), str(x)


def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_problem (raises ValueError on text that is not a toy problem)."""
    try:
        head, *rest = problem.split("\n")
        start = int(head.removeprefix("x = ").split(".", 1)[0])
        ops = []
        for line in rest:
            _, op, k = line.split(" ")
            ops.append((op, int(k)))
    except (ValueError, IndexError):
        raise ValueError(f"not a toy problem: {problem!r}") from None
    if not ops or render_problem(start, ops) != problem:
        raise ValueError(f"not a toy problem: {problem!r}")
    return start, ops


def verify(example: dict) -> bool:
    """Recompute the chain from the problem text and check solution and answer (and the
    arithmetic of every line of the solution)."""
    start, ops = parse_problem(example["problem"])
    solution, answer = solve(start, ops)
    if example["solution"] != solution or example["answer"] != answer:
        return False
    x = start
    for (op, k), line in zip(ops, solution.splitlines()[:-1]):  # independent check of each written step
        head, rest = line.split(": ")
        lhs, rhs = rest.split(" = ")
        exact, red = rhs.split(" -> ")
        a, op2, k2 = lhs.split(" ")
        if (head.split(" ")[1:] != [op, str(k)] or [int(a), op2, int(k2)] != [x, op, k]
                or _apply(x, op, k) != int(exact) or int(exact) % MOD != int(red)):
            return False
        x = int(red)
    return True


def split_of(problem: str) -> str:
    """By a stable hash of the text: one problem in HELDOUT_EVERY is held out, and the held-out ones
    are split in two halves, 'validation' (for choosing settings) and 'test' (for reporting only);
    the rest is 'train'."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
    if h % HELDOUT_EVERY:
        return "train"
    return "validation" if (h // HELDOUT_EVERY) % 2 == 0 else "test"


def _operand(rng: random.Random, op: str) -> int:
    return rng.randint(2, 9) if op == "*" else rng.randint(1, 9)


def num_distinct(difficulty: int) -> int:
    """How many distinct problems (both splits) have `difficulty` operations."""
    per_op = 9 + 9 + 8
    return per_op ** difficulty


def make_problems(n: int, seed: int = 0, difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY,
                  split: str = "train", unique: bool | None = None) -> list[dict]:
    """`n` problems of one split, deterministic in (seed, difficulty, split).

    difficulty: the number of operations, or an inclusive (lo, hi) range drawn uniformly per
    problem. unique (default: True for 'validation'/'test', False for 'train'): no problem twice.
    Each item: {"problem", "solution", "answer", "difficulty"}; the solution ends in \\boxed{answer}
    and is verified by recomputation.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
    if not (1 <= lo <= hi <= 26):
        raise ValueError(f"difficulty={difficulty!r}: need 1 <= operations <= 26 (or 1 <= lo <= hi <= 26)")
    unique = split != "train" if unique is None else unique
    if unique:
        space = sum(num_distinct(d) for d in range(lo, hi + 1))
        share = 1 - 1 / HELDOUT_EVERY if split == "train" else 1 / (2 * HELDOUT_EVERY)
        if n > 0.8 * space * share:
            raise ValueError(f"make_problems: {n} unique {split} problems requested, but difficulty "
                             f"{difficulty} has only about {int(space * share)} in that split")
    rng = random.Random(f"toy-{TOY_VERSION}-{seed}-{lo}-{hi}-{split}")
    out, seen = [], set()
    while len(out) < n:
        d = rng.randint(lo, hi)
        start = START
        ops = []
        for _ in range(d):
            op = rng.choice(OPS)
            ops.append((op, _operand(rng, op)))
        problem = render_problem(start, ops)
        if split_of(problem) != split or (unique and problem in seen):
            continue
        seen.add(problem)
        solution, answer = solve(start, ops)
        out.append({"problem": problem, "solution": solution, "answer": answer, "difficulty": d})
    return out


BENCHMARK_SEED = {"validation": 10_000, "test": 20_000}


def toy_benchmark(n: int = 128, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY, split: str = "test") -> list[dict]:
    """Held-out evaluation problems, no repeats: split 'test' (the default; reported, never used to
    choose a setting) or 'validation' (for tuning)."""
    if split not in BENCHMARK_SEED:
        raise ValueError(f"toy_benchmark: split={split!r}; choose 'validation' or 'test'")
    return make_problems(n, seed=BENCHMARK_SEED[split] + seed, difficulty=difficulty, split=split, unique=True)


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} in text (None when there is none)."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    j, depth = i + len("\\boxed{"), 1
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j:k].strip()
    return None


# ---------------------------------------------------------------------------------------------
# tokenizer


def _tokenizer_corpus(n: int = 3000) -> Iterable[str]:
    """Texts the BPE merges are learned from: chats of both roles, thinking on and off."""
    probs = make_problems(n, seed=12345, difficulty=(1, 8), split="train")
    for i, ex in enumerate(probs):
        yield "user\n" + student_prompt(ex["problem"]) + "\n"
        yield "user\n" + teacher_prompt(ex["problem"], ex["solution"]) + "\n"
        yield "assistant\n\n\n\n\n" + ex["solution"] + "\n"
    yield "system\nYou are a helpful assistant.\n"


def build_tokenizer(vocab_size: int = 448, out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer (any text round-trips; digits stay single tokens) with the
    special tokens and chat template of Qwen3, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[t for t in SPECIAL_TOKENS
                                                              if t not in (EOS_TOKEN, PAD_TOKEN)],
                                   model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def render_chat(tokenizer, user_message: str, enable_thinking: bool) -> str:
    """The prompt text of one user turn with the assistant generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)


# ---------------------------------------------------------------------------------------------
# model and warm start


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """Everything that determines the cached assets (a non-default value changes the cache path)."""
    vocab_size: int = 448  # BPE target; the merges run out at ~417 tokens
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    steps: int = 2400  # the teacher passes 98% from ~1,800 steps on (the build probe in docs/toy.md)
    batch_rows: int = 4
    row_len: int = 256
    learning_rate: float = 4e-3
    warmup: int = 30
    weight_decay: float = 0.01
    teacher_fraction: float = 0.65  # share of warm-start examples in the teacher role (after the copy phase)
    copy_steps: int = 0  # first steps with teacher-role examples only (the copy circuit forms first)
    recovery_fraction: float = 0.3  # share of teacher-role examples that start from the habit's mistake (below)
    habit_fraction: float = 0.6  # share of student-role examples written with the habit (see below)
    train_difficulty: tuple[int, int] = TRAIN_DIFFICULTY  # operations of the student-role examples
    teacher_difficulty: tuple[int, int] = TRAIN_DIFFICULTY  # operations of the teacher-role examples
    seed: int = 0


DEFAULT_SETTINGS = ToySettings()


def hf_config(settings: ToySettings, tokenizer) -> dict:
    from transformers import Qwen3Config
    c = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads, head_dim=settings.head_dim, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN))
    d = c.to_dict()
    d["architectures"] = ["Qwen3ForCausalLM"]
    return d


def encode_example(tokenizer, ex: dict, role: str, enable_thinking: bool,
                   wrong_prefix: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example; the completion is solution + <|im_end|>.

    wrong_prefix: lines the assistant has already written (ending in a newline), appended to the
    prompt (so no loss is put on them); the completion then is what follows them."""
    msg = student_prompt(ex["problem"]) if role == "student" else teacher_prompt(ex["problem"], ex["solution"])
    prompt = tokenizer.encode(render_chat(tokenizer, msg, enable_thinking) + wrong_prefix, add_special_tokens=False)
    completion = tokenizer.encode(ex["solution"], add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    return prompt, completion


def habit_example(ex: dict) -> dict:
    """The example as the student's habit writes it: negative results reduced by dropping the sign
    (-6 -> 6 instead of 4), the chain continued from there (a wrong answer after any negative
    result other than -5)."""
    start, ops = parse_problem(ex["problem"])
    solution, answer = solve(start, ops, habit=True)
    return dict(ex, solution=solution, answer=answer)


def recovery_example(ex: dict) -> tuple[str, dict] | None:
    """(wrong prefix, continuation) for a teacher-role example that starts from the student's habit,
    or None when the habit makes no mistake on this problem.

    The prefix is the habit's solution up to and including its first wrong line; the continuation
    applies the remaining operations, correctly, to the value that line reached, and boxes the
    result. Trained on the continuation only, the teacher learns to continue from what has been
    written, so that on a student's rollout it disagrees with the student where the student made
    its mistake, not on every later line."""
    start, ops = parse_problem(ex["problem"])
    good = ex["solution"].split("\n")
    bad = solve(start, ops, habit=True)[0].split("\n")
    wrong = [i for i in range(len(ops)) if bad[i] != good[i]]
    if not wrong:
        return None
    j = wrong[0]
    x = int(bad[j].rsplit(" -> ", 1)[1])
    rest = solve(x, ops[j + 1:])[0].split("\n")
    cont = [f"{_label(j + 1 + i)}{line[1:]}" for i, line in enumerate(rest[:-1])] + [rest[-1]]
    return "\n".join(bad[:j + 1]) + "\n", dict(ex, solution="\n".join(cont), reference=ex["solution"])


def _pack(examples: list[tuple[list[int], list[int]]], rows: int, row_len: int):
    """Greedy packing into [rows, row_len] tokens, segment ids, positions and loss weights."""
    import numpy as np
    tok = np.zeros((rows, row_len), np.int32)
    seg = np.zeros((rows, row_len), np.int32)
    pos = np.zeros((rows, row_len), np.int32)
    tgt = np.zeros((rows, row_len), np.int32)
    w = np.zeros((rows, row_len), np.float32)
    r, c, s, used = 0, 0, 0, 0
    for prompt, completion in examples:
        ids = prompt + completion
        if len(ids) > row_len:
            raise ValueError(f"toy example of {len(ids)} tokens does not fit row_len={row_len}")
        if c + len(ids) > row_len:
            r, c = r + 1, 0
            if r == rows:
                break
        s += 1
        n = len(ids)
        tok[r, c:c + n] = ids
        seg[r, c:c + n] = s
        pos[r, c:c + n] = np.arange(n)
        tgt[r, c:c + n - 1] = ids[1:]
        w[r, c + len(prompt) - 1:c + n - 1] = 1.0  # predict every completion token
        c += n
        used += 1
    return (tok, seg, pos, tgt, w), used


def _problem_stream(seed: int, difficulty: tuple[int, int]):
    chunk = 0
    while True:
        yield from make_problems(512, seed=seed + chunk, difficulty=difficulty, split="train")
        chunk += 1


def _example_stream(tokenizer, settings: ToySettings, teacher_fraction: float, phase: int = 0):
    """Endless (prompt, completion) pairs for the warm start: both roles (teacher-role examples with
    probability teacher_fraction, on chains of settings.teacher_difficulty operations), both
    thinking modes."""
    rng = random.Random(f"{settings.seed}-{phase}")
    base = 100 + 1000 * settings.seed + 100_000 * phase
    student = _problem_stream(base, tuple(settings.train_difficulty))
    teacher = _problem_stream(base + 500, tuple(settings.teacher_difficulty))
    while True:
        role = "teacher" if rng.random() < teacher_fraction else "student"
        ex = next(teacher if role == "teacher" else student)
        thinking = rng.random() < 0.5
        if role == "student" and rng.random() < settings.habit_fraction:
            ex = habit_example(ex)  # the habit is trained in the student role only
        rec = recovery_example(ex) if role == "teacher" and rng.random() < settings.recovery_fraction else None
        if rec is not None:
            prefix, cont = rec
            # the teacher prompt shows the full reference; the completion is the continuation
            msg_ex = dict(ex)
            p, _ = encode_example(tokenizer, msg_ex, role, thinking, wrong_prefix=prefix)
            c = tokenizer.encode(cont["solution"], add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
            yield p, c
        else:
            yield encode_example(tokenizer, ex, role, enable_thinking=thinking)


def warm_start(settings: ToySettings, tokenizer, progress: bool = True, callback=None):
    """Full-parameter AdamW SFT from a random init; returns (params, ModelConfig, hf config, log)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jsdr.model.hf import config_from_hf
    from jsdr.model.transformer import forward, init_params

    hf = hf_config(settings, tokenizer)
    cfg = config_from_hf(hf, "toy config")
    params = init_params(cfg, jax.random.PRNGKey(settings.seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup,
                                               max(settings.steps, settings.warmup + 1), settings.learning_rate * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=settings.weight_decay))
    opt_state = opt.init(params)

    def loss_fn(p, tok, seg, pos, tgt, w):
        logits = forward(p, tok, pos, seg, cfg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    stream = _example_stream(tokenizer, settings, 1.0 if settings.copy_steps > 0 else settings.teacher_fraction)
    pending: list = []
    log = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=settings.steps, desc="toy warm start (SFT)", unit="step")
    t0 = time.time()
    for i in range(settings.steps):
        if i == settings.copy_steps and i > 0:  # end of the copy phase: both roles from here on
            stream, pending = _example_stream(tokenizer, settings, settings.teacher_fraction, phase=1), []
        while len(pending) < settings.batch_rows * 8:
            pending.append(next(stream))
        batch, used = _pack(pending, settings.batch_rows, settings.row_len)
        pending = pending[used:]
        params, opt_state, loss = step(params, opt_state, tuple(jnp.asarray(b) for b in batch))
        if i % 25 == 0 or i == settings.steps - 1:
            log.append({"step": i, "loss": float(loss), "time_s": round(time.time() - t0, 2)})
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(i + 1, params, cfg)
    if bar is not None:
        bar.close()
    return jax.device_get(params), cfg, hf, log


# ---------------------------------------------------------------------------------------------
# decoding and accuracy (a small self-contained loop; jsdr.sampling is the library sampler)


def generate(params, cfg, prompts: list[list[int]], max_new_tokens: int, eos_ids: Sequence[int],
             temperature: float = 0.0, seed: int = 0, pad_id: int = 0) -> list[list[int]]:
    """Greedy (temperature 0) or plain temperature sampling with a KV cache; left-padded batch.
    Returns the generated ids of each prompt, cut after the first EOS."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jsdr.model.transformer import forward, init_cache

    B = len(prompts)
    P = max(len(p) for p in prompts)
    P = -(-P // 16) * 16  # bucket the prompt length: fewer compiles
    tok = np.full((B, P), pad_id, np.int32)
    seg = np.zeros((B, P), np.int32)
    pos = np.zeros((B, P), np.int32)
    for b, p in enumerate(prompts):
        tok[b, P - len(p):] = p
        seg[b, P - len(p):] = 1
        pos[b, P - len(p):] = np.arange(len(p))
    lens = np.array([len(p) for p in prompts], np.int32)
    out = _decode(params, jnp.asarray(tok), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(lens),
                  jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.asarray(list(eos_ids), jnp.int32),
                  cfg=cfg, max_new=max_new_tokens)
    out = np.asarray(out)
    res = []
    eos = set(eos_ids)
    for row in out:
        ids = []
        for t in row.tolist():
            ids.append(t)
            if t in eos:
                break
        res.append(ids)
    return res


def _decode_impl(params, tok, seg, pos, lens, key, temperature, eos_ids, *, cfg, max_new):
    import jax
    import jax.numpy as jnp
    from jsdr.model.transformer import forward, init_cache

    B, P = tok.shape
    cache = init_cache(cfg, B, P + max_new, params["embed_tokens"]["embedding"].dtype)
    logits, cache = forward(params, tok, pos, seg, cfg, cache=cache)
    last = logits[:, -1]

    def pick(logits, k):
        greedy = jnp.argmax(logits, -1)
        sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    def body(i, carry):
        last, cache, key, out, done, = carry
        key, k = jax.random.split(key)
        nxt = pick(last, k)
        nxt = jnp.where(done, eos_ids[0], nxt)
        out = out.at[:, i].set(nxt)
        done = done | jnp.isin(nxt, eos_ids)
        p = (lens + i)[:, None]
        logits, cache = forward(params, nxt[:, None], p, jnp.ones((B, 1), jnp.int32), cfg, cache=cache)
        return logits[:, -1], cache, key, out, done

    out = jnp.zeros((B, max_new), jnp.int32)
    carry = (last, cache, key, out, jnp.zeros((B,), bool))
    carry = jax.lax.fori_loop(0, max_new, body, carry)
    return carry[3]


def _jit_decode():
    import jax
    return jax.jit(_decode_impl, static_argnames=("cfg", "max_new"))


_decode_cache: dict = {}


def _decode(*args, **kw):
    if "fn" not in _decode_cache:
        _decode_cache["fn"] = _jit_decode()
    return _decode_cache["fn"](*args, **kw)


def accuracy(params, cfg, tokenizer, problems: list[dict], role: str = "student", enable_thinking: bool | None = None,
             temperature: float = 0.0, seed: int = 0, max_new_tokens: int = 96, batch_size: int = 128) -> dict:
    """Share of problems whose generated \\boxed{} answer equals the reference answer.

    role 'student' (default thinking off) or 'teacher' (the reference solution in the prompt;
    default thinking on), as in the paper's setup."""
    if enable_thinking is None:
        enable_thinking = role == "teacher"
    eos = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
    correct, boxed, texts = 0, 0, []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        prompts = [encode_example(tokenizer, ex, role, enable_thinking)[0] for ex in chunk]
        outs = generate(params, cfg, prompts, max_new_tokens, eos, temperature, seed + s,
                        pad_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN))
        for ex, ids in zip(chunk, outs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(text)
            ans = boxed_answer(text)
            boxed += ans is not None
            correct += ans == ex["answer"]
    n = max(len(problems), 1)
    return {"accuracy": correct / n, "boxed_rate": boxed / n, "n": len(problems), "texts": texts}


# ---------------------------------------------------------------------------------------------
# the cache


def default_cache_root() -> Path:
    return Path(os.environ.get("JSDR_CACHE") or Path.home() / ".cache" / "jsdr").expanduser()


def assets_dir(cache_dir: str | Path | None = None, settings: ToySettings = DEFAULT_SETTINGS) -> Path:
    """Where the assets of `settings` live: <root>/toy-<version>-<hash of the settings>, so that a
    cache built by another version or with other settings is never reused."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    blob = json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()
    return root / f"toy-{TOY_VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}"


_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "toy_meta.json")

# The warm start of DEFAULT_SETTINGS ships inside the package (3.4 MB), built once by
# scripts/build_toy_model.py: every machine then starts from the same weights (a build's result
# depends on the CPU's floating-point details, and the copy ability forms abruptly during training).
SHIPPED_DIR = Path(__file__).resolve().parent / "toy_model"


def shipped_assets(settings: ToySettings = DEFAULT_SETTINGS) -> Path | None:
    """The packaged warm start when it exists, is complete and was built with `settings`."""
    meta = SHIPPED_DIR / "toy_meta.json"
    if not all((SHIPPED_DIR / f).exists() for f in _REQUIRED):
        return None
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    same = m.get("version") == TOY_VERSION and m.get("settings") == json.loads(json.dumps(dataclasses.asdict(settings)))
    return SHIPPED_DIR if same else None


def weights_sha256(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def ensure_toy_assets(cache_dir: str | Path | None = None, progress: bool = True,
                      settings: ToySettings | None = None, **overrides: Any) -> Path:
    """The directory of the warm-started toy model (HF format, tokenizer included): the one shipped in
    the package for the default settings, else built on first use and cached.

    cache_dir: the cache root (default $JSDR_CACHE or ~/.cache/jsdr); the assets go to
    <root>/toy-<version>-<settings hash>. `overrides` replace fields of ToySettings (tests use a
    few steps). Written to a temporary directory and renamed into place, so a half-built cache is
    never used.
    """
    settings = dataclasses.replace(settings or DEFAULT_SETTINGS, **overrides)
    if cache_dir is None and (shipped := shipped_assets(settings)) is not None:
        return shipped
    final = assets_dir(cache_dir, settings)
    if all((final / f).exists() for f in _REQUIRED):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build_assets(tmp, settings, progress)
        if final.exists():  # incomplete leftover (or a concurrent build that just finished)
            if all((final / f).exists() for f in _REQUIRED):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / f).exists() for f in _REQUIRED):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_assets(out_dir: str | Path, settings: ToySettings = DEFAULT_SETTINGS, progress: bool = True) -> Path:
    """Tokenizer + warm start + save into out_dir (no caching logic)."""
    from jsdr.model.hf import save_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = build_tokenizer(settings.vocab_size)
    params, cfg, hf, log = warm_start(settings, tokenizer, progress)
    save_params(params, cfg, hf, out)
    tokenizer.save_pretrained(str(out))
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [eos, tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN), "do_sample": True, "temperature": 1.0}, indent=2))
    meta = {"version": TOY_VERSION, "settings": dataclasses.asdict(settings), "num_params": cfg.num_params(),
            "build_seconds": round(time.time() - t0, 1), "weights_sha256": weights_sha256(out), "train_log": log}
    (out / "toy_meta.json").write_text(json.dumps(meta, indent=2))
    return out
