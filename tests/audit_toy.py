"""Shared tiny-model helpers of the audit tests: plain full-batch NLL training and gradient-ascent unlearning on QA
rows, in the prompt format the audit scores with."""

import torch

from trl_unlearn.data.formats import resolve_prompt_format
from trl_unlearn.data.tokenize import encode_pairs, pad_batch
from trl_unlearn.modeling import forward_logps


def qa_batch(tokenizer, rows, prompt_format="plain"):
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    seqs, starts = encode_pairs(tokenizer, fmt, [r["question"] for r in rows], [r["answer"] for r in rows], 256)
    return pad_batch(seqs, starts, tokenizer.pad_token_id, "cpu")


def mean_nll(model, batch):
    ids, attn, labels = batch
    logps = forward_logps(model, ids, attention_mask=attn, labels=labels).token_logps
    mask = labels[:, 1:] != -100
    return -(logps * mask).sum() / mask.sum()


def train(model, batch, steps, lr, seed=0):
    """Full-batch AdamW on the answers' NLL (the model learns the rows)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = mean_nll(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def unlearn(model, forget_batch, retain_batch, steps, lr):
    """Gradient difference: ascent on the forget NLL, descent on the retain NLL."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = -mean_nll(model, forget_batch) + mean_nll(model, retain_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
