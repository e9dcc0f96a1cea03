"""DLIP's distillation of a frozen BLIP teacher into a smaller BLIP student (docs/DLIP.md).

Nine terms, named as the released code names them, each with its own weight in the config
(``weight_<term without loss_>``, release weights 1; a term of weight 0 is not computed):

==================  ==========================================================================
``loss_img_dist``   1 - cos(student, teacher) of the normalised image features (mean over the batch)
``loss_text_dist``  the same for the normalised (unimodal) text features
``loss_vl_dist``    the same for the multimodal [ENC] state of the positive pairs, each through
                    its own model's ``text_proj``
``loss_vl_dec_dist`` the same for the decoder's last hidden state at position 0, each through its
                    own ``text_proj``
``loss_ita_dist``   ITC against the teacher's soft targets (below), both directions, averaged
``loss_kl``         KL(teacher || student) of the LM logits at every shifted position (padding
                    included), summed and divided by the number of positions, temperature 1
``loss_Sattn``      last layer, multimodal pass: text self-attention
``loss_Xattn``      last layer, multimodal pass: cross-attention to the image tokens
``loss_DXattn``     last layer, decoder: causal self-attention
==================  ==========================================================================

The attention terms treat each row of attention probabilities (every head, every query position)
as logits divided by ``distill_attn_temp`` (0.05): ``KL(softmax(t/T) || softmax(s/T))`` summed,
divided by the number of rows. ``nn.CosineEmbeddingLoss(margin)`` with target +1 is ``1 - cos``
whatever the margin, so no margin appears here.

Where ours differs from the release, deliberately:

- Any text length and image size: the release reshapes with 30 positions and 197 image tokens; here
  the shapes come from the tensors.
- Different head counts: the release needs equal ones (its reshape would misalign rows). When the
  student and teacher differ, each attention map is averaged over its heads first, so a row is one
  query position's head-averaged distribution (docs/DLIP.md). Equal head counts compare head by head,
  as the release.
- Different widths need nothing: every feature term compares ``embed_dim`` projections, each
  model through its own projection; the two ``embed_dim`` must agree (checked when the teacher is
  built), as must the vocabularies (the logit KL) and, for ``loss_Xattn``, the image token counts.

ITC soft targets (``distill_itc_targets``):

- ``release`` (default): the teacher's features against [the teacher's features of the batch ;
  the **student's** queues, after this step's enqueue], divided by the **student's** temperature;
  ``alpha * softmax + (1 - alpha) * diagonal``. The student's features go against the same keys.
- ``teacher``: a cleaner variant: the keys are the teacher's features of the batch only (the
  queues hold student-space features the teacher never produced), the teacher's soft targets use
  the teacher's own temperature, and the student's logits its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from pydantic import field_validator

from models.vit import ViTArch, known_vit_preset
from utils import dist as du
from utils.config import Config, NonNegFloat, PosFloat

TERMS = ("loss_img_dist", "loss_text_dist", "loss_vl_dist", "loss_vl_dec_dist", "loss_ita_dist", "loss_kl",
         "loss_Sattn", "loss_Xattn", "loss_DXattn")


def weight_key(term: str) -> str:
    """``loss_img_dist`` -> ``weight_img_dist``: the config key of a term's weight."""
    return "weight_" + term[len("loss_"):]


class DistillSettings(Config):
    """DLIP distillation (pretrain_blip.py with ``teacher``); weights default to the release's 1."""

    teacher: str = ''                           # a BLIP checkpoint with a decoder (model_base.pth layout); '' = no distillation
    teacher_vit: Union[str, ViTArch] = 'base'   # the teacher's ViT, given like `vit`
    teacher_med_config: str = 'configs/med_config.json'  # the teacher's text transformer
    distill_itc_targets: Literal['release', 'teacher'] = 'release'  # see models/distill.py
    distill_attn_temp: PosFloat = 0.05          # temperature on the attention probabilities
    distill_logit_temp: PosFloat = 1.0          # temperature of the LM logit KL
    weight_img_dist: NonNegFloat = 1.0
    weight_text_dist: NonNegFloat = 1.0
    weight_vl_dist: NonNegFloat = 1.0
    weight_vl_dec_dist: NonNegFloat = 1.0
    weight_ita_dist: NonNegFloat = 1.0
    weight_kl: NonNegFloat = 1.0
    weight_Sattn: NonNegFloat = 1.0
    weight_Xattn: NonNegFloat = 1.0
    weight_DXattn: NonNegFloat = 1.0

    _known_teacher_preset = field_validator("teacher_vit")(classmethod(lambda cls, vit: known_vit_preset(vit)))

    def distill_weights(self) -> Dict[str, float]:
        return {t: float(getattr(self, weight_key(t))) for t in TERMS}


# ---------------------------------------------------------------------- the terms (pure tensor functions)

