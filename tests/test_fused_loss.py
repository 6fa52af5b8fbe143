"""Tests for trl_unlearn.kernels.sequence_loss: the sequence-level loss fused with the LM head (gradients in the
forward)."""

import contextlib

import pytest
import torch

import trl_unlearn.kernels.sequence_loss as fl
from trl_unlearn import losses
from trl_unlearn.kernels.sequence_loss import _plan, fused_linear_sequence_loss, naive_sequence_loss

# 7 sequences: empty ones, short ones, and (with chunk_rows=4) a 9-row and a 5-row one longer than the budget
LENGTHS = [3, 0, 9, 2, 1, 5, 0]
IS_FORGET = torch.tensor([1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
TRANSFORMS = {
    "plain": {},
    "scale-softcap-temp": {"logit_scale": 0.7, "softcap": 2.5, "temperature": 1.3},
    "scale": {"logit_scale": 0.25},
}


def make_inputs(n, h, v, dtype=torch.float64, bias=True, frozen=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_(not frozen)
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_(not frozen) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, labels


def make_seq_loss(method, lengths, is_forget, ref_logps=None, dtype=torch.float64):
    """`seq_loss` as a trainer builds it (module docstring): step-wide normalisation folded in. The step counts are
    made larger than this batch's, as when the batch is one micro-batch of several."""
    num_tokens = torch.tensor(lengths, dtype=dtype)
    n_forget, n_forget_tokens = 2.0 * is_forget.sum(), 2.0 * num_tokens[is_forget].sum()
    n_retain_tokens = 3.0 * num_tokens[~is_forget].sum()
    num_tokens = num_tokens.clamp(min=1)
    fw, rw = 0.8, 1.3

    def seq_loss(logps):
        if method == "simnpo":
            forget = losses.simnpo_loss(logps, num_tokens, beta=2.5, gamma=0.4) * (fw / n_forget)
        elif method == "npo":
            forget = losses.npo_loss(logps, ref_logps, beta=0.6) * (fw / n_forget)
        else:  # ga, graddiff: token-mean log-likelihood of the forget rows
            forget = losses.ga_loss(logps) * (fw / n_forget_tokens)
        if method == "ga":
            return torch.where(is_forget, forget, torch.zeros_like(forget))
        retain = losses.nll_loss(logps) * (rw / n_retain_tokens)
        return torch.where(is_forget, forget, retain)

    return seq_loss


def ref_logps_for(lengths):
    return torch.linspace(-30.0, -2.0, len(lengths), dtype=torch.float64)


def test_plan_packs_whole_sequences_under_the_budget():
    assert _plan([3, 0, 9, 2, 1, 5, 0], 4) == [
        (0, 3, 0, 2, False),
        (3, 12, 2, 3, True),
        (12, 15, 3, 5, False),
        (15, 20, 5, 6, True),
        (20, 20, 6, 7, False),
    ]
    assert _plan([2, 2, 2], 4) == [(0, 4, 0, 2, False), (4, 6, 2, 3, False)]
    assert _plan([0, 0], 1) == [(0, 0, 0, 2, False)]
    assert _plan([], 4) == []


@pytest.mark.parametrize(
    "frozen, transform", [(False, "scale-softcap-temp"), (True, "plain")], ids=["trainable-head", "frozen-head"]
)
def test_gradcheck_float64(frozen, transform):
    lengths, is_forget = [3, 0, 6, 1], torch.tensor([True, False, True, False])  # 6 rows > chunk_rows=4
    hidden, weight, b, labels = make_inputs(sum(lengths), 4, 7, frozen=frozen)
    seq_loss = make_seq_loss("simnpo", lengths, is_forget)
    inputs = (hidden,) if frozen else (hidden, weight, b)

    def loss(hidden, weight=weight, b=b):
        return fused_linear_sequence_loss(
            hidden, weight, labels, lengths, seq_loss, b, chunk_rows=4, **TRANSFORMS[transform]
        )[0]

    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("method", ["simnpo", "npo", "ga", "graddiff"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-head", "frozen-head"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])  # 1: every sequence is long; 64: one chunk
def test_matches_full_logits(method, frozen, transform, chunk_rows):
    hidden, weight, b, labels = make_inputs(sum(LENGTHS), 6, 13, frozen=frozen, seed=chunk_rows)
    seq_loss = make_seq_loss(method, LENGTHS, IS_FORGET, ref_logps_for(LENGTHS))
    params = (hidden,) if frozen else (hidden, weight, b)
    kw = TRANSFORMS[transform]

    loss, seq_logps, _ = fused_linear_sequence_loss(
        hidden, weight, labels, LENGTHS, seq_loss, b, chunk_rows=chunk_rows, **kw
    )
    ref_loss, ref_seq, _ = naive_sequence_loss(hidden, weight, labels, LENGTHS, seq_loss, b, **kw)
    assert loss.shape == () and seq_logps.shape == (len(LENGTHS),) and not seq_logps.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq_logps, ref_seq.detach(), rtol=1e-12, atol=1e-12)
    assert (seq_logps[torch.tensor(LENGTHS) == 0] == 0).all()

    grads = torch.autograd.grad(loss * 1.7, params)  # an incoming gradient other than 1
    ref = torch.autograd.grad(ref_loss * 1.7, params)
    for x, y in zip(grads, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_fp32_realistic_shape():
    """8 sequences of 100-200 scored rows (a TOFU-like micro-batch), H = 64, V = 4096, fp32."""
    lengths = [181, 104, 157, 200, 123, 142, 196, 110]
    is_forget = torch.tensor([True] * 4 + [False] * 4)
    hidden, weight, b, labels = make_inputs(sum(lengths), 64, 4096, dtype=torch.float32)
    hidden.data.mul_(2.0)  # peaked distributions: log-probs from about -2 to -20 per token
    seq_loss = make_seq_loss("simnpo", lengths, is_forget, dtype=torch.float32)
    loss, seq_logps, _ = fused_linear_sequence_loss(hidden, weight, labels, lengths, seq_loss, b, chunk_rows=512)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    ref_loss, ref_seq, _ = naive_sequence_loss(hidden, weight, labels, lengths, seq_loss, b)
    ref = torch.autograd.grad(ref_loss, (hidden, weight, b))
    assert seq_logps.dtype == loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq_logps, ref_seq.detach(), rtol=1e-5, atol=1e-3)
    for x, y in zip(grads, ref):
        assert (x - y).norm() / y.norm() < 1e-5


def test_each_row_projected_once_unless_its_sequence_exceeds_the_budget(monkeypatch):
    """The exactness scheme: short sequences' rows go through the head once (logits, log-probs and gradients from
    the same tile), longer ones' twice (a log-prob pass, then a gradient pass); no tile exceeds `chunk_rows`;
    backward projects nothing. Without gradients every row is projected once."""
    projected = []
    project = fl.project
    monkeypatch.setattr(fl, "project", lambda h, *a, **k: projected.append(h.shape[0]) or project(h, *a, **k))
    for frozen in (False, True):
        hidden, weight, b, labels = make_inputs(sum(LENGTHS), 5, 11, frozen=frozen)
        projected.clear()
        seq_loss = make_seq_loss("simnpo", LENGTHS, IS_FORGET)
        loss, _, _ = fused_linear_sequence_loss(hidden, weight, labels, LENGTHS, seq_loss, b, chunk_rows=4)
        assert max(projected) <= 4
        long_rows = 9 + 5
        assert sum(projected) == sum(LENGTHS) + long_rows
        count = len(projected)
        loss.backward()
        assert len(projected) == count
        assert (weight.grad is None) == frozen

    projected.clear()
    with torch.no_grad():
        loss, _, _ = fused_linear_sequence_loss(
            hidden, weight, labels, LENGTHS, make_seq_loss("ga", LENGTHS, IS_FORGET), chunk_rows=4
        )
    assert sum(projected) == sum(LENGTHS) and not loss.requires_grad


def test_frozen_head_keeps_no_head_gradient_buffer():
    hidden, weight, _, labels = make_inputs(sum(LENGTHS), 5, 11, bias=False, frozen=True)
    loss, _, _ = fused_linear_sequence_loss(
        hidden, weight, labels, LENGTHS, make_seq_loss("npo", LENGTHS, IS_FORGET, ref_logps_for(LENGTHS))
    )
    grad_hidden, grad_weight, grad_bias = loss.grad_fn.saved_tensors
    assert grad_hidden.shape == hidden.shape and grad_weight is None and grad_bias is None


def test_retain_graph_and_second_backward():
    hidden, weight, b, labels = make_inputs(sum(LENGTHS), 5, 11)
    loss, _, _ = fused_linear_sequence_loss(hidden, weight, labels, LENGTHS, make_seq_loss("ga", LENGTHS, IS_FORGET), b)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(weight.grad, 3 * first)


def test_bf16_weights_and_autocast():
    lengths = [40, 25, 60, 35]
    is_forget = torch.tensor([True, False, True, False])
    seq_loss = make_seq_loss("simnpo", lengths, is_forget, dtype=torch.float32)
    hidden, weight, b, labels = make_inputs(sum(lengths), 32, 300, dtype=torch.float32)
    ref_loss, _, _ = naive_sequence_loss(hidden, weight, labels, lengths, seq_loss, b)
    ref = torch.autograd.grad(ref_loss, (hidden, weight, b))

    # bf16 tensors, no autocast: gradients come back in bf16, accumulated in fp32
    h16, w16, b16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight, b))
    loss, seq_logps, _ = fused_linear_sequence_loss(h16, w16, labels, lengths, seq_loss, b16, chunk_rows=64)
    grads = torch.autograd.grad(loss, (h16, w16, b16))
    assert loss.dtype == seq_logps.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    # fp32 autocast to bf16: the GEMMs in bf16, gradients in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac, _, _ = fused_linear_sequence_loss(hidden, weight, labels, lengths, seq_loss, b, chunk_rows=64)
    grads_ac = torch.autograd.grad(loss_ac, (hidden, weight, b))
    assert all(g.dtype == torch.float32 for g in grads_ac)
    for got, lo in ((grads, loss), (grads_ac, loss_ac)):
        assert abs(lo.item() - ref_loss.item()) < 0.02 * abs(ref_loss.item())
        for x, y in zip(got, ref):
            assert (x.float() - y).norm() / y.norm() < 2e-2
    assert (grads_ac[1] - ref[1]).abs().max() > 0  # the GEMMs really ran in bf16


def test_no_rows():
    hidden, weight, b, labels = make_inputs(0, 5, 11)
    loss, seq_logps, _ = fused_linear_sequence_loss(hidden, weight, labels, [0, 0], lambda x: (x - 1.5) ** 2, b)
    assert loss.item() == 4.5  # two sequences with L_s = 0
    assert (seq_logps == 0).all()
    loss.backward()
    assert hidden.grad.shape == (0, 5) and torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_bad_inputs_are_named():
    hidden, weight, b, labels = make_inputs(6, 5, 11)

    def call(labels=labels, lengths=(2, 4), seq_loss=lambda x: -x, **kw):
        return fused_linear_sequence_loss(hidden, weight, labels, lengths, seq_loss, **kw)

    with pytest.raises(ValueError, match="drop the unscored"):
        call(labels=labels.masked_fill(labels == labels[0], -100))
    with pytest.raises(ValueError, match="sum to the 6 rows"):
        call(lengths=(2, 3))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        call(seq_loss=lambda x: x.sum())
    with pytest.raises(ValueError, match="labels must be \\[N\\]"):
        call(labels=labels[:5])
    with pytest.raises(ValueError, match="chunk_rows"):
        call(chunk_rows=0)


def test_head_only_read_inside_gather_context(monkeypatch):
    """Mimic ZeRO-3: the head weight is empty except inside the gather context (`tiles.gather_head`, TRL's
    `maybe_gather_lm_head_ctx`). The op gathers it for the forward only (the gradient is computed there) and hands
    the full-shape gradient back through autograd."""
    hidden, weight, _, labels = make_inputs(sum(LENGTHS), 5, 11, bias=False)
    full = weight.detach().clone().requires_grad_()
    seq_loss = make_seq_loss("graddiff", LENGTHS, IS_FORGET)
    ref_loss, _, _ = naive_sequence_loss(hidden, full, labels, LENGTHS, seq_loss)
    ref = torch.autograd.grad(ref_loss, (hidden, full))

    partitioned = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    entered = []

    @contextlib.contextmanager
    def fake_gather(weight, bias):
        assert weight is partitioned and bias is None
        if partitioned.numel():  # already gathered: a null context, as in TRL
            yield
            return
        entered.append(1)
        partitioned.data = full.detach()
        try:
            yield
        finally:
            partitioned.data = torch.empty(0, dtype=torch.float64)

    monkeypatch.setattr(fl, "gather_head", fake_gather)
    loss, _, _ = fused_linear_sequence_loss(hidden, partitioned, labels, LENGTHS, seq_loss, chunk_rows=4)
    assert partitioned.numel() == 0 and len(entered) == 1
    grads = torch.autograd.grad(loss, (hidden, partitioned))
    assert len(entered) == 1  # nothing to gather in backward
    for x, y in zip(grads, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_weights_apply_outside_the_loss_and_unweighted_losses_come_back():
    """`seq_weights` scale each sequence's loss and gradient; `seq_losses` are the unweighted losses at the final
    sums, computed once (no second pass for logging)."""
    hidden, weight, b, labels = make_inputs(sum(LENGTHS), 6, 11)
    weights = torch.linspace(0.5, 2.0, len(LENGTHS), dtype=torch.float64)

    def seq_loss(logps):
        return (logps + 3.0) ** 2

    loss, seq_logps, seq_losses = fused_linear_sequence_loss(
        hidden, weight, labels, LENGTHS, seq_loss, b, seq_weights=weights, chunk_rows=4
    )
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    ref_loss, ref_seq, ref_losses = naive_sequence_loss(
        hidden, weight, labels, LENGTHS, seq_loss, b, seq_weights=weights
    )
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, b))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(seq_losses, ref_losses.detach())
    torch.testing.assert_close(seq_losses, (ref_seq.detach() + 3.0) ** 2)
    torch.testing.assert_close(loss.detach(), (weights * seq_losses).sum())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
