"""TRL dataset formats: the one plain QA prompt template, `PromptFormat` (template or chat template), format
detection and checks, the drop-in preference form split into forget and retain.

Accepted formats (TRL's, standard or conversational):
- language modeling: `text` or `messages`; every token after the first is scored;
- prompt-completion: `prompt`, `completion`; only completion tokens (and the EOS) are scored;
- preference (`chosen`, `rejected`, optional `prompt`) and unpaired preference (`prompt`, `completion`, `label`),
  for the drop-in `train_dataset=` form: `rejected` / `label=False` is forgotten, `chosen` / `label=True` retained.
"""

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, IterableDataset

from .._trl_compat import is_conversational, maybe_extract_prompt

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""The plain prompt of QA data (TOFU's); the completion is `" " + answer`."""

FORMATS = {
    "language_modeling": "`text` (or `messages`)",
    "prompt_completion": "`prompt` + `completion`",
    "preference": "`chosen` + `rejected` (optional `prompt`)",
    "unpaired_preference": "`prompt` + `completion` + `label`",
}


def qa_to_trl(
    rows: Iterable[Mapping], template: str | None = PROMPT_TEMPLATE, question: str = "question", answer: str = "answer"
) -> Dataset:
    """QA rows -> a TRL prompt-completion `Dataset`: standard (`prompt` = `template` with the question, `completion`
    = `" " + answer`) or, with `template=None`, conversational (one user turn, one assistant turn)."""
    rows = list(rows)
    if template is None:
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": r[question]}] for r in rows],
                "completion": [[{"role": "assistant", "content": r[answer]}] for r in rows],
            }
        )
    return Dataset.from_dict(
        {
            "prompt": [template.format(question=r[question]) for r in rows],
            "completion": [" " + r[answer] for r in rows],
        }
    )


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes prompt token ids, and what goes before a scored answer.

    `template` None means the tokenizer's chat template (one user turn, `add_generation_prompt=True`, rendered to
    text and tokenised without adding special tokens, since templates write their own BOS). Otherwise `template`
    is a format string with a ``{question}`` field, tokenised with the tokenizer's special tokens (BOS if it adds
    one). `answer_prefix` is prepended to each scored answer (``" "`` after ``"Answer:"``).
    """

    template: str | None
    answer_prefix: str = ""

    @property
    def name(self) -> str:
        """The description recorded in reports: ``"chat_template"`` or the template string."""
        return "chat_template" if self.template is None else self.template

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        if self.template is None:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(self.template.format(question=question), add_special_tokens=True)["input_ids"])

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        ids = list(tokenizer(self.answer_prefix + answer, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids


def resolve_prompt_format(tokenizer, prompt_format: str | PromptFormat = "auto") -> PromptFormat:
    """`"auto"` (chat template if the tokenizer has one, else `"plain"`), `"chat"`, `"plain"`
    (``"Question: {question}\\nAnswer:"``, answers after a space), `"raw"` (the text itself is the prompt: plain
    continuation, nothing in between), or any format string containing ``{question}`` (answers after a space when
    it does not end in whitespace)."""
    if isinstance(prompt_format, PromptFormat):
        return prompt_format
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format='chat' but the tokenizer has no chat template")
        return PromptFormat(None, "")
    if prompt_format == "plain":
        return PromptFormat(PROMPT_TEMPLATE, " ")
    if prompt_format == "raw":
        return PromptFormat("{question}", "")
    if prompt_format == "chat_template":  # the recorded name of the chat format
        return resolve_prompt_format(tokenizer, "chat")
    if "{question}" not in prompt_format:
        raise ValueError(
            f"prompt_format must be 'auto', 'chat', 'plain', 'raw' or a string with a '{{question}}' field, "
            f"got {prompt_format!r}"
        )
    return PromptFormat(prompt_format, "" if prompt_format[-1:].isspace() else " ")


def detect_format(dataset: Dataset, name: str) -> str:
    """Name of `dataset`'s TRL format (a key of `FORMATS`); a clear error if it has none."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: unlearning needs at least one {name} example.")
    cols = set(dataset.column_names)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired_preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols or "messages" in cols:
        return "language_modeling"
    accepted = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise ValueError(
        f"The {name} dataset has columns {sorted(cols)}, which match no TRL dataset format. Accepted formats: "
        f"{accepted}. Rename your columns (e.g. `dataset.rename_column('question', 'prompt')`)."
    )