def cosine_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - cos(student_i, teacher_i)`` (``CosineEmbeddingLoss``, target +1)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def soft_itc_distill(image_feat: torch.Tensor, text_feat: torch.Tensor, image_keys: torch.Tensor,
                     text_keys: torch.Tensor, image_feat_t: torch.Tensor, text_feat_t: torch.Tensor,
                     temp: torch.Tensor, alpha: float, temp_t: Optional[torch.Tensor] = None,
                     offset: int = 0) -> torch.Tensor:
    """ITC of the student's ``image_feat``/``text_feat`` ``[B, E]`` against keys ``[K, E]`` (keys
    ``offset .. offset + B - 1`` are the positives), with targets ``alpha * softmax(teacher query @
    keys / temp_t) + (1 - alpha) * diagonal``; ``temp_t`` defaults to ``temp`` (the release)."""
    temp_t = temp if temp_t is None else temp_t
    B = image_feat.shape[0]
    with torch.no_grad():
        diagonal = torch.zeros(B, text_keys.shape[0], device=image_feat.device)
        diagonal[:, offset:offset + B] = torch.eye(B, device=image_feat.device)
        t_i2t = alpha * F.softmax(image_feat_t @ text_keys.t() / temp_t, dim=1) + (1 - alpha) * diagonal
        t_t2i = alpha * F.softmax(text_feat_t @ image_keys.t() / temp_t, dim=1) + (1 - alpha) * diagonal
    loss_i2t = -(F.log_softmax(image_feat @ text_keys.t() / temp, dim=1) * t_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_keys.t() / temp, dim=1) * t_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KLDivLoss(reduction='sum')(log_softmax(s / T), softmax(t / T))`` divided by the number of
    rows; rows are the last dimension's vectors."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                    reduction="sum") / s.shape[0]


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DLIP's LM logit KL: positions ``0..T-2`` of ``[B, T, V]`` (those that predict a next token)."""
    return row_kl(student_logits[:, :-1], teacher_logits[:, :-1], temperature)


def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """DLIP's attention KL of ``[B, H, Q, K]`` probability maps, rows = (batch, head, query); with
    different head counts both maps are averaged over heads first (rows = (batch, query))."""
    if student_probs.shape[0] != teacher_probs.shape[0] or student_probs.shape[2:] != teacher_probs.shape[2:]:
        raise ValueError(f"attention maps of student {tuple(student_probs.shape)} and teacher "
                         f"{tuple(teacher_probs.shape)} do not cover the same queries and keys")
    if student_probs.shape[1] != teacher_probs.shape[1]:
        student_probs, teacher_probs = student_probs.mean(dim=1), teacher_probs.mean(dim=1)
    return row_kl(student_probs, teacher_probs, temperature)


# ---------------------------------------------------------------------- the teacher's side

@dataclass
class Views:
    """What distillation compares, from one model's forward of a batch."""
    image_feat: torch.Tensor              # [B, E] normalised
    text_feat: torch.Tensor               # [B, E] normalised (unimodal text pass)
    vl_state: torch.Tensor                # [B, D] multimodal [ENC] state, positive pairs
    mm_attentions: Tuple[torch.Tensor, torch.Tensor]  # last layer (self [B,H,T,T], cross [B,H,T,N])
    dec_state: torch.Tensor               # [B, D] decoder last hidden state at position 0
    dec_logits: torch.Tensor              # [B, T, V]
    dec_self_attention: torch.Tensor      # [B, H, T, T] last decoder layer


