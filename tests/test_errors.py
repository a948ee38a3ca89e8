"""Bad model, tokenizer, adapter and data files: each is a JsdrError subclass with a one-line message
that names the file (and the tensor or row) and the problem, never a raw numpy/transformers/hub
traceback. Tiny random models from tests/tiny_models.py; nothing is compiled."""

import json
import shutil
import struct

import numpy as np
import pytest

from jsdr.data import datasets as D
from jsdr.errors import JsdrError
from jsdr.model import hf, lora as LR
from tests.tiny_models import build_tiny_model


def _raises(exc_type, fn, *args, contains=(), **kw) -> str:
    """Call fn, expect exc_type (a JsdrError) with a one-line message holding every `contains`."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert isinstance(info.value, JsdrError)
    assert "\n" not in msg, msg
    for c in contains:
        assert str(c) in msg, (c, msg)
    return msg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 (config.json + model.safetensors) with a tokenizer."""
    from jsdr import toy
    d = tmp_path_factory.mktemp("err_model")
    tok = toy.build_tokenizer(vocab_size=300, out_dir=d)
    build_tiny_model("qwen3", d, vocab_size=len(tok))
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    """(adapter directory, model config): a rank-4 PEFT adapter written by save_peft."""
    cfg, _ = hf.load_config(str(model_dir))
    lc = LR.LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    rs = np.random.RandomState(0)
    tree = {k: {n: {leaf: rs.normal(0, 0.1, s.shape).astype(np.float32) for leaf, s in v.items()}
                for n, v in blk.items()} for k, blk in LR.lora_shapes(cfg, lc)["layers"].items()}
    out = LR.save_peft(tmp_path_factory.mktemp("err_adapter") / "a", {"layers": tree}, lc, cfg)
    return out, cfg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# model directories


@pytest.mark.parametrize("path", ["/does/not/exist", "./not-here", "~/not-here-either", "a/b/c"])
def test_missing_model_path(path):
    for fn in (hf.resolve_model_dir, hf.load_params, hf.load_tokenizer):
        msg = _raises(hf.CheckpointError, fn, path, contains=[path, "no such directory"])
        assert "Repo id" not in msg


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    _raises(hf.CheckpointError, hf.resolve_model_dir, str(f), contains=[f, "not a directory"])


def test_hub_id_that_cannot_be_fetched():
    # tests run with HF_HUB_OFFLINE=1 (conftest): no network, not cached
    for fn in (hf.resolve_model_dir, hf.load_tokenizer):
        _raises(hf.CheckpointError, fn, "some-org/no-such-model-xyz",
                contains=["some-org/no-such-model-xyz", "could not be fetched", "no network"])


def test_directory_without_config(tmp_path, model_dir):
    _raises(hf.CheckpointError, hf.resolve_model_dir, str(tmp_path), contains=[tmp_path, "no config.json"])
    _raises(hf.CheckpointError, hf.load_params, str(tmp_path), contains=[tmp_path, "no config.json"])
    d = _copy(model_dir, tmp_path / "m")
    assert hf.resolve_model_dir(str(d)) == str(d)
    (d / "config.json").write_text("{not json")
    _raises(hf.CheckpointError, hf.load_config, str(d), contains=[d / "config.json", "invalid JSON"])
    (d / "config.json").write_text("[1, 2]")
    _raises(hf.CheckpointError, hf.load_config, str(d), contains=[d / "config.json", "expected a JSON object"])
    c = json.loads((model_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "hidden_size": "64"}))
    _raises(hf.CheckpointError, hf.load_config, str(d), contains=[d / "config.json", "hidden_size"])


def test_truncated_safetensors(tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    msg = _raises(hf.CheckpointError, hf.load_params, str(d), contains=[f, "truncated", "1000 missing"])
    assert "tensor " in msg and "reshape" not in msg
    # the same when reading the file alone
    _raises(hf.CheckpointError, hf.SafetensorsFile, f, contains=[f, "truncated"])
    # cut inside the header
    with open(f, "r+b") as fh:
        fh.truncate(100)
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[f, "header length"])
    with open(f, "r+b") as fh:
        fh.truncate(3)
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[f, "only 3 bytes"])


