"""Config machinery: YAML + overrides into nested dataclasses, with errors that name the key."""

import dataclasses
from typing import Literal

import pytest

from jsdr import config as C


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = C.field(1e-3, "learning rate")
    names: tuple[str, ...] = C.field(("a", "b"), "names")
    mode: Literal["x", "y"] = C.field("x", "mode")
    limit: int | None = C.field(None, "limit")

    def __post_init__(self):
        C.check(self.lr > 0, "lr", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Outer:
    seed: int = C.field(0, "seed")
    flag: bool = C.field(False, "a flag")
    inner: Inner = C.field(Inner(), "")


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ninner:\n  names: [q, k]\n  mode: y\n")
    cfg = C.load(Outer, p, ["--inner.lr=2e-5", "--flag", "--limit", "7"])
    assert cfg == Outer(seed=3, flag=True, inner=Inner(lr=2e-5, names=("q", "k"), mode="y", limit=7))
    cfg = C.load(Outer, None, ["--names=a,b,c", "--inner.limit=none", "--flag=false"])
    assert cfg.inner.names == ("a", "b", "c") and cfg.inner.limit is None and cfg.flag is False
    # round trip through plain data
    assert C.from_dict(Outer, C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("args,match", [
    (["--inner.mode=z"], r"inner.mode: 'z' is not allowed; choose one of \['x', 'y'\]"),
    (["--seed=abc"], r"seed: expected int, got 'abc'"),
    (["--seed=1.5"], r"seed: expected int"),
    (["--flag=maybe"], r"flag: expected true/false"),
    (["--inner.lr=-1"], r"inner.lr: must be > 0"),
    (["--nope=1"], r"unknown option --nope"),
    (["--inner.nope=1"], r"unknown option --inner.nope"),
    (["positional"], r"unexpected argument 'positional'"),
])
def test_bad_values_name_the_key(args, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(Outer, None, args)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("inner:\n  typo: 1\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml: unknown key inner.typo; inner accepts: lr, names"):
        C.load(Outer, p)
    p.write_text("seed: [1\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(Outer, p)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(Outer, tmp_path / "missing.yaml")


def test_help_lists_every_option_with_default():
    text = C.help_text(Outer)
    for key in ("--seed=0", "--flag=False", "--inner.lr=0.001", "--inner.names=a,b", "--inner.mode=x",
                "--inner.limit=None"):
        assert key in text
    assert "learning rate" in text and "x|y" in text


def test_every_train_and_eval_option_has_help():
    """Help sits on the fields (no separate table): every leaf of both entry points has one."""
    from jsdr.eval import EvalConfig
    from jsdr.train import TrainConfig
    for cls in (TrainConfig, EvalConfig):
        missing = [key for key, f, _ in C.leaf_paths(cls) if not f.metadata.get("help")]
        assert not missing, missing
    assert not hasattr(C, "FIELD_HELP")


def test_choices_show_in_help():
    """Fixed choices are Literal types, so --help lists them (e.g. opsd.variant, not a bare `str`)."""
    from jsdr.train import TrainConfig
    text = C.help_text(TrainConfig)
    for line in ("--opsd.variant=full  (full|sampled_token|top_k)", "--grpo.aggregation=grpo  (grpo|dapo|dr_grpo)",
                 "--sft.reduction=token  (token|sequence)", "--opsd.teacher=fixed  (fixed|live|ema)"):
        assert line in text, line


def test_config_file_forms_are_the_same_for_train_and_eval(tmp_path):
    """`--config FILE` and `--config=FILE` both work for both entry points, with the same errors."""
    from jsdr import eval as evaluation
    from jsdr import train
    t = tmp_path / "t.yaml"
    t.write_text("seed: 5\n")
    for argv in (["--config", str(t)], [f"--config={t}"]):
        assert train.build_config(argv + ["--model.path=x"])[0].seed == 5
        assert evaluation.parse_args(argv).seed == 5
    for parse in (lambda a: train.build_config(a), evaluation.parse_args):
        with pytest.raises(C.ConfigError, match="--config needs a file"):
            parse(["--config"])
        with pytest.raises(C.ConfigError, match="--config is given twice"):
            parse([f"--config={t}", f"--config={t}"])


def test_mapping_entries_one_by_one_on_the_command_line():
    """A mapping field takes entries as dotted keys (--mesh.rules.act_seq=tensor), with YAML values."""
    from jsdr import sharding
    from jsdr.train import TrainConfig
    cfg = C.load(TrainConfig, None, ["--model.path=x", "--mesh.rules.act_seq=tensor", "--mesh.rules.embed=null",
                                     "--mesh.rules.mlp=[tensor, fsdp]"])
    assert cfg.mesh.rules == {"act_seq": ["tensor"], "embed": None, "mlp": ["tensor", "fsdp"]}
    rules = sharding.effective_rules(cfg.mesh)
    assert rules["act_seq"] == ("tensor",) and rules["embed"] is None and rules["vocab"] == ("tensor",)
    with pytest.raises(C.ConfigError, match=r"mesh.rules: .*unknown mesh axis \['pipe'\]"):
        C.load(TrainConfig, None, ["--model.path=x", "--mesh.rules.mlp=pipe"])
    with pytest.raises(C.ConfigError, match=r"unknown option --mesh.rule.mlp"):
        C.load(TrainConfig, None, ["--model.path=x", "--mesh.rule.mlp=tensor"])