@torch.no_grad()
def teacher_views(teacher, pixel_values: Optional[torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, dec_ids: torch.Tensor,
                  image_tokens: Optional[torch.Tensor] = None) -> Views:
    """The frozen teacher's forward of the batch (eval mode is the caller's business: the teacher is
    built in eval mode and never switched). Given its ``image_tokens`` (already computed), only the
    multimodal and decoder passes run, and the unimodal features are left out (None)."""
    if image_tokens is None:
        image_tokens, image_feat = teacher.encode_image(pixel_values)
        _, text_feat = teacher.encode_text(input_ids, attention_mask)
    else:
        image_feat = text_feat = None
    mm = teacher.text_encoder(teacher.itm_input_ids(input_ids), attention_mask, mode="multimodal",
                              encoder_hidden_states=image_tokens, output_last_attentions=True)
    dec = teacher.text_decoder.bert(dec_ids, attention_mask, mode="decoder", encoder_hidden_states=image_tokens,
                                    output_last_attentions=True)
    logits = teacher.text_decoder.cls.predictions(dec.last_hidden_state)
    return Views(image_feat, text_feat, mm.last_hidden_state[:, 0], mm.last_attentions, dec.last_hidden_state[:, 0],
                 logits, dec.last_attentions[0])


def distillation_losses(student, teacher, s: Views, t: Views, image_keys: torch.Tensor, text_keys: torch.Tensor,
                        alpha: float, settings: DistillSettings) -> Dict[str, torch.Tensor]:
    """The terms of nonzero weight, unweighted. ``image_keys``/``text_keys`` ``[Q, E]``: the
    student's queues (after this step's enqueue) as rows, used by ``release`` ITC targets."""
    weights = settings.distill_weights()
    out: Dict[str, torch.Tensor] = {}
    if weights["loss_img_dist"]:
        out["loss_img_dist"] = cosine_distill(s.image_feat, t.image_feat)
    if weights["loss_text_dist"]:
        out["loss_text_dist"] = cosine_distill(s.text_feat, t.text_feat)
    if weights["loss_ita_dist"]:
        out["loss_ita_dist"] = soft_itc_terms(student, teacher, s.image_feat, s.text_feat, t.image_feat, t.text_feat,
                                              image_keys, text_keys, alpha, settings)
    out.update(per_pair_terms(student, teacher, s, t, settings))
    return {k: out[k] for k in TERMS if k in out}


def soft_itc_terms(student, teacher, image_feat, text_feat, image_feat_t, text_feat_t, image_keys, text_keys,
                   alpha: float, settings: DistillSettings) -> torch.Tensor:
    """``loss_ita_dist``: the student's features against the teacher's batch keys (this rank's, as
    the release, or every rank's with ``itc_all_rank_keys``, so N ranks x B equal one process on
    N*B) followed, for ``release`` targets, by the student's queues (``image_keys``/``text_keys``)."""
    img_t, txt_t, offset = image_feat_t, text_feat_t, 0
    if student.itc_all_rank_keys and du.get_world_size() > 1:
        img_t, txt_t = du.concat_all_gather(img_t), du.concat_all_gather(txt_t)
        offset = du.get_rank() * image_feat_t.shape[0]
    if settings.distill_itc_targets == "release":
        return soft_itc_distill(image_feat, text_feat, torch.cat([img_t, image_keys]), torch.cat([txt_t, text_keys]),
                                image_feat_t, text_feat_t, student.temp, alpha, offset=offset)
    return soft_itc_distill(image_feat, text_feat, img_t, txt_t, image_feat_t, text_feat_t, student.temp, alpha,
                            temp_t=teacher.temp.detach(), offset=offset)


def per_pair_terms(student, teacher, s: Views, t: Views, settings: DistillSettings) -> Dict[str, torch.Tensor]:
    """The terms that are means over rows of a fixed count per pair (multimodal and decoder states,
    LM logits, attention maps), of nonzero weight, unweighted."""
    weights = settings.distill_weights()
    out: Dict[str, torch.Tensor] = {}
    if weights["loss_vl_dist"]:
        out["loss_vl_dist"] = cosine_distill(student.text_proj(s.vl_state), teacher.text_proj(t.vl_state))
    if weights["loss_vl_dec_dist"]:
        out["loss_vl_dec_dist"] = cosine_distill(student.text_proj(s.dec_state), teacher.text_proj(t.dec_state))
    if weights["loss_kl"]:
        out["loss_kl"] = logit_kl(s.dec_logits, t.dec_logits, settings.distill_logit_temp)
    T = settings.distill_attn_temp
    if weights["loss_Sattn"]:
        out["loss_Sattn"] = attention_kl(s.mm_attentions[0], t.mm_attentions[0], T)
    if weights["loss_Xattn"]:
        out["loss_Xattn"] = attention_kl(s.mm_attentions[1], t.mm_attentions[1], T)
    if weights["loss_DXattn"]:
        out["loss_DXattn"] = attention_kl(s.dec_self_attention, t.dec_self_attention, T)
    return out


def check_teacher(student, teacher, settings: DistillSettings) -> None:
    """Shapes the terms need, checked once when the teacher is built (before any step)."""
    problems = []
    if student.embed_dim != teacher.embed_dim:
        problems.append(f"embed_dim: student {student.embed_dim}, teacher {teacher.embed_dim} (the feature terms "
                        "compare the two projections)")
    sv, tv = student.text_encoder.config.vocab_size, teacher.text_encoder.config.vocab_size
    if sv != tv and settings.weight_kl:
        problems.append(f"vocabulary: student {sv}, teacher {tv} tokens (loss_kl compares LM logits; "
                        "use one tokenizer)")
    sn, tn = student.visual_encoder.num_patches, teacher.visual_encoder.num_patches
    if sn != tn and settings.weight_Xattn:
        problems.append(f"image tokens: student {sn + 1}, teacher {tn + 1} (loss_Xattn compares cross-attention "
                        "over them; use one patch size, or weight_Xattn: 0)")
    if problems:
        raise ValueError(f"teacher {settings.teacher} cannot be distilled into this student: " + "; ".join(problems))
