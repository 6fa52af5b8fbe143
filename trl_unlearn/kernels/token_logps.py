"""Per-token log-probabilities of a causal LM without materialising the `[B, T, V]` logits.

Unlearning losses (GA, NPO, SimNPO, ...) only need `log p(label)` at each scored position, yet the usual path builds
the full logits tensor, its fp32 log-softmax and, in backward, two more tensors of the same size. With a 128k vocabulary
that is the largest thing in memory. Here the LM head is applied to the scored positions only, `chunk_size` rows at a
time: forward keeps one `[chunk_size, V]` tile alive and saves one float per row (the logsumexp); backward rebuilds each
tile and turns it into the gradient in place. When the head is frozen (LoRA), forward instead saves the `[N, H]`
gradient of each row's log-prob with respect to its hidden state, and backward is a row scaling.

Layout (the math on one tile is in `tiles.py`):
    ChunkedTokenLogps, chunked_token_logps              the row-chunking machinery (autograd Function + wrapper)
    naive_token_logps                                   the full-logits reference (tests, benchmark)

Conventions: `hidden` is `[N, H]` (only the positions that are scored), `weight` is the LM head `[V, H]`, `labels` is
`[N]` int64 with values in `[0, V)`; outputs are `[N]` float32 (float64 for float64 inputs). The logits are
`z = t(hidden @ weight.T + bias)` with `t(y) = softcap * tanh(logit_scale * y / softcap) / temperature`, or
`t(y) = logit_scale * y / temperature` without softcap.
"""

import torch

from .tiles import (
    DEFAULT_CHUNK_SIZE,
    addmm_fp32_,
    gather_head,
    logits_grad,
    project,
    to_raw_logits_grad,
    token_stats,
    transform_logits,
)


