"""The trainers' model forward: backbone once, then label log-probs (and retain KL) from a chunked LM head.

`add_unlearning_head(model)` patches `model.forward` so that
`model(input_ids, attention_mask, labels=labels, fused_logps=True)` returns `UnlearningLMOutput` instead of logits.
The loss runs inside the (possibly DDP / DeepSpeed-wrapped) model's forward, which ZeRO-3 needs for its hooks.
Without `fused_logps` the original class forward runs, so `generate` is unchanged.
"""

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from .ops import _head_transform, chunked_token_logps


@dataclass
class UnlearningLMOutput(ModelOutput):
    """`token_logps` `[B, T-1]` fp32 log-prob of each next-token label (0 where unscored); `token_kl` `[B, T-1]`
    KL(teacher ‖ model) at the teacher's positions (0 elsewhere), when a teacher was given; `hidden` `[N, H]` the
    final hidden states at the scored positions, when asked (a reference model's, to serve as a KL teacher)."""

    token_logps: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class KLTeacher:
    """A frozen reference at some positions: `mask` `[B, T-1]` bool, its `hidden` `[mask.sum(), H]` states there and
    its LM-head `weight` `[V, H]` (and `bias`)."""

    mask: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # masked_scatter keeps the result attached to the graph even when nothing is scored
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _unlearning_forward(
    self, input_ids=None, attention_mask=None, labels=None, fused_logps=False, kl_teacher=None, return_hidden=False,
    **kwargs,
):
    if not fused_logps:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    kwargs["use_cache"] = False
    hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state[:, :-1]
    head = self.get_output_embeddings()
    hidden = hidden.to(head.weight.device)
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != -100
    scored = hidden[mask]
    logit_scale, softcap = _head_transform(self.config)  # Cohere / Granite scaling, Gemma soft-capping
    logps = chunked_token_logps(scored, head.weight, targets[mask], bias=head.bias, logit_scale=logit_scale,
                                softcap=softcap)
    out = UnlearningLMOutput(token_logps=_scatter(mask, logps), hidden=scored if return_hidden else None)
    if kl_teacher is not None:
        kl, _ = ChunkedDivergenceFunction.apply(
            hidden[kl_teacher.mask], head.weight, head.bias, kl_teacher.hidden, kl_teacher.weight, kl_teacher.bias, 0.0
        )
        out.token_kl = _scatter(kl_teacher.mask, kl.float())
    return out


def add_unlearning_head(model) -> None:
    """Patch `model.forward` (a transformers causal LM, not a PEFT wrapper) as described in the module docstring."""
    forward = functools.wraps(type(model).forward)(_unlearning_forward)
    model.forward = types.MethodType(forward, model)
