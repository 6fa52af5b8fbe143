"""Full-vocabulary per-token losses (UNDIAL, CE-U, PDU) fused with the LM head: gradients in the forward pass.

Each loss is a function of one scored row's whole next-token logits `z_i` `[V]` (the model's logits, after its
transform; `tiles.py`), with `p_i = softmax(z_i)` and `y_i` the row's label:

| kind     | loss `l_i`                                                     | `d l_i / d z_i`                    |
|----------|----------------------------------------------------------------|------------------------------------|
| `undial` | `CE(q_i, p_i) = lse(z_i) − q_i·z_i`, `q_i = softmax(t_i − β e_y)` | `p_i − q_i`                       |
| `ceu`    | `CE(q_i, p_i)`, `q_i = softmax(sg(z_i) with z_iy = −inf)`        | `p_i − q_i` (`q_i` detached)       |
| `pdu`    | `d_i² = (max_v z_iv − mean_v z_iv)²`                           | `2 d_i (e_argmax − 1/V)`           |
| `nll`    | `lse(z_i) − z_iy` (the retain rows)                            | `p_i − e_y`                        |

UNDIAL (Dong et al., arXiv 2402.10052): `t_i` are the frozen teacher's logits at the same position, from its own
hidden states and head (`VocabTeacher`). CE-U (Yang et al., arXiv 2503.01224): the student's own distribution with the
label removed. PDU (Entesari et al., arXiv 2506.05314): the logit-margin flattening loss. A soft-target CE differs from
the KL to the same target by the target's entropy, a constant: the gradient is the KL's; the value is the CE, as
open-unlearning reports it.

The rows' weights are constants known before the forward (the step's normalisation and loss weights), so each
`[n, V]` tile is turned into its loss and its gradients as soon as it is projected: three `[N, H] x [H, V]` GEMMs as
the naive full-logits path runs (UNDIAL: one more for the teacher's tile, as the naive teacher forward), no `[N, V]`
tensor, no recomputation in backward. Backward scales the saved gradients by the incoming scalar.

API:
    fused_vocab_loss(hidden, weight, labels, row_weights, bias=None, *, kind, num_forget, beta=0.0, teacher=None,
                     logit_scale=1.0, softcap=None, chunk_rows=512) -> (loss, row_losses, row_logps)

    hidden       `[N, H]` final hidden states of the scored rows: rows `[0, num_forget)` get `kind`'s loss, the
                 others the NLL.
    weight       `[V, H]` LM head (trainable, frozen, tied or ZeRO-3 partitioned); `bias` optional `[V]`.
    labels       `[N]` int64 in `[0, V)`.
    row_weights  `[N]` constants: `loss = sum_i row_weights[i] * l_i`.
    kind         "undial", "ceu" or "pdu"; `beta` the UNDIAL logit adjustment; `teacher` a `VocabTeacher` (UNDIAL).
    Returns `loss` (0-dim fp32, differentiable w.r.t. hidden, weight, bias), `row_losses` `[N]` (unweighted `l_i`)
    and `row_logps` `[N]` (the label log-probs, for logging), both detached.

ZeRO-3: the student's head and the teacher's are gathered for the op (a teacher sharing the student's head once).

Memory: one `[chunk_rows, V]` tile in the GEMM dtype, its fp32 copy (the same buffer in fp32), one more fp32 tile for
the UNDIAL / CE-U target, the `[N, H]` hidden gradient and, with a trainable head, the fp32 `[V, H]` head gradient.
"""

import contextlib
from dataclasses import dataclass

import torch

from .tiles import (
    DEFAULT_CHUNK_SIZE,
    addmm_fp32_,
    gather_head,
    gemm_dtypes,
    project,
    to_raw_logits_grad,
    transform_logits,
)

KINDS = ("undial", "ceu", "pdu")


@dataclass
class VocabTeacher:
    """A frozen teacher at the forget rows: `hidden` `[num_forget, H]`, its head `weight` `[V, H]` (and `bias`) and
    its `(logit_scale, softcap)` transform."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: tuple = (1.0, None)


def softmax_(x):
    """Row softmax of `x` `[n, V]` in place (rows may hold -inf, not only -inf)."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def soft_ce_(z, q):
    """`(CE(q, softmax(z)) [n], logsumexp(z) [n])`; overwrites `z` with the gradient `softmax(z) − q`."""
    dot = torch.bmm(q.unsqueeze(1), z.unsqueeze(2)).view(-1)  # q·z per row, no [n, V] temporary
    zmax = z.amax(-1, keepdim=True)
    total = z.sub_(zmax).exp_().sum(-1, keepdim=True)
    lse = (zmax + total.log()).view(-1)
    z.div_(total).sub_(q)
    return lse - dot, lse


