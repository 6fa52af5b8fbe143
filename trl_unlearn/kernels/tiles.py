"""The math on one `[n, V]` tile of logits, shared by the chunked kernels (`token_logps`, `sequence_loss`).

Conventions: `h` `[n, H]` hidden states, `w` `[V, H]` LM head, `labels` `[n]` int64 in `[0, V)`; a tile `z` `[n, V]` is
fp32. The model's logits are `z = t(h @ w.T + b)` with `t(y) = softcap * tanh(logit_scale * y / softcap) / temperature`,
or `t(y) = logit_scale * y / temperature` without softcap.
"""

import torch

from .._trl_compat import maybe_gather_lm_head_ctx

DEFAULT_CHUNK_SIZE = 512

# `torch.addmm(..., out_dtype=torch.float32)` (low-precision inputs, fp32 output) exists on CUDA from torch 2.8.
CUDA_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
ACC_BLOCK_ROWS = 8192


def project(h, w, b, out):
    """Raw logits `out[n, V] = h[n, H] @ w[V, H].T (+ b[V])`, written into the preallocated `out`."""
    torch.mm(h, w.t(), out=out)
    return out if b is None else out.add_(b)


def transform_logits(z, logit_scale, softcap, temperature):
    """Raw logits -> model logits, in place on fp32 `z[n, V]`. Returns `dz/dy` as a tile when softcapping, else None
    (then `dz/dy` is the constant `logit_scale / temperature`)."""
    if softcap is None:
        if logit_scale != temperature:
            z.mul_(logit_scale / temperature)
        return None
    z.mul_(logit_scale / softcap).tanh_()
    slope = z.square().neg_().add_(1).mul_(logit_scale / temperature)  # d(softcap * tanh(s*y/softcap) / T)/dy
    z.mul_(softcap / temperature)
    return slope


def token_stats(z, labels, with_entropy):
    """Per-row statistics of fp32 logits `z[n, V]` for `labels[n]`: `(logp[n], logsumexp[n], entropy[n] or None)`.

    Overwrites `z` with the probabilities `softmax(z)`.
    """
    zmax = z.amax(dim=-1)
    target = z.gather(-1, labels[:, None]).squeeze(-1)
    e = z.sub_(zmax[:, None]).exp_()
    sum_e = e.sum(dim=-1)
    p = e.div_(sum_e[:, None])
    lse = zmax + sum_e.log()
    entropy = torch.special.entr(p).sum(dim=-1) if with_entropy else None  # -sum p log p, 0 log 0 = 0
    return target - lse, lse, entropy


def logits_grad(z, labels, lse, grad_logp, grad_entropy=None, entropy=None):
    """Gradient w.r.t. the fp32 logits `z[n, V]`, computed in place over `z` and returned.

    d logp_i / dz_ij = 1[j = label_i] - p_ij ;  d H_i / dz_ij = -p_ij (log p_ij + H_i).
    `grad_logp`, `grad_entropy`: `[n]` fp32 upstream gradients (either may be None, not both).
    """
    logp = z.sub_(lse[:, None])
    if grad_entropy is None:
        grad = logp.exp_().mul_(-grad_logp[:, None])
    else:
        p = logp.exp()
        coef = logp.add_(entropy[:, None]).mul_(-grad_entropy[:, None])
        if grad_logp is not None:
            coef.sub_(grad_logp[:, None])
        grad = coef.mul_(p)
    if grad_logp is not None:
        grad.scatter_add_(1, labels[:, None], grad_logp[:, None])
    return grad


def to_raw_logits_grad(g, slope, logit_scale, temperature):
    """Chain rule through `transform_logits`, in place: d/dz `[n, V]` -> d/dy (the raw logits)."""
    if slope is not None:
        return g.mul_(slope)
    return g.mul_(logit_scale / temperature) if logit_scale != temperature else g


def addmm_fp32_(acc, a, b, first):
    """`acc += a @ b` (`acc = a @ b` if `first`: `acc` may then be uninitialised) with an fp32 (or fp64) accumulator
    `acc`, whatever the dtype of `a` and `b`."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.device.type == "cuda" and CUDA_MM_OUT_DTYPE:
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    else:  # no low-precision GEMM with fp32 output here: round the product per row chunk, in blocks of acc's rows
        for r in range(0, acc.shape[0], ACC_BLOCK_ROWS):  # (bounds the temporary to [ACC_BLOCK_ROWS, H])
            part = a[r : r + ACC_BLOCK_ROWS] @ b
            acc[r : r + ACC_BLOCK_ROWS].copy_(part) if first else acc[r : r + ACC_BLOCK_ROWS].add_(part)


def gather_head(weight, bias):
    """All-gather ZeRO-3 partitioned head parameters for a direct read; a null context otherwise."""
    return maybe_gather_lm_head_ctx(weight, bias)


def gemm_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """`(dtype, acc)`: the dtype the tile GEMMs run in (autocast's, else `hidden`'s) and the accumulator dtype (fp32,
    or fp64 for fp64 inputs, as gradcheck uses)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return dtype, torch.promote_types(dtype, torch.float32)
