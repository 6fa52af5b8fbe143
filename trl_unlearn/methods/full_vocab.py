"""`FullVocabUnlearningTrainer`: the loss of the methods whose forget term needs each forget token's whole
next-token distribution (UNDIAL, CE-U, PDU), plus the retain NLL or KL.

One forward over forget and retain rows together: `vocab_loss_forward` (an `unlearning_forward=` function) runs the
backbone once, takes the hidden states at the scored positions and hands them to `kernels.vocab_loss.fused_vocab_loss`:
the method's loss on the forget rows, the NLL on the retain rows, gradients computed tile by tile without `(B, T, V)`
logits. A retain KL (`retain_loss_type="kl"`) runs the chunked KL on the retain rows instead. A method sets
`vocab_loss_kind` and, where it needs them, `forget_labels` (CE-U drops the first answer tokens), `forget_teacher`
(UNDIAL's frozen teacher) and `retain_coefficient` / `loss_offset` (PDU's dual variable).

Normalisation: every term is a token mean over the optimizer step (`StepCounts`): the forget term by the step's
forget tokens (`forget_token_count`), the retain term by its retain tokens.
"""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..kernels.tiles import DEFAULT_CHUNK_SIZE
from ..kernels.vocab_loss import VocabTeacher, fused_vocab_loss
from ..losses import LossStats
from ..modeling import lm_head, scored_hidden, teacher_kl
from ..reference import kl_teacher, reference_context, scored_labels
from .base import UnlearningTrainer


@dataclass
class VocabLossOutput(ModelOutput):
    """`loss` (0-dim, gradients computed by the fused op); `row_losses` / `row_logps` `[N']` the unweighted loss and
    the label log-prob of each row the kernel scored, `num_forget` forget rows first, then the retain rows (none with
    a KL retain term); `retain_kl` `[N_r]` the KL(teacher ‖ model) of each retain row when a KL teacher was given."""

    loss: torch.Tensor | None = None
    row_losses: torch.Tensor | None = None
    row_logps: torch.Tensor | None = None
    num_forget: int | None = None
    retain_kl: torch.Tensor | None = None


def vocab_loss_forward(
    model,
    input_ids=None,
    attention_mask=None,
    labels=None,
    *,
    forget_rows,
    kind,
    forget_row_weight,
    retain_row_weight=None,
    beta=0.0,
    teacher=None,
    kl_teacher=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    **backbone_kwargs,
) -> VocabLossOutput:
    """One forward of the causal LM `model` on a forget+retain batch (`forget_rows` `[B]` bool; `labels` `[B, T]`
    with -100 at unscored positions): `kind`'s loss on the forget rows' scored positions, weighted by
    `forget_row_weight`, plus the NLL of the retain rows' weighted by `retain_row_weight` (None: no retain NLL rows).
    `teacher`: UNDIAL's `VocabTeacher` at the forget rows; `kl_teacher`: `modeling.KLTeacher` at the retain rows."""
    hidden, targets, mask = scored_hidden(model, input_ids, attention_mask, labels, **backbone_kwargs)
    weight, bias, (logit_scale, softcap) = lm_head(model)
    is_forget = forget_rows[:, None].expand_as(mask)[mask]  # [N]
    forget_idx = is_forget.nonzero().view(-1)
    order = forget_idx
    if retain_row_weight is not None:
        order = torch.cat([forget_idx, (~is_forget).nonzero().view(-1)])
    num_forget = len(forget_idx)
    row_weights = torch.where(
        is_forget[order], forget_row_weight, retain_row_weight if retain_row_weight is not None else 0.0
    ).float()
    loss, row_losses, row_logps = fused_vocab_loss(
        hidden[order],
        weight,
        targets[order],
        row_weights,
        bias,
        kind=kind,
        num_forget=num_forget,
        beta=beta,
        teacher=teacher,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_rows=chunk_size,
    )
    out = VocabLossOutput(loss=loss, row_losses=row_losses, row_logps=row_logps, num_forget=num_forget)
    if kl_teacher is not None:
        out.retain_kl = teacher_kl(hidden, mask, weight, bias, (logit_scale, softcap), kl_teacher)
    return out


