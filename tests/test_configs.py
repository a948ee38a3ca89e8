"""configs/paper/ (the paper's tables) and configs/public/ (the authors' public scripts), checked through
the real loader (`jsdr.train.build_config`) against the numbers of their sources, held here as data.

Sources, named beside each number:
- "paper table 4/6": the paper's hyperparameter tables (SFT: table 4; GRPO and OPSD: table 6; common rows:
  AdamW, bfloat16, gradient checkpointing, flash attention, LoRA r 64 / alpha 128 on 7 projections, 8 GPUs);
- "paper text": what the paper says outside the tables (fixed teacher, thinking off / on, the per-rollout
  mean; /work/shared/paper-notes.md);
- "OLD <script> @d75fcc7": the public code's first release (behind the v1 results);
- "NEW <script> @85d6bf9" / "@7448751": the public v3 code;
- "HF/TRL default": transformers TrainingArguments / TRL 0.26.0 defaults that no public script overrides.
No model is loaded: every test is build_config (or main --print_config) on small files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from jsdr import train as TR
from jsdr.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FOLDERS = ("paper", "public")

HUB = "siyanzhao/Openthoughts_math_30k_opsd"
RECORDS = 29_434  # rows of the hub dataset's train split (notes §1a, §5)
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = {"1.7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B", "8b": "Qwen/Qwen3-8B"}

# -- prompt texts, exactly as the public code writes them (notes §3) -------------------------------------

INSTR = "Please reason step by step, and put your final answer within \\boxed{}."
OPSD_STUDENT = "Problem: {problem}\n\n" + INSTR  # data_collator.py, every version
TRANSITION_V3 = (  # NEW data_collator.py @7448751 l.37-43
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n")
TEACHER_V3 = ("Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin "
              "===\n{solution}\n=== Reference Solution End ===\n" + TRANSITION_V3 + "\n" + INSTR)
TRANSITION_V1 = (  # OLD data_collator.py @d75fcc7 l.28
    "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n")
TEACHER_V1 = "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n" + TRANSITION_V1 + "\n" + INSTR
SFT_STUDENT_V3 = "{problem}\n\n" + INSTR  # NEW sft_train.py @7448751 l.29-41 (the evaluation prompt)
GRPO_STUDENT_V3 = "Problem: {problem}\n" + INSTR  # NEW grpo_train.py @7448751 l.122-130 (one newline)
GRPO_STUDENT_V1 = "Problem: {problem}\n " + INSTR  # OLD grpo_train.py @d75fcc7 l.111 (newline and a space)

# -- expected values: dotted key -> value; "devices" = GPUs of the run -----------------------------------

COMMON = {
    "model.dtype": "bfloat16",  # paper tables 4/6 common row; every public script: --torch_dtype bfloat16
    "model.remat": "full",  # paper tables: gradient checkpointing; public: --gradient_checkpointing
    "lora.rank": 64, "lora.alpha": 128.0, "lora.target_modules": ALL7,  # paper tables 4/6; every public script
    "optim.schedule": "linear", "optim.warmup_steps": 0, "optim.warmup_ratio": 0.0,  # HF default (linear, no warmup)
    "optim.weight_decay": 0.0, "optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-8,  # HF default AdamW
    "data.train": HUB, "data.split": "train", "data.answer_field": "Answer",  # paper-notes; load_dataset(...)
    "train.steps": None,  # the run length is train.epochs (HF num_train_epochs), never a step count
}

# ---- configs/paper
PAPER_COMMON = {
    **COMMON,
    "devices": 8, "mesh.num_devices": None,  # paper tables: 8 x A100
    "optim.max_grad_norm": 1.0,  # HF default (v1 stack)
    "train.save_every": 50,  # OLD scripts/run_opsd.sh, run_grpo.sh @d75fcc7: --save_steps 50
    "data.problem_field": "problem", "data.solution_field": "solution",  # paper-notes (fields problem, solution)
}
PAPER = {
    "sft": {
        **PAPER_COMMON, "method": "sft",
        "optim.learning_rate": 2e-5,  # paper table 4
        "train.per_device_batch": 2, "train.grad_accum": 4, "train.effective_batch": 64,  # paper table 4
        "data.max_length": 16000,  # paper table 4
        "train.epochs": 4.0, "train.stop_at": None,  # OLD and NEW scripts/run_sft.sh: --num_train_epochs 4
        "lora.dropout": 0.05,  # TRL ModelConfig default lora_dropout (public code)
        "prompts.student": SFT_STUDENT_V3, "prompts.student_thinking": False,  # NEW sft_train.py @7448751
    },
    "grpo": {
        **PAPER_COMMON, "method": "grpo",
        "optim.learning_rate": 2e-5,  # paper table 6
        "train.per_device_batch": 1, "train.grad_accum": 4, "train.effective_batch": 32,  # paper table 6
        "rollout.n": 8, "rollout.temperature": 1.2, "rollout.max_new_tokens": 16000,  # paper table 6
        "grpo.beta": 0.0,  # paper table 6: KL beta 0
        "train.epochs": 2.0, "train.stop_at": None,  # OLD scripts/run_grpo.sh @d75fcc7: --num_train_epochs 2
        "grpo.aggregation": "grpo", "grpo.scale_rewards": "group",  # OLD run_grpo.sh: loss_type, scale_rewards
        "grpo.num_iterations": 1,  # OLD run_grpo.sh @d75fcc7: not set (TRL default 1)
        "grpo.epsilon_low": 0.2, "grpo.epsilon_high": 0.2,  # TRL default epsilon 0.2, epsilon_high = epsilon
        "grpo.importance_sampling_level": "token", "grpo.mask_truncated_completions": False,  # TRL default
        "grpo.dynamic_sampling": False,  # TRL: no dynamic sampling
        "rollout.top_p": 1.0, "rollout.top_k": -1,  # TRL default (no filter)
        "reward": "math_verify",  # paper-notes: math-verify grades (tables silent)
        "lora.dropout": 0.05,  # TRL ModelConfig default
        "data.problem_field": "Question",  # OLD and NEW grpo_train.py: prompts from Question
        "prompts.student": GRPO_STUDENT_V3, "prompts.student_thinking": True,  # NEW grpo_train.py @7448751
        "prompts.student_chat_template": True,
    },
    "opsd-v1": {
        **PAPER_COMMON, "method": "opsd",
        "optim.learning_rate": 2e-5,  # paper table 6 (v1)
        "train.per_device_batch": 1, "train.grad_accum": 4, "train.effective_batch": 32,  # paper table 6
        "rollout.n": 1, "rollout.temperature": 1.2, "rollout.max_new_tokens": 2048,  # paper table 6 (v1)
        "opsd.beta": 0.5, "opsd.variant": "full", "opsd.clip_tau": None,  # paper table 6 (v1): JSD 0.5, full vocabulary
        "opsd.temperature": 1.2,  # public code: the loss divides the logits by the sampling temperature
        "rollout.top_p": 0.95, "rollout.top_k": 20,  # OLD scripts/run_opsd*.sh @d75fcc7: --top_p 0.95 --top_k 20
        "opsd.teacher": "fixed", "opsd.reduction": "sequence",  # paper text: fixed teacher, mean per rollout
        "prompts.student_thinking": False, "prompts.teacher_thinking": True,  # paper text
        "prompts.student": OPSD_STUDENT, "prompts.teacher": TEACHER_V3,  # jsdr default preset public (tables silent)
        "train.epochs": 30.0,  # OLD/NEW scripts/run_opsd*.sh: --num_train_epochs 30
        "train.stop_at": 500,  # the paper reads OPSD at about 100-500 steps
        "lora.dropout": 0.0,  # public code: GOLDConfig.disable_dropout=True
        "data.max_teacher_prompt_tokens": 20000,  # public code: --max_length 20000
    },
}
PAPER["opsd-v3"] = {
    **PAPER["opsd-v1"],
    "optim.learning_rate": 5e-6,  # paper table 6 (v3)
    "rollout.max_new_tokens": 1024,  # paper table 6 (v3)
    "opsd.beta": 0.0,  # paper table 6 (v3): forward KL
    "opsd.clip_tau": 0.05, "opsd.clip_mode": "vocab",  # NEW run_opsd_{1b,4b}.sh @85d6bf9: --jsd_token_clip 0.05
    "optim.max_grad_norm": 0.1,  # NEW run_opsd_*.sh @85d6bf9: --max_grad_norm 0.1
}

# ---- configs/public
PUB_COMMON = {**COMMON, "optim.max_grad_norm": 1.0,  # HF default (not set by the script)
              "data.problem_field": "problem", "data.solution_field": "solution"}
PUB_OPSD = {  # flags of every OPSD script, OLD @d75fcc7 and NEW @85d6bf9
    **PUB_COMMON, "method": "opsd", "train.effective_batch": 32,
    "train.epochs": 30.0,  # --num_train_epochs 30
    "rollout.n": 1, "rollout.temperature": 1.1, "rollout.top_p": 0.95, "rollout.top_k": 20,  # --temperature 1.1 ...
    "rollout.min_p": 0.0,  # opsd_trainer.py: min_p 0.0 (GOLDConfig has none)
    "opsd.temperature": 1.1,  # opsd_trainer.py: logits / args.temperature
    "opsd.variant": "full", "opsd.teacher": "fixed",  # --fixed_teacher
    "opsd.reduction": "token",  # opsd_trainer.py: reduction="batchmean" = sum / unmasked tokens
    "lora.dropout": 0.0,  # GOLDConfig.disable_dropout=True
    "data.max_teacher_prompt_tokens": 20000,  # --max_length 20000
}
PUB_OPSD_V3 = {  # NEW scripts/run_opsd_{1b,4b,8b}.sh @85d6bf9
    **PUB_OPSD,
    "optim.learning_rate": 5e-6, "optim.max_grad_norm": 0.1,  # --learning_rate 5e-6 --max_grad_norm 0.1
    "train.save_every": 25,  # --save_steps 25
    "train.stop_at": 100,  # eval/run_eval.sh @7448751 reads checkpoints 25-100
    "rollout.max_new_tokens": 1024,  # --max_completion_length 1024
    "opsd.beta": 0.0, "opsd.clip_tau": 0.05, "opsd.clip_mode": "vocab",  # --beta 0 --jsd_token_clip 0.05
    "prompts.student": OPSD_STUDENT, "prompts.teacher": TEACHER_V3,  # data_collator.py @7448751
    "prompts.student_thinking": False, "prompts.teacher_thinking": True,  # opsd_train.py defaults
    "prompts.student_chat_template": True,  # NEW vLLM path keeps the special tokens (l.863)
}
PUB_OPSD_V1 = {  # OLD scripts/run_opsd.sh, run_opsd_1b.sh @d75fcc7
    **PUB_OPSD,
    "optim.learning_rate": 2e-4,  # --learning_rate 2e-4
    "train.save_every": 50,  # --save_steps 50
    "train.stop_at": 200,  # OLD README / eval/run_eval.sh: checkpoint-200
    "opsd.beta": 0.5, "opsd.clip_tau": None,  # --beta 0.5, no clip in that release
    "prompts.student": OPSD_STUDENT, "prompts.teacher": TEACHER_V1,  # OLD data_collator.py
    "prompts.student_thinking": True, "prompts.teacher_thinking": True,  # no enable_thinking: Qwen3 default on
    "prompts.student_chat_template": False,  # OLD vLLM path: skip_special_tokens=True (l.856-859)
}
PUB_GRPO = {  # flags of scripts/run_grpo.sh, OLD @d75fcc7 and NEW @7448751
    **PUB_COMMON, "method": "grpo", "devices": 8, "model.path": MODELS["4b"],
    "train.per_device_batch": 1, "train.grad_accum": 4, "train.effective_batch": 32,  # 1 x 4 x 8 processes
    "train.epochs": 2.0, "train.stop_at": None,  # --num_train_epochs 2
    "rollout.n": 8, "rollout.temperature": 1.2, "rollout.max_new_tokens": 16000,  # --num_generations 8 ...
    "rollout.top_p": 1.0, "rollout.top_k": -1,  # TRL default
    "grpo.beta": 0.0, "grpo.aggregation": "grpo", "grpo.scale_rewards": "group",  # --beta 0.0 --loss_type grpo ...
    "grpo.epsilon_low": 0.2, "grpo.epsilon_high": 0.2,  # TRL default
    "grpo.importance_sampling_level": "token", "grpo.mask_truncated_completions": False,  # TRL default
    "grpo.dynamic_sampling": False,
    "lora.dropout": 0.05,  # TRL ModelConfig default
    "data.problem_field": "Question",  # grpo_train.py: example['Question'], reward against Answer
    "prompts.student_thinking": True,  # no enable_thinking (NEW) / no template (OLD): thinking on
}
PUBLIC = {
    "opsd-v3-qwen3-1.7b.yaml": {**PUB_OPSD_V3, "model.path": MODELS["1.7b"],  # NEW run_opsd_1b.sh @85d6bf9
                                "devices": 4, "mesh.num_devices": 4,  # --num_processes 4
                                "train.per_device_batch": 4, "train.grad_accum": 2},
    "opsd-v3-qwen3-4b.yaml": {**PUB_OPSD_V3, "model.path": MODELS["4b"],  # NEW run_opsd_4b.sh @85d6bf9
                              "devices": 8, "mesh.num_devices": None,
                              "train.per_device_batch": 4, "train.grad_accum": 1},
    "opsd-v3-qwen3-8b.yaml": {**PUB_OPSD_V3, "model.path": MODELS["8b"],  # NEW run_opsd_8b.sh @85d6bf9
                              "devices": 8, "mesh.num_devices": None,
                              "train.per_device_batch": 2, "train.grad_accum": 2,
                              "opsd.clip_tau": 0.06},  # --jsd_token_clip 0.06
    "opsd-v1-qwen3-1.7b.yaml": {**PUB_OPSD_V1, "model.path": MODELS["1.7b"],  # OLD run_opsd_1b.sh @d75fcc7
                                "devices": 8, "mesh.num_devices": None,
                                "train.per_device_batch": 2, "train.grad_accum": 2,
                                "rollout.max_new_tokens": 2048},  # --max_completion_length 2048
    "opsd-v1-qwen3-4b.yaml": {**PUB_OPSD_V1, "model.path": MODELS["4b"],  # OLD run_opsd.sh @d75fcc7
                              "devices": 8, "mesh.num_devices": None,
                              "train.per_device_batch": 1, "train.grad_accum": 4,
                              "rollout.max_new_tokens": 1024},  # --max_completion_length 1024
    "sft-qwen3-4b.yaml": {**PUB_COMMON, "method": "sft", "model.path": MODELS["4b"],  # NEW run_sft.sh @7448751
                          "devices": 8, "optim.learning_rate": 5e-6,  # --learning_rate 5e-6
                          "train.per_device_batch": 2, "train.grad_accum": 4, "train.effective_batch": 64,
                          "train.epochs": 4.0, "train.stop_at": None,  # --num_train_epochs 4
                          "train.save_every": 20,  # --save_steps 20 (since 0feada9)
                          "data.max_length": 16000,  # --max_length 16000
                          "lora.dropout": 0.05,  # TRL ModelConfig default
                          "prompts.student": SFT_STUDENT_V3, "prompts.student_thinking": False},
    "grpo-qwen3-4b.yaml": {**PUB_GRPO,  # NEW run_grpo.sh @7448751
                           "optim.learning_rate": 5e-6,  # --learning_rate 5e-6
                           "train.save_every": 20,  # --save_steps 20 (since 0feada9)
                           "grpo.num_iterations": 2,  # --num_iterations 2
                           "reward": "math_verify",  # grpo_train.py @7448751: math_verify (+ string fallback)
                           "prompts.student": GRPO_STUDENT_V3, "prompts.student_chat_template": True},
    "grpo-v1-qwen3-4b.yaml": {**PUB_GRPO,  # OLD run_grpo.sh @d75fcc7
                              "optim.learning_rate": 2e-5,  # --learning_rate 2e-5
                              "train.save_every": 50,  # --save_steps 50
                              "grpo.num_iterations": 1,  # not set: TRL default
                              "reward": "string_first",  # grpo_train.py @d75fcc7: first box, strip().lower() ==
                              "prompts.student": GRPO_STUDENT_V1, "prompts.student_chat_template": False},
}

EXPECTED: dict[str, dict] = {
    **{f"paper/{m}-qwen3-{s}.yaml": {**want, "model.path": path}
       for m, want in PAPER.items() for s, path in MODELS.items()},
    **{f"public/{name}": want for name, want in PUBLIC.items()},
}


def _files() -> list[str]:
    """Every runnable config of configs/paper and configs/public (the shared/ parents excluded)."""
    return sorted(str(p.relative_to(CONFIGS)) for f in FOLDERS for p in (CONFIGS / f).rglob("*.yaml")
                  if "shared" not in p.relative_to(CONFIGS / f).parts)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _load(rel: str):
    cfg, note = TR.build_config(["--config", str(CONFIGS / rel)])
    assert note is None
    return cfg


def _records_per_step(cfg) -> int:
    return cfg.train.effective_batch // (cfg.rollout.n if cfg.method == "grpo" else 1)


# -- the values -----------------------------------------------------------------------------------------


def test_every_config_file_is_checked():
    """No untested file: the files on disk are exactly the ones this test holds values for."""
    assert _files() == sorted(EXPECTED), (set(_files()) ^ set(EXPECTED))


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_config_matches_its_source(rel):
    cfg, want = _load(rel), EXPECTED[rel]
    wrong = {k: (_get(cfg, k), v) for k, v in want.items() if k != "devices" and _get(cfg, k) != v}
    assert not wrong, f"{rel}: key: (config, source) {wrong}"
    for k, v in want.items():  # a float must not hide an int and the other way round (2 vs 2.0 is fine)
        if k != "devices" and v is not None and not isinstance(v, bool):
            assert isinstance(_get(cfg, k), type(v)) or {type(v), type(_get(cfg, k))} <= {int, float}, k


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_batch_arithmetic(rel):
    """per_device_batch x data-parallel devices x grad_accum = effective batch, on the source's GPUs."""
    cfg, want = _load(rel), EXPECTED[rel]
    m = cfg.mesh
    assert -1 not in (m.data, m.fsdp, m.tensor), "the configs name their layout"
    assert m.data * m.fsdp * m.tensor == want["devices"]
    assert m.num_devices in (None, want["devices"])
    dp = m.data * m.fsdp
    assert cfg.train.per_device_batch * dp * cfg.train.grad_accum == cfg.train.effective_batch
    if cfg.method == "grpo":  # 32 completions = 4 prompts x 8 generations (paper table 6; run_grpo.sh)
        assert cfg.train.effective_batch % cfg.rollout.n == 0 and _records_per_step(cfg) == 4
    if cfg.method == "opsd":  # 32 prompts, one rollout each
        assert cfg.rollout.n == 1 and cfg.train.effective_batch == 32


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_run_length(rel):
    """The schedule spans train.epochs; stop_at ends the run well inside it, at a checkpoint."""
    cfg = _load(rel)
    updates = cfg.grpo.num_iterations if cfg.method == "grpo" else 1
    total = cfg.train.total_steps(RECORDS, _records_per_step(cfg), updates)
    assert total == math.ceil(cfg.train.epochs * RECORDS / _records_per_step(cfg)) * updates
    if cfg.method == "opsd":  # 30 epochs of 32 prompts: ~27,600 steps (notes §1a)
        assert 27_000 < total < 28_000
        assert 1 - cfg.train.stop_at / total > 0.98  # read at 100-500 steps: the lr has barely decayed
        assert cfg.train.stop_at % cfg.train.save_every == 0  # the steps the sources read are saved
    else:
        assert cfg.train.stop_at is None


