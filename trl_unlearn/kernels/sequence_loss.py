"""A sequence-level unlearning loss fused with the LM head: its gradients are computed in the forward pass.

SimNPO, NPO, GA and the retain NLL give each sequence `s` a loss `l_s(L_s)` that depends only on the sequence's summed
label log-prob `L_s = sum_{i in s} logp_i` (plus its token count, a reference log-prob, step-wide counts: constants
known before the forward). So every scored row `i` has the upstream gradient `g_s = l_s'(L_s)` as soon as the rows of
its sequence have been projected. `FusedLinearSequenceLoss` projects whole sequences at a time, computes their
log-probs, losses and `g_s`, and turns the same `[n, V]` tile into the gradients for the hidden states and the head:
three `[N, H] x [H, V]` GEMMs, as the naive full-logits path runs, with no `[N, V]` tensor and no recomputation in
backward (`token_logps.ChunkedTokenLogps` needs four with a trainable head). Backward scales the saved gradients by the
incoming scalar.

API:
    fused_linear_sequence_loss(hidden, weight, labels, seq_lengths, seq_loss, bias=None, *, seq_weights=None,
                               logit_scale=1.0, softcap=None, temperature=1.0, chunk_rows=512)
        -> (loss, seq_logps, seq_losses)

    hidden       `[N, H]` final hidden states of the scored rows only, packed sequence after sequence (any float
                 dtype; under autocast the GEMMs run in the autocast dtype).
    weight       `[V, H]` LM head (may be tied, frozen, or ZeRO-3 partitioned); `bias` optional `[V]`.
    labels       `[N]` int64 in `[0, V)`: the next-token label of each row (no -100: drop those rows first).
    seq_lengths  `[S]` ints (list or 1-D tensor, read on the host: one device sync): rows of each sequence, in
                 order, summing to `N`; 0 is allowed (that sequence's `L_s` is 0).
    seq_loss     `seq_loss(logps) -> losses`: `logps` `[S]` fp32 (fp64 for fp64 inputs), `losses` `[S]`, where
                 `losses[s]` depends on `logps[s]` only (elementwise in `logps`; any constants may be captured, e.g.
                 `losses.ForgetRetainLoss`). The op calls it once per chunk on the full `[S]` vector, entries of
                 sequences not yet complete holding partial sums, and keeps the value and gradient of the chunk's own
                 entries only. The op differentiates nothing else: tensors it captures get no gradient.
    seq_weights  optional `[S]` constant weights: `loss = sum_s seq_weights[s] * losses[s]` (normalisations, loss
                 weights, the number of ranks); default 1.
    logit_scale, softcap, temperature: the logits are `z = t(hidden @ weight.T + bias)` as in `tiles.py`:
                 `softcap * tanh(logit_scale * y / softcap) / temperature`, or `logit_scale * y / temperature`.
    chunk_rows   row budget of one `[chunk_rows, V]` tile.
    Returns `loss` (0-dim, fp32; differentiable w.r.t. hidden, weight, bias), `seq_logps` (`[S]` fp32, the `L_s`) and
    `seq_losses` (`[S]`, the unweighted `losses[s]` at the final `L_s`), both detached, for logging: the loss of each
    sequence is computed once.

Backward reads the incoming gradient on the host (one sync on GPUs) when a saved buffer is already in its input's
dtype: if it is 1 the buffer is returned as it is (autograd takes it without a copy), else a scaled copy is made;
buffers in another dtype (fp32 accumulators of a bf16 head) are scaled while being cast.

Chunking, and why it is exact. `loss = sum_s w_s l_s(L_s)`, so `d loss / d theta = sum_i g_{s(i)} d logp_i / d theta`,
with `theta` = hidden, weight or bias and `d logp_i / d z_i = onehot(label_i) - softmax(z_i)`. Each term needs row
`i`'s logits and `g_{s(i)}` only, and the terms may be summed in any order: any partition of the rows into tiles
gives the gradient of the full-logits computation, provided `g_{s(i)}` is final when row `i`'s tile is
differentiated. Sequences are visited in order and packed greedily into groups of whole sequences of at most
`chunk_rows` rows; a group's tile holds all rows of its sequences, so their `L_s` and `g_s` are final once the tile's
log-probs are summed, and the same tile gives their gradients (3 GEMMs). A sequence longer than `chunk_rows` is cut
into tiles of `chunk_rows` rows: a first pass sums its log-probs (1 GEMM per tile), which makes `L_s` and `g_s`
final, and a second pass recomputes each tile and differentiates it with `g_s` (2 more GEMMs with a frozen head,
3 with a trainable one). Only those rows are projected twice. `tests/test_fused_loss.py` checks the gradients
against full-logits autograd and counts the projections.

Memory: one `[chunk_rows, V]` tile (plus its fp32 copy when the GEMMs run in lower precision, plus one more with
softcapping), the `[N, H]` hidden gradient (in hidden's dtype) and, with a trainable head, the fp32 `[V, H]` head
gradient accumulator, the only full-vocabulary buffer, and the `[V]` bias one (fp64 for fp64 inputs). A frozen head
(LoRA / QLoRA) gets no accumulator. ZeRO-3: the head is gathered for the forward and its gradient goes back through
autograd, so backward reads no parameter.
"""

