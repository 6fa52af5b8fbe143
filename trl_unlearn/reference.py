"""The reference model: which one a run uses (`plan_reference`, a pure decision) and its forwards.

Where π_ref comes from, for NPO's forget term and for the retain KL (`retain_loss_type="kl"`):
| plan          | when                                                                 | held during training |
|---------------|----------------------------------------------------------------------|----------------------|
| `none`        | the method needs no reference (SimNPO, GA, GradDiff with NLL)        | nothing              |
| `explicit`    | a `ref_model` was passed                                             | that model           |
| `adapters_off`| a PEFT model and no `ref_model`: the base with adapters disabled     | nothing extra        |
| `precomputed` | NPO forget log-probs computed once before training (automatic when   | nothing              |
|               | no `ref_model`, no PEFT and no KL, or `precompute_ref_log_probs=True`)|                      |
| `frozen_copy` | a live reference is needed and none was given: a frozen copy of the  | a second model       |
|               | initial model (deep-copied, or loaded again by TRL from a path)      |                      |
"""

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model

from ._trl_compat import use_adapter
from .modeling import KLTeacher, forward_logps, lm_head

PLANS = ("none", "explicit", "adapters_off", "precomputed", "frozen_copy")


@dataclass(frozen=True)
class ReferencePlan:
    """`kind` (one of `PLANS`); `precompute_forget`: NPO's forget reference log-probs are precomputed; `live`: a
    reference forward runs during training; `copy_model`: keep a deep copy of the model given as an instance."""

    kind: str
    precompute_forget: bool = False
    live: bool = False
    copy_model: bool = False

    def describe(self) -> str:
        return {
            "none": "none (reference-free)",
            "explicit": "the reference model passed as `ref_model`",
            "adapters_off": "the base model with the PEFT adapters disabled",
            "precomputed": "the initial model; its forget-set log-probs precomputed before training",
            "frozen_copy": "a frozen copy of the initial model",
        }[self.kind]


def plan_reference(
    *,
    forget_needs_reference: bool,
    retain_kl: bool,
    precompute: bool | None,
    has_ref_model: bool,
    uses_peft: bool,
    model_is_instance: bool,
    method: str = "This trainer",
) -> ReferencePlan:
    """Decide the reference (see the module table). `precompute` is the config's `precompute_ref_log_probs`
    (None: automatic). Raises when the settings contradict each other."""
    if has_ref_model and not forget_needs_reference:
        raise ValueError(
            f"{method} is reference-free: remove `ref_model`. (With `retain_loss_type='kl'` the reference is the "
            "initial model, kept automatically.)"
        )
    if precompute is None:
        precompute = not has_ref_model and not uses_peft and not retain_kl
    if precompute and retain_kl and not has_ref_model and not uses_peft:
        raise ValueError(
            "`retain_loss_type='kl'` needs a live reference model during training, but "
            "`precompute_ref_log_probs=True` and no `ref_model` was given. Set `precompute_ref_log_probs=False` "
            "(a frozen copy of the initial model is then kept), pass a `ref_model`, or train with PEFT."
        )
    precompute_forget = forget_needs_reference and bool(precompute)
    live = (forget_needs_reference and not precompute_forget) or retain_kl
    if precompute_forget and not retain_kl:
        return ReferencePlan("precomputed", precompute_forget=True)
    if not live:
        return ReferencePlan("none")
    if has_ref_model:
        kind = "explicit"
    elif uses_peft:
        kind = "adapters_off"
    else:
        kind = "frozen_copy"
    return ReferencePlan(
        kind, precompute_forget=precompute_forget, live=True, copy_model=kind == "frozen_copy" and model_is_instance
    )


@contextlib.contextmanager
def activation_checkpointing_off(model, checkpointing_kwargs=None):
    """Activation checkpointing off for the block (a reference forward keeps no activations), restored after.
    transformers 5 names it `activation_checkpointing`; older 5.x releases only `gradient_checkpointing`."""
    new = hasattr(model, "is_activation_checkpointing")
    enabled = model.is_activation_checkpointing if new else model.is_gradient_checkpointing
    if enabled:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    try:
        yield
    finally:
        if enabled:
            (model.activation_checkpointing_enable if new else model.gradient_checkpointing_enable)(
                checkpointing_kwargs
            )


@contextlib.contextmanager
def reference_context(policy, unwrapped, ref_model, gradient_checkpointing_kwargs=None):
    """A reference forward: no grad, no activation checkpointing, and adapters off when the reference is the PEFT
    base of `unwrapped` (the policy without its DDP / DeepSpeed wrapper)."""
    adapter = contextlib.nullcontext()
    if ref_model is None and is_peft_model(unwrapped):
        adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    with torch.no_grad(), activation_checkpointing_off(policy, gradient_checkpointing_kwargs), adapter:
        yield


def scored_labels(batch, rows=None) -> torch.Tensor:
    """Labels `[B, T]` of a collated batch: its tokens where `completion_mask` is 1 (and the row is in `rows`,
    a `[B]` bool mask), else -100."""
    keep = batch["completion_mask"] != 0
    if rows is not None:
        keep = keep & rows[:, None]
    return batch["input_ids"].masked_fill(~keep, -100)


def reference_forward(model, batch, labels, return_hidden=False):
    """The (patched) reference `model`'s forward on a collated batch: an `UnlearningLMOutput`."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        unlearning_forward=forward_logps,
        return_hidden=return_hidden,
    )


def kl_teacher(reference, ref_unwrapped, batch, rows) -> KLTeacher:
    """The reference's hidden states at the scored positions of the `rows` (retain rows), for the chunked KL."""
    labels = scored_labels(batch, rows)
    out = reference_forward(reference, batch, labels, return_hidden=True)
    weight, bias, transform = lm_head(ref_unwrapped)
    return KLTeacher(mask=labels[:, 1:] != -100, hidden=out.hidden, weight=weight, bias=bias, transform=transform)
