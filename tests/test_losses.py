"""Losses against hand-worked values and their gradient limits (docs/method.md §2)."""

import math

import torch

from trl_unlearn import losses


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_simnpo_hand_values():
    # sample 1: log π = -12 over 4 tokens, β = 2, γ = 0.5  →  -(2/2)·logσ(-(2/4)(-12) - 0.5) = -logσ(5.5)
    # sample 2: log π = -3 over 6 tokens                    →  -logσ(0.5)
    logps, n = torch.tensor([-12.0, -3.0]), torch.tensor([4.0, 6.0])
    got = losses.simnpo_loss(logps, n, beta=2.0, gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([-logsig(5.5), -logsig(0.5)]))


def test_npo_hand_values():
    # β = 0.5, log π − log π_ref = [-2, 4]  →  -(2/0.5)·logσ(-0.5·[-2, 4]) = -4·logσ([1, -2])
    got = losses.npo_loss(torch.tensor([-7.0, -1.0]), torch.tensor([-5.0, -5.0]), beta=0.5)
    torch.testing.assert_close(got, torch.tensor([-4 * logsig(1.0), -4 * logsig(-2.0)]))


def test_ga_and_nll_are_summed_log_likelihoods_normalised_by_tokens():
    logps, n = torch.tensor([-6.0, -2.0, -4.0]), torch.tensor([3.0, 1.0, 4.0])
    # per sequence: the summed log-likelihood (GA) and its negative (NLL); normalised by tokens, the token mean
    # (-6 - 2 - 4) / (3 + 1 + 4) = -1.5
    assert losses.ga_loss(logps).tolist() == [-6.0, -2.0, -4.0]
    assert losses.nll_loss(logps).tolist() == [6.0, 2.0, 4.0]
    assert (losses.ga_loss(logps).sum() / n.sum()).item() == -1.5


def test_kl_loss_sums_scored_positions():
    token_kl = torch.tensor([[0.2, 0.4, 9.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # per sequence: 0.2 + 0.4 and 1.0; the masked 9.0 is ignored; token mean (0.2 + 0.4 + 1.0) / 3
    torch.testing.assert_close(losses.kl_loss(token_kl, mask), torch.tensor([0.6, 1.0]))
    torch.testing.assert_close(losses.kl_loss(token_kl, mask).sum() / mask.sum(), torch.tensor(1.6 / 3))


def test_forget_retain_loss_scatters_the_forget_loss_and_retain_nll():
    logps = torch.tensor([-2.0, -3.0, -5.0, -7.0])
    is_forget = torch.tensor([True, False, True, False])
    objective = losses.ForgetRetainLoss(lambda x: 10.0 * x, is_forget)
    torch.testing.assert_close(objective(logps), torch.tensor([-20.0, 3.0, -50.0, 7.0]))
    no_retain = losses.ForgetRetainLoss(lambda x: 10.0 * x, is_forget, retain_nll=False)
    torch.testing.assert_close(no_retain(logps), torch.tensor([-20.0, 0.0, -50.0, 0.0]))


def test_loss_stats_pool_ranks_and_skip_what_nobody_counted():
    """Rank 0: forget loss total 3 over 2 samples, no retain rows; rank 1: total 1 over 2, retain 6 over 3 tokens."""
    ranks = [
        losses.LossStats()
        .mean("forget/loss", torch.tensor(3.0), 2)
        .mean("retain/loss", torch.tensor(0.0), 0)
        .total("num_tokens/retain", torch.tensor(0.0), False),
        losses.LossStats()
        .mean("forget/loss", torch.tensor(1.0), 2)
        .mean("retain/loss", torch.tensor(6.0), 3)
        .total("num_tokens/retain", torch.tensor(3.0), True),
    ]
    rows = torch.stack([r.flat() for r in ranks])
    assert ranks[0].reduce(rows) == {"forget/loss": 1.0, "retain/loss": 2.0, "num_tokens/retain": 3.0}
    alone = ranks[0].reduce(rows[:1])  # rank 0 on its own: nothing counted for retain, so not logged
    assert alone == {"forget/loss": 1.5}


def test_npo_weight_is_exactly_one_at_reference():
    logps = torch.tensor([-3.0, -10.0, -0.5], requires_grad=True)
    loss = losses.npo_loss(logps, logps.detach().clone(), beta=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    # ∇L = w·∇log π with w = 2σ(β·0) = 1: descent lowers log π at unit rate for every sample
    assert torch.equal(grad, torch.ones(3))
    assert torch.equal(losses.npo_weight(logps.detach(), logps.detach(), 0.1), torch.ones(3))


def test_npo_and_simnpo_weights_match_autograd():
    logps = torch.tensor([-3.0, -10.0, -0.5], requires_grad=True)
    ref, n = torch.tensor([-2.0, -12.0, -0.5]), torch.tensor([2.0, 7.0, 1.0])
    for loss, weight in [
        (losses.npo_loss(logps, ref, 0.7), losses.npo_weight(logps.detach(), ref, 0.7)),
        (losses.simnpo_loss(logps, n, 1.3, 0.4), losses.simnpo_weight(logps.detach(), n, 1.3, 0.4)),
    ]:
        (grad,) = torch.autograd.grad(loss.sum(), logps)
        torch.testing.assert_close(grad, weight)


def test_simnpo_gradient_tends_to_length_normalised_ga():
    logps, n = torch.tensor([-30.0, -4.0, -1.0]), torch.tensor([10.0, 2.0, 5.0])
    target = 1.0 / n  # gradient of the per-sample length-normalised GA loss, log π / |y|
    errors = []
    for beta in [1.0, 1e-2, 1e-4]:
        x = logps.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(losses.simnpo_loss(x, n, beta, 0.0).sum(), x)
        errors.append((grad - target).abs().max().item())
    assert errors[0] > 0.05 and errors[2] < 1e-3 and errors[0] > errors[1] > errors[2]


def test_simnpo_weight_depends_on_length_npo_does_not():
    # Same summed log-likelihood, different lengths: NPO weights them equally, SimNPO does not
    logps, ref = torch.tensor([-10.0, -10.0]), torch.tensor([-9.0, -9.0])
    npo = losses.npo_weight(logps, ref, 0.1)
    sim = losses.simnpo_weight(logps, torch.tensor([2.0, 20.0]), 2.5)
    assert npo[0] == npo[1] and sim[0] != sim[1]
