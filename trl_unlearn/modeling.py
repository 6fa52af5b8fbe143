"""The one model wrapper: backbone once, the scored positions selected, the LM head applied there only.

Used by training (the policy and reference forwards), evaluation scoring, relearning and the reference precompute:
- `scored_hidden(model, input_ids, attention_mask, labels)`: final hidden states at the scored positions `[N, H]`,
  their next-token labels `[N]` and the position mask `[B, T-1]`;
- `head_transform(config)` / `head_logits(model, hidden)`: the model's own logit scaling and soft-capping, and the
  full fp32 logits of a few rows (evaluation statistics over the vocabulary);
- `forward_logps(model, ...)`: label log-probs `[B, T-1]` from the chunked head (`kernels.token_logps`), and
  optionally the entropy, the KL to a frozen teacher, and the scored hidden states; or, for training, a weighted sum
  of per-sequence losses with its gradients from the fused loss (`kernels.sequence_loss`);
- `add_unlearning_forward(model)`: THE one change to a model's forward, made once per model:
  `model(..., unlearning_forward=fn, **kw)` returns `fn(causal_lm, **kw)` instead of the class's forward. Every
  special forward of the package is such an `fn` (`forward_logps` here; `decoder_layers.layer_output` for RMU's
  activations at a layer). The trainers call the policy through its (DDP / DeepSpeed / FSDP) wrapper, whose hooks
  must run, so the switch travels as a keyword argument of the ordinary call. Without it the class's forward runs,
  so `generate` and plain calls are unchanged. `fn` must hold no module (a deep copy of the model, e.g. a
  relearning attack's, then runs its own weights).

Conventions: labels are unshifted `[B, T]` with -100 at unscored positions; position `t` of a `[B, T-1]` output
scores `labels[:, t + 1]`. A `peft.PeftModel` is unwrapped (LoRA layers live inside the base model's modules); an
adapter on the LM head itself is refused.
"""

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ._trl_compat import chunked_kl
from .kernels.sequence_loss import fused_linear_sequence_loss
from .kernels.tiles import DEFAULT_CHUNK_SIZE
from .kernels.token_logps import chunked_token_logps


@dataclass
class UnlearningLMOutput(ModelOutput):
    """`token_logps` `[B, T-1]` fp32 log-prob of each next-token label (0 where unscored); `entropy` `[B, T-1]` when
    asked; `token_kl` `[B, T-1]` KL(teacher ‖ model) at the teacher's positions (0 elsewhere) when a teacher was given;
    `hidden` `[N, H]` the final hidden states at the scored positions, when asked (a reference's, as a KL teacher).
    With a `sequence_loss`: `loss` (0-dim, with its gradients already computed by the fused op), `seq_logps` `[B]`
    the summed label log-prob of each row and `seq_losses` `[B]` each row's unweighted loss, instead of
    `token_logps`."""

    token_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    seq_logps: torch.Tensor | None = None
    seq_losses: torch.Tensor | None = None


@dataclass
class KLTeacher:
    """A frozen reference at some positions: `mask` `[B, T-1]` bool, its `hidden` `[mask.sum(), H]` states there, its
    LM-head `weight` `[V, H]` (and `bias`) and its `transform` `(logit_scale, softcap)`."""

    mask: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: tuple = (1.0, None)


def head_transform(config) -> tuple[float, float | None]:
    """`(logit_scale, softcap)` as the model's own forward applies them: Cohere `logit_scale` (multiplies), Granite
    `logits_scaling` (divides), Gemma 2/3 `final_logit_softcapping`."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    logit_scale = getattr(config, "logit_scale", None)
    if logit_scale is None and getattr(config, "logits_scaling", None) is not None:
        logit_scale = 1.0 / config.logits_scaling
    return (1.0 if logit_scale is None else float(logit_scale)), getattr(config, "final_logit_softcapping", None)


def causal_lm(model):
    """The transformers causal LM inside `model` (a `PeftModel`'s base model), with a plain LM head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise ValueError(
            "The LM head carries a PEFT adapter or modules_to_save, which the chunked head would ignore: remove "
            "lm_head from the PEFT `target_modules` / `modules_to_save`."
        )
    return model


def lm_head(model):
    """`(weight [V, H], bias [V] or None, (logit_scale, softcap))` of the model's LM head."""
    model = causal_lm(model)
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None), head_transform(model.config)


