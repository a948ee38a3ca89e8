"""Prompts through a chat template, and records from local files (jsdr.data.prompts / datasets)."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jsdr.data import datasets as D
from jsdr.config import ConfigError, load
from jsdr.data import prompts as P
from jsdr.train import TrainConfig

# A Qwen3-like chat template: thinking off writes an empty think block after the assistant header.
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# The same without the switch (like Qwen2 / Llama templates).
PLAIN_TEMPLATE = QWEN3_LIKE_TEMPLATE.split("{%- if enable_thinking")[0] + "{%- endif %}"

INSTR = "Please reason step by step, and put your final answer within \\boxed{}."


def _tokenizer(template=QWEN3_LIKE_TEMPLATE):
    """Byte-level BPE without merges (lossless), with Qwen-style special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    fast.add_tokens(["<think>", "</think>"])
    if template is not None:
        fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# prompts


def test_student_prompt_thinking_off_matches_qwen3_layout(tok):
    ids = P.render_student(tok, "What is 1+1?")
    expected = ("<|im_start|>user\nProblem: What is 1+1?\n\n" + INSTR + "<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(ids) == expected
    assert ids == _ids(tok, expected)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    # control tokens are single ids, and the empty think block closes the prompt
    im_start, think, end_think = tok.convert_tokens_to_ids(["<|im_start|>", "<think>", "</think>"])
    assert ids.count(im_start) == 2
    nl = _ids(tok, "\n")
    assert ids[-6:] == [think] + nl + nl + [end_think] + nl + nl


def test_teacher_prompt_text_and_thinking_on(tok):
    problem, solution = "Find x if 2x = 6.", "Divide by 2: x = 3. So \\boxed{3}."
    ids = P.render_teacher(tok, problem, solution)
    user = (
        "Problem: Find x if 2x = 6.\n\n"
        "Here is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\nDivide by 2: x = 3. So \\boxed{3}.\n"
        "=== Reference Solution End ===\n\n\n"
        "After reading the reference solution above, make sure you truly understand the reasoning "
        "behind each step \u2014 do not copy or paraphrase it. Now, using your own words and "
        "independent reasoning, derive the same final answer to the problem above. Think step by "
        "step, explore different approaches, and don't be afraid to backtrack or reconsider if "
        "something doesn't work out:\n\n" + INSTR)
    expected = "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == expected
    assert ids == _ids(tok, expected)
    assert tok.convert_tokens_to_ids("<think>") not in ids  # thinking on: no empty think block
    assert P.teacher_messages(problem, solution) == [{"role": "user", "content": user}]


def test_roles_share_the_assistant_header_and_differ_only_in_the_user_message(tok):
    t = P.PromptTemplates(student_thinking=True, teacher_thinking=True)
    s_ids = P.render_student(tok, "p", t)
    t_ids = P.render_teacher(tok, "p", "s", t)
    tail = _ids(tok, "<|im_end|>\n<|im_start|>assistant\n")
    assert s_ids[-len(tail):] == tail and t_ids[-len(tail):] == tail
    # thinking flag per role toggles only the think block
    off = P.render_student(tok, "p", P.PromptTemplates(student_thinking=False))
    assert off[:len(s_ids)] == s_ids and tok.decode(off[len(s_ids):]) == "<think>\n\n</think>\n\n"


def test_render_prompt_matches_text_rendering_then_encoding(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? {x} \\boxed{}"}]
    for thinking in (False, True):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                       enable_thinking=thinking)
        assert P.render_text(tok, msgs, thinking) == text
        assert P.render_prompt(tok, msgs, thinking) == _ids(tok, text)


def test_template_overrides_and_placeholders(tok):
    t = P.PromptTemplates(student="Q: {problem} A:", teacher="{problem} | ref: {solution}",
                          system="You are a careful solver.")
    # braces in the data are kept; a literal {solution} inside the problem is not substituted
    msgs = P.teacher_messages("a {solution} b {}", "S {problem}", t)
    assert msgs == [{"role": "system", "content": "You are a careful solver."},
                    {"role": "user", "content": "a {solution} b {} | ref: S {problem}"}]
    assert P.student_messages("x^{2}", t)[-1]["content"] == "Q: x^{2} A:"
    text = tok.decode(P.render_student(tok, "x", t))
    assert text.startswith("<|im_start|>system\nYou are a careful solver.<|im_end|>\n"
                           "<|im_start|>user\nQ: x A:<|im_end|>")
    assert P.STUDENT_TEMPLATE == "Problem: {problem}\n\n" + INSTR
    with pytest.raises(ConfigError, match=r"^teacher: .*\{solution\}"):
        P.PromptTemplates(teacher="{problem} only")
    with pytest.raises(ConfigError, match=r"^student: .*\{problem\}"):
        P.PromptTemplates(student="no placeholder")
    with pytest.raises(ConfigError, match=r"^prompts.student: .*\{problem\}"):  # from a config: the option's name
        load(TrainConfig, None, ["--prompts.student=no placeholder"])


def test_prompt_presets(tok):
    """public (the v3 code) is the default; public_v1 is the first release: its teacher text, and a
    student prompt that is the chat template's text without its special tokens; fields set by hand
    replace the preset's."""
    pub, v1 = P.PromptTemplates(), P.PromptTemplates(preset="public_v1")
    assert (pub.student, pub.teacher, pub.student_thinking, pub.teacher_thinking) == \
        (P.STUDENT_TEMPLATE, P.TEACHER_TEMPLATE, False, True)
    assert v1.teacher == ("{problem}\n\nHere is a reference solution to this problem:\n{solution}\n"
                          + P.TEACHER_TRANSITION_V1 + "\n" + INSTR)
    assert v1.student_thinking is True and v1.student_chat_template is False
    ids = P.render_student(tok, "2+2?", v1)
    assert tok.decode(ids) == "user\nProblem: 2+2?\n\n" + INSTR + "\nassistant\n"
    assert not set(ids) & set(tok.all_special_ids)
    own = P.PromptTemplates(preset="public_v1", teacher="{problem} / {solution}", student_chat_template=True)
    assert own.teacher == "{problem} / {solution}" and own.student_thinking is True
    assert P.render_student(tok, "2+2?", own) == P.render_student(tok, "2+2?", P.PromptTemplates(student_thinking=True))
    with pytest.raises(ConfigError, match="preset"):
        load(TrainConfig, None, ["--prompts.preset=paper_v9"])
    cfg = load(TrainConfig, None, ["--prompts.preset=public_v1"])  # from the command line: the preset's texts
    assert cfg.prompts == v1
    assert load(TrainConfig, None, ["--prompts.preset=public_v1", "--prompts.student_thinking=false"]).prompts == \
        P.PromptTemplates(preset="public_v1", student_thinking=False)
    # reason_first: the analysis request in the chat template, the transition as raw text
    text = tok.decode(P.render_reason_first(tok, "p", "s", pub))
    assert "Here is a correct reasoning to this problem:=== Reference Reasoning Start ===\ns\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(P.reason_first_transition_ids(tok, pub)) == "\n" + P.TEACHER_TRANSITION + "\n" + INSTR
    assert P.EVAL_TEMPLATE == "{problem}\n\n" + INSTR


def test_missing_chat_template_is_a_clear_error():
    bare = _tokenizer(template=None)
    with pytest.raises(P.PromptError, match="no chat template"):
        P.render_student(bare, "x")
    # an explicit template works for such a tokenizer
    ids = P.render_student(bare, "x", chat_template=QWEN3_LIKE_TEMPLATE)
    assert bare.decode(ids).endswith("<think>\n\n</think>\n\n")


def test_template_without_thinking_switch_warns_and_ignores_it(caplog):
    plain = _tokenizer(PLAIN_TEMPLATE)
    with caplog.at_level(logging.WARNING, logger="jsdr.data.prompts"):
        on = P.render_prompt(plain, [{"role": "user", "content": "x"}], True)
        off = P.render_prompt(plain, [{"role": "user", "content": "x"}], False)
    assert on == off
    assert plain.decode(on).endswith("<|im_start|>assistant\n")
    assert any("enable_thinking" in r.getMessage() for r in caplog.records)


def test_id_list_normalisation():
    from transformers import BatchEncoding

    assert P._as_id_list([1, 2]) == [1, 2]
    assert P._as_id_list(BatchEncoding({"input_ids": [3, 4], "attention_mask": [1, 1]})) == [3, 4]
    assert P._as_id_list({"input_ids": [[5, 6]]}) == [5, 6]
    assert P._as_id_list(np.array([[7, 8]], np.int64)) == [7, 8]
    assert all(type(t) is int for t in P._as_id_list(np.array([9], np.int32)))
    with pytest.raises(P.PromptError, match="batch"):
        P._as_id_list([[1], [2]])


def test_sft_example(tok):
    ex = P.render_sft_example(tok, "1+1?", "One plus one is \\boxed{2}.")
    prompt = P.render_student(tok, "1+1?")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert list(ex.prompt_ids) == prompt
    assert list(ex.response_ids) == _ids(tok, "One plus one is \\boxed{2}.") + [eos]
    assert ex.input_ids == prompt + list(ex.response_ids) and len(ex) == len(ex.input_ids)
    assert ex.loss_mask == [0] * len(prompt) + [1] * len(ex.response_ids)
    assert tok.decode(ex.input_ids).endswith("</think>\n\nOne plus one is \\boxed{2}.<|im_end|>")
    # thinking on and another end token
    ex2 = P.render_sft_example(tok, "1+1?", "2", thinking=True, end_token="<|endoftext|>")
    assert tok.decode(list(ex2.prompt_ids)).endswith("assistant\n")
    assert ex2.response_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(P.PromptError, match="not a single token"):
        P.render_sft_example(tok, "1+1?", "2", end_token="<|no_such|>")


# ---------------------------------------------------------------------------------------------
# datasets


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {"problem": "1+1?", "solution": "It is 2.", "answer": "2"},
    {"problem": "2+3?", "solution": "It is 5.", "answer": 5},  # integer answers become text
    {"problem": "half of 1?", "solution": "1/2", "answer": "\\frac{1}{2}", "extra": 1},
]