def split_preference(dataset: Dataset, num_proc: int | None = None) -> tuple[Dataset, Dataset | None]:
    """Split a (paired or unpaired) preference dataset into prompt-completion (forget, retain) datasets."""
    fmt = detect_format(dataset, "train")
    if fmt == "preference":
        if "prompt" not in dataset.column_names:
            dataset = dataset.map(maybe_extract_prompt, num_proc=num_proc)
        forget = dataset.select_columns(["prompt", "rejected"]).rename_column("rejected", "completion")
        retain = dataset.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    elif fmt == "unpaired_preference":
        labels = np.asarray(dataset["label"], dtype=bool)
        forget = dataset.select(np.flatnonzero(~labels)).select_columns(["prompt", "completion"])
        retain = dataset.select(np.flatnonzero(labels)).select_columns(["prompt", "completion"])
    else:
        raise ValueError(
            f"`train_dataset` must be a preference dataset ({FORMATS['preference']}) or an unpaired preference "
            f"dataset ({FORMATS['unpaired_preference']}); got a {fmt} dataset. Pass language-modeling or "
            "prompt-completion data as `forget_dataset=` / `retain_dataset=` instead."
        )
    return forget, (retain if len(retain) else None)


def _describe(signature: tuple[str, bool]) -> str:
    fmt, conversational = signature
    return f"{'conversational' if conversational else 'standard'} {fmt.replace('_', '-')}"


def check_dataset(dataset, name: str, tokenizer=None) -> tuple[str, bool]:
    """Fail early, naming the fix, on data the pipeline can't use: not a `datasets.Dataset`, no TRL format, empty,
    a `None` or wrongly typed prompt / completion / text, conversational rows with a tokenizer that has no chat
    template. Returns the format signature `(format, conversational)`."""
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"Streaming (`IterableDataset`) {name} data is not supported: pass a `datasets.Dataset`.")
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"The {name} dataset is a {type(dataset).__name__}, not a `datasets.Dataset`: wrap it, e.g. "
            "`datasets.Dataset.from_list(rows)` or `Dataset.from_dict({'prompt': [...], 'completion': [...]})`."
        )
    fmt, conversational = detect_format(dataset, name), is_conversational(dataset[0])
    columns = {
        "language_modeling": ("text", "messages"),
        "prompt_completion": ("prompt", "completion"),
        "preference": ("prompt", "chosen", "rejected"),
        "unpaired_preference": ("prompt", "completion"),
    }[fmt]
    expected = list if conversational else str
    for column in (c for c in columns if c in dataset.column_names):
        for i, value in enumerate(dataset[column]):
            if not isinstance(value, expected):
                kind = "a list of messages" if conversational else "a string"
                raise TypeError(
                    f"{name} row {i}: `{column}` is {value!r} ({type(value).__name__}); every `{column}` must be "
                    f"{kind}, as in the rest of this {_describe((fmt, conversational))} dataset. Fix or drop that row."
                )
    if conversational and tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The {name} data is conversational (lists of messages) but the tokenizer has no chat template. Set "
            "`tokenizer.chat_template`, or give standard rows (plain strings, e.g. with `PROMPT_TEMPLATE`)."
        )
    return fmt, conversational


def _is_blank(value) -> bool:
    """An empty or whitespace-only string, or messages whose contents all are."""
    if isinstance(value, str):
        return not value.strip()
    return all(not str(m.get("content") or "").strip() for m in value)


def _scored_column(dataset: Dataset) -> str:
    """The column whose text is scored: `completion`, else `text` or `messages` (language modeling)."""
    return next(c for c in ("completion", "text", "messages") if c in dataset.column_names)


def blank_rows(dataset: Dataset) -> list[int]:
    """Indices of the rows whose scored part (completion, text or messages) is empty or whitespace-only."""
    return [i for i, v in enumerate(dataset[_scored_column(dataset)]) if _is_blank(v)]


def _first(indices, n: int = 5) -> str:
    return ", ".join(map(str, indices[:n])) + (", ..." if len(indices) > n else "")


def drop_blank_rows(dataset: Dataset, name: str) -> Dataset:
    """`dataset` without its blank rows (`blank_rows`), with a warning naming them; an error if every row is
    blank. A blank completion would score the EOS token alone."""
    blank = blank_rows(dataset)
    if not blank:
        return dataset
    column = _scored_column(dataset)
    if len(blank) == len(dataset):
        raise ValueError(
            f"Every {name} row has an empty or whitespace-only `{column}`: there is nothing to "
            f"{'forget' if name == 'forget' else 'retain'}. Check the {name} data's `{column}` column."
        )
    logger.warning(
        f"Dropped {len(blank)} of {len(dataset)} {name} rows with an empty or whitespace-only `{column}` "
        f"(rows {_first(blank)}): only the EOS token would be scored. Fix those rows to keep them."
    )
    keep = sorted(set(range(len(dataset))) - set(blank))
    return dataset.select(keep)


