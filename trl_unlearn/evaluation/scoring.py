"""Batched model scoring and batched greedy generation for evaluation.

* `score_answers`: per-token log-probs of answers given questions. Every (question, answer) pair of a call is
  scored in shared batches: pairs are sorted by length (less padding), right-padded, and scored with
  `trl_unlearn.modeling.forward_logps`, which never builds a `(B, T, V)` logits tensor. Pass all answers of all
  items (ground truth, paraphrase, every perturbed answer) in one call.
* `score_texts`: the same for plain texts (every token after the first is scored), optionally with the mean and
  standard deviation of `log p` under the model's next-token distribution at each position (Min-K%++), computed
  from the final hidden states and the LM head a chunk of positions at a time.
* `generate_answers`: batched greedy decoding with LEFT padding, prompts grouped by length, results returned in
  the input order.

Prompts are built by a `PromptFormat` (see `resolve_prompt_format`): the tokenizer's chat template when it has
one, else ``"Question: {question}\\nAnswer:"``. The scored answer is ``answer_prefix + answer`` followed by the EOS
token, so `|y|` counts the EOS (`method.md` §1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..data.formats import PromptFormat, resolve_prompt_format
from ..data.tokenize import encode_pairs, item_name, pad_batch
from ..modeling import forward_logps, head_logits, scored_hidden

__all__ = ["ScoreResult", "generate_answers", "score_answers", "score_texts"]

# -------------------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """Per-item scores, in the input order.

    `avg_nll` per-token mean NLL over the scored tokens; `sum_logp` their summed log-prob; `num_tokens` their
    count. With `return_token_logps`: `token_logps[i]` the per-token log-probs (float32). With `vocab_stats`:
    `token_mu[i]` and `token_sigma[i]`, the mean and standard deviation of `log p(z)` for `z` drawn from the
    model's next-token distribution at each scored position.
    """

    avg_nll: np.ndarray
    sum_logp: np.ndarray
    num_tokens: np.ndarray
    token_logps: list[np.ndarray] | None = None
    token_mu: list[np.ndarray] | None = None
    token_sigma: list[np.ndarray] | None = None


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    # progress=None: tqdm decides (shown on a terminal, hidden otherwise)
    return tqdm(total=total, desc=desc, disable=None if progress is None else not progress, leave=False)


def _batches(lengths: Sequence[int], batch_size: int, group_by_length: bool) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if group_by_length:
        # longest first: a batch that does not fit in memory fails at once, not at the end of a long run
        order.sort(key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@contextmanager
def eval_mode(model):
    """Eval mode and no gradients; the model's previous train / eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:
        return next(model.parameters()).device


def _vocab_stats(model, input_ids, attention_mask, labels, chunk_elements: int = 1 << 24):
    """Per scored position: label log-prob, mu = E_p[log p], sigma = sqrt(E_p[(log p)^2] - mu^2), all fp32 `[B, T-1]`.

    The final hidden states are computed once; the LM head runs on chunks of scored positions holding at most
    `chunk_elements` logits, so a `(B, T, V)` tensor never exists.
    """
    h, t, mask = scored_hidden(model, input_ids, attention_mask, labels)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, chunk_elements // vocab)
    lp, mu, sg = [], [], []
    for s in range(0, h.shape[0], step):
        logp = torch.log_softmax(head_logits(model, h[s : s + step]), dim=-1)
        lp.append(logp.gather(-1, t[s : s + step, None].to(logp.device)).squeeze(-1))
        p = logp.exp()
        logp = torch.where(p > 0, logp, 0.0)  # tokens with p = 0 (e.g. -inf logits) add nothing, and no 0 * inf
        m = (p * logp).sum(-1, keepdim=True)
        mu.append(m.squeeze(-1))
        sg.append((p * (logp - m).square()).sum(-1).sqrt())  # two-pass variance: no cancellation

    def scatter(parts):
        full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        if parts:
            full[mask] = torch.cat(parts).to(mask.device)
        return full

    return scatter(lp), scatter(mu), scatter(sg)


def _score_encoded(
    model,
    tokenizer,
    sequences: Sequence[list[int]],
    starts: Sequence[int],
    *,
    batch_size: int,
    group_by_length: bool,
    return_token_logps: bool,
    vocab_stats: bool,
    progress: bool | None,
    desc: str,
) -> ScoreResult:
    """Score `sequences[i][starts[i]:]` given `sequences[i][:starts[i]]` (starts >= 1), batched and right-padded."""
    n = len(sequences)
    avg_nll = np.zeros(n)
    sum_logp = np.zeros(n)
    num_tokens = np.zeros(n, dtype=np.int64)
    keep_tokens = return_token_logps or vocab_stats
    tok_lp: list = [None] * n
    tok_mu: list = [None] * n
    tok_sg: list = [None] * n
    pad = pad_id(tokenizer)
    device = model_device(model)
    batches = _batches([len(s) for s in sequences], batch_size, group_by_length)
    with eval_mode(model), _progress(len(batches), desc, progress) as bar:
        for idx in batches:
            ids, attn, labels = pad_batch([sequences[i] for i in idx], [starts[i] for i in idx], pad, device)
            if vocab_stats:
                lp, mu, sg = _vocab_stats(model, ids, attn, labels)
            else:
                lp = forward_logps(model, ids, attention_mask=attn, labels=labels).token_logps
            lp = lp.float().cpu()
            scored = (labels[:, 1:] != -100).cpu()
            if vocab_stats:
                mu, sg = mu.cpu(), sg.cpu()
            for r, i in enumerate(idx):
                row = lp[r][scored[r]]
                k = row.numel()
                num_tokens[i] = k
                sum_logp[i] = row.double().sum().item()
                avg_nll[i] = -sum_logp[i] / k
                if keep_tokens:
                    tok_lp[i] = row.numpy().copy()
                if vocab_stats:
                    tok_mu[i] = mu[r][scored[r]].numpy().copy()
                    tok_sg[i] = sg[r][scored[r]].numpy().copy()
            bar.update(1)
    return ScoreResult(
        avg_nll=avg_nll,
        sum_logp=sum_logp,
        num_tokens=num_tokens,
        token_logps=tok_lp if keep_tokens else None,
        token_mu=tok_mu if vocab_stats else None,
        token_sigma=tok_sg if vocab_stats else None,
    )