def logit_gap_(z):
    """`((max z − mean z)² [n], logsumexp(z) [n])`; overwrites `z` with the gradient `2 d (e_argmax − 1/V)`."""
    zmax, argmax = z.max(-1)
    gap = zmax - z.mean(-1)
    lse = zmax + z.sub_(zmax[:, None]).exp_().sum(-1).log()  # z is overwritten next
    z.copy_((-2.0 / z.shape[1] * gap)[:, None].expand_as(z))
    z.scatter_add_(1, argmax[:, None], 2.0 * gap[:, None])
    return gap.square(), lse


def nll_(z, labels):
    """`(−log softmax(z)[label] [n], logsumexp(z) [n])`; overwrites `z` with the gradient `softmax(z) − e_label`."""
    target = z.gather(1, labels[:, None]).view(-1)
    zmax = z.amax(-1, keepdim=True)
    total = z.sub_(zmax).exp_().sum(-1, keepdim=True)
    lse = (zmax + total.log()).view(-1)
    z.div_(total).scatter_add_(1, labels[:, None], torch.full_like(lse[:, None], -1.0))
    return lse - target, lse


class FusedVocabLoss(torch.autograd.Function):
    """`apply(hidden, weight, bias, labels, row_weights, kind, num_forget, beta, teacher, chunk_rows, logit_scale,
    softcap, needs_grad)` -> `(loss, row_losses, row_logps)`; see the module docstring."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        row_weights,
        kind,
        num_forget,
        beta,
        teacher,
        chunk_rows,
        logit_scale,
        softcap,
        needs_grad,
    ):
        ctx.set_materialize_grads(False)
        need_h, need_w, need_b = needs_grad
        device = hidden.device
        dtype, acc = gemm_dtypes(hidden)
        n_rows = hidden.shape[0]
        row_losses = torch.zeros(n_rows, device=device, dtype=acc)
        row_logps = torch.zeros(n_rows, device=device, dtype=acc)
        weights = row_weights.to(acc)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        new = torch.empty if n_rows else torch.zeros  # grad_weight is written (not added to) by the first tile
        grad_weight = new(weight.shape, device=device, dtype=acc) if need_w else None
        grad_bias = torch.zeros(bias.shape, device=device, dtype=acc) if need_b else None
        tiles = [(a, min(a + chunk_rows, num_forget)) for a in range(0, num_forget, chunk_rows)]
        tiles += [(a, min(a + chunk_rows, n_rows)) for a in range(num_forget, n_rows, chunk_rows)]
        first = True
        with gather_head(weight, bias), torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            tile_rows = max((r1 - r0 for r0, r1 in tiles), default=0)
            tile = hidden.new_empty((tile_rows, w.shape[0]), dtype=dtype)
            tile32 = tile if dtype == acc else torch.empty_like(tile, dtype=acc)
            target = torch.empty_like(tile32) if kind in ("undial", "ceu") and num_forget else None
            if kind == "undial" and num_forget:
                tw = teacher.weight.to(dtype)
                tb = None if teacher.bias is None else teacher.bias.to(dtype)
            for r0, r1 in tiles:
                n = r1 - r0
                y = project(hidden[r0:r1].to(dtype), w, b, out=tile[:n])
                z = tile32[:n].copy_(y) if tile32 is not tile else y
                slope = transform_logits(z, logit_scale, softcap, 1.0)
                label = labels[r0:r1]
                if r0 >= num_forget:
                    loss, lse = nll_(z, label)
                    logp = -loss
                else:
                    logp = z.gather(1, label[:, None]).view(-1)
                    if kind == "pdu":
                        loss, lse = logit_gap_(z)
                    else:
                        q = target[:n]
                        if kind == "ceu":
                            q.copy_(z).scatter_(1, label[:, None], float("-inf"))
                        else:  # the teacher's logits, its transform, the label's lowered by beta
                            th = teacher.hidden[r0:r1].to(dtype)
                            tq = project(th, tw, tb, out=q if dtype == acc else tile[:n])
                            if tq is not q:
                                q.copy_(tq)
                            transform_logits(q, *teacher.transform, 1.0)
                            q.scatter_add_(1, label[:, None], torch.full_like(q[:, :1], -beta))
                        loss, lse = soft_ce_(z, softmax_(q))
                    logp = logp - lse
                row_losses[r0:r1], row_logps[r0:r1] = loss, logp
                if not any(needs_grad):
                    continue
                g = to_raw_logits_grad(z.mul_(weights[r0:r1, None]), slope, logit_scale, 1.0)  # z holds dl/dz
                if need_b:
                    grad_bias.add_(g.sum(dim=0))
                g = tile[:n].copy_(g) if tile32 is not tile else g  # back to the GEMM dtype
                if need_h:
                    grad_hidden[r0:r1] = g @ w
                if need_w:
                    addmm_fp32_(grad_weight, g.t(), hidden[r0:r1].to(dtype), first=first)
                    first = False
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(row_losses, row_logps)
        return (row_losses * weights).sum(), row_losses, row_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_losses, _grad_row_logps):
        none = (None,) * 10  # labels, row_weights and the non-tensor arguments
        if grad_loss is None:
            return (None, None, None) + none
        grads = tuple(
            None if buf is None else (buf * grad_loss.to(buf.dtype)).to(dt)
            for buf, dt in zip(ctx.saved_tensors, ctx.dtypes)
        )
        return grads + none


def fused_vocab_loss(
    hidden,
    weight,
    labels,
    row_weights,
    bias=None,
    *,
    kind,
    num_forget,
    beta=0.0,
    teacher=None,
    logit_scale=1.0,
    softcap=None,
    chunk_rows=DEFAULT_CHUNK_SIZE,
):
    """`(loss, row_losses, row_logps)`: the weighted sum of the rows' losses; shapes and conventions: module
    docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if not 0 <= num_forget <= hidden.shape[0]:
        raise ValueError(f"num_forget must lie in [0, {hidden.shape[0]}] (the rows of hidden), got {num_forget}")
    if kind == "undial" and num_forget and (teacher is None or teacher.hidden.shape[0] != num_forget):
        got = "none" if teacher is None else f"{teacher.hidden.shape[0]} rows"
        raise ValueError(f"UNDIAL needs the teacher's hidden states at the {num_forget} forget rows, got {got}")
    if labels.shape != (hidden.shape[0],) or row_weights.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels and row_weights must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)} and "
            f"{tuple(row_weights.shape)}"
        )
    # ZeRO-3: the heads are gathered for the op; autograd then records the full head shape for its gradient. A teacher
    # sharing the student's head (PEFT with the adapters off) is gathered once.
    own_teacher_head = teacher is not None and teacher.weight is not weight
    teacher_ctx = gather_head(teacher.weight, teacher.bias) if own_teacher_head else contextlib.nullcontext()
    with gather_head(weight, bias), teacher_ctx:
        grad_on = torch.is_grad_enabled()
        needs_grad = tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))
        return FusedVocabLoss.apply(
            hidden,
            weight,
            bias,
            labels.long(),
            row_weights.detach(),
            kind,
            num_forget,
            float(beta),
            teacher,
            chunk_rows,
            logit_scale,
            softcap,
            needs_grad,
        )


