"""Student and teacher prompts, rendered through the tokenizer's chat template.

OPSD runs one model in two roles (see ../shared/paper-notes.md):

- the student sees only the problem, with thinking mode OFF by default;
- the teacher also sees the reference solution, with thinking mode ON by default.

The user-message texts follow the public OPSD code (its data collator) so that runs are
comparable with the paper. They are plain module constants and fields of `PromptTemplates`,
so a config can print them and replace them. Templates use two placeholders, `{problem}` and
`{solution}`, substituted in one pass: braces elsewhere (`\\boxed{}`) are left alone, and text
inside a problem that happens to read `{solution}` is never substituted again.

Rendering goes through `tokenizer.apply_chat_template(..., add_generation_prompt=True,
enable_thinking=...)`, exactly what generation with `transformers` would see. Templates that do
not know `enable_thinking` (Llama, Qwen2) ignore it; we warn once when thinking is asked for
such a template.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from jsdr.config import check, field

logger = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

STUDENT_TEMPLATE = "Problem: {problem}\n\n" + INSTRUCTION

# The sentence between the reference solution and the instruction: the teacher is asked to
# understand the solution and then reason on its own to the same answer.
TEACHER_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the "
    "reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own words "
    "and independent reasoning, derive the same final answer to the problem above. Think step by "
    "step, explore different approaches, and don't be afraid to backtrack or reconsider if "
    "something doesn't work out:\n"
)

TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    + TEACHER_TRANSITION
    + "\n"
    + INSTRUCTION
)

# The public code's evaluation prompt (and its v3 SFT prompt): the problem without a "Problem: " label.
EVAL_TEMPLATE = "{problem}\n\n" + INSTRUCTION

# reason_first (public code, not in its main scripts): the teacher first writes an analysis of the
# reference solution (a generation of its own), then reads the transition and scores the rollout.
REASON_FIRST_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a correct reasoning to this problem:=== Reference Reasoning Start ===\n{solution}\n"
    "=== Reference Reasoning End ===\n\n"
    "\n\nThe reference reasoning above arrives at the correct answer. Please analyze this solution and explain "
    "the key reasoning steps and problem-solving strategies employed. Do NOT use <think> tags. Do NOT derive your "
    "own solution. Simply analyze and explain the reference solution provided above.\n"
)

# The public code's first release (the setting behind the paper's v1 results): no "Problem: " label and no
# delimiters in the teacher prompt, another transition sentence; its student prompt lost the chat template
# (the special tokens were stripped before generation), which `student_chat_template: false` reproduces.
TEACHER_TRANSITION_V1 = (
    "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your "
    "own step-by-step reasoning that derives the same final answer to the problem below:\n"
)
TEACHER_TEMPLATE_V1 = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n" + TEACHER_TRANSITION_V1 + "\n"
    + INSTRUCTION
)

# prompts.preset -> the values of the fields left unset (None)
PRESETS: dict[str, dict[str, Any]] = {
    "public": dict(student=STUDENT_TEMPLATE, teacher=TEACHER_TEMPLATE, student_thinking=False, teacher_thinking=True,
                   student_chat_template=True, reason_first=REASON_FIRST_TEMPLATE,
                   reason_first_transition="\n" + TEACHER_TRANSITION + "\n" + INSTRUCTION),
    "public_v1": dict(student=STUDENT_TEMPLATE, teacher=TEACHER_TEMPLATE_V1, student_thinking=True,
                      teacher_thinking=True, student_chat_template=False, reason_first=REASON_FIRST_TEMPLATE,
                      reason_first_transition="\n" + TEACHER_TRANSITION_V1 + "\n" + INSTRUCTION),
}

_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")


class PromptError(ValueError):
    """A prompt that cannot be built or rendered; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The prompt settings of a run. `preset` gives every field left unset (None): "public" the public
    code's current (v3) prompts (student thinking off, teacher thinking on: the paper's choice),
    "public_v1" its first release's (see PRESETS). Set fields replace the preset's."""

    preset: Literal["public", "public_v1"] = field("public", "public: the public code's prompts (v3) | public_v1: "
                                                             "its first release's (v1 results; student without "
                                                             "its chat template)")
    student: str | None = field(None, "student user message; {problem} is filled in (None: the preset's)")
    teacher: str | None = field(None, "teacher user message; {problem} and {solution} are filled in (None: the "
                                      "preset's)")
    student_thinking: bool | None = field(None, "Qwen3 thinking mode in the student prompt (and GRPO/SFT prompts; "
                                                "None: the preset's)")
    teacher_thinking: bool | None = field(None, "Qwen3 thinking mode in the OPSD teacher prompt (None: the preset's)")
    student_chat_template: bool | None = field(
        None, "false: the student prompt is the chat template's text with its special tokens removed, as the public "
              "code's first release built it (None: the preset's)")
    reason_first: str | None = field(None, "opsd.reason_first: the teacher's request to analyse the solution "
                                           "({problem}, {solution}; None: the preset's)")
    reason_first_transition: str | None = field(None, "opsd.reason_first: text after the teacher's analysis, "
                                                      "before the rollout (None: the preset's)")
    system: str | None = field(None, "optional system message before the user message of both roles")

    def __post_init__(self):
        check(self.preset in PRESETS, "preset", f"{self.preset!r} is not a preset; choose one of {list(PRESETS)}")
        object.__setattr__(self, "_given", {k: getattr(self, k) for k in PRESETS[self.preset]})
        for k, v in PRESETS[self.preset].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        check("{problem}" in self.student, "student", "the template must contain {problem}")
        for name in ("teacher", "reason_first"):
            for key in ("{problem}", "{solution}"):
                check(key in getattr(self, name), name, f"the template must contain {key}")


def _as_partial(self) -> dict:
    """The settings as given (None where the preset filled a field): what a partial `prompts:` section
    of a config is merged into, so that `preset: public_v1` alone brings that preset's texts."""
    return {f.name: self._given.get(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}


PromptTemplates.as_partial = _as_partial


def fill(template: str, **values: str) -> str:
    """Substitute `{problem}` / `{solution}` in one pass; other braces stay as they are."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            raise PromptError(f"template needs a value for {{{name}}}")
        return str(values[name])

    return _PLACEHOLDER.sub(sub, template)


def _messages(user: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def student_messages(problem: str, templates: PromptTemplates = PromptTemplates()) -> list[dict[str, str]]:
    """Chat messages of the student role: the problem only."""
    return _messages(fill(templates.student, problem=problem), templates.system)


def teacher_messages(
    problem: str, solution: str, templates: PromptTemplates = PromptTemplates()
) -> list[dict[str, str]]:
    """Chat messages of the teacher role: the problem and the reference solution."""
    return _messages(fill(templates.teacher, problem=problem, solution=solution), templates.system)


_WARNED_NO_THINKING_SWITCH: set[str] = set()


def _template_of(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: transformers uses "default"
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptError(
            f"tokenizer {name!r} has no chat template: use a chat/instruct model's tokenizer, or "
            "pass a Jinja chat template explicitly (chat_template=...)"
        )
    return template


def _as_id_list(out: Any) -> list[int]:
    """apply_chat_template may return a list, a BatchEncoding/dict, or an array; give list[int]."""
    if isinstance(out, Mapping) or hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    if any(isinstance(t, (list, tuple)) for t in out):
        raise PromptError("apply_chat_template returned a batch; render one conversation at a time")
    return [int(t) for t in out]


def render_text(tokenizer, messages: Sequence[Mapping[str, str]], thinking: bool, *,
                chat_template: str | None = None) -> str:
    """The prompt as text (chat template + generation prompt), for logs and audits."""
    template = _template_of(tokenizer, chat_template)
    _warn_if_no_thinking_switch(template, thinking)
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, add_generation_prompt=True, tokenize=False,
        enable_thinking=thinking)


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]], thinking: bool, *,
                  chat_template: str | None = None) -> list[int]:
    """Token ids of `messages` through the chat template, ending with the assistant header.

    thinking is passed as `enable_thinking`; with a Qwen3 template, False appends the empty think
    block (`<think>\\n\\n</think>\\n\\n`) so the model answers directly. No BOS/EOS is added
    beyond what the template itself writes.
    """
    template = _template_of(tokenizer, chat_template)
    _warn_if_no_thinking_switch(template, thinking)
    out = tokenizer.apply_chat_template(
        list(messages), chat_template=template, add_generation_prompt=True, tokenize=True,
        return_dict=False, enable_thinking=thinking)
    return _as_id_list(out)


def _warn_if_no_thinking_switch(template: str, thinking: bool) -> None:
    if "enable_thinking" not in template and template not in _WARNED_NO_THINKING_SWITCH:
        _WARNED_NO_THINKING_SWITCH.add(template)
        logger.warning(
            "the chat template has no enable_thinking switch: thinking=%s has no effect on the "
            "prompt (expected for Llama/Qwen2 templates)", thinking)


def render_student(tokenizer, problem: str, templates: PromptTemplates = PromptTemplates(), *,
                   chat_template: str | None = None) -> list[int]:
    """Student prompt ids (thinking per `templates.student_thinking`). With
    `student_chat_template=False`, the rendered text without its special tokens, tokenized again
    (the public code's first release: its student saw "user\\nProblem: ...assistant\\n")."""
    ids = render_prompt(tokenizer, student_messages(problem, templates),
                        templates.student_thinking, chat_template=chat_template)
    if templates.student_chat_template:
        return ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return _as_id_list(tokenizer.encode(text, add_special_tokens=False))


def render_teacher(tokenizer, problem: str, solution: str,
                   templates: PromptTemplates = PromptTemplates(), *,
                   chat_template: str | None = None) -> list[int]:
    """Teacher prompt ids (thinking per `templates.teacher_thinking`)."""
    return render_prompt(tokenizer, teacher_messages(problem, solution, templates),
                         templates.teacher_thinking, chat_template=chat_template)


def render_reason_first(tokenizer, problem: str, solution: str, templates: PromptTemplates = PromptTemplates(), *,
                        chat_template: str | None = None) -> list[int]:
    """opsd.reason_first: the prompt that asks the teacher to analyse the reference solution (chat
    template, thinking per `templates.teacher_thinking`)."""
    messages = _messages(fill(templates.reason_first, problem=problem, solution=solution), templates.system)
    return render_prompt(tokenizer, messages, templates.teacher_thinking, chat_template=chat_template)


def reason_first_transition_ids(tokenizer, templates: PromptTemplates = PromptTemplates()) -> list[int]:
    """opsd.reason_first: the raw (no chat template) transition text after the teacher's analysis."""
    return _as_id_list(tokenizer.encode(templates.reason_first_transition, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# SFT


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One SFT sequence: the student prompt, then the reference solution and the end token.

    Only `response_ids` are trained on (`loss_mask`). The response is tokenized on its own and
    appended to the prompt ids, exactly as a sampled rollout is appended to its prompt.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def input_ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.response_ids)

    @property
    def loss_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.response_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def end_of_turn_id(tokenizer, end_token: str | None = None) -> int:
    """Id of the token that ends an assistant turn: `end_token`, else the tokenizer's EOS
    (`<|im_end|>` for Qwen3 chat tokenizers)."""
    token = end_token if end_token is not None else getattr(tokenizer, "eos_token", None)
    if not token:
        raise PromptError("the tokenizer has no eos_token; pass end_token= (e.g. '<|im_end|>')")
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)):
        raise PromptError(f"end token {token!r} is not a single token of this tokenizer")
    return int(tid)


def render_sft_example(tokenizer, problem: str, solution: str,
                       templates: PromptTemplates = PromptTemplates(), *,
                       thinking: bool | None = None, end_token: str | None = None,
                       chat_template: str | None = None) -> SFTExample:
    """problem -> reference solution as (student prompt ids, solution ids + end-of-turn id).

    thinking defaults to `templates.student_thinking` (the SFT model is trained in the role it
    is evaluated in).
    """
    think = templates.student_thinking if thinking is None else thinking
    prompt = render_prompt(tokenizer, student_messages(problem, templates), think,
                           chat_template=chat_template)
    response = _as_id_list(tokenizer.encode(solution, add_special_tokens=False))
    response.append(end_of_turn_id(tokenizer, end_token))
    return SFTExample(tuple(prompt), tuple(response))


END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Ids that end a generated turn: `extra`, the tokenizer's EOS, and the chat end markers of the
    supported families that this vocabulary has as single tokens."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid >= 0 and tid != unk:
            ids.add(tid)
    return tuple(sorted(ids))
