"""`kernels/vocab_loss.py`: UNDIAL, CE-U and PDU's full-vocabulary losses (and the retain NLL rows) against hand
computations, full-logits autograd and float64 gradcheck, with the logit transform, in any tiling."""

import math

import pytest
import torch

from trl_unlearn.kernels.vocab_loss import VocabTeacher, fused_vocab_loss, naive_vocab_loss


def identity_head_loss(z, labels, num_forget, kind, weights=None, **kw):
    """The kernel on logits given directly: `hidden = z`, head = identity `[V, V]`."""
    z = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.ones(len(z), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    loss, rows, logps = fused_vocab_loss(z, eye, torch.tensor(labels), w, kind=kind, num_forget=num_forget, **kw)
    loss.backward()
    return loss.item(), rows, z.grad


def test_hand_computed_losses_and_logit_gradients():
    # UNDIAL: teacher logits [0, ln 4, 0], label 1 lowered by beta = ln 2 -> target [1/4, 1/2, 1/4]; student uniform
    teacher = VocabTeacher(
        hidden=torch.tensor([[0.0, math.log(4), 0.0]], dtype=torch.float64), weight=torch.eye(3, dtype=torch.float64)
    )
    loss, rows, grad = identity_head_loss([[0.0, 0.0, 0.0]], [1], 1, "undial", beta=math.log(2), teacher=teacher)
    assert loss == pytest.approx(math.log(3))  # CE(q, uniform) = log V
    torch.testing.assert_close(grad, torch.tensor([[1 / 12, -1 / 6, 1 / 12]], dtype=torch.float64))
    # CE-U: z = [1, 2, 0], label 1 -> target softmax([1, -inf, 0]) = [e, 0, 1] / (e + 1)
    e = math.e
    loss, _, grad = identity_head_loss([[1.0, 2.0, 0.0]], [1], 1, "ceu")
    assert loss == pytest.approx(math.log(e + e**2 + 1) - e / (e + 1))
    p = torch.tensor([e, e**2, 1.0], dtype=torch.float64) / (e + e**2 + 1)
    torch.testing.assert_close(grad[0], p - torch.tensor([e / (e + 1), 0.0, 1 / (e + 1)], dtype=torch.float64))
    # PDU: z = [3, 0, 0]: gap max - mean = 2, loss 4, gradient 2 * 2 * (e_0 - 1/3); weighted by 0.5
    loss, rows, grad = identity_head_loss([[3.0, 0.0, 0.0]], [2], 1, "pdu", weights=[0.5])
    assert loss == pytest.approx(2.0) and rows.tolist() == pytest.approx([4.0])
    torch.testing.assert_close(grad, 0.5 * torch.tensor([[8 / 3, -4 / 3, -4 / 3]], dtype=torch.float64))
    # a retain row after the forget row: NLL of label 2 under uniform logits = log 3, gradient p - e_2
    loss, rows, grad = identity_head_loss([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [2, 2], 1, "pdu")
    assert rows.tolist() == pytest.approx([4.0, math.log(3)])
    torch.testing.assert_close(grad[1], torch.tensor([1 / 3, 1 / 3, -2 / 3], dtype=torch.float64))


def case(dtype=torch.float64, seed=0, n=9, h=6, v=13, num_forget=5, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=dtype)
    teacher = VocabTeacher(
        torch.randn(num_forget, h, generator=g, dtype=dtype),
        torch.randn(v, h, generator=g, dtype=dtype),
        torch.randn(v, generator=g, dtype=dtype),
        (0.8, 2.5),
    )
    return hidden, weight, b, labels, weights, teacher


@pytest.mark.parametrize("kind", ["undial", "pdu"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_float64(kind, softcap):
    hidden, weight, bias, labels, weights, teacher = case()
    kw = dict(kind=kind, num_forget=5, beta=1.5, teacher=teacher, logit_scale=0.7, softcap=softcap, chunk_rows=2)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_vocab_loss(h, w, labels, weights, b, **kw)[0], (hidden, weight, bias)
    )


@pytest.mark.parametrize("kind", ["undial", "ceu", "pdu"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_matches_full_logits_autograd_in_any_tiling(kind, softcap, chunk_rows):
    """CE-U's target is detached by definition, so its gradient is checked against autograd of the definition."""
    hidden, weight, bias, labels, weights, teacher = case()
    kw = dict(kind=kind, num_forget=5, beta=1.5, teacher=teacher, logit_scale=0.7, softcap=softcap)
    loss, rows, logps = fused_vocab_loss(hidden, weight, labels, weights, bias, chunk_rows=chunk_rows, **kw)
    ref, ref_rows, ref_logps = naive_vocab_loss(hidden, weight, labels, weights, bias, **kw)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(rows, ref_rows)
    torch.testing.assert_close(logps, ref_logps)
    for a, b in zip(
        torch.autograd.grad(loss, (hidden, weight, bias)), torch.autograd.grad(ref, (hidden, weight, bias))
    ):
        torch.testing.assert_close(a, b)


def test_float32_frozen_head_and_all_retain_or_all_forget():
    hidden, weight, _, labels, weights, teacher = case(dtype=torch.float32, bias=False)
    weight.requires_grad_(False)
    teacher_hidden = torch.randn(9, hidden.shape[1], generator=torch.Generator().manual_seed(1))
    for num_forget in (0, 5, 9):
        t = VocabTeacher(teacher_hidden[:num_forget], teacher.weight.float())
        kw = dict(kind="undial", num_forget=num_forget, beta=2.0, teacher=t)
        loss, _, _ = fused_vocab_loss(hidden, weight, labels, weights, chunk_rows=3, **kw)
        ref, _, _ = naive_vocab_loss(hidden, weight, labels, weights, **kw)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0], rtol=1e-5, atol=1e-6
        )


def test_bad_input_is_a_clear_error():
    hidden, weight, bias, labels, weights, teacher = case()
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_vocab_loss(hidden, weight, labels, weights, kind="kl", num_forget=5)
    with pytest.raises(ValueError, match="UNDIAL needs the teacher's hidden states at the 5 forget rows, got none"):
        fused_vocab_loss(hidden, weight, labels, weights, kind="undial", num_forget=5)
    with pytest.raises(ValueError, match="num_forget must lie in"):
        fused_vocab_loss(hidden, weight, labels, weights, kind="pdu", num_forget=10)


@pytest.mark.parametrize("kind", ["undial", "ceu", "pdu"])
def test_bf16_inputs_close_to_fp32(kind):
    """bf16 hidden and head (the GEMMs in bf16, the tile math in fp32): values and gradients near the fp32 result."""
    hidden, weight, bias, labels, weights, teacher = case(dtype=torch.float32, n=24, h=16, v=50)
    kw = dict(kind=kind, num_forget=5, beta=1.5, teacher=teacher, softcap=3.0)
    ref, _, _ = naive_vocab_loss(hidden, weight, labels, weights, bias, **kw)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    h16, w16, b16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight, bias))
    t16 = VocabTeacher(teacher.hidden.bfloat16(), teacher.weight.bfloat16(), teacher.bias.bfloat16(), teacher.transform)
    kw["teacher"] = t16
    loss, _, _ = fused_vocab_loss(h16, w16, labels, weights.float(), b16, chunk_rows=7, **kw)
    grads = torch.autograd.grad(loss, (h16, w16))
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=2e-2)