# -- the files themselves ---------------------------------------------------------------------------------


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(ln for ln in lines[:next((i for i, ln in enumerate(lines) if not ln.startswith("#")),
                                               len(lines))])


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_headers_name_their_source(rel):
    head = _header(CONFIGS / rel)
    assert head, f"{rel}: starts with a comment saying what it is"
    if rel.startswith("paper/"):
        assert re.search(r"[Pp]aper (v[13], )?table [46] \((SFT|GRPO|OPSD)\)", head), head
    else:  # the script and commit it mirrors, and where it differs from the paper's table
        assert re.search(r"scripts/run_\w+\.sh @[0-9a-f]{7}", head), head
        assert "differs from the paper" in head, head


def test_shared_files_are_all_used_and_commented():
    used = set()
    for rel in _files():
        path = CONFIGS / rel
        while True:
            parent = (yaml.safe_load(path.read_text()) or {}).get("inherit")
            if parent is None:
                break
            path = (path.parent / parent).resolve()
            used.add(path)
    shared = {p.resolve() for f in FOLDERS for p in (CONFIGS / f / "shared").glob("*.yaml")}
    assert shared and shared <= used, f"unused: {sorted(map(str, shared - used))}"
    for p in shared:
        assert _header(p), f"{p}: starts with a comment saying which table or script it is"
    for rel in _files():  # every run inherits its method file: the tables are written once
        assert "inherit" in yaml.safe_load((CONFIGS / rel).read_text()), rel


