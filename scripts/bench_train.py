"""One optimizer step of jsdr against the same step in TRL (PyTorch, PEFT LoRA), in one run.

    python scripts/bench_train.py --method opsd            # ~3-6 min per method on 2 CPU cores
    python scripts/bench_train.py --method sft,grpo,opsd --json /tmp/bench_train.json
    python scripts/bench_train.py --method grpo --device cuda --dtype bfloat16 --hidden 1024 --layers 16 \\
        --batch 32 --max-new-tokens 512                                       # a GPU machine

Needs TRL 1.x beside jsdr's test extra (`pip install -e ".[test,bench]"`, or `pip install trl==1.16.0`;
it brings nothing that jsdr's `transformers`/`peft`/`torch` do not already satisfy).

What is shared. The driver builds, once per run, a random Qwen3-architecture model with
`transformers` (`--hidden/--layers/...`, untied unless `--tied`) and `save_pretrained`s it with one
tokenizer: the toy tokenizer of jsdr (`jsdr.toy.build_tokenizer`: byte-level BPE, Qwen3's special
tokens and chat template with the thinking switch) whose BPE vocabulary is extended with never-merged
letter tokens to `--vocab` entries (32,000 by default), so the lm-head is as wide as a real model's
and a random model almost never samples a stop token (every rollout runs to `--max-new-tokens`, the
same work on both sides). Both frameworks read these files. The records are the toy's mod-10 chains
(`--difficulty` operations each, so prompt lengths are equal: one jit bucket), in file order on both
sides (jsdr `data.shuffle=false`; TRL `shuffle_dataset=False` / `train_sampling_strategy="sequential"`):
step k of either side trains on the same records. Student prompts are the chat template with thinking
off on both sides (jsdr `prompts.student_thinking=false`; TRL `chat_template_kwargs`); the token ids of
every prompt are checked equal between jsdr's renderer and TRL's tokenization before timing. Both run
float32 (`--dtype bfloat16`: jsdr bf16 weights/compute, TRL bf16 weights + `bf16=True`), LoRA of
`--lora-rank/--lora-alpha` on q/k/v/o/gate/up/down with dropout 0, AdamW at `--lr` constant (betas
0.9/0.999, eps 1e-8, no weight decay, gradient clip 1.0: jsdr's defaults, set on TRL), per-layer
rematerialization on both (jsdr `model.remat=full`; TRL's default `gradient_checkpointing=True`;
`--no-remat` turns both off), `--batch` sequences per optimizer step in `--grad-accum` micro-batches,
the same seed.

What each side runs per method (jsdr: its `Trainer`, built like tests/test_train.py, its method's
defaults; TRL: the trainer's own `train()` loop, its settings mapped from jsdr's resolved config):

  sft   jsdr  method.make_batch (packs the examples into rows of a `train.seq_bucket` multiple) +
              the jitted step (masked cross-entropy on the solution tokens, chunked lm-head, AdamW)
        TRL   SFTTrainer + peft LoraConfig on the same token ids, pre-tokenized (input_ids +
              completion_mask, `completion_only_loss=True`, no packing: each batch padded to its
              longest row; its fused, chunked lm-head and its entropy/accuracy metrics are its own)
  grpo  jsdr  make_batch (paged-KV sampler: rollout.n completions per prompt at its temperature and
              filters, grading with `jsdr.data.rewards.grade`, group advantages) + the jitted step
              (clipped ratio, aggregation `grpo`, old log-probs = current ones under stop-gradient)
        TRL   GRPOTrainer, use_vllm=False (transformers `generate`), the same num_generations,
              temperature, top_p/top_k, max_completion_length, loss_type="grpo", epsilon 0.2/0.2,
              beta 0, scale_rewards="group", num_iterations 1, no truncation masking; its reward
              function calls the same `grade` (method `reward`, default math_verify) on the decoded
              completion. TRL also computes per-token entropies in its loss (its default)
  opsd  jsdr  make_batch (1 student rollout per prompt, temperature/top-p/top-k of jsdr's OPSD
              defaults, 1.1/0.95/20) + the jitted step: student forward+backward and teacher forward
              (fixed teacher = base weights, LoRA off) over the same rollout, generalized JSD
              (opsd.beta, default 0.5) over the full vocabulary at opsd.temperature, per-rollout mean
        TRL   trl.experimental.sdft.SDFTTrainer (SDFT, arXiv 2601.19897: "self-distillation with
              explicit teacher prompts", the self-distillation trainer of TRL 1.16 and the one that is
              OPSD's algorithm: on-policy student rollouts, the same model as teacher with the
              reference solution in its prompt). Settings: teacher_model_kind="base" (the PEFT adapter
              disabled for the teacher forward = jsdr's fixed teacher), distillation_mode="full_logits",
              distillation_alpha = opsd.beta (the same generalized-JSD convention: 0 forward KL, 1
              reverse KL), logits divided by the sampling temperature (= jsdr's opsd.temperature),
              per-sequence mean then mean over sequences (= opsd.reduction "sequence"),
              num_generations 1, distillation_is_clip=None (no old log-probs are computed with one
              update per rollout batch anyway), the same temperature/top_p/top_k.

What differs between the sides (beyond the frameworks):
  - OPSD teacher prompt: SDFT builds it as the student's user message + template + reference
    solution, in the same chat template call as the student (same thinking switch). jsdr gets the
    same text: `prompts.teacher` = the student template + "\\n\\n" + the toy's reference header +
    "\\n{solution}", and `prompts.teacher_thinking=false` (jsdr's default teacher prompt, with its
    transition sentence and thinking on, cannot be expressed in SDFT's template). The teacher token
    ids are checked equal. GKDTrainer (the fallback the issue names) is not used: SDFT exists.
  - Padding: jsdr pads every length to a multiple of `train.seq_bucket` (`--seq-bucket`, jsdr's
    default 64: one compile per bucket) and packs SFT rows; TRL pads to the longest row of the batch.
    tok/s count real (non-padding) tokens on both sides, so the padding jsdr computes is its cost.
  - Sampling: jsdr's paged engine shares a prompt's KV pages among its n samples; TRL `generate`s the
    repeated prompt n times (dynamic KV cache). Different random streams: the same distribution, not
    the same tokens (lengths are equal here: rollouts run to the limit).
  - GRPO loss: TRL also computes the entropy of every completion position (it logs it).
  - Optimizer: TRL/transformers' default AdamW implementation (`optim`, adamw_torch_fused on recent
    torch), jsdr optax.adamw in the jitted step.

Timing. jsdr and TRL run in separate subprocesses (no shared thread pool, per-process memory), set up
one after the other, each warmed up for `--warmup` steps (jsdr compiles its sampler and its step
there), then they take turns step by step, alternating who goes first, `--pause` seconds apart, for
`--repeats` steps each, so a shared machine's load hits both alike. Phases (seconds per step):
  data      sft: jsdr make_batch (packing); TRL its data collator (padding)
  rollout   grpo/opsd: jsdr method.make_batch (sampling, decoding, grading, batch building);
            TRL `_generate_and_score_completions` (GRPO) / `_prepare_training_batch` (SDFT)
  generate  the sampling inside rollout: jsdr the trainer's sampler call (`Trainer._sample`,
            wrapped), TRL `_generate` (prompt tokenization, `generate`, decoding)
  train     jsdr the jitted step (`trainer.step_fn()`, batch placement included, until
            block_until_ready); TRL step minus rollout/data: forward (`compute_loss`), backward
            (`accelerator.backward`), grad clip + optimizer step (the JSON has the three parts)
  teacher   opsd: jsdr a jit of its own (teacher hidden states + chunked lm-head log-probs from
            jsdr.losses.opsd.teacher_logprobs; not part of the step, run after it); TRL the teacher's
            `_forward_logits` inside the loss (no_grad, logits of the completion positions)
  student   opsd: jsdr a jit of its own (student forward + divergence against the given teacher
            states + backward, value_and_grad of jsdr.losses.opsd.opsd_head_loss; after the step);
            TRL `compute_loss` minus the teacher, plus the backward
  step      the whole optimizer step (data/rollout + train), the headline
Reported per phase: tokens/s from the median time over the timed steps (rollout/generate: generated
tokens; the others: the real tokens of the sequences trained on, prompt + completion, for OPSD the
student's and the teacher's; teacher/student: their own rows), the ratio jsdr/TRL of those, and the
load-robust "best" ratio of the fastest step of each. Memory: as scripts/bench_forward.py measures it
on CPU, the process's peak resident set during a step (Linux VmHWM, reset through /proc/self/clear_refs
at the start of each timed step), the largest over the timed steps, for both alike, and beside it its
growth over the RSS at the step's start (with jsdr's malloc settings below, a process keeps its freed
heap, so a steady-state step of either side grows little or not at all); on GPU
torch.cuda.max_memory_allocated and JAX's peak_bytes_in_use. Malloc: the jsdr worker runs with the glibc settings that importing jsdr
sets for XLA:CPU (`jsdr.hostmem`); the TRL worker with glibc's defaults, what TRL users run, or with
`--peer-malloc same` with jsdr's settings too (the report's "malloc" line says which). On the 2-core
machine the settings made TRL's steps faster in most runs and, in one run of four, far slower (its
heap grew by 3.4 GB in a step): docs/performance.md has both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import add_model_args, fmt_bytes, peak_reset, peak_since, worker_argv as _flags  # noqa: E402

METHODS = ("sft", "grpo", "opsd")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = {"sft": ("data", "train", "step"),
          "grpo": ("rollout", "generate", "train", "step"),
          "opsd": ("rollout", "generate", "train", "teacher", "student", "step")}
# the tokens each phase's tok/s counts (keys of a step record)
PHASE_TOKENS = {"rollout": "gen_tokens", "generate": "gen_tokens", "teacher": "t_tokens", "student": "s_tokens"}
PHASE_NAMES = {"data": "data (pack/collate)", "rollout": "rollout", "generate": "  generate", "train":
               "train (fwd+bwd+opt)", "teacher": "  teacher fwd", "student": "  student fwd+bwd", "step": "step"}
TEACHER_TEMPLATE_TRL = "{prompt}\n\n{header}\n{privileged_context}"  # SDFT's teacher message ({header} filled)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2)
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--method", default="opsd", help=f"one of {METHODS}, or a comma list of them")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (sft: examples, grpo: "
                                                        "completions = prompts x rollout.n, opsd: prompts)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both sides)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="rollout length limit (grpo, opsd)")
    p.add_argument("--difficulty", type=int, default=4, help="operations per toy problem (sets prompt and "
                                                             "solution lengths)")
    p.add_argument("--seq-bucket", type=int, default=64, help="jsdr train.seq_bucket (jsdr's default 64)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate, constant (both sides)")
    p.add_argument("--no-remat", action="store_true", help="no per-layer rematerialization / gradient "
                                                           "checkpointing on either side")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (jsdr compiles there)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between the two sides' steps (idle "
                                                            "thread pools stop spinning)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0 = all cores)")
    p.add_argument("--peer-malloc", choices=("default", "same"), default="default",
                   help="glibc malloc of the TRL worker: default = glibc's own (what TRL users run); same = the "
                        "settings jsdr sets for XLA:CPU (jsdr.hostmem)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--keep", default="", help="build the model, tokenizer and data in this directory and keep "
                                              "them (default: a temporary directory)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "<jsdr|trl>:<method>:<assets dir>"
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--method: {bad or args.method!r}; choose from {METHODS} (or a comma list)")
    if args.batch % args.grad_accum:
        p.error(f"--batch {args.batch} is not a multiple of --grad-accum {args.grad_accum}")
    return args


# ---------------------------------------------------------------------------------------------
# the shared assets: tokenizer, model, records (built by the driver, read by both workers)


def build_tokenizer(vocab: int):
    """jsdr's toy tokenizer (BPE, Qwen3 special tokens and chat template) with its BPE vocabulary
    extended to `vocab` entries by letter tokens that no merge produces (they only come out of a model)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from jsdr import toy
    base = toy.build_tokenizer()
    if vocab < len(base):
        raise SystemExit(f"--vocab {vocab} is smaller than the toy tokenizer ({len(base)} tokens)")
    spec = json.loads(base.backend_tokenizer.to_str())
    table, n, i = spec["model"]["vocab"], len(base), 0
    letters = "abcdefghijklmnopqrstuvwxyz"
    while n < vocab:
        word, k = "", i
        while True:
            word, k = letters[k % 26] + word, k // 26
            if not k:
                break
        i += 1
        if "\u0120q" + word not in table:  # byte-level " q<letters>"
            table["\u0120q" + word] = n
            n += 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=toy.EOS_TOKEN,
                                  pad_token=toy.PAD_TOKEN, model_max_length=base.model_max_length,
                                  additional_special_tokens=[t for t in toy.SPECIAL_TOKENS
                                                             if t not in (toy.EOS_TOKEN, toy.PAD_TOKEN)],
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = toy.CHAT_TEMPLATE
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def jsdr_config_dict(args, method: str, assets: Path) -> dict:
    """The TrainConfig of the jsdr side as a dict (method defaults <- these settings), as tests/test_train.py
    builds it."""
    from jsdr import config as C
    from jsdr import methods, toy
    from jsdr.data.prompts import STUDENT_TEMPLATE
    data = {
        "method": method, "seed": args.seed,
        "model": {"path": str(assets / "model"), "dtype": args.dtype, "remat": "none" if args.no_remat else "full"},
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": str(assets / "train.jsonl"), "shuffle": False},
        "prompts": {"teacher": STUDENT_TEMPLATE + "\n\n" + toy.REFERENCE_HEADER + "\n{solution}",
                    "student_thinking": False, "teacher_thinking": False},
        "optim": {"learning_rate": args.lr, "schedule": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
        "train": {"steps": args.warmup + args.repeats, "per_device_batch": args.batch // args.grad_accum,
                  "grad_accum": args.grad_accum, "output_dir": str(assets / f"run_{method}"),
                  "seq_bucket": args.seq_bucket},
        "rollout": {"max_new_tokens": args.max_new_tokens},
        "mesh": {"num_devices": 1},
    }
    return C.merge_dicts(methods.get(method).defaults, data)


def build_assets(args, out: Path) -> dict:
    """Tokenizer + random model in out/model, the records in out/train.jsonl, and per method what the
    TRL worker needs (out/<method>.json: its settings, mapped from jsdr's resolved config, and every
    record with the token ids jsdr renders, to check TRL's tokenization against)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from jsdr import config as C
    from jsdr import toy
    from jsdr.data import prompts as P
    from jsdr.train import TrainConfig

    tok = build_tokenizer(args.vocab)
    stops = sorted({tok.convert_tokens_to_ids(t) for t in (toy.EOS_TOKEN, toy.PAD_TOKEN)})
    torch.manual_seed(args.seed)
    hc = Qwen3Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=4096,
                     tie_word_embeddings=args.tied, bos_token_id=None, eos_token_id=stops,
                     pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(hc, dtype=torch.float32)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    n_params = sum(p.numel() for p in model.parameters())
    cfgs = {m: C.from_dict(TrainConfig, jsdr_config_dict(args, m, out)) for m in args.methods}
    # records per step: sequences, or prompts of rollout.n completions (grpo); one spare step
    n_records = max(args.batch // (c.rollout.n if m == "grpo" else 1) for m, c in cfgs.items()) \
        * (args.warmup + args.repeats + 1)
    records = toy.make_problems(n_records, seed=args.seed, split="train", difficulty=args.difficulty)
    with open(out / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in ("problem", "solution", "answer")}) + "\n")
    lengths = {}
    for method, cfg in cfgs.items():
        pt = cfg.prompts
        rows = []
        for r in records:
            row = {"problem": r["problem"], "solution": r["solution"], "answer": r["answer"],
                   "student_text": P.fill(pt.student, problem=r["problem"]),
                   "student_ids": P.render_student(tok, r["problem"], pt)}
            if method == "sft":
                ex = P.render_sft_example(tok, r["problem"], r["solution"], pt)
                row["input_ids"] = ex.input_ids
                row["completion_mask"] = ex.loss_mask
            if method == "opsd":
                row["teacher_ids"] = P.render_teacher(tok, r["problem"], r["solution"], pt)
            rows.append(row)
        ro = cfg.rollout
        settings = {
            "jsdr": C.to_dict(cfg), "rows": rows, "reward": cfg.reward,
            "rollout": {"n": ro.n, "temperature": ro.temperature, "top_p": ro.top_p,
                        "top_k": 0 if ro.top_k == -1 else ro.top_k, "max_new_tokens": ro.max_new_tokens},
            "teacher_header": toy.REFERENCE_HEADER, "chat_template_kwargs": {"enable_thinking": pt.student_thinking},
        }
        lengths[method] = sorted({len(r.get("input_ids", r["student_ids"])) for r in rows})
        if pt.teacher_thinking != pt.student_thinking:
            raise SystemExit("the TRL side renders student and teacher with one thinking switch")
        (out / f"{method}.json").write_text(json.dumps(settings))
    return {"params": n_params, "vocab": len(tok), "records": n_records, "lengths": lengths}


# ---------------------------------------------------------------------------------------------
# memory


def mem_start(gpu: bool) -> int:
    if gpu == "torch":
        import torch
        torch.cuda.reset_peak_memory_stats()
        return 0
    if gpu == "jax":
        return 0
    return peak_reset()


def mem_end(gpu, base: int) -> tuple[int, int]:
    """(peak growth over `base`, absolute peak) since mem_start."""
    if gpu == "torch":
        import torch
        m = torch.cuda.max_memory_allocated()
        return m, m
    if gpu == "jax":
        import jax
        m = int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))
        return m, m
    return peak_since(base), peak_since(0)


def _protocol(tag: str, payload="") -> None:
    print(f"@@{tag} {payload}".rstrip(), flush=True)


# ---------------------------------------------------------------------------------------------
# the jsdr worker


def serve_jsdr(args, method: str, assets: Path) -> None:
    if args.threads and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from jsdr import hostmem
    from jsdr import config as C
    from jsdr import run, sharding
    from jsdr import train as TR
    from jsdr.losses import divergence
    from jsdr.losses.opsd import opsd_head_loss, teacher_hidden

    t_setup = time.perf_counter()
    cfg = C.from_dict(TR.TrainConfig, jsdr_config_dict(args, method, assets))
    tr = TR.Trainer(cfg, progress=False, log=lambda *a: None)
    settings = json.loads((assets / f"{method}.json").read_text())
    for r, row in zip(tr.take(0), settings["rows"]):  # the records of step 0 are rendered as the driver did
        if method == "sft":
            assert list(r["prompt_ids"]) + list(r["response_ids"]) == row["input_ids"], "SFT ids differ"
        else:
            assert r["prompt_ids"] == row["student_ids"], "student prompt ids differ"
        if method == "opsd":
            assert r["teacher_ids"] == row["teacher_ids"], "teacher prompt ids differ"
    acc: dict[str, float] = {}
    sample = tr._sample  # the sampler call that Trainer.sample (the method's rollouts) makes

    def timed_sample(*a, **k):
        t = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            acc["generate"] = acc.get("generate", 0.0) + time.perf_counter() - t
    tr._sample = timed_sample

    split = None
    if method == "opsd":  # teacher and student as two jits of their own, on the step's batch
        model, opts = tr.model, tr.method.options

        def teacher(lora, params, batch, ema):
            def one(mb):
                ht = teacher_hidden(lora, params, mb, model=model, cfg=opts, teacher_lora=ema)
                lp = divergence.token_logprobs(ht, mb.rollout_tokens, model.head_kernel(params),
                                               temperature=opts.temperature, chunk_size=opts.chunk_size)
                return ht, lp
            return jax.lax.map(one, batch)

        def student(lora, params, batch, hts):
            def loss(lo, mb, ht):
                hs = model.hidden(params, lo, mb.s_tokens, mb.s_positions, mb.s_segment_ids)
                hs = divergence.gather_positions(hs, mb.s_index)
                return opsd_head_loss(hs, ht, mb.rollout_tokens, mb.rollout_mask, model.head_kernel(params), opts)
            grad = jax.value_and_grad(loss, has_aux=True)
            return jax.lax.map(lambda x: grad(lora, x[0], x[1]), (batch, hts))
        split = {"teacher_fn": jax.jit(teacher), "student_fn": jax.jit(student)}
    gpu = "jax" if jax.devices()[0].platform != "cpu" else False
    base_key = jax.random.PRNGKey(cfg.seed)

    def step(k: int) -> dict:
        acc.clear()
        base = mem_start(gpu)
        t0 = time.perf_counter()
        rng_data = jax.random.split(jax.random.fold_in(base_key, k))[0]  # as Trainer.batch_for / run
        sb = tr.method.make_batch(tr.take(k), tr.state.lora, rng_data)
        t1 = time.perf_counter()
        n_compiled = tr.step_fn()._cache_size()
        with sharding.use_mesh(tr.mesh, tr.rules):
            batch = run.place_batch(sb.batch, tr.mesh, leading=1, rules=tr.rules)
            tr.state, metrics = tr.step_fn()(tr.state, tr.params, batch, jax.random.split(jax.random.fold_in(
                base_key, k))[1])
            jax.block_until_ready((tr.state, metrics))
        t2 = time.perf_counter()
        peak, peak_abs = mem_end(gpu, base)
        rec = {"step": t2 - t0, "train": t2 - t1, "tokens": sb.tokens, "gen_tokens": sb.rollout_tokens,
               "loss": float(metrics["loss"]), "peak": peak, "peak_abs": peak_abs,
               "compiled": tr.step_fn()._cache_size() - n_compiled}
        rec["data" if method == "sft" else "rollout"] = t1 - t0
        if "generate" in acc:
            rec["generate"] = acc["generate"]
        if split is not None:
            b = sb.batch
            rec["t_tokens"] = int(np.asarray(b.t_segment_ids).astype(bool).sum())
            rec["s_tokens"] = int(np.asarray(b.s_segment_ids).astype(bool).sum())
            with sharding.use_mesh(tr.mesh, tr.rules):
                t_args = (tr.state.lora, tr.params, batch, tr.state.ema)
                if "teacher" not in split:  # compiled once, outside the timing
                    split["teacher"] = split.pop("teacher_fn").lower(*t_args).compile()
                t = time.perf_counter()
                hts, _ = jax.block_until_ready(split["teacher"](*t_args))
                rec["teacher"] = time.perf_counter() - t
                s_args = (tr.state.lora, tr.params, batch, hts)
                if "student" not in split:
                    split["student"] = split.pop("student_fn").lower(*s_args).compile()
                t = time.perf_counter()
                jax.block_until_ready(split["student"](*s_args))
                rec["student"] = time.perf_counter() - t
        return rec

    info = {"device": jax.devices()[0].platform, "jax": jax.__version__, "malloc": hostmem.status(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "setup_s": time.perf_counter() - t_setup, "warmup_s": []}
    k = 0
    for _ in range(args.warmup):
        t = time.perf_counter()
        step(k)
        info["warmup_s"].append(time.perf_counter() - t)
        k += 1
    info["micro_batches"] = args.grad_accum
    _protocol("READY")
    steps = []
    for line in sys.stdin:
        if line.strip() == "step":
            steps.append(step(k))
            k += 1
            _protocol("TIME", steps[-1]["step"])
        elif line.strip() == "done":
            break
    info["steps"] = steps
    _protocol("RESULT", json.dumps(info))


# ---------------------------------------------------------------------------------------------
# the TRL worker


def serve_trl(args, method: str, assets: Path) -> None:
    sys.path.insert(0, str(REPO))
    from jsdr import hostmem  # the import sets the same glibc malloc settings as on the jsdr side
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    sys.path.insert(0, str(REPO))
    from jsdr.data.rewards import grade  # pure Python (no JAX): the same grader as the jsdr side

    t_setup = time.perf_counter()
    s = json.loads((assets / f"{method}.json").read_text())
    j, ro, rows = s["jsdr"], s["rollout"], s["rows"]
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tok = AutoTokenizer.from_pretrained(assets / "model")
    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=dtype)
    peft_config = LoraConfig(r=j["lora"]["rank"], lora_alpha=j["lora"]["alpha"], lora_dropout=j["lora"]["dropout"],
                             target_modules=list(j["lora"]["target_modules"]), task_type="CAUSAL_LM")
    o = j["optim"]
    common = dict(output_dir=str(assets / f"trl_{method}"), per_device_train_batch_size=args.batch // args.grad_accum,
                  gradient_accumulation_steps=args.grad_accum, learning_rate=o["learning_rate"],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=o["weight_decay"],
                  adam_beta1=o["b1"], adam_beta2=o["b2"], adam_epsilon=o["eps"], max_grad_norm=o["max_grad_norm"],
                  max_steps=args.warmup + args.repeats, logging_strategy="no", save_strategy="no", report_to="none",
                  disable_tqdm=True, seed=j["seed"], bf16=dtype == torch.bfloat16, fp16=False,
                  gradient_checkpointing=j["model"]["remat"] != "none", use_cpu=not gpu, dataloader_num_workers=0)
    chat_kwargs = s["chat_template_kwargs"]

    def user(text):
        return [{"role": "user", "content": text}]

    if method == "sft":
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
        cfg = SFTConfig(**common, completion_only_loss=True, packing=False, max_length=None,
                        train_sampling_strategy="sequential")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    elif method == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        g = j["grpo"]
        reward_method = s["reward"]

        def reward(prompts, completions, answer, **kw):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [float(grade(t, a, method=reward_method).correct) for t, a in zip(texts, answer)]
        reward.__name__ = f"jsdr_grade_{reward_method}"
        ds = Dataset.from_list([{"prompt": user(r["student_text"]), "answer": r["answer"]} for r in rows])
        cfg = GRPOConfig(**common, num_generations=ro["n"], max_completion_length=ro["max_new_tokens"],
                         temperature=ro["temperature"], top_p=ro["top_p"], top_k=ro["top_k"], use_vllm=False,
                         loss_type=g["aggregation"], epsilon=g["epsilon_low"], epsilon_high=g["epsilon_high"],
                         beta=g["beta"], scale_rewards=g["scale_rewards"],
                         importance_sampling_level=g["importance_sampling_level"], num_iterations=g["num_iterations"],
                         mask_truncated_completions=g["mask_truncated_completions"], shuffle_dataset=False,
                         chat_template_kwargs=chat_kwargs, log_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=peft_config)
    else:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
        od = j["opsd"]
        if od["temperature"] != ro["temperature"]:
            raise SystemExit("SDFT divides the logits by its sampling temperature: opsd.temperature must equal "
                             "rollout.temperature")
        if od["clip_tau"] is not None or od["variant"] != "full" or od["reduction"] != "sequence":
            raise SystemExit("SDFT has no opsd.clip_tau / variant / token reduction equivalent")
        ds = Dataset.from_list([{"prompt": user(r["student_text"]), "privileged_context": r["solution"]}
                                for r in rows])
        template = TEACHER_TEMPLATE_TRL.replace("{header}", s["teacher_header"])
        cfg = SDFTConfig(**common, num_generations=1, max_completion_length=ro["max_new_tokens"],
                         temperature=ro["temperature"], top_p=ro["top_p"], top_k=ro["top_k"], use_vllm=False,
                         distillation_mode="full_logits", distillation_alpha=od["beta"], distillation_is_clip=None,
                         teacher_model_kind={"fixed": "base", "live": "live", "ema": "ema"}[od["teacher"]],
                         teacher_update_rate=1.0 - od["ema_decay"], teacher_prompt_template=template,
                         max_prompt_length=None, shuffle_dataset=False, chat_template_kwargs=chat_kwargs)
        trainer = SDFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)

    # the prompts TRL renders are the token ids jsdr renders
    for r in rows[:4]:
        ids = tok.apply_chat_template(user(r["student_text"]), add_generation_prompt=True, tokenize=True,
                                      return_dict=True, **chat_kwargs)["input_ids"]
        if method != "sft" and list(ids) != r["student_ids"]:
            raise SystemExit(f"TRL's student prompt ids differ from jsdr's: {ids} vs {r['student_ids']}")
        if method == "opsd":
            t_ids = trainer._tokenize_prompts(trainer.teacher_context_builder.select_generation_prompts(
                [user(r["student_text"])], [r["solution"]]))[0]
            if list(t_ids) != r["teacher_ids"]:
                raise SystemExit(f"TRL's teacher prompt ids differ from jsdr's: {t_ids} vs {r['teacher_ids']}")

    # ---- phase timers: the trainer's own methods, wrapped on the instance
    acc: dict[str, float] = {}
    pending: dict[str, float] = {}  # the data collation of the next step (it runs before on_step_begin)
    state = {"in_loss": False, "last_train_end": 0.0}

    def add(d, key, v):
        d[key] = d.get(key, 0.0) + v

    def wrap(obj, name, key, when=None, after=None):
        fn = getattr(obj, name)

        def timed(*a, **k):
            if when is not None and not when():
                return fn(*a, **k)
            t = time.perf_counter()
            out = fn(*a, **k)
            add(acc, key, time.perf_counter() - t)
            if after is not None:
                after(out)
            return out
        setattr(obj, name, timed)

    def count_rollout(out):
        add(acc, "gen_tokens", int(out["completion_mask"].sum()))
        s_tok = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
        add(acc, "tokens", s_tok)
        if "teacher_attention_mask" in out:
            t_tok = int(out["teacher_attention_mask"].sum())
            add(acc, "tokens", t_tok)
            add(acc, "t_tokens", t_tok)
            add(acc, "s_tokens", s_tok)

    if method == "sft":
        collate = trainer.data_collator

        def timed_collate(examples):
            t = time.perf_counter()
            out = collate(examples)
            add(pending, "data", time.perf_counter() - t)
            add(pending, "tokens", int(out["attention_mask"].sum()))
            return out
        trainer.data_collator = timed_collate
    elif method == "grpo":
        wrap(trainer, "_generate_and_score_completions", "rollout", after=count_rollout)
        wrap(trainer, "_generate", "generate")
    else:
        wrap(trainer, "_prepare_training_batch", "rollout", after=count_rollout)
        wrap(trainer, "_generate", "generate")
        wrap(trainer, "_forward_logits", "teacher", when=lambda: state["in_loss"] and not torch.is_grad_enabled())
    loss_fn = trainer.compute_loss

    def timed_loss(*a, **k):
        state["in_loss"] = True
        t = time.perf_counter()
        try:
            out = loss_fn(*a, **k)
        finally:
            state["in_loss"] = False
        add(acc, "fwd", time.perf_counter() - t)
        return out
    trainer.compute_loss = timed_loss
    wrap(trainer.accelerator, "backward", "bwd")
    training_step = trainer.training_step

    def timed_training_step(*a, **k):
        out = training_step(*a, **k)
        state["last_train_end"] = time.perf_counter()
        return out
    trainer.training_step = timed_training_step
    gpu_mem = "torch" if gpu else False
    info = {"device": str(trainer.accelerator.device), "threads": torch.get_num_threads(), "malloc": hostmem.status(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "trainer": type(trainer).__name__, "optim": str(trainer.args.optim),
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "attn": getattr(model.config, "_attn_implementation", "?"), "warmup_s": []}
    steps: list[dict] = []

    class Turns(TrainerCallback):
        """Step k >= --warmup waits for the driver's "step"; every step is timed from on_step_begin to
        on_step_end (plus the collation of its batch, which the loop runs just before)."""

        def on_step_begin(self, args_, st, control, **kw):
            k = st.global_step
            if k == args.warmup:
                _protocol("READY")
            if k >= args.warmup:
                line = sys.stdin.readline().strip()
                if line != "step":
                    raise SystemExit(f"TRL worker: expected 'step', got {line!r}")
            acc.clear()
            acc.update(pending)
            pending.clear()
            self.base = mem_start(gpu_mem)
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, args_, st, control, **kw):
            acc["opt"] = time.perf_counter() - state["last_train_end"]  # grad norm, clip, optimizer.step

        def on_step_end(self, args_, st, control, **kw):
            t = time.perf_counter() - self.t0 + acc.get("data", 0.0)
            peak, peak_abs = mem_end(gpu_mem, self.base)
            k = st.global_step - 1
            if k < args.warmup:
                info["warmup_s"].append(t)
                return
            rec = {"step": t, "peak": peak, "peak_abs": peak_abs, **acc}
            rec["train"] = t - acc.get("rollout", 0.0) - acc.get("data", 0.0)
            if method == "opsd":
                rec["student"] = acc.get("fwd", 0.0) - acc.get("teacher", 0.0) + acc.get("bwd", 0.0)
            steps.append(rec)
            _protocol("TIME", t)

    trainer.add_callback(Turns())
    info["setup_s"] = time.perf_counter() - t_setup
    out = trainer.train()
    info["loss"] = float(out.training_loss)
    for line in sys.stdin:
        if line.strip() == "done":
            break
    info["steps"] = steps
    _protocol("RESULT", json.dumps(info))


# ---------------------------------------------------------------------------------------------
# the driver


class Worker:
    """A worker subprocess; its stderr goes to a log file (TRL and transformers write a lot there)."""

    def __init__(self, cmd, log: Path, env: dict):
        self.log = log
        self.err = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, bufsize=1, env=env)
        self.name = cmd[cmd.index("--worker") + 1]

    def _expect(self, tag):
        for line in self.proc.stdout:
            if line.startswith(f"@@{tag}"):
                return line[len(tag) + 2:].strip()
        self.err.flush()
        tail = self.log.read_text(errors="replace")[-6000:]
        raise SystemExit(f"worker {self.name} died (exit {self.proc.wait()}), its stderr ({self.log}):\n{tail}")

    def ready(self):
        self._expect("READY")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._expect("TIME"))

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        res = json.loads(self._expect("RESULT"))
        self.proc.stdin.close()
        self.proc.wait()
        self.err.close()
        return res


def worker_env(args, fw: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONUNBUFFERED="1")
    if fw == "jsdr":
        if args.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        else:
            env.pop("JAX_PLATFORMS", None)
    else:  # the TRL worker imports jsdr (its grader), which would apply jsdr.hostmem's settings
        env["JSDR_CPU_MALLOC"] = "1" if args.peer_malloc == "same" and args.device == "cpu" else "0"
    return env


def summarize(method: str, j: dict, t: dict) -> dict:
    """Per phase: median seconds, tokens/s of the medians, ratio jsdr/TRL, best ratio (fastest steps)."""
    rows = {}
    for phase in PHASES[method]:
        key = PHASE_TOKENS.get(phase, "tokens")
        side = {}
        for name, res in (("jsdr", j), ("trl", t)):
            recs = [r for r in res["steps"] if phase in r and r[phase] > 0]
            if not recs:
                side[name] = None
                continue
            secs = sorted(r[phase] for r in recs)
            toks = statistics.median(r.get(key, r.get("tokens", 0)) for r in recs)
            side[name] = {"median_s": statistics.median(secs), "best_s": secs[0], "tokens": toks,
                          "tokens_per_s": toks / statistics.median(secs),
                          "best_tokens_per_s": max(r.get(key, r.get("tokens", 0)) / r[phase] for r in recs)}
        row = {"jsdr": side["jsdr"], "trl": side["trl"]}
        if side["jsdr"] and side["trl"]:
            row["ratio"] = side["jsdr"]["tokens_per_s"] / side["trl"]["tokens_per_s"]
            row["best_ratio"] = side["jsdr"]["best_tokens_per_s"] / side["trl"]["best_tokens_per_s"]
        rows[phase] = row
    mem = {name: {"peak": max(r["peak"] for r in res["steps"]), "peak_abs": max(r["peak_abs"] for r in res["steps"])}
           for name, res in (("jsdr", j), ("trl", t))}
    extra = {}
    for part in ("fwd", "bwd", "opt"):
        vals = [r[part] for r in t["steps"] if part in r]
        if vals:
            extra[f"trl_{part}_s"] = statistics.median(vals)
    extra["jsdr_recompiled_steps"] = sum(1 for r in j["steps"] if r.get("compiled"))
    extra["jsdr_loss"] = statistics.median(r["loss"] for r in j["steps"])
    extra["trl_loss"] = t.get("loss")
    return {"phases": rows, "memory": mem, "extra": extra}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        fw, method, assets = args.worker.split(":", 2)
        (serve_jsdr if fw == "jsdr" else serve_trl)(args, method, Path(assets))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the driver only renders prompts with jsdr
    sys.path.insert(0, str(REPO))
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e \".[test,bench]\" (or pip install trl==1.16.0)") from None
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_train_")
    assets = Path(args.keep or tmp.name)
    assets.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    meta = build_assets(args, assets)
    print(f"Qwen3-architecture model: {meta['params'] / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {meta['vocab']}, {'tied' if args.tied else 'untied'}); {args.dtype} on {args.device}; LoRA "
          f"r={args.lora_rank} alpha={args.lora_alpha:g} on 7 projections; {args.batch} sequences per step in "
          f"{args.grad_accum} micro-batch(es); rollouts up to {args.max_new_tokens} tokens; prompt (sft: example) "
          f"tokens {meta['lengths']}; median of {args.repeats} steps after {args.warmup} warm-up "
          f"(assets built in {time.perf_counter() - t:.0f}s)", flush=True)
    results: dict = {}
    try:
        for method in args.methods:
            t = time.perf_counter()
            workers = {}
            for fw in ("jsdr", "trl"):  # set up (and warm up) one after the other
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{fw}:{method}:{assets}"] \
                    + _flags(args, skip=("worker", "json", "methods", "keep", "peer_malloc"))
                workers[fw] = Worker(cmd, assets / f"{fw}_{method}.log", worker_env(args, fw))
                workers[fw].ready()
            for r in range(args.repeats):  # alternate who goes first
                for fw in (("jsdr", "trl") if r % 2 == 0 else ("trl", "jsdr")):
                    time.sleep(args.pause)
                    workers[fw].step()
            res = {fw: w.finish() for fw, w in workers.items()}
            results[method] = {"jsdr": res["jsdr"], "trl": res["trl"], **summarize(method, res["jsdr"], res["trl"])}
            print(f"  {method:5s} done in {time.perf_counter() - t:.0f}s", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(args, meta, results)


def report(args, meta, results) -> None:
    any_res = next(iter(results.values()))
    j0, t0 = any_res["jsdr"], any_res["trl"]
    print(f"\njsdr: jax {j0['jax']} on {j0['device']} ({j0['cpus']} cpus); TRL {t0['trl']} (torch {t0['torch']}, "
          f"transformers {t0['transformers']}, peft {t0['peft']}) on {t0['device']} ({t0['threads']} threads, "
          f"attention {t0['attn']}, optim {t0['optim']})")
    print(f"malloc: jsdr: {j0.get('malloc')}; TRL: {t0.get('malloc')}")
    hdr = (f"{'method':<7}{'phase':<21}{'tokens':>7}{'jsdr s':>8}{'TRL s':>8}{'jsdr tok/s':>11}{'TRL tok/s':>10}"
           f"{'ratio':>7}{'best':>7}")
    print(hdr)
    print("-" * len(hdr))
    for method, res in results.items():
        for phase, row in res["phases"].items():
            j, t = row["jsdr"], row["trl"]
            cell = (lambda d, k, f: "-" if d is None else format(d[k], f))
            ratio = "-" if "ratio" not in row else f"{row['ratio']:.2f}"
            best = "-" if "best_ratio" not in row else f"{row['best_ratio']:.2f}"
            print(f"{method:<7}{PHASE_NAMES[phase]:<21}{cell(j or t, 'tokens', '.0f'):>7}{cell(j, 'median_s', '.3f'):>8}"
                  f"{cell(t, 'median_s', '.3f'):>8}{cell(j, 'tokens_per_s', '.0f'):>11}{cell(t, 'tokens_per_s', '.0f'):>10}"
                  f"{ratio:>7}{best:>7}")
        m, x = res["memory"], res["extra"]
        print(f"{method:<7}{'peak memory':<21}{'':>7}{fmt_bytes(m['jsdr']['peak_abs']):>9}"
              f"{fmt_bytes(m['trl']['peak_abs']):>9}   (ratio jsdr/TRL {m['jsdr']['peak_abs'] / max(m['trl']['peak_abs'], 1):.2f}; "
              f"growth during a step {fmt_bytes(m['jsdr']['peak'])} / {fmt_bytes(m['trl']['peak'])})")
        parts = ", ".join(f"{k[4:-2]} {v:.3f}s" for k, v in x.items() if k.startswith("trl_") and k.endswith("_s"))
        print(f"{'':7}{'':21}TRL train = {parts}; warm-up step jsdr {res['jsdr']['warmup_s'][0] if res['jsdr']['warmup_s'] else 0:.0f}s"
              f" / TRL {res['trl']['warmup_s'][0] if res['trl']['warmup_s'] else 0:.0f}s; loss jsdr {x['jsdr_loss']:.4f} / "
              f"TRL {x['trl_loss'] if x['trl_loss'] is not None else float('nan'):.4f}"
              + (f"; jsdr recompiled in {x['jsdr_recompiled_steps']} timed step(s)" if x["jsdr_recompiled_steps"] else ""))
    print("ratio = jsdr tok/s / TRL tok/s of the median step times (> 1: jsdr faster); best = the same of each side's "
          "fastest step; rollout/generate count generated tokens, the others the real tokens trained on; "
          "jsdr teacher/student: separate jits after the step (not part of it); peak memory: the process's peak "
          "RSS during a step (VmHWM, the largest over the timed steps; on GPU the device's peak), with its growth over "
          "the RSS at the step's start beside it")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "assets": meta, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
