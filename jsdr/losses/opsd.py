"""On-Policy Self-Distillation (OPSD): the student (problem only) is pulled towards the teacher (the
same model whose prompt also holds the reference solution) on the student's own rollout, token by
token, over the full vocabulary.

Batch (numpy or jax arrays; `build_opsd_batch` makes one):
    s_tokens, s_positions, s_segment_ids   int32 [B, Ts]  student prompt + rollout
    t_tokens, t_positions, t_segment_ids   int32 [B, Tt]  teacher prompt + rollout
    s_index, t_index                       int32 [B, N]   the hidden state at s_index[b, j] of the
                                                          student sequence (t_index[b, j] of the
                                                          teacher's) predicts rollout_tokens[b, j]
    rollout_tokens                         int32 [B, N]
    rollout_mask                           f32   [B, N]   1 for real rollout tokens
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdr.losses import divergence as D
from jsdr.losses.common import check_choice, check_chunk, check_range, hidden
from jsdr.model.transformer import ModelConfig, lm_head_kernel

VARIANTS = ("full", "sampled_token", "top_k")
TEACHERS = ("fixed", "live", "ema")
REDUCTIONS = ("sequence", "token")
CLIP_MODES = ("token", "vocab")


@dataclasses.dataclass(frozen=True)
class OPSDConfig:
    """OPSD options (defaults: paper v1; v3 is beta=0.0, clip_tau=0.05).

    beta: generalized-JSD weight, TRL convention (0 = forward KL(p_T || p_S), 1 = reverse KL).
    temperature: both roles' logits are divided by it (the sampling temperature; public code 1.1).
    clip_tau: cap on each token's divergence (clip_mode "token") or on each vocabulary entry's
        contribution to it (clip_mode "vocab", what the public code does); None = no clip.
    reduction: "sequence" (mean over each rollout's tokens, then over the non-empty rollouts: the
        paper's objective) or "token" (mean over all rollout tokens of the batch: the public code).
    variant: "full" (whole vocabulary), "sampled_token" (a_t = sg(log p_T(y_t) - log p_S(y_t)),
        term -a_t log p_S(y_t)), "top_k" (both distributions restricted to the teacher's top_k
        tokens and renormalised).
    teacher: "fixed" (base weights, LoRA off: the paper), "live" (current weights incl. LoRA,
        stop-gradient) or "ema" (the `teacher_lora` tree passed to the loss; see `ema_update`).
    chunk_size: rollout positions per lm-head chunk (None = one chunk).
    """

    beta: float = 0.5
    temperature: float = 1.1
    clip_tau: float | None = None
    clip_mode: str = "token"
    reduction: str = "sequence"
    variant: str = "full"
    top_k: int = 20
    teacher: str = "fixed"
    ema_decay: float = 0.999
    chunk_size: int | None = D.DEFAULT_CHUNK

    def __post_init__(self):
        n = "OPSDConfig"
        check_range(n, "beta", self.beta, 0.0, 1.0)
        check_range(n, "temperature", self.temperature, 0.0, None, lo_open=True)
        if self.clip_tau is not None:
            check_range(n, "clip_tau", self.clip_tau, 0.0, None, lo_open=True)
            if self.variant == "sampled_token":
                raise ValueError("OPSDConfig.clip_tau is only supported with variant 'full' or 'top_k' "
                                 "(the sampled-token term is not a divergence); set clip_tau=None")
        check_choice(n, "clip_mode", self.clip_mode, CLIP_MODES)
        check_choice(n, "reduction", self.reduction, REDUCTIONS)
        check_choice(n, "variant", self.variant, VARIANTS)
        check_choice(n, "teacher", self.teacher, TEACHERS)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"OPSDConfig.top_k={self.top_k!r} must be a positive int")
        check_range(n, "ema_decay", self.ema_decay, 0.0, 1.0)
        check_chunk(n, self.chunk_size)


def ema_update(ema, lora, decay: float):
    """decay * ema + (1 - decay) * lora, leaf by leaf (each result keeps the dtype of `ema`)."""
    return jax.tree.map(lambda e, x: (decay * e.astype(jnp.float32)
                                      + (1.0 - decay) * jax.lax.stop_gradient(x).astype(jnp.float32)).astype(e.dtype),
                        ema, lora)


def opsd_head_loss(s_hidden, t_hidden, rollout_tokens, rollout_mask, kernel, cfg: OPSDConfig = OPSDConfig(),
                   t_kernel=None):
    """The OPSD loss from hidden states gathered at the rollout positions ([B, N, E] each).

    Returns (loss, metrics): div_mean (unclipped divergence, mean over tokens), div_max (per-token
    max), clip_frac (fraction of tokens the clip changed), student_entropy / teacher_entropy (mean
    over tokens, of the full tempered distributions), n_tokens."""
    if kernel.shape[-1] < cfg.top_k and cfg.variant == "top_k":
        raise ValueError(f"OPSDConfig.top_k={cfg.top_k} exceeds the vocabulary size {kernel.shape[-1]}")
    mask = jnp.asarray(rollout_mask, jnp.float32)
    terms = D.opsd_head(s_hidden, t_hidden, rollout_tokens, kernel, beta=cfg.beta, temperature=cfg.temperature,
                        clip_tau=cfg.clip_tau, clip_mode=cfg.clip_mode, variant=cfg.variant, top_k=cfg.top_k,
                        chunk_size=cfg.chunk_size, t_kernel=t_kernel)
    if cfg.reduction == "sequence":
        loss = D.sequence_mean(terms["loss"], mask)
    else:
        loss = D.token_mean(terms["loss"], mask)
    metrics = {
        "loss": loss,
        "div_mean": D.token_mean(terms["div"], mask),
        "div_max": D.masked_max(terms["div"], mask),
        "clip_frac": D.token_mean(terms["clipped"], mask),
        "student_entropy": D.token_mean(terms["s_ent"], mask),
        "teacher_entropy": D.token_mean(terms["t_ent"], mask),
        "n_tokens": jnp.sum(mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _teacher_lora(lora, teacher_lora, cfg: OPSDConfig):
    if cfg.teacher == "fixed":
        return None
    if cfg.teacher == "live":
        return None if lora is None else jax.lax.stop_gradient(lora)
    if teacher_lora is None:
        raise ValueError("OPSDConfig.teacher='ema' needs the EMA LoRA tree: pass teacher_lora=...")
    return jax.lax.stop_gradient(teacher_lora)


def teacher_hidden(lora, params, batch, *, model_cfg: ModelConfig, cfg: OPSDConfig = OPSDConfig(),
                   lora_scale: float = 1.0, teacher_lora=None, remat: str = "none", attn_impl: str = "xla",
                   dtype=None):
    """The teacher's final hidden states at the rollout positions [B, N, E] (stop-gradient)."""
    tl = _teacher_lora(lora, teacher_lora, cfg)
    h = hidden(params, tl, batch["t_tokens"], batch["t_positions"], batch["t_segment_ids"], model_cfg, lora_scale,
               remat, attn_impl, dtype)
    return jax.lax.stop_gradient(D.gather_positions(h, batch["t_index"]))


def teacher_logprobs(lora, params, batch, *, model_cfg: ModelConfig, cfg: OPSDConfig = OPSDConfig(),
                     lora_scale: float = 1.0, teacher_lora=None, **fwd):
    """log p_T(rollout_tokens[b, j]) [B, N] at the OPSD temperature (diagnostics and tests)."""
    ht = teacher_hidden(lora, params, batch, model_cfg=model_cfg, cfg=cfg, lora_scale=lora_scale,
                        teacher_lora=teacher_lora, **fwd)
    return D.token_logprobs(ht, batch["rollout_tokens"], lm_head_kernel(params, model_cfg),
                            temperature=cfg.temperature, chunk_size=cfg.chunk_size)


def opsd_loss(lora, params, batch, rng=None, *, model_cfg: ModelConfig, cfg: OPSDConfig = OPSDConfig(),
              lora_scale: float = 1.0, teacher_lora=None, remat: str = "none", attn_impl: str = "xla",
              dtype=None, lora_dropout: float = 0.0):
    """(loss f32, metrics) of one OPSD micro-batch; differentiable w.r.t. `lora` (the student).

    The teacher forward is stop-gradient and uses base weights ("fixed"), the current LoRA
    ("live") or `teacher_lora` ("ema"). `rng` is used only for LoRA dropout (lora_dropout > 0,
    student forward only; the teacher never drops)."""
    fwd = dict(remat=remat, attn_impl=attn_impl, dtype=dtype)
    hs = hidden(params, lora, batch["s_tokens"], batch["s_positions"], batch["s_segment_ids"], model_cfg, lora_scale,
                lora_dropout=lora_dropout, rng=rng, **fwd)
    hs = D.gather_positions(hs, batch["s_index"])
    ht = teacher_hidden(lora, params, batch, model_cfg=model_cfg, cfg=cfg, lora_scale=lora_scale,
                        teacher_lora=teacher_lora, **fwd)
    return opsd_head_loss(hs, ht, batch["rollout_tokens"], batch["rollout_mask"], lm_head_kernel(params, model_cfg),
                          cfg)


# ---------------------------------------------------------------------------------------------
# batch building


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
                     pad_id: int = 0) -> dict[str, np.ndarray]:
    """Student and teacher sequences (prompt + rollout, each role with its own prompt) and the
    explicit alignment of the rollout tokens.

    Row b of each role is `prompt_b + rollout_b`, left- or right-padded to the role's length
    (default: the longest row), positions 0.. over the real tokens, segment id 1 (0 = padding).
    Rollout token j of row b is predicted by the hidden state at s_index[b, j] = (start of the
    student prompt) + len(student prompt) - 1 + j, and likewise t_index in the teacher sequence: the
    first rollout token is predicted by the *last prompt position* of each role. Rollouts shorter
    than `rollout_len` (default: the longest) are padded with `pad_id`, mask 0 and index 0."""
    check_choice("build_opsd_batch", "padding", padding, ("left", "right"))
    if not (len(student_prompts) == len(teacher_prompts) == len(rollouts)):
        raise ValueError(f"build_opsd_batch: {len(student_prompts)} student prompts, {len(teacher_prompts)} teacher "
                         f"prompts and {len(rollouts)} rollouts; the counts must match")
    B = len(rollouts)
    lens = [len(r) for r in rollouts]
    N = max(lens + [1]) if rollout_len is None else rollout_len
    for b, n in enumerate(lens):
        if n > N:
            raise ValueError(f"row {b}: rollout of {n} tokens exceeds rollout_len={N}")
    s_len = max(len(p) + n for p, n in zip(student_prompts, lens)) if student_len is None else student_len
    t_len = max(len(p) + n for p, n in zip(teacher_prompts, lens)) if teacher_len is None else teacher_len
    out = {k: np.zeros((B, s_len), np.int32) for k in ("s_tokens", "s_positions", "s_segment_ids")}
    out.update({k: np.zeros((B, t_len), np.int32) for k in ("t_tokens", "t_positions", "t_segment_ids")})
    out.update(s_index=np.zeros((B, N), np.int32), t_index=np.zeros((B, N), np.int32),
               rollout_tokens=np.full((B, N), pad_id, np.int32), rollout_mask=np.zeros((B, N), np.float32))
    for b in range(B):
        r = list(rollouts[b])
        for role, prompts, L in (("s", student_prompts, s_len), ("t", teacher_prompts, t_len)):
            tok, pos, seg, first = _pad_row(prompts[b], r, L, padding, pad_id,
                                            "student" if role == "s" else "teacher", b)
            out[f"{role}_tokens"][b], out[f"{role}_positions"][b], out[f"{role}_segment_ids"][b] = tok, pos, seg
            out[f"{role}_index"][b, :len(r)] = first + np.arange(len(r))
        out["rollout_tokens"][b, :len(r)] = r
        out["rollout_mask"][b, :len(r)] = 1.0
    return out
