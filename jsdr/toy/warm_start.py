"""The toy model's warm start and its greedy accuracy, on the library's pieces.

`warm_start` is full-parameter AdamW SFT from a random init: examples packed by
`jsdr.data.batches.pack_sft_examples`, the loss `jsdr.losses.sft.sft_loss` differentiated w.r.t. the
base parameters (no LoRA tree). `accuracy` decodes with `jsdr.sampling.Sampler` and grades with
`jsdr.data.rewards.grade`.

The warm start gives the student role a habit the teacher role does not have (a negative result
reduced by dropping its sign, -7 -> 7), so the same weights solve about half of the problems as the
student and nearly all as the teacher: the gap that SFT, GRPO and OPSD each close in their own way.
Teacher-role "recovery" examples continue correctly from the habit's first mistake, so the
teacher's disagreement with a student rollout sits at the student's mistake. docs/toy.md has the
measurements behind each choice.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Iterator, Sequence

import jax
import optax

from jsdr.data.batches import SFTBatch, pack_sft_examples
from jsdr.data.prompts import stop_token_ids
from jsdr.data.rewards import GradeMethod, grade
from jsdr.losses.sft import SFTConfig, sft_loss
from jsdr.model.hf import config_from_hf
from jsdr.model.transformer import Model, ModelConfig, init_params
from jsdr.sampling import Sampler, SamplingConfig
from jsdr.toy.task import TRAIN_DIFFICULTY, habit_example, make_problems, recovery_example
from jsdr.toy.tokenizer import EOS_TOKEN, PAD_TOKEN, encode_completion, encode_example, encode_prompt


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
    recovery_fraction: float = 0.3  # share of teacher-role examples that start from the habit's mistake
    habit_fraction: float = 0.6  # share of student-role examples written with the habit
    train_difficulty: tuple[int, int] = TRAIN_DIFFICULTY  # operations of the student-role examples
    teacher_difficulty: tuple[int, int] = TRAIN_DIFFICULTY  # operations of the teacher-role examples
    seed: int = 0


DEFAULT_SETTINGS = ToySettings()


def hf_config(settings: ToySettings, tokenizer) -> dict:
    """The Hugging Face config.json of the toy model (Qwen3 architecture, tied embeddings)."""
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


# ---------------------------------------------------------------------------------------------
# training examples


def _problem_stream(seed: int, difficulty: tuple[int, int]) -> Iterator[dict]:
    chunk = 0
    while True:
        yield from make_problems(512, seed=seed + chunk, difficulty=difficulty, split="train")
        chunk += 1


def example_stream(tokenizer, settings: ToySettings, teacher_fraction: float,
                   phase: int = 0) -> Iterator[tuple[list[int], list[int]]]:
    """Endless (prompt ids, completion ids) pairs for the warm start: both roles (teacher-role examples
    with probability teacher_fraction, on chains of settings.teacher_difficulty operations), both
    thinking modes, the student's habit and the teacher's recovery examples mixed in."""
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
            # the teacher prompt shows the full reference and the habit's lines up to its mistake;
            # the completion is the correct continuation from there
            prefix, cont = rec
            yield (encode_prompt(tokenizer, ex, role, thinking, wrong_prefix=prefix),
                   encode_completion(tokenizer, cont["solution"]))
        else:
            yield encode_example(tokenizer, ex, role, enable_thinking=thinking)


def pack_prefix(pending: Sequence[tuple[list[int], list[int]]], rows: int, row_len: int,
                pad_id: int) -> tuple[SFTBatch, int]:
    """(batch, used): the longest prefix of `pending` that `pack_sft_examples` fits into `rows` rows
    of `row_len` tokens, packed. First-fit never needs fewer rows for a longer prefix, so the prefix
    is found by bisection. An example longer than a row raises (when it comes first)."""
    lo, hi = 1, len(pending)  # pending[:lo] fits (checked below), pending[:hi + 1] does not
    best = pack_sft_examples(pending[:1], row_len, num_rows=rows, pad_id=pad_id)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            batch = pack_sft_examples(pending[:mid], row_len, num_rows=rows, pad_id=pad_id)
        except ValueError:
            hi = mid - 1
        else:
            lo, best = mid, batch
    return best, lo


# ---------------------------------------------------------------------------------------------
# warm start


def warm_start(settings: ToySettings, tokenizer, progress: bool = True,
               callback: Callable[[int, dict, ModelConfig], None] | None = None):
    """Full-parameter AdamW SFT from a random init; returns (params, ModelConfig, hf config, log).

    callback(step, params, cfg) runs after every optimizer step (a build probe)."""
    hf = hf_config(settings, tokenizer)
    cfg = config_from_hf(hf, "toy config")
    model = Model(cfg)
    params = init_params(cfg, jax.random.PRNGKey(settings.seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup,
                                               max(settings.steps, settings.warmup + 1), settings.learning_rate * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=settings.weight_decay))
    opt_state = opt.init(params)
    loss_cfg = SFTConfig(reduction="token")  # every completion token weighs the same

    def loss_fn(p, batch):
        return sft_loss(None, p, batch, model=model, cfg=loss_cfg)  # lora=None: the base weights train

    @jax.jit
    def step(p, s, batch):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    stream = example_stream(tokenizer, settings, 1.0 if settings.copy_steps > 0 else settings.teacher_fraction)
    pending: list = []
    log = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=settings.steps, desc="toy warm start (SFT)", unit="step")
    t0 = time.time()
    for i in range(settings.steps):
        if i == settings.copy_steps and i > 0:  # end of the copy phase: both roles from here on
            stream, pending = example_stream(tokenizer, settings, settings.teacher_fraction, phase=1), []
        while len(pending) < settings.batch_rows * 8:
            pending.append(next(stream))
        batch, used = pack_prefix(pending, settings.batch_rows, settings.row_len, pad_id)
        pending = pending[used:]
        params, opt_state, loss = step(params, opt_state, batch)
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
# accuracy


def toy_sampler(model: Model | ModelConfig, tokenizer) -> Sampler:
    """A library sampler for the toy model (padding with the toy's pad token)."""
    model = model if isinstance(model, Model) else Model(model)
    return Sampler(model, pad_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN))


def accuracy(params, model: Model | ModelConfig, tokenizer, problems: list[dict], role: str = "student",
             enable_thinking: bool | None = None, temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = 96, batch_size: int = 128, *, lora=None, sampler: Sampler | None = None,
             method: GradeMethod = "string") -> dict:
    """Share of problems whose generated \\boxed{} answer is graded equal to the reference answer.

    role 'student' (default thinking off) or 'teacher' (the reference solution in the prompt;
    default thinking on), as in the paper's setup. Decoding: `jsdr.sampling.Sampler` (pass one to
    reuse its compiled programs across calls), greedy at temperature 0; grading:
    `jsdr.data.rewards.grade(..., method)`. Returns accuracy, boxed_rate, n and the decoded texts."""
    if enable_thinking is None:
        enable_thinking = role == "teacher"
    sampler = sampler or toy_sampler(model, tokenizer)
    stops = stop_token_ids(tokenizer)
    correct, boxed, texts = 0, 0, []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        prompts = [encode_prompt(tokenizer, ex, role, enable_thinking) for ex in chunk]
        sc = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                            seed=seed + s)
        out = sampler.generate(params, lora, prompts, sc)
        for ex, ids in zip(chunk, out.completions()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(text)
            g = grade(text, ex["answer"], method)
            boxed += g.extracted is not None
            correct += g.correct
    n = max(len(problems), 1)
    return {"accuracy": correct / n, "boxed_rate": boxed / n, "n": len(problems), "texts": texts}
