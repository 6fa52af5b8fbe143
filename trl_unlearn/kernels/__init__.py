"""LM-head kernels that never build the `(batch, seq, vocab)` logits: `token_logps` (label log-probs, chunked),
`sequence_loss` (a per-sequence loss fused with the head: its gradients in the forward pass), and `tiles`, the math
on one `[n, V]` tile that both share."""