import torch

from .tiles import (
    DEFAULT_CHUNK_SIZE,
    addmm_fp32_,
    gather_head,
    gemm_dtypes,
    project,
    to_raw_logits_grad,
    token_stats,
    transform_logits,
)

DEFAULT_CHUNK_ROWS = DEFAULT_CHUNK_SIZE  # 512 rows: a 256 MiB fp32 tile at V = 128256 (see benchmarks/README.md)


def _plan(lengths, budget):
    """Chunks of rows, in order: `(r0, r1, s0, s1, long)`. `long=False`: whole sequences `s0:s1`, rows `r0:r1`,
    at most `budget` rows; `long=True`: one sequence `s0` (`s1 = s0 + 1`) of more than `budget` rows `r0:r1`."""
    chunks, r0, s0, rows = [], 0, 0, 0
    for s, n in enumerate(lengths):
        if n > budget or rows + n > budget:
            if s > s0:
                chunks.append((r0, r0 + rows, s0, s, False))
            r0, s0, rows = r0 + rows, s, 0
        if n > budget:
            chunks.append((r0, r0 + n, s, s + 1, True))
            r0, s0 = r0 + n, s + 1
        else:
            rows += n
    if len(lengths) > s0:
        chunks.append((r0, r0 + rows, s0, len(lengths), False))
    return chunks


def _chunk_losses(seq_loss, seq_weights, seq_logps, s0, s1, with_grad):
    """`(value, losses, grad)` of the chunk's sequences `s0:s1`: `value = sum(w * seq_loss(seq_logps))[s0:s1]` (0-dim,
    `seq_logps`' dtype), `losses` their unweighted losses `[s1 - s0]`, and, if `with_grad`, the gradient of `value`
    `[S]` w.r.t. `seq_logps` (only entries `s0:s1` are meaningful); None otherwise."""
    with torch.enable_grad():
        x = seq_logps.detach().clone().requires_grad_(with_grad)
        out = seq_loss(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"seq_loss must return a tensor of shape {tuple(x.shape)} (one loss per sequence), got {got}."
            )
        weighted = out if seq_weights is None else out * seq_weights
        part = weighted[s0:s1].sum().to(x.dtype)
        grad = None
        if with_grad:
            grad = torch.autograd.grad(part, x)[0] if part.requires_grad else torch.zeros_like(x)
    return part.detach(), out[s0:s1].detach(), grad