def scored_hidden(model, input_ids, attention_mask=None, labels=None, **backbone_kwargs):
    """Backbone once -> `(hidden [N, H], targets [N], mask [B, T-1])` at the N scored positions. `labels` defaults
    to `input_ids` with padding (`attention_mask == 0`) set to -100."""
    model = causal_lm(model)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    backbone_kwargs["use_cache"] = False
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)[0][:, :-1]
    device = model.get_output_embeddings().weight.device
    hidden, targets = hidden.to(device), labels[:, 1:].to(device)
    mask = targets != -100
    return hidden[mask], targets[mask], mask


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 model logits `[n, V]` of a few rows of final hidden states `[n, H]`, with the model's transform."""
    weight, bias, (logit_scale, softcap) = lm_head(model)
    logits = torch.nn.functional.linear(hidden.to(weight.device), weight, bias).float() * logit_scale
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # masked_scatter keeps the result attached to the graph even when nothing is scored
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def teacher_kl(hidden, mask, weight, bias, transform, kl_teacher: KLTeacher) -> torch.Tensor:
    """KL(teacher ‖ model) `[n]` fp32 over the full vocabulary at the teacher's n positions, from the model's scored
    hidden states `hidden` `[N, H]` (positions `mask` `[B, T-1]`; the teacher's are a subset), its head and its
    `transform` `(logit_scale, softcap)`, without `[N, V]` logits (TRL's chunked divergence)."""
    rows = kl_teacher.mask[mask]
    kl = chunked_kl(
        hidden[rows],
        weight,
        bias,
        kl_teacher.hidden,
        kl_teacher.weight,
        kl_teacher.bias,
        student_transform=transform,
        teacher_transform=kl_teacher.transform,
    )
    return kl.float()


def forward_logps(
    model,
    input_ids=None,
    attention_mask=None,
    labels=None,
    *,
    return_entropy=False,
    kl_teacher=None,
    return_hidden=False,
    sequence_loss=None,
    seq_weights=None,
    per_token=False,
    chunk_size=DEFAULT_CHUNK_SIZE,
    temperature=1.0,
    **backbone_kwargs,
) -> UnlearningLMOutput:
    """Label log-probs of a causal LM (see the module docstring) without the `[B, T, V]` logits. With
    `sequence_loss` (`[B]` summed log-probs -> `[B]` losses, elementwise) and `seq_weights` `[B]` it returns their
    weighted sum from the fused loss op instead, for training (`kernels/sequence_loss.py`). With `per_token=True`
    every scored token is its own "sequence" (`seq_lengths` of ones): `sequence_loss` and `seq_weights` then run
    over the `N` scored tokens in row-major order (`mask.nonzero()`), and `seq_logps` / `seq_losses` are `[N]`
    (token-level losses: WGA, SatImp)."""
    hidden, targets, mask = scored_hidden(model, input_ids, attention_mask, labels, **backbone_kwargs)
    weight, bias, (logit_scale, softcap) = lm_head(model)
    out = UnlearningLMOutput(hidden=hidden if return_hidden else None)
    if sequence_loss is not None:
        seq_lengths = torch.ones_like(targets) if per_token else mask.sum(-1)
        out.loss, out.seq_logps, out.seq_losses = fused_linear_sequence_loss(
            hidden,
            weight,
            targets,
            seq_lengths,
            sequence_loss,
            bias,
            seq_weights=seq_weights,
            logit_scale=logit_scale,
            softcap=softcap,
            temperature=temperature,
            chunk_rows=chunk_size,
        )
    else:
        logps = chunked_token_logps(
            hidden,
            weight,
            targets,
            bias,
            chunk_size=chunk_size,
            logit_scale=logit_scale,
            softcap=softcap,
            temperature=temperature,
            return_entropy=return_entropy,
        )
        logps, entropy = logps if return_entropy else (logps, None)
        out.token_logps = _scatter(mask, logps)
        if entropy is not None:
            out.entropy = _scatter(mask, entropy)
    if kl_teacher is not None:
        out.token_kl = _scatter(
            kl_teacher.mask, teacher_kl(hidden, mask, weight, bias, (logit_scale, softcap), kl_teacher)
        )
    return out


def add_unlearning_forward(model) -> None:
    """Patch `model.forward` (of the causal LM inside a PEFT wrapper) once, as the module docstring describes."""
    model = causal_lm(model)
    if getattr(model.forward, "_unlearning_forward", False):
        return
    cls = type(model)

    @functools.wraps(cls.forward)
    def forward(self, *args, unlearning_forward=None, **kwargs):
        if unlearning_forward is None:
            return cls.forward(self, *args, **kwargs)
        return unlearning_forward(self, *args, **kwargs)

    forward._unlearning_forward = True
    model.forward = types.MethodType(forward, model)
