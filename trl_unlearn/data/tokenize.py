"""Tokenisation: TRL rows to `prompt_ids` / `completion_ids` (`tokenize_dataset`), raw text to windows or
documents, QA pairs to token ids (`encode_pairs`) and right-padded batches (`pad_batch`) for scoring."""

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from datasets import Dataset

from .._trl_compat import common_prefix_length, is_conversational
from .._trl_compat import tokenize as _tokenize
from .formats import PromptFormat, detect_format

logger = logging.getLogger(__name__)


def text_windows(texts: Iterable[str], tokenizer, max_length: int) -> Dataset:
    """The concatenated documents (each followed by EOS) cut into windows of `max_length - 1` tokens, as
    language-modeling `text` rows (MUSE's training data; the trainer appends the EOS back). A last window of one
    token is dropped."""
    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    size = max_length - 1
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    return Dataset.from_dict({"text": [tokenizer.decode(c, skip_special_tokens=True) for c in chunks if len(c) > 1]})


def text_documents(texts: Iterable[str]) -> Dataset:
    """One language-modeling `text` row per document, as stored (the WMDP code's rows); the trainer truncates each
    to `max_length` tokens, keeping the start (`truncation_mode="keep_start"`, the default)."""
    return Dataset.from_dict({"text": list(texts)})


def item_name(names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None else f"item {i}"


def pad_batch(sequences: Sequence[list[int]], starts: Sequence[int], pad: int, device):
    """Right-padded `(input_ids, attention_mask, labels)` `[B, T]`: `labels` keeps `sequences[i][starts[i]:]`,
    -100 elsewhere."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for r, (seq, start) in enumerate(zip(sequences, starts)):
        t = torch.tensor(seq, dtype=torch.long)
        ids[r, : len(seq)] = t
        attn[r, : len(seq)] = 1
        labels[r, start : len(seq)] = t[start:]
    return ids.to(device), attn.to(device), labels.to(device)


def encode_pairs(tokenizer, fmt: PromptFormat, questions, answers, max_length: int, names=None):
    """`(sequences, starts)`: `prompt_ids(question) + answer_ids(answer)` (EOS included) cut on the right to
    `max_length`, and where each answer starts. A pair left with no answer token raises `ValueError` naming it."""
    prompt_cache: dict[str, list[int]] = {}
    sequences, starts = [], []
    for i, (q, a) in enumerate(zip(questions, answers)):
        if not isinstance(q, str) or not isinstance(a, str):
            raise TypeError(f"{item_name(names, i)}: question and answer must be strings, got {q!r}, {a!r}")
        if q not in prompt_cache:
            prompt_cache[q] = fmt.prompt_ids(tokenizer, q)
        p = prompt_cache[q]
        seq = (p + fmt.answer_ids(tokenizer, a))[:max_length]
        if len(seq) <= len(p) or len(p) == 0:
            why = (
                f"the prompt alone is {len(p)} tokens and max_length is {max_length}"
                if len(p) >= max_length
                else "the prompt is empty"
                if len(p) == 0
                else "the answer has no tokens"
            )
            raise ValueError(f"{item_name(names, i)}: no answer token left to score ({why})")
        sequences.append(seq)
        starts.append(len(p))
    return sequences, starts


def _num_scored(prompt_len: int, total_len: int, max_length: int | None, truncation_mode: str) -> int:
    """Completion tokens that keep a label after truncation (position 0 is never scored: nothing predicts it)."""
    if max_length is None or total_len <= max_length:
        return total_len - max(prompt_len, 1)
    if truncation_mode == "keep_start":
        return max_length - max(prompt_len, 1)
    first_kept = total_len - max_length  # keep_end
    return total_len - max(first_kept + 1, prompt_len)


def tokenize_example(example: dict, tokenizer) -> dict:
    """One example → `prompt_ids`, `completion_ids` (language modeling: empty prompt)."""
    tools = example.get("tools")
    kwargs = {"tools": tools} if tools else {}
    if "prompt" in example:
        prompt, completion = example["prompt"], example["completion"]
        if is_conversational(example):
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
            full_ids = _tokenize(tokenizer, prompt + completion, **kwargs)["input_ids"]
        else:
            if not completion.endswith(tokenizer.eos_token):
                completion = completion + tokenizer.eos_token
            prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
            full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
        # The completion starts where the tokenized prompt and prompt+completion diverge (TRL's convention)
        split = common_prefix_length(prompt_ids, full_ids)
        return {"prompt_ids": full_ids[:split], "completion_ids": full_ids[split:]}
    if "messages" in example:
        ids = _tokenize(tokenizer, example["messages"], **kwargs)["input_ids"]
    else:
        text = example["text"]
        if not text.endswith(tokenizer.eos_token):
            text = text + tokenizer.eos_token
        ids = _tokenize(tokenizer, text)["input_ids"]
    return {"prompt_ids": [], "completion_ids": ids}


def tokenize_dataset(
    dataset: Dataset,
    tokenizer,
    name: str,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
) -> Dataset:
    """Tokenize a forget or retain dataset; drop (with a counted warning) rows with no scored token left."""
    detect_format(dataset, name)
    if "prompt_ids" not in dataset.column_names:
        keep = {"ref_logps"} & set(dataset.column_names)
        dataset = dataset.map(
            tokenize_example,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=[c for c in dataset.column_names if c not in keep],
            num_proc=num_proc,
            desc=f"Tokenizing {name} dataset",
        )

    def count(ex):
        n = len(ex["prompt_ids"]) + len(ex["completion_ids"])
        return {"num_scored": _num_scored(len(ex["prompt_ids"]), n, max_length, truncation_mode)}

    dataset = dataset.map(count, num_proc=num_proc, desc=f"Counting scored tokens of {name} dataset")
    scored = np.asarray(dataset["num_scored"])
    dropped = int((scored <= 0).sum())
    if dropped == len(dataset):
        raise ValueError(
            f"Every one of the {len(dataset)} {name} examples has zero scored tokens after truncation to "
            f"max_length={max_length} (the prompt fills the whole sequence, or the completion is empty). Increase "
            "`max_length` or shorten the prompts."
        )
    if dropped:
        logger.warning(
            f"Dropped {dropped} of {len(dataset)} {name} examples that have zero scored tokens after truncation to "
            f"max_length={max_length}."
        )
        dataset = dataset.select(np.flatnonzero(scored > 0))
    return dataset