def test_jsonl_records_fields_and_limit(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    recs = D.load_records(str(f))
    assert recs == [
        {"problem": "1+1?", "solution": "It is 2.", "answer": "2", "index": 0},
        {"problem": "2+3?", "solution": "It is 5.", "answer": "5", "index": 1},
        {"problem": "half of 1?", "solution": "1/2", "answer": "\\frac{1}{2}", "index": 2},
    ]
    assert len(D.load_records(str(f), limit=2)) == 2
    g = _write_jsonl(tmp_path / "other.jsonl",
                     [{"Q": r["problem"], "A": r["answer"], "meta": i} for i, r in enumerate(ROWS)])
    recs = D.load_records(str(g), fields={"problem": "Q", "answer": "A"}, extra_fields=("meta",))
    assert recs[1] == {"problem": "2+3?", "answer": "5", "meta": 1, "index": 1}


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "", '{"problem": "x", "solution": '])
    with pytest.raises(D.DataError, match=r"bad\.jsonl line 3: malformed JSON"):
        D.load_records(str(f))
    f = _write_jsonl(tmp_path / "missing.jsonl", [ROWS[0], {"problem": "x", "answer": "1"}])
    with pytest.raises(D.DataError, match=r"missing\.jsonl line 2: missing field 'solution' "
                                          r"\(for solution\); the row has fields \['answer', 'problem'\]"):
        D.load_records(str(f))
    f = _write_jsonl(tmp_path / "empty.jsonl", [ROWS[0], ROWS[1], {**ROWS[0], "answer": "  "}])
    with pytest.raises(D.DataError, match=r"empty\.jsonl line 3: field 'answer' is empty"):
        D.load_records(str(f))
    f = _write_jsonl(tmp_path / "null.jsonl", [{**ROWS[0], "solution": None}])
    with pytest.raises(D.DataError, match=r"null\.jsonl line 1: field 'solution' is empty \(null\)"):
        D.load_records(str(f))
    f = _write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(D.DataError, match=r"list\.jsonl line 1: expected an object"):
        D.load_records(str(f))
    f = _write_jsonl(tmp_path / "nested.jsonl", [{**ROWS[0], "answer": {"v": 1}}])
    with pytest.raises(D.DataError, match=r"nested\.jsonl line 1: field 'answer' must be text, got dict"):
        D.load_records(str(f))
    # the limit stops before a bad row further down
    f = _write_jsonl(tmp_path / "late.jsonl", [ROWS[0], "{oops"])
    assert len(D.load_records(str(f), limit=1)) == 1


