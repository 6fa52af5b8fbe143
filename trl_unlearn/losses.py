"""Unlearning losses as pure tensor functions, and what one micro-batch's loss reports (`LossStats`).

Conventions (see the SimNPO paper, arXiv 2410.07163, and docs/method.md):
- `logps` `[B]`: per-sequence SUM of the log-probabilities of the scored (completion) tokens, `log π(y|x)`.
- `num_tokens` `[B]`: number of scored tokens `|y|` of each sequence (the completion plus its EOS).
- Every loss function returns UNREDUCED per-sample losses `[B]`, written to be MINIMISED. The trainers normalise
  them over the optimizer step: sample-level losses (SimNPO, NPO) by the number of forget samples, token-level ones
  (GA, the retain NLL and KL) by the number of scored tokens; `ga_loss(logps).sum() / num_tokens.sum()` is GA's
  usual token mean.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def simnpo_loss(logps: torch.Tensor, num_tokens: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO: `-(2/β)·logσ(-(β/|y|)·log π(y|x) − γ)`, the margin γ outside β as in the paper.

    Its gradient is `w·∇log π` with `w = (2/|y|)·σ((β/|y|)·log π + γ)` (see `simnpo_weight`).
    """
    return -(2.0 / beta) * F.logsigmoid(-(beta / num_tokens) * logps - gamma)


def npo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: `-(2/β)·logσ(-β·(log π(y|x) − log π_ref(y|x)))` with summed log-probs.

    Its gradient is `w·∇log π` with `w = 2π^β/(π^β + π_ref^β)` (see `npo_weight`): 1 when π = π_ref.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logps - ref_logps))


def ga_loss(logps: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: each sequence's summed log-likelihood (minimised); normalised by tokens, minus the NLL."""
    return logps


def nll_loss(logps: torch.Tensor) -> torch.Tensor:
    """Retain NLL (GradDiff-style): each sequence's summed negative log-likelihood; normalised by tokens."""
    return -logps


def kl_loss(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain KL(π_ref ‖ π): each sequence's KL summed over its scored tokens `[B]`; normalised by tokens.

    `token_kl` `[B, T]`: per-position KL(π_ref(·|x_<t) ‖ π(·|x_<t)) over the full vocabulary (the trainer gets it from
    a chunked kernel, without `(B, T, V)` logits); `mask` `[B, T]` marks scored positions.
    """
    return (token_kl * mask).sum(-1)


def simnpo_weight(logps: torch.Tensor, num_tokens: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Per-sample gradient weight of SimNPO on `log π`: `(2/|y|)·σ((β/|y|)·log π + γ)` `[B]`."""
    return (2.0 / num_tokens) * torch.sigmoid((beta / num_tokens) * logps + gamma)


def npo_weight(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample gradient weight of NPO on `log π`: `2π^β/(π^β + π_ref^β) = 2σ(β(log π − log π_ref))` `[B]`."""
    return 2.0 * torch.sigmoid(beta * (logps - ref_logps))


@dataclass(frozen=True)
class ForgetRetainLoss:
    """The per-sequence loss of one forget+retain batch, elementwise in the summed log-probs `logps` `[S]` (what the
    fused kernel, `kernels/sequence_loss.py`, differentiates): `forget(logps[is_forget])` on forget rows and, when
    `retain_nll`, `nll_loss` on the others (0 otherwise: a KL retain term is computed apart). Unweighted: the
    normalisation and the loss weights are the kernel's `seq_weights`.

    `forget`: a pure function `[B_f] -> [B_f]` of the forget rows' summed log-probs, this batch's constants bound
    (e.g. `functools.partial(simnpo_loss, num_tokens=..., beta=..., gamma=...)`).
    """

    forget: Callable[[torch.Tensor], torch.Tensor]
    is_forget: torch.Tensor
    retain_nll: bool = True

    def __call__(self, logps: torch.Tensor) -> torch.Tensor:
        retain = nll_loss(logps) if self.retain_nll else torch.zeros_like(logps)
        return retain.masked_scatter(self.is_forget, self.forget(logps[self.is_forget]))


@dataclass
class LossStats:
    """What one micro-batch logs, by name (one gather over ranks per micro-batch: see `UnlearningTrainer`).

    `mean(name, total, count)` is logged as the sum over ranks of `total` divided by the sum of `count`;
    `total(name, value, present)` as the sum over ranks of `value`. Neither is logged when no rank counted anything
    (`count` 0, or `present` false, on every rank). Every rank must register the same names."""

    entries: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def mean(self, name: str, total: torch.Tensor, count) -> "LossStats":
        self.entries[name] = ("mean", total.detach().float(), torch.as_tensor(count, device=total.device).float())
        return self

    def total(self, name: str, value: torch.Tensor, present=True) -> "LossStats":
        self.entries[name] = ("total", value.detach().float(), torch.as_tensor(present, device=value.device).float())
        return self

    def flat(self) -> torch.Tensor:
        """`[2K]`: each entry's value then its count (or presence), in name order."""
        if not self.entries:
            return torch.zeros(0)
        return torch.stack([x for name in sorted(self.entries) for x in self.entries[name][1:]])

    def reduce(self, rows: torch.Tensor) -> dict[str, float]:
        """The logged values from `rows` `[world_size, 2K]`, the gathered `flat()` of every rank."""
        sums = rows.sum(0).tolist()
        out = {}
        for i, name in enumerate(sorted(self.entries)):
            value, count = sums[2 * i], sums[2 * i + 1]
            if count > 0:
                out[name] = value / count if self.entries[name][0] == "mean" else value
        return out


def wga_loss(token_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA (weighted gradient ascent; Wang et al., 2025, arXiv 2502.19301): `sg(p_t)^β · log p_t` per scored token
    `[N]`, with `p_t = exp(log p_t)` and `sg` the stop-gradient; normalised by tokens (a token mean, minimised). Its
    gradient on `log p_t` is `p_t^β` (see `wga_weight`): gradient ascent that fades on tokens already unlikely.
    `token_logps` `[N]`: each scored token's label log-prob (not a sequence sum)."""
    return wga_weight(token_logps, beta) * token_logps


def wga_weight(token_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's detached per-token weight `p_t^β = exp(β · log p_t)` `[N]`."""
    return torch.exp(beta * token_logps.detach())


def satimp_loss(token_logps: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp (Yang et al., 2025, arXiv 2505.11953): `sg(p_t^β1 · (1 − p_t)^β2) · log p_t` per scored token `[N]`;
    normalised by tokens (minimised). `p^β1` (saturation) fades tokens already forgotten, `(1 − p)^β2` (importance)
    those the model is sure of. `token_logps` `[N]`: each scored token's label log-prob."""
    return satimp_weight(token_logps, beta1, beta2) * token_logps


def satimp_weight(token_logps: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's detached per-token weight `p_t^β1 · (1 − p_t)^β2` `[N]`."""
    x = token_logps.detach()
    return torch.exp(beta1 * x) * (-torch.expm1(x)).pow(beta2)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290): `-logσ(β·((log π_w − log π_ref,w) − (log π_l − log π_ref,l)))`
    per pair `[B]`, with summed log-probs; normalised by pairs. IdkDPO: `w` the IdK answer, `l` the answer to forget.
    (open-unlearning multiplies it by 2/β; docs/method.md.)"""
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)