# -- print_config round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_print_config_reads_back_to_the_same_config(rel, tmp_path, capsys):
    assert TR.main(["--config", str(CONFIGS / rel), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "inherit" not in yaml.safe_load(out)
    (tmp_path / "resolved.yaml").write_text(out)
    again, _ = TR.build_config(["--config", str(tmp_path / "resolved.yaml")])
    assert again == _load(rel)


def test_print_config_applies_command_line_options(capsys):
    rel = "public/opsd-v3-qwen3-1.7b.yaml"
    assert TR.main(["--config", str(CONFIGS / rel), "--train.stop_at=50", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["stop_at"] == 50 and printed["mesh"]["num_devices"] == 4


# -- inherit ----------------------------------------------------------------------------------------------------


def test_inherit_replaces_key_by_key(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "method: opsd\nmodel: {path: m}\nopsd: {beta: 0.5, teacher: live}\ntrain: {steps: 7}\n")
    (tmp_path / "shared" / "mid.yaml").write_text("inherit: base.yaml\nopsd: {beta: 0.0}\n")
    (tmp_path / "run.yaml").write_text("inherit: shared/mid.yaml\ntrain: {grad_accum: 2}\n")
    cfg, _ = TR.build_config(["--config", str(tmp_path / "run.yaml"), "--opsd.teacher=ema"])
    assert (cfg.opsd.beta, cfg.opsd.teacher, cfg.train.steps, cfg.train.grad_accum) == (0.0, "ema", 7, 2)


def test_inherit_cycle_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\nmodel: {path: m}\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: inherits itself \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        TR.build_config(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("inherit: c.yaml\n")
    with pytest.raises(ConfigError, match="inherits itself"):
        TR.build_config(["--config", str(tmp_path / "c.yaml")])


def test_inherit_missing_parent_is_a_config_error(tmp_path):
    (tmp_path / "run.yaml").write_text("inherit: shared/nowhere.yaml\nmodel: {path: m}\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist \(inherited by .*run.yaml\)"):
        TR.build_config(["--config", str(tmp_path / "run.yaml")])
    (tmp_path / "bad.yaml").write_text("inherit: [x.yaml]\n")
    with pytest.raises(ConfigError, match="inherit: expected the path of another YAML file"):
        TR.build_config(["--config", str(tmp_path / "bad.yaml")])
