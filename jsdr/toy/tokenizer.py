"""The toy's tokenizer: a byte-level BPE learned from the task's texts, with Qwen3's special tokens
and a reduced Qwen3 chat template (the `enable_thinking` switch included).

Prompts are filled and rendered by `jsdr.data.prompts`, exactly as the trainer renders them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from jsdr.data.prompts import end_of_turn_id, render_text, student_messages, teacher_messages
from jsdr.toy.task import TEMPLATES, make_problems, student_prompt, teacher_prompt

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


def _tokenizer_corpus(n: int = 3000) -> Iterable[str]:
    """Texts the BPE merges are learned from: chats of both roles, thinking on and off."""
    probs = make_problems(n, seed=12345, difficulty=(1, 8), split="train")
    for ex in probs:
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


def encode_prompt(tokenizer, ex: dict, role: str, enable_thinking: bool, wrong_prefix: str = "") -> list[int]:
    """Prompt ids of one example in `role` ('student': the problem; 'teacher': problem and reference
    solution), rendered through the chat template (jsdr.data.prompts, the toy's TEMPLATES).

    wrong_prefix: lines the assistant has already written (ending in a newline), appended to the
    rendered prompt text, so that no loss is put on them."""
    if role == "student":
        messages = student_messages(ex["problem"], TEMPLATES)
    elif role == "teacher":
        messages = teacher_messages(ex["problem"], ex["solution"], TEMPLATES)
    else:
        raise ValueError(f"role={role!r}; choose 'student' or 'teacher'")
    text = render_text(tokenizer, messages, enable_thinking) + wrong_prefix
    return tokenizer.encode(text, add_special_tokens=False)


def encode_completion(tokenizer, solution: str) -> list[int]:
    """The ids of an assistant turn: the solution, then the end-of-turn token."""
    return tokenizer.encode(solution, add_special_tokens=False) + [end_of_turn_id(tokenizer, EOS_TOKEN)]


def encode_example(tokenizer, ex: dict, role: str, enable_thinking: bool,
                   wrong_prefix: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example; the completion is solution + <|im_end|>."""
    return (encode_prompt(tokenizer, ex, role, enable_thinking, wrong_prefix),
            encode_completion(tokenizer, ex["solution"]))