class FusedLinearSequenceLoss(torch.autograd.Function):
    """`apply(hidden, weight, bias, labels, lengths (tuple of ints), seq_loss, seq_weights, chunk_rows, logit_scale,
    softcap, temperature, needs_grad (3 bools: hidden, weight, bias))` -> `(loss, seq_logps, seq_losses)`; see the
    module docstring."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        lengths,
        seq_loss,
        seq_weights,
        chunk_rows,
        logit_scale,
        softcap,
        temperature,
        needs_grad,
    ):
        ctx.set_materialize_grads(False)
        need_h, need_w, need_b = needs_grad
        device = hidden.device
        dtype, acc = gemm_dtypes(hidden)
        transform = (logit_scale, softcap, temperature)
        n_rows, n_seqs = hidden.shape[0], len(lengths)
        chunks = _plan(lengths, chunk_rows)
        seq_logps = torch.zeros(n_seqs, device=device, dtype=acc)
        seq_losses = torch.zeros(n_seqs, device=device, dtype=acc)
        seq_of_row = torch.repeat_interleave(torch.arange(n_seqs), torch.tensor(lengths, dtype=torch.long)).to(device)
        total = torch.zeros((), device=device, dtype=acc)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        new = torch.empty if n_rows else torch.zeros  # grad_weight is written (not added to) by the first tile
        grad_weight = new(weight.shape, device=device, dtype=acc) if need_w else None
        grad_bias = torch.zeros(bias.shape, device=device, dtype=acc) if need_b else None
        first = True  # grad_weight not written yet

        with gather_head(weight, bias), torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            tile_rows = max((min(r1 - r0, chunk_rows) for r0, r1, *_ in chunks), default=0)
            tile = hidden.new_empty((tile_rows, w.shape[0]), dtype=dtype)
            tile32 = tile if dtype == acc else torch.empty_like(tile, dtype=acc)

            def tile_forward(r0, r1):
                """Softmax `[n, V]` (fp32, in the tile), the transform's slope and `logp` `[n]` of rows `r0:r1`."""
                n = r1 - r0
                y = project(hidden[r0:r1].to(dtype), w, b, out=tile[:n])
                z = tile32[:n].copy_(y) if tile32 is not tile else y
                slope = transform_logits(z, *transform)
                logp, _, _ = token_stats(z, labels[r0:r1], False)  # z now holds softmax(z)
                return z, slope, logp

            def tile_backward(r0, r1, p, slope, row_grad):
                """Gradients of `sum_i row_grad[i] * logp_i` over rows `r0:r1`, from their softmax `p` (overwritten)."""
                nonlocal first
                g = p.mul_(-row_grad[:, None]).scatter_add_(1, labels[r0:r1, None], row_grad[:, None])
                g = to_raw_logits_grad(g, slope, logit_scale, temperature)
                if need_b:
                    grad_bias.add_(g.sum(dim=0))
                g = tile[: r1 - r0].copy_(g) if tile32 is not tile else g  # back to the GEMM dtype
                if need_h and grad_hidden.dtype == dtype:
                    torch.mm(g, w, out=grad_hidden[r0:r1])
                elif need_h:  # autocast: the GEMM in its dtype, the gradient in hidden's
                    grad_hidden[r0:r1] = g @ w
                if need_w:
                    addmm_fp32_(grad_weight, g.t(), hidden[r0:r1].to(dtype), first=first)
                    first = False

            for r0, r1, s0, s1, long in chunks:
                if not long:  # whole sequences: log-probs, losses and gradients from one projection
                    p, slope, logp = tile_forward(r0, r1) if r1 > r0 else (None, None, None)
                    if logp is not None:
                        seq_logps.index_add_(0, seq_of_row[r0:r1], logp)
                    value, seq_losses[s0:s1], grad = _chunk_losses(
                        seq_loss, seq_weights, seq_logps, s0, s1, any(needs_grad)
                    )
                    if grad is not None and r1 > r0:
                        tile_backward(r0, r1, p, slope, grad[seq_of_row[r0:r1]])
                else:  # one sequence over several tiles: sum its log-probs first, then differentiate each tile
                    tiles = [(a, min(a + chunk_rows, r1)) for a in range(r0, r1, chunk_rows)]
                    for a, c in tiles:
                        seq_logps[s0] += tile_forward(a, c)[2].sum()
                    value, seq_losses[s0:s1], grad = _chunk_losses(
                        seq_loss, seq_weights, seq_logps, s0, s1, any(needs_grad)
                    )
                    if grad is not None:
                        for a, c in tiles:
                            p, slope, _ = tile_forward(a, c)
                            tile_backward(a, c, p, slope, grad[s0].expand(c - a))
                total += value

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(seq_logps, seq_losses)
        return total, seq_logps, seq_losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq_logps, _grad_seq_losses):
        none = (None,) * 9  # labels, lengths, seq_loss, seq_weights and the non-tensor arguments
        if grad_loss is None:
            return (None, None, None) + none
        scale = [None]

        def scaled(buf, dtype):
            if buf is None:
                return None
            if buf.dtype != dtype:  # a new tensor anyway: scale while casting, no sync
                return torch.mul(buf, grad_loss.to(buf.dtype), out=torch.empty_like(buf, dtype=dtype))
            if scale[0] is None:
                scale[0] = float(grad_loss)  # a host sync on GPUs, only for buffers already in the right dtype
            return buf if scale[0] == 1.0 else buf * scale[0]

        return tuple(scaled(buf, dt) for buf, dt in zip(ctx.saved_tensors, ctx.dtypes)) + none


