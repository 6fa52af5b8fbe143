""" "I don't know" answers for the IdK methods (IdkNLL, IdkDPO): the answers (a default list written for this package,
a list, or a file), their seeded pairing with forget rows, and the pair tokenisation and batching IdkDPO needs.

Pairing: forget row `i` gets answer `answers[k_i]`, `k_i` drawn once from a NumPy generator seeded with the run's
seed, so the same seed gives the same answers (a one-answer list gives every row that answer)."""

import json
import os
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from .pairing import ForgetRetainCollator
from .tokenize import tokenize_example

# Refusal phrasings written for this package (plain statements of not knowing, no invented facts, varied openings)
DEFAULT_IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I can't answer that; I don't know.",
    "That's something I don't know.",
    "I have no information about that.",
    "I'm afraid I don't know the answer.",
    "I don't know the answer to that question.",
    "I'm unable to answer that.",
    "Sorry, I don't know.",
    "I'm not aware of that.",
    "I can't say; I don't have that knowledge.",
    "I have no knowledge of that.",
    "I'm not able to tell you that.",
    "I don't recall anything about that.",
    "That isn't something I know.",
    "I'm uncertain; I don't know.",
    "I couldn't tell you.",
    "I lack the information to answer that.",
    "I really don't know.",
)
IDK_COLUMN = "idk_completion"  # the IdK answer of each forget row, in the row's format


def load_idk_answers(answers=None, path: str | None = None) -> list[str]:
    """The IdK answers: `answers` (a list of strings), or the file `path` (a JSON list, or one answer per line;
    blank lines skipped), or `DEFAULT_IDK_ANSWERS` when neither is given."""
    if answers is not None and path is not None:
        raise ValueError("Both `idk_answers` and `idk_answers_file` are set: give the answers one way.")
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`idk_answers_file={path}` does not exist: give a JSON list or a text file with one answer per line."
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        answers = json.loads(text) if path.endswith(".json") else text.splitlines()
        where = f"the file {path}"
    elif answers is None:
        return list(DEFAULT_IDK_ANSWERS)
    else:
        where = "`idk_answers`"
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise TypeError(f"{where} must be a list of strings, got {answers!r}.")
    answers = [a.strip() for a in answers if a.strip()]
    if not answers:
        raise ValueError(
            f'{where} holds no answer: give at least one "I don\'t know" answer, or leave '
            "`idk_answers` unset for the package's default list."
        )
    return answers


def _as_completion(answer: str, like):
    """`answer` in the format of the completion `like`: an assistant message list, or a string with `like`'s
    leading whitespace."""
    if isinstance(like, list):
        return [{"role": "assistant", "content": answer}]
    return like[: len(like) - len(like.lstrip())] + answer


def idk_forget_rows(dataset: Dataset, answers: list[str], seed: int) -> Dataset:
    """Prompt-completion forget rows with an `idk_completion` column (the seeded IdK answer of each row). A
    preference dataset (`prompt`, `chosen`, `rejected`) is read as `rejected` = the answer to forget and `chosen` =
    its IdK answer, and `answers` is not used."""
    columns = set(dataset.column_names)
    if {"prompt", "chosen", "rejected"} <= columns:
        return dataset.select_columns(["prompt", "rejected", "chosen"]).rename_columns(
            {"rejected": "completion", "chosen": IDK_COLUMN}
        )
    if not {"prompt", "completion"} <= columns:
        raise ValueError(
            f'The IdK methods replace each forget answer with an "I don\'t know" answer, so the forget data must be '
            f"prompt-completion (or preference) rows; it has columns {sorted(columns)}. Give `prompt` and "
            "`completion` columns (e.g. `data.formats.qa_to_trl`)."
        )
    picks = np.random.default_rng(seed).integers(len(answers), size=len(dataset))
    completions = dataset["completion"]
    idk = [_as_completion(answers[k], c) for k, c in zip(picks.tolist(), completions)]
    return dataset.add_column(IDK_COLUMN, idk) if IDK_COLUMN not in columns else dataset


def with_idk_completions(dataset: Dataset, answers: list[str], seed: int) -> Dataset:
    """Prompt-completion rows whose completions are their seeded IdK answers (IdkNLL's forget rows)."""
    rows = idk_forget_rows(dataset, answers, seed)
    return rows.remove_columns("completion").rename_column(IDK_COLUMN, "completion")


def tokenize_idk_pair(example: dict, tokenizer) -> dict:
    """`prompt_ids`, `completion_ids` (the answer to forget) and `idk_prompt_ids`, `idk_completion_ids` (the IdK
    answer; its own prompt split, as `tokenize_example` makes it)."""
    base = {k: example[k] for k in ("prompt", "tools") if k in example}
    idk = tokenize_example({**base, "completion": example[IDK_COLUMN]}, tokenizer)
    pair = tokenize_example({**base, "completion": example["completion"]}, tokenizer)
    return {**pair, "idk_prompt_ids": idk["prompt_ids"], "idk_completion_ids": idk["completion_ids"]}


@dataclass
class IdkPairCollator(ForgetRetainCollator):
    """`ForgetRetainCollator` for IdkDPO: the batch holds each forget row's answer, then the same rows' IdK answers
    (both `forget_mask` True), then the retain rows; `idk_mask` `[B]` marks the IdK rows, so forget row `i` pairs
    with IdK row `B_f + i`. `ref_logps` (when precomputed) follows the same order."""

    def __call__(self, examples: list[dict]):
        if "forget" not in examples[0]:
            return super().__call__(examples)
        idk = []
        for ex in examples:
            f = ex["forget"]
            row = {"prompt_ids": f["idk_prompt_ids"], "completion_ids": f["idk_completion_ids"]}
            if "idk_ref_logps" in f:
                row["ref_logps"] = f["idk_ref_logps"]
            idk.append({"forget": row, "retain": None})
        batch = super().__call__(list(examples) + idk)
        n_forget = len(examples)
        batch["idk_mask"] = batch["forget_mask"].clone()
        batch["idk_mask"][:n_forget] = False  # the collator marked every forget-side row; keep the IdK ones
        return batch