def test_garbage_safetensors(tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(np.random.RandomState(0).bytes(4096))  # a huge header length
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[f, "not a safetensors file"])
    for header, what in ((b"\xff\xfe garbage \x00", "header is not JSON"), (b"[1, 2, 3]", "JSON list"),
                         (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "hold 4 bytes, but F32 [2] needs 8"),
                         (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "malformed shape"),
                         (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', "malformed data_offsets"),
                         (b'{"w": [1]}', "malformed header entry")):
        f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        _raises(hf.CheckpointError, hf.load_params, str(d), contains=[f, what])


def test_sharded_index_errors(tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "part.safetensors")
    index = d / "model.safetensors.index.json"
    index.write_text("{oops")
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[index, "malformed safetensors index"])
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "missing.safetensors"}}))
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[index, "does not exist"])
    index.write_text(json.dumps({"weight_map": {"no.such.tensor": "part.safetensors"}}))
    _raises(hf.CheckpointError, hf.load_params, str(d), contains=[index, "no.such.tensor", "has no such tensor"])


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_tokenizer_loads(model_dir):
    tok = hf.load_tokenizer(str(model_dir))
    assert tok.decode(tok("1 + 1 = 2")["input_ids"]) == "1 + 1 = 2"


def test_missing_tokenizer(tmp_path, model_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(model_dir / "config.json", d / "config.json")
    msg = _raises(hf.CheckpointError, hf.load_tokenizer, str(d), contains=[d, "no tokenizer files", "tokenizer.json"])
    assert "config.json" in msg  # what was found
    _raises(hf.CheckpointError, hf.load_tokenizer, str(tmp_path / "gone"), contains=["gone", "no such directory"])


def test_corrupt_tokenizer(tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{broken")
    _raises(hf.CheckpointError, hf.load_tokenizer, str(d), contains=[d, "cannot load the tokenizer"])


# ---------------------------------------------------------------------------------------------
# PEFT adapters


def test_adapter_loads(adapter):
    d, cfg = adapter
    lora, lc = LR.load_peft(d, cfg)
    assert lc.rank == 4 and set(lora["layers"]["self_attn"]) == {"q_proj", "v_proj"}


def test_truncated_adapter(tmp_path, adapter):
    src, cfg = adapter
    d = _copy(src, tmp_path / "a")
    w = d / LR.ADAPTER_WEIGHTS
    with open(w, "r+b") as fh:
        fh.truncate(w.stat().st_size - 10)
    _raises(LR.AdapterError, LR.load_peft, d, cfg, contains=[w, "truncated", "10 missing", "lora_"])
    w.write_bytes(b"\x01\x02")
    _raises(LR.AdapterError, LR.load_peft, d, cfg, contains=[w, "not a safetensors file"])
    w.unlink()
    _raises(LR.AdapterError, LR.load_peft, d, cfg, contains=[d, "no adapter_model.safetensors"])


@pytest.mark.parametrize("text,what", [
    ("{not json", "invalid JSON"),
    ("", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"peft_type": "LORA", "r": 4}', "missing field 'lora_alpha'"),
    ('{"r": 4, "lora_alpha": 8}', "missing field 'target_modules'"),
    ('{"r": "four", "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}', "rank: must be a positive integer (got 'four')"),
    ('{"r": 4, "lora_alpha": 8, "lora_dropout": "x", "target_modules": ["q_proj", "v_proj"]}', "dropout"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": [1, 2]}', "not a list of module names"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": "q_proj("}', "not a valid regex"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "auto_mapping": "x"}', "has LoRA tensors for"),
])
def test_bad_adapter_config(tmp_path, adapter, text, what):
    src, cfg = adapter
    d = _copy(src, tmp_path / "a")
    (d / LR.ADAPTER_CONFIG).write_text(text)
    _raises(LR.AdapterError, LR.load_peft, d, cfg, contains=[d, what])


def test_missing_adapter_config(tmp_path, adapter):
    src, cfg = adapter
    d = _copy(src, tmp_path / "a")
    (d / LR.ADAPTER_CONFIG).unlink()
    _raises(LR.AdapterError, LR.load_peft, d, cfg, contains=[d, "no adapter_config.json"])
    _raises(LR.AdapterError, LR.load_peft, tmp_path / "gone", cfg, contains=["gone", "no such directory"])


def test_adapter_for_another_model(tmp_path, adapter):
    import dataclasses
    src, cfg = adapter
    for other, what in ((dataclasses.replace(cfg, hidden_size=32), "wrong shape"),
                        (dataclasses.replace(cfg, num_heads=8), "wrong shape"),
                        (dataclasses.replace(cfg, num_layers=1), "the model has 1 layers"),
                        (dataclasses.replace(cfg, num_layers=3), "for layers [2]")):
        _raises(LR.AdapterError, LR.load_peft, src, other, contains=[src, what])


# ---------------------------------------------------------------------------------------------
# data files


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b'{"problem": "1+1?", "solution": "2", "answer": "2"}'


@pytest.mark.parametrize("line,what", [
    (b'{"problem": "1+1?", "solution": ', "malformed JSON"),
    (b'{"problem": "caf\xe9", "solution": "s", "answer": "1"}', "UnicodeDecodeError at line 3 column 17"),
    (b'{"problem": "", "solution": "s", "answer": "1"}', "field 'problem' is empty"),
    (b'{"problem": null, "solution": "s", "answer": "1"}', "is empty (null)"),
    (b'{"problem": "p", "solution": "s", "answer": NaN}', "is empty (NaN)"),
    (b'{"problem": "p", "solution": "s", "answer": Infinity}', "not a finite number"),
    (b'{"problem": "p", "solution": "s", "answer": 1' + b"0" * 5000 + b"}", "malformed JSON"),
    (b"[" * 100000, "nested too deeply"),
    (b'{"problem": "p", "solution": "s"}', "missing field 'answer'"),
    (b'"just a string"', "expected an object"),
])
def test_bad_jsonl_rows(tmp_path, line, what):
    f = _jsonl(tmp_path / "data.jsonl", [GOOD, b"", line, GOOD])
    msg = _raises(D.DataError, D.load_records, str(f), contains=[f, what])
    assert "line 3" in msg


def test_huge_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_ROW_BYTES", 1000)
    f = _jsonl(tmp_path / "huge.jsonl", [GOOD, b'{"problem": "' + b"x" * 2000 + b'", "solution": "s", "answer": "1"}'])
    _raises(D.DataError, D.load_records, str(f), contains=[f, "line 2", "longer than the limit of 1000 bytes"])
    g = tmp_path / "huge.json"
    g.write_text(json.dumps([{"problem": "x" * 2000, "solution": "s", "answer": "1"}]))
    _raises(D.DataError, D.load_records, str(g), contains=[g, "item 0", "'problem' has 2000 characters"])


def test_empty_and_non_utf8_files(tmp_path):
    for name, content in (("e.jsonl", b""), ("b.jsonl", b"\n  \n"), ("e.json", b""), ("a.json", b"[]")):
        f = tmp_path / name
        f.write_bytes(content)
        _raises(D.DataError, D.load_records, str(f), contains=[f, "no records"])
    f = tmp_path / "latin.json"
    f.write_bytes(b'[\n{"problem": "p", "solution": "s", "answer": "1"},\n{"problem": "caf\xe9"}]')
    _raises(D.DataError, D.load_records, str(f), contains=[f, "line 3 column 17", "0xe9"])
    f = tmp_path / "bom.jsonl"  # a byte-order mark is fine
    f.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\n")
    assert D.load_records(str(f))[0]["answer"] == "2"


def test_hub_dataset_error_is_one_line(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("first line\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", fail)
    _raises(D.DataError, D.load_records, "some-org/some-data", contains=["some-org/some-data", "first line second line"])