def test_json_files(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ROWS))
    assert [r["answer"] for r in D.load_records(str(a))] == ["2", "5", "\\frac{1}{2}"]
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert len(D.load_records(str(b))) == 3
    c = tmp_path / "c.json"  # JSON lines in a .json file
    _write_jsonl(c, ROWS)
    assert len(D.load_records(str(c))) == 3
    d = tmp_path / "d.json"
    d.write_text(json.dumps([ROWS[0], {"problem": "p", "solution": "s", "answer": ""}]))
    with pytest.raises(D.DataError, match=r"d\.json item 1: field 'answer' is empty"):
        D.load_records(str(d))
    e = tmp_path / "e.json"
    e.write_text('[{"problem": "p",')
    with pytest.raises(D.DataError, match=r"e\.json: malformed JSON"):
        D.load_records(str(e))
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"x": [], "y": []}))
    with pytest.raises(D.DataError, match=r"g\.json: expected a JSON array"):
        D.load_records(str(g))


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_and_directories(tmp_path):
    rows = [{"problem": f"p{i}", "solution": f"s{i}", "Answer": str(i)} for i in range(5)]
    d = tmp_path / "hub_copy" / "data"
    d.mkdir(parents=True)
    _write_parquet(d / "train-00000-of-00002.parquet", rows[:3])
    _write_parquet(d / "train-00001-of-00002.parquet", rows[3:])
    _write_parquet(d / "test-00000-of-00001.parquet", [{"problem": "t", "solution": "t", "Answer": "9"}])
    fields = D.TRAIN_DATASET.fields
    recs = D.load_records(str(tmp_path / "hub_copy"), split="train", fields=fields)
    assert [r["problem"] for r in recs] == [f"p{i}" for i in range(5)]
    assert [r["answer"] for r in recs] == [str(i) for i in range(5)]
    assert [r["index"] for r in recs] == list(range(5))
    test = D.load_records(str(tmp_path / "hub_copy"), split="test", fields=fields)
    assert [r["answer"] for r in test] == ["9"]
    # a directory without split-named files gives all its files
    e = tmp_path / "flat"
    e.mkdir()
    _write_jsonl(e / "part1.jsonl", ROWS[:1])
    _write_jsonl(e / "part2.jsonl", ROWS[1:])
    assert len(D.load_records(str(e), split="train")) == 3
    bad = _write_parquet(tmp_path / "bad.parquet", rows[:2] + [{"problem": "p", "solution": None,
                                                               "Answer": "1"}])
    with pytest.raises(D.DataError, match=r"bad\.parquet row 2: field 'solution' is empty"):
        D.load_records(str(bad), fields=fields)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"problem": "caf\xe9", "solution": "s", "answer": "1"}\n')
    with pytest.raises(D.DataError, match=r"latin\.jsonl: cannot read \(UnicodeDecodeError"):
        D.load_records(str(latin))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(D.DataError, match=r"junk\.parquet: cannot read parquet"):
        D.load_records(str(junk))


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match=r"nope\.jsonl: no such file"):
        D.load_records(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(D.DataError, match="no .jsonl/.json/.parquet files"):
        D.load_records(str(empty))
    with pytest.raises(D.DataError, match="unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        D.load_records(str(tmp_path / "x.csv"))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match=r"(?s)cannot load hub dataset 'owner/data' \(split "
                                          r"'train'\).*ConnectionError.*local \.jsonl/\.json/\.parquet"):
        D.load_records("owner/data")


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "p", "answer": "\\boxed{1}", "answer_type": "number",
                                            "question_id": 7}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = D.load_spec("amo")
    assert calls == [("meituan-longcat/AMO-Bench", None, "test")]
    assert recs == [{"problem": "p", "answer": "\\boxed{1}", "question_id": 7, "answer_type": "number",
                     "index": 0}]


def test_benchmark_registry_and_local_copies(tmp_path):
    hub = {k: (v.hub_id, v.split) for k, v in D.BENCHMARKS.items()}
    assert hub == {"aime24": ("HuggingFaceH4/aime_2024", "train"),
                   "aime25": ("yentinglin/aime_2025", "train"),
                   "hmmt25": ("MathArena/hmmt_feb_2025", "train"),
                   "amo": ("meituan-longcat/AMO-Bench", "test"),
                   "math500": ("HuggingFaceH4/MATH-500", "test")}
    assert all(set(v.fields) == {"problem", "answer"} for v in D.BENCHMARKS.values())
    assert D.TRAIN_DATASET.hub_id == "siyanzhao/Openthoughts_math_30k_opsd"
    assert dict(D.TRAIN_DATASET.fields) == {"problem": "problem", "solution": "solution", "answer": "Answer"}
    f = _write_jsonl(tmp_path / "amo.jsonl", [{"prompt": "P", "answer": "3", "answer_type": "number"}])
    assert D.load_spec("amo", path=str(f)) == [{"problem": "P", "answer": "3", "answer_type": "number",
                                                "index": 0}]
    g = _write_jsonl(tmp_path / "mine.jsonl", [{"q": "P", "a": "3"}])
    assert D.load_spec("aime24", path=str(g), fields={"problem": "q", "answer": "a"})[0]["answer"] == "3"
    with pytest.raises(D.DataError, match="unknown benchmark 'aime23'"):
        D.load_spec("aime23")


def test_stop_token_ids_of_a_chat_tokenizer():
    from jsdr import toy
    from jsdr.data.prompts import stop_token_ids
    tok = toy.build_tokenizer()
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert stop_token_ids(tok) == tuple(sorted({im_end, eot}))
    assert stop_token_ids(tok, extra=(7,)) == tuple(sorted({im_end, eot, 7}))
