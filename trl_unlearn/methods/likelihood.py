"""`LikelihoodUnlearningTrainer`: the loss of the methods whose forget term is a function of each forget
sequence's summed log-likelihood (SimNPO, NPO, GA, GradDiff), plus the retain NLL or KL.

One forward over forget and retain rows together. In training the fused loss (`kernels/sequence_loss.py`) computes
each sequence's loss and its gradients with the LM head, in one pass and without `(B, T, V)` logits; the retain KL
keeps its chunked kernel. A method defines only `forget_loss(num_tokens, ref_logps)`: the pure per-sample function of
`losses.py` with this batch's constants bound. The loss path, dataset to loss:

    data.formats.resolve_datasets -> data.tokenize.tokenize_dataset -> (NPO) UnlearningTrainer._precompute_ref_logps
    -> data.pairing (sampler, collator) -> UnlearningTrainer.compute_loss -> unlearning_loss (here) -> the model's
    forward with `unlearning_forward=modeling.forward_logps` -> kernels.sequence_loss (calls losses.ForgetRetainLoss)
    -> back here: `(loss, LossStats)`.
"""

import torch

from .. import losses
from ..modeling import forward_logps
from ..reference import scored_labels
from .base import UnlearningTrainer


class LikelihoodUnlearningTrainer(UnlearningTrainer):
    """Base of the likelihood methods: subclasses set `forget_normaliser` and define `forget_loss` (and, for the
    logged `forget/grad_weight`, `forget_grad_weight`). Arguments as [`UnlearningTrainer`]."""

    forget_normaliser = "samples"  # "tokens": the forget term is a token mean over the step (GA)
    # True: `forget_loss` is a function of each scored token's log-prob `[N_f]` (WGA, SatImp), not of the sequences'
    # sums; the fused kernel then runs with one "sequence" per token (`forward_logps(per_token=True)`)
    token_level = False
    card_hyperparameters = ("retain_loss_type",)

    def forget_grad_weight(self, logps, num_tokens, ref_logps):
        """Per-sample gradient weight on `log π` `[B_f]`, logged as `forget/grad_weight`: a token mean's by default.
        Token-level methods get each forget token's log-prob `[N_f]` (and `num_tokens` of ones) and return each
        token's weight: the log then shows their mean over tokens."""
        return torch.ones_like(logps) / num_tokens

    def unlearning_loss(self, model, inputs, counts, scale=1.0):
        """The micro-batch's share of the step's loss (times `scale`, the number of ranks) and its `LossStats`.

        `counts`: the step's `StepCounts`. Weights per row: `forget_weight · scale / n` with `n` the step's forget
        samples (or tokens) on forget rows, `retain_weight · scale / retain tokens` on retain rows."""
        args = self.args
        fmask = inputs["forget_mask"]
        rmask = ~fmask
        ref_logps = None
        if self.forget_needs_reference:  # before the policy forward, whose activations would otherwise be held
            if "ref_logps" in inputs:
                ref_logps = inputs["ref_logps"].float()
            else:
                forget_batch = {k: inputs[k][fmask] for k in ("input_ids", "attention_mask", "completion_mask")}
                ref_logps = self._reference_token_logps(model, forget_batch).sum(-1)
        teacher = self._retain_kl_teacher(model, inputs) if self.retain_kl and rmask.any() else None
        mask = inputs["completion_mask"][:, 1:]
        num_tokens = mask.sum(-1).float()
        n_forget = counts.forget_tokens if self.forget_normaliser == "tokens" else counts.forget_samples
        weights = torch.where(
            fmask,
            args.forget_weight * scale / n_forget.clamp(min=1),
            args.retain_weight * scale / counts.retain_tokens.clamp(min=1),
        )
        # The loss's units: sequences, or (token-level methods) the N scored tokens in row-major order
        row = mask.bool().nonzero()[:, 0] if self.token_level else None  # [N] row of each scored token
        unit_fmask, unit_weights = (fmask[row], weights[row]) if self.token_level else (fmask, weights)
        objective = losses.ForgetRetainLoss(
            self.forget_loss(num_tokens[fmask], ref_logps), unit_fmask, not self.retain_kl
        )
        kw = dict(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=scored_labels(inputs),
            unlearning_forward=forward_logps,
            kl_teacher=teacher,
        )
        if torch.is_grad_enabled():
            out = model(**kw, sequence_loss=objective, seq_weights=unit_weights, per_token=self.token_level)
            unit_logps, unit_losses, loss = out.seq_logps, out.seq_losses, out.loss
        else:
            out = model(**kw)
            unit_logps = out.token_logps[mask.bool()] if self.token_level else out.token_logps.sum(-1)
            unit_losses = objective(unit_logps)
            loss = (unit_losses * unit_weights).sum()
        if self.token_level:  # per-row sums, for the logs
            logps = unit_logps.new_zeros(len(fmask)).index_add(0, row, unit_logps.detach())
            seq_losses = unit_losses.new_zeros(len(fmask)).index_add(0, row, unit_losses.detach())
            f_units = unit_logps.detach()[unit_fmask]
            grad_weight = self.forget_grad_weight(f_units, torch.ones_like(f_units), ref_logps)
        else:
            logps, seq_losses = unit_logps, unit_losses
            grad_weight = self.forget_grad_weight(logps.detach()[fmask], num_tokens[fmask], ref_logps)
        retain_losses = seq_losses[rmask]
        if self.retain_kl and rmask.any():
            retain_losses = losses.kl_loss(out.token_kl[rmask], mask[rmask])
            loss = loss + (retain_losses * weights[rmask]).sum()

        logps = logps.detach()
        f_logps, f_tokens, f_losses = logps[fmask], num_tokens[fmask], seq_losses[fmask]
        r_tokens = num_tokens[rmask].sum()
        stats = losses.LossStats()
        f_count = f_tokens.sum() if self.forget_normaliser == "tokens" else len(f_losses)
        stats.mean("forget/loss", f_losses.sum(), f_count)
        stats.mean("forget/logps_per_token", f_logps.sum(), f_tokens.sum())
        stats.total("num_tokens/forget", f_tokens.sum())
        stats.mean("forget/grad_weight", grad_weight.sum(), len(grad_weight))
        stats.mean("retain/loss", retain_losses.detach().sum(), r_tokens)
        stats.mean("retain/logps_per_token", logps[rmask].sum(), r_tokens)
        stats.total("num_tokens/retain", r_tokens, rmask.any())
        return loss, stats