def _row_keys(dataset: Dataset) -> list[str]:
    columns = [c for c in ("prompt", "completion", "text", "messages") if c in dataset.column_names]
    return [json.dumps(values, sort_keys=True) for values in zip(*(dataset[c] for c in columns))]


def shared_rows(forget: Dataset, retain: Dataset) -> list[int]:
    """Indices of the forget rows that are also retain rows (the same prompt and completion, or text)."""
    retained = set(_row_keys(retain))
    return [i for i, key in enumerate(_row_keys(forget)) if key in retained]


def check_overlap(forget: Dataset, retain: Dataset) -> None:
    """An error when every forget row is also a retain row (the two terms pull each row both ways: the run would
    measure nothing), a warning naming them when some are."""
    shared = shared_rows(forget, retain)
    if not shared:
        return
    if len(shared) == len(forget):
        raise ValueError(
            f"Every forget row is also a retain row ({len(forget)} of {len(forget)}): the forget and "
            "retain terms would pull the same examples both ways. Give retain data disjoint from the "
            "forget data (for TOFU: forget10 with retain90)."
        )
    logger.warning(
        f"{len(shared)} of {len(forget)} forget rows are also retain rows (forget rows {_first(shared)}): "
        "those examples are both forgotten and retained. Remove them from the retain data."
    )


def resolve_datasets(forget, retain, train, retain_weight: float, num_proc: int | None = None, tokenizer=None):
    """`(forget, retain)` from the trainer's arguments: `forget_dataset` / `retain_dataset`, or the drop-in
    preference `train_dataset` (`rejected` forgotten, `chosen` retained). Checks both (same format) and warns about
    data it won't use, drops blank rows (`drop_blank_rows`) and checks that forget rows are not retain rows."""
    if train is not None:
        if forget is not None:
            raise ValueError("Pass either `train_dataset` (preference form) or `forget_dataset`, not both.")
        check_dataset(train, "train", tokenizer)
        forget, split_retain = split_preference(train, num_proc)
        if retain is not None and split_retain is not None:
            logger.warning(
                f"`retain_dataset` was given with a preference `train_dataset`: its {len(split_retain)} `chosen` / "
                "`label=True` rows are NOT used as retain data (the `retain_dataset` is)."
            )
        retain = retain if retain is not None else split_retain
    if forget is None:
        raise ValueError(
            "No forget data: pass `forget_dataset=` (or a preference `train_dataset=` whose `rejected` column holds "
            "the data to forget)."
        )
    forget_signature = check_dataset(forget, "forget", tokenizer)
    forget = drop_blank_rows(forget, "forget")
    if retain_weight == 0:
        if retain is not None:
            logger.warning(
                f"`retain_weight=0`: the {len(retain)} retain examples are not used (the retain regulariser is off)."
            )
        return forget, None
    if retain is None:
        raise ValueError(
            f"`retain_weight={retain_weight}` but no retain data was given: pass `retain_dataset=` or set "
            "`retain_weight=0`."
        )
    retain_signature = check_dataset(retain, "retain", tokenizer)
    if retain_signature != forget_signature:
        raise ValueError(
            f"Forget data is {_describe(forget_signature)} but retain data is {_describe(retain_signature)}: give "
            "both in the same TRL format."
        )
    retain = drop_blank_rows(retain, "retain")
    check_overlap(forget, retain)
    return forget, retain


def split_eval(eval_dataset, num_proc: int | None = None, with_retain: bool = True):
    """`{"forget": ..., "retain": ...}` (raw) from either accepted eval form (that dict, or a preference dataset)."""
    if eval_dataset is None:
        return None
    if isinstance(eval_dataset, dict):
        if set(eval_dataset) - {"forget", "retain"} or "forget" not in eval_dataset:
            raise ValueError(
                f"`eval_dataset` as a dict needs keys 'forget' (and 'retain'); got {sorted(eval_dataset)}."
            )
        forget, retain = eval_dataset["forget"], eval_dataset.get("retain")
    else:
        forget, retain = split_preference(eval_dataset, num_proc)
    split = {"forget": forget}
    if retain is not None and with_retain:
        split["retain"] = retain
    return split