class FullVocabUnlearningTrainer(UnlearningTrainer):
    """Base of the full-vocabulary methods (module docstring). Arguments as [`UnlearningTrainer`]."""

    vocab_loss_kind: str  # "undial", "ceu" or "pdu": `kernels.vocab_loss.KINDS`
    card_hyperparameters = ("retain_loss_type",)

    def forget_labels(self, labels, forget_rows):
        """Labels `[B, T]` (unshifted, -100 unscored) of the forget rows' loss; the scored labels by default."""
        return labels

    def forget_token_count(self, counts):
        """The step's number of forget tokens the forget loss averages over."""
        return counts.forget_tokens

    def forget_teacher(self, model, inputs, labels) -> VocabTeacher | None:
        """The frozen teacher at the forget rows' scored positions (UNDIAL); None by default."""
        return None

    def retain_coefficient(self):
        """The weight of the retain term now: `retain_weight` (PDU: its dual variable λ)."""
        return self.args.retain_weight

    def loss_offset(self, retain_tokens, counts, scale):
        """A constant added to this micro-batch's loss (PDU's `−λ·ε` share); 0 by default."""
        return 0.0

    def record_retain_loss(self, retain_sum, counts):
        """Called in training with each micro-batch's summed retain loss (PDU's dual update); nothing by default."""

    def _reference_teacher(self, model, inputs, rows) -> VocabTeacher:
        """The reference's (the frozen initial model's) hidden states and head at the scored positions of `rows`."""
        ref = self.ref_model if self.ref_model is not None else model
        unwrapped = self.accelerator.unwrap_model(model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            t = kl_teacher(ref, self.accelerator.unwrap_model(ref), inputs, rows)
        return VocabTeacher(hidden=t.hidden, weight=t.weight, bias=t.bias, transform=t.transform)

    def unlearning_loss(self, model, inputs, counts, scale=1.0):
        """The micro-batch's share of the step's loss (times `scale`, the number of ranks) and its `LossStats`.

        Per scored token: `forget_weight · scale / n_f` on forget rows (`n_f` = `forget_token_count`),
        `retain_coefficient · scale / retain tokens` on retain rows."""
        args = self.args
        fmask = inputs["forget_mask"]
        rmask = ~fmask
        labels = scored_labels(inputs)
        labels = torch.where(fmask[:, None], self.forget_labels(labels, fmask), labels)
        # reference forwards before the policy's, whose activations would otherwise be held
        teacher = self.forget_teacher(model, inputs, labels)
        kl = self._retain_kl_teacher(model, inputs) if self.retain_kl and rmask.any() else None
        forget_w = args.forget_weight * scale / self.forget_token_count(counts).clamp(min=1)
        retain_w = self.retain_coefficient() * scale / counts.retain_tokens.clamp(min=1)
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            unlearning_forward=vocab_loss_forward,
            forget_rows=fmask,
            kind=self.vocab_loss_kind,
            beta=getattr(args, "beta", 0.0),
            teacher=teacher,
            kl_teacher=kl,
            forget_row_weight=forget_w,
            retain_row_weight=None if self.retain_kl else retain_w,
        )
        loss, nf = out.loss, out.num_forget
        if kl is not None:
            retain_losses = out.retain_kl
            loss = loss + retain_losses.sum() * retain_w
        else:
            retain_losses = out.row_losses[nf:]
        n_retain = retain_losses.new_tensor(len(retain_losses))
        loss = loss + self.loss_offset(n_retain, counts, scale)
        retain_sum = retain_losses.detach().sum()
        if torch.is_grad_enabled():
            self.record_retain_loss(retain_sum, counts)

        stats = LossStats()
        stats.mean("forget/loss", out.row_losses[:nf].sum(), nf)
        stats.mean("forget/logps_per_token", out.row_logps[:nf].sum(), nf)
        stats.total("num_tokens/forget", n_retain.new_tensor(nf))
        stats.mean("retain/loss", retain_sum, n_retain)
        stats.mean("retain/logps_per_token", out.row_logps[nf:].sum(), len(out.row_logps) - nf)
        stats.total("num_tokens/retain", n_retain, rmask.any())
        return loss, stats