def score_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    prompt_format: str | PromptFormat = "auto",
    batch_size: int = 16,
    max_length: int = 512,
    names: Sequence[str] | None = None,
    return_token_logps: bool = False,
    vocab_stats: bool = False,
    group_by_length: bool = True,
    progress: bool | None = None,
) -> ScoreResult:
    """Score each `answers[i]` given `questions[i]` (pairs; repeat a question for each of its answers).

    The sequence is `prompt_ids(question) + answer_ids(answer) + [EOS]`, cut on the right to `max_length` tokens;
    only answer tokens (and the EOS) are scored. A pair left with no scored token raises `ValueError` naming it
    (`names[i]` when given). Pairs are sorted by length and scored `batch_size` at a time (`group_by_length=False`
    keeps the input order), right-padded. Returns a `ScoreResult` in the input order.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if names is not None and len(names) != len(answers):
        raise ValueError(f"{len(names)} names but {len(answers)} answers")
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    sequences, starts = encode_pairs(tokenizer, fmt, questions, answers, max_length, names)
    return _score_encoded(
        model,
        tokenizer,
        sequences,
        starts,
        batch_size=batch_size,
        group_by_length=group_by_length,
        return_token_logps=return_token_logps,
        vocab_stats=vocab_stats,
        progress=progress,
        desc="scoring",
    )


def score_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    names: Sequence[str] | None = None,
    return_token_logps: bool = True,
    vocab_stats: bool = False,
    group_by_length: bool = True,
    progress: bool | None = None,
) -> ScoreResult:
    """Score plain texts: tokenised with the tokenizer's special tokens, cut to the first `max_length` tokens,
    every token after the first scored (membership scores, `method.md` §1). `vocab_stats=True` adds the per-position
    mean / std of `log p` under the model's distribution (Min-K%++). A text with fewer than 2 tokens raises
    `ValueError` naming it."""
    if names is not None and len(names) != len(texts):
        raise ValueError(f"{len(names)} names but {len(texts)} texts")
    sequences = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{item_name(names, i)}: text must be a string, got {type(t).__name__}")
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_length]
        if len(ids) < 2:
            raise ValueError(f"{item_name(names, i)}: needs at least 2 tokens to score one, has {len(ids)}")
        sequences.append(ids)
    return _score_encoded(
        model,
        tokenizer,
        sequences,
        [1] * len(sequences),
        batch_size=batch_size,
        group_by_length=group_by_length,
        return_token_logps=return_token_logps,
        vocab_stats=vocab_stats,
        progress=progress,
        desc="scoring texts",
    )


# ----------------------------------------------------------------------------------------------------- generation


def _cut_at(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int = 200,
    batch_size: int = 16,
    *,
    prompt_format: str | PromptFormat = "auto",
    max_prompt_length: int | None = None,
    stop_strings: Sequence[str] = (),
    group_by_length: bool = True,
    progress: bool | None = None,
    postprocess: Callable[[str], str] | None = str.strip,
) -> list[str]:
    """Greedy answers to `questions`, in the input order.

    Prompts (built by `prompt_format`; keep only their last `max_prompt_length` tokens when given) are sorted by
    length, LEFT-padded and decoded `batch_size` at a time for at most `max_new_tokens` new tokens each, stopping at
    EOS. The new tokens are decoded without special tokens, cut at the first of `stop_strings`, then passed
    through `postprocess` (default `str.strip`).
    """
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    prompts = []
    for i, q in enumerate(questions):
        ids = fmt.prompt_ids(tokenizer, q)
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        if not ids:
            raise ValueError(f"item {i}: the prompt has no tokens")
        prompts.append(ids)
    pad = pad_id(tokenizer)
    device = model_device(model)
    outputs: list[str | None] = [None] * len(prompts)
    batches = _batches([len(p) for p in prompts], batch_size, group_by_length)
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    # stop at the model's own end tokens (a chat model may have several); the tokenizer's EOS when it names none
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is None and tokenizer.eos_token_id is not None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id
    stop_ids = {config_eos} if isinstance(config_eos, int) else set(config_eos or ())
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    with eval_mode(model), _progress(len(batches), "generating", progress) as bar:
        for idx in batches:
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
                attn[r, width - len(prompts[i]) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **gen_kwargs)
            new = out[:, width:].cpu()
            for r, i in enumerate(idx):
                row = new[r].tolist()
                end = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
                row = row[:end]
                text = _cut_at(tokenizer.decode(row, skip_special_tokens=True), stop_strings)
                outputs[i] = postprocess(text) if postprocess is not None else text
            bar.update(1)
    return outputs  # type: ignore[return-value]
