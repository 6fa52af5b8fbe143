"""Unlearning losses as pure tensor functions.

Conventions (see the SimNPO paper, arXiv 2410.07163, and docs/):
- `logps` `[B]`: per-sequence SUM of the log-probabilities of the scored (completion) tokens, `log π(y|x)`.
- `num_tokens` `[B]`: number of scored tokens `|y|` of each sequence (the completion plus its EOS).
- Every function returns UNREDUCED per-sample losses `[B]`; the batch loss is their mean.
- Losses are written to be MINIMISED.
"""

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


def ga_loss(logps: torch.Tensor, num_tokens: torch.Tensor, total_tokens: torch.Tensor | float | None = None):
    """Gradient ascent: the token-mean log-likelihood, i.e. minus the usual NLL.

    Per-sample shares such that `ga_loss(...).mean() == logps.sum() / total_tokens`, where `total_tokens` defaults
    to `num_tokens.sum()` (pass the token count of a larger batch, e.g. across gradient-accumulation steps and
    ranks, to normalise by it instead).
    """
    total = num_tokens.sum() if total_tokens is None else total_tokens
    return logps * (logps.numel() / total)


def nll_loss(logps: torch.Tensor, num_tokens: torch.Tensor, total_tokens: torch.Tensor | float | None = None):
    """Retain NLL (GradDiff-style): per-sample shares of the token-mean negative log-likelihood; see `ga_loss`."""
    return -ga_loss(logps, num_tokens, total_tokens)


def kl_loss(token_kl: torch.Tensor, mask: torch.Tensor, total_tokens: torch.Tensor | float | None = None):
    """Retain KL(π_ref ‖ π): per-sample shares of the token-mean KL over scored tokens.

    `token_kl` `[B, T]`: per-position KL(π_ref(·|x_<t) ‖ π(·|x_<t)) over the full vocabulary (the trainer gets it from
    a chunked kernel, without `(B, T, V)` logits); `mask` `[B, T]` marks scored positions. The mean of the result
    `[B]` is `(token_kl·mask).sum() / total_tokens` (default `mask.sum()`).
    """
    total = mask.sum() if total_tokens is None else total_tokens
    return (token_kl * mask).sum(-1) * (token_kl.size(0) / total)


def simnpo_weight(logps: torch.Tensor, num_tokens: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Per-sample gradient weight of SimNPO on `log π`: `(2/|y|)·σ((β/|y|)·log π + γ)` `[B]`."""
    return (2.0 / num_tokens) * torch.sigmoid((beta / num_tokens) * logps + gamma)


def npo_weight(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample gradient weight of NPO on `log π`: `2π^β/(π^β + π_ref^β) = 2σ(β(log π − log π_ref))` `[B]`."""
    return 2.0 * torch.sigmoid(beta * (logps - ref_logps))