def fused_linear_sequence_loss(
    hidden,
    weight,
    labels,
    seq_lengths,
    seq_loss,
    bias=None,
    *,
    seq_weights=None,
    logit_scale=1.0,
    softcap=None,
    temperature=1.0,
    chunk_rows=DEFAULT_CHUNK_ROWS,
):
    """`(loss, seq_logps, seq_losses)`: the weighted sum of `seq_loss`'s per-sequence losses of the summed label
    log-probs, those sums `[S]` and the unweighted losses `[S]` (both detached). Shapes and conventions: module
    docstring."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    # ZeRO-3: the head's shape is only visible once gathered; gathering around `apply` also makes autograd record the
    # full weight shape for the gradient it will receive.
    with gather_head(weight, bias):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                f"{tuple(weight.shape)} (pass the scored rows only: "
                "hidden[:, :-1][labels[:, 1:] != -100])"
            )
        if labels.shape != (n_rows,):
            raise ValueError(f"labels must be [N] = [{n_rows}], one per row of hidden, got {tuple(labels.shape)}")
        lengths = torch.as_tensor(seq_lengths).reshape(-1).long()
        if n_rows:  # one host copy for the lengths and the label range
            *lengths, lo, hi = torch.cat([lengths.to(labels.device), torch.stack(labels.aminmax())]).tolist()
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"labels must lie in [0, {vocab}), got values in [{lo}, {hi}]: drop the unscored "
                    "(-100) rows from hidden and labels first"
                )
        else:
            lengths = lengths.tolist()
        if any(n < 0 for n in lengths) or sum(lengths) != n_rows:
            raise ValueError(f"seq_lengths must be non-negative and sum to the {n_rows} rows of hidden, got {lengths}")
        grad_on = torch.is_grad_enabled()
        needs_grad = tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))
        return FusedLinearSequenceLoss.apply(
            hidden,
            weight,
            bias,
            labels.long(),
            tuple(lengths),
            seq_loss,
            seq_weights,
            chunk_rows,
            logit_scale,
            softcap,
            temperature,
            needs_grad,
        )


def naive_sequence_loss(
    hidden,
    weight,
    labels,
    seq_lengths,
    seq_loss,
    bias=None,
    *,
    seq_weights=None,
    logit_scale=1.0,
    softcap=None,
    temperature=1.0,
):
    """Reference (tests, benchmarks): full fp32 `[N, V]` logits -> log_softmax -> gather -> per-sequence sums ->
    `seq_loss` -> weighted sum. Same arguments and outputs as `fused_linear_sequence_loss`, but attached."""
    y = torch.nn.functional.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
    z = softcap * torch.tanh(logit_scale * y / softcap) if softcap is not None else logit_scale * y
    logp = (z / temperature).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    lengths = torch.as_tensor(seq_lengths, device=hidden.device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    seq_logps = logp.new_zeros(len(lengths)).index_add(0, seq, logp)
    seq_losses = seq_loss(seq_logps)
    weighted = seq_losses if seq_weights is None else seq_losses * seq_weights
    return weighted.sum(), seq_logps, seq_losses