def naive_vocab_loss(
    hidden,
    weight,
    labels,
    row_weights,
    bias=None,
    *,
    kind,
    num_forget,
    beta=0.0,
    teacher=None,
    logit_scale=1.0,
    softcap=None,
):
    """Reference (tests, benchmarks): the same losses from the full `[N, V]` logits with autograd. Same arguments
    and outputs as `fused_vocab_loss`, the loss attached."""

    def logits(h, w, b, scale, cap):
        y = torch.nn.functional.linear(h, w, b).to(torch.promote_types(h.dtype, torch.float32))
        return cap * torch.tanh(scale * y / cap) if cap is not None else scale * y

    z = logits(hidden, weight, bias, logit_scale, softcap)
    logp = z.log_softmax(-1)
    zf, lf = z[:num_forget], labels[:num_forget]
    if kind == "pdu":
        forget = (zf.max(-1).values - zf.mean(-1)).square()
    else:
        if kind == "ceu":
            t = zf.detach().scatter(1, lf[:, None], float("-inf"))
        else:
            t = logits(teacher.hidden, teacher.weight, teacher.bias, *teacher.transform).detach()
            t = t - beta * torch.nn.functional.one_hot(lf, t.shape[1]).to(t.dtype)
        forget = -(t.softmax(-1) * logp[:num_forget]).sum(-1)
    row_logps = logp.gather(1, labels[:, None]).view(-1)
    row_losses = torch.cat([forget, -row_logps[num_forget:]])
    return (row_losses * row_weights).sum(), row_losses.detach(), row_logps.detach()