# Rows per tile. On the 2-core CPU of benchmarks/README.md (N = 2044, H = 1024, V = 128k, fp32, trained head),
# 256 / 512 / 1024 / 2048 rows took 24.4 / 23.1 / 22.2 / 22.5 CPU-s: 512 is within 5% of the fastest and keeps the
# fp32 tile at 256 MiB (1024 rows: 512 MiB). On GPUs a larger tile may pay off: pass `chunk_size`.
class ChunkedTokenLogps(torch.autograd.Function):
    """`log_softmax(t(hidden @ weight.T + bias))[i, labels[i]]` (and the entropy) without the `[N, V]` logits.

    `apply(hidden[N, H], weight[V, H], bias[V] | None, labels[N], chunk_size, logit_scale, softcap, temperature,
    return_entropy, hidden_grad_only)` -> `(logp[N] fp32, entropy[N] fp32 or None)`.

    Rows are processed `chunk_size` at a time; one `[chunk_size, V]` tile (plus an fp32 copy when the matmul runs in a
    lower precision, plus one more with softcapping) lives at a time. The matmul runs in the autocast dtype when
    autocast is on, else in `hidden`'s dtype; the softmax math is fp32.

    Backward, general case: saves hidden, weight, bias, labels and the per-row logsumexp; recomputes each tile and
    returns gradients for hidden, weight and bias (weight and bias accumulated in fp32, then cast). The entropy is
    differentiable too.

    Backward, `hidden_grad_only=True` (set by `chunked_token_logps` when grad mode is on and only `hidden` requires a
    gradient, e.g. a frozen LM head under LoRA, and no entropy is returned): forward also computes
    `d logp_i / d hidden_i` (`[N, H]`, one extra matmul per tile) and saves only that, so backward is a row scaling
    with no recomputation.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        chunk_size,
        logit_scale,
        softcap,
        temperature,
        return_entropy,
        hidden_grad_only=False,
    ):
        ctx.set_materialize_grads(False)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)
        ctx.hidden_grad_only = hidden_grad_only and not return_entropy and not any(ctx.needs_input_grad[1:3])
        n_rows = hidden.shape[0]
        logp = torch.empty(n_rows, device=hidden.device, dtype=acc)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        dlogp_dhidden = hidden.new_empty(hidden.shape, dtype=acc) if ctx.hidden_grad_only else None
        with gather_head(weight, bias), torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            tile = hidden.new_empty((min(n_rows, chunk_size), w.shape[0]), dtype=dtype)
            tile32 = tile if dtype == acc else torch.empty_like(tile, dtype=acc)
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, min(start + chunk_size, n_rows))
                n = rows.stop - start
                y = project(hidden[rows].to(dtype), w, b, out=tile[:n])
                z = tile32[:n].copy_(y) if tile32 is not tile else y
                slope = transform_logits(z, logit_scale, softcap, temperature)
                logp[rows], lse[rows], ent = token_stats(z, labels[rows], return_entropy)  # z now holds p
                if return_entropy:
                    entropy[rows] = ent
                if dlogp_dhidden is not None:  # (onehot - p) @ W, through the logit transform
                    g = z.neg_().scatter_add_(1, labels[rows, None], torch.ones_like(lse[rows, None]))
                    g = to_raw_logits_grad(g, slope, logit_scale, temperature)
                    g = tile[:n].copy_(g) if tile32 is not tile else g
                    dlogp_dhidden[rows] = g @ w
        if ctx.hidden_grad_only:
            ctx.save_for_backward(dlogp_dhidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.config = (dtype, chunk_size, logit_scale, softcap, temperature)
        ctx.hidden_dtype = hidden.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        none = (None,) * 7  # labels and the non-tensor arguments
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + none
        if ctx.hidden_grad_only:
            (dlogp_dhidden,) = ctx.saved_tensors
            return ((grad_logp[:, None] * dlogp_dhidden).to(ctx.hidden_dtype), None, None) + none
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        with gather_head(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            grads = _recompute_grads(
                hidden,
                weight,
                bias,
                labels,
                lse,
                entropy,
                grad_logp,
                grad_entropy,
                ctx.needs_input_grad[:3],
                *ctx.config,
            )
        # cast once the tiles are freed, so only the fp32 accumulators and their casts coexist
        return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias))) + none


def _recompute_grads(
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    needs_grad,
    dtype,
    chunk_size,
    logit_scale,
    softcap,
    temperature,
):
    """Backward of `ChunkedTokenLogps` by recomputing the tiles: `(grad_hidden, grad_weight fp32, grad_bias fp32)`,
    each None where not needed. `weight` and `bias` must be gathered (ZeRO-3) and autocast off."""
    need_hidden, need_weight, need_bias = needs_grad
    acc = lse.dtype
    grad_logp = None if grad_logp is None else grad_logp.to(acc)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(acc)
    n_rows = hidden.shape[0]
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # written (not added to) by the first chunk; zero-filled only when there is no chunk
    new = torch.empty if n_rows else torch.zeros
    grad_weight = new(weight.shape, device=weight.device, dtype=acc) if need_weight else None
    grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=acc) if need_bias else None
    tile = hidden.new_empty((min(n_rows, chunk_size), w.shape[0]), dtype=dtype)
    tile32 = tile if dtype == acc else torch.empty_like(tile, dtype=acc)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, n_rows))
        n = rows.stop - start
        h = hidden[rows].to(dtype)
        y = project(h, w, b, out=tile[:n])
        z = tile32[:n].copy_(y) if tile32 is not tile else y
        slope = transform_logits(z, logit_scale, softcap, temperature)
        g = logits_grad(
            z,
            labels[rows],
            lse[rows],
            None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows],
            None if entropy is None else entropy[rows],
        )
        g = to_raw_logits_grad(g, slope, logit_scale, temperature)
        if grad_bias is not None:
            grad_bias += g.sum(dim=0)
        g = tile[:n].copy_(g) if tile32 is not tile else g  # back to the matmul dtype
        if grad_hidden is not None:
            grad_hidden[rows] = g @ w
        if grad_weight is not None:
            addmm_fp32_(grad_weight, g.t(), h, first=start == 0)
    return grad_hidden, grad_weight, grad_bias


def chunked_token_logps(
    hidden,
    weight,
    labels,
    bias=None,
    *,
    chunk_size=DEFAULT_CHUNK_SIZE,
    logit_scale=1.0,
    softcap=None,
    temperature=1.0,
    return_entropy=False,
):
    """Log-probability of `labels` under the LM head, `chunk_size` rows at a time.

    Args:
        hidden: `[N, H]` final hidden states of the scored positions only (any float dtype).
        weight: `[V, H]` LM head weight (may be tied to the input embedding, or ZeRO-3 partitioned).
        labels: `[N]` int64 target ids in `[0, V)`.
        bias: optional `[V]` LM head bias.
        chunk_size: rows per `[chunk_size, V]` tile.
        logit_scale, softcap, temperature: `z = softcap * tanh(logit_scale * y / softcap) / temperature`.
        return_entropy: also return the entropy of each row's distribution (differentiable).

    Returns:
        `logp` `[N]` float32, or `(logp, entropy)` both `[N]` float32 if `return_entropy`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    labels = labels.long()
    head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    hidden_grad_only = torch.is_grad_enabled() and hidden.requires_grad and not head_grad
    # Gather around `apply` too, so autograd records the full weight shape for the gradient it will receive.
    with gather_head(weight, bias):
        logp, entropy = ChunkedTokenLogps.apply(
            hidden,
            weight,
            bias,
            labels,
            chunk_size,
            logit_scale,
            softcap,
            temperature,
            return_entropy,
            hidden_grad_only,
        )
    return (logp, entropy) if return_entropy else logp


def naive_token_logps(hidden, weight, labels, bias=None):
    """Reference: full fp32 logits `[N, V]` -> log_softmax -> gather. `hidden [N, H]`, `labels [N]` -> `[N]` fp32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
