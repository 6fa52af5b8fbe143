"""Forget and retain data: files and TRL dataset formats in, one padded forget+retain batch out.

Files: TOFU's layout (`load_tofu_split`, `write_tofu_layout`: JSON lines per split) and raw-text corpora
(`load_text_corpus`, `drop_short_documents`, then `text_windows` or `text_documents`). QA rows become TRL rows with
the ONE plain prompt template `PROMPT_TEMPLATE` (`qa_to_trl`) or conversational rows for a chat template; for
scoring, a `PromptFormat` (the same template, or the chat template) turns QA pairs into token ids (`encode_pairs`)
and right-padded batches (`pad_batch`).

Accepted formats (TRL's, standard or conversational):
- language modeling: `text` or `messages`; every token after the first is scored;
- prompt-completion: `prompt`, `completion`; only completion tokens (and the EOS) are scored;
- preference (`chosen`, `rejected`, optional `prompt`) and unpaired preference (`prompt`, `completion`, `label`),
  for the drop-in `train_dataset=` form: `rejected` / `label=False` is forgotten, `chosen` / `label=True` retained.

Pipeline: `split_preference` (drop-in form) → `tokenize_dataset` (→ `prompt_ids`, `completion_ids`, `num_scored`)
→ `ForgetRetainPairs` indexed by `ForgetRetainSampler` → `ForgetRetainCollator`, which concatenates forget rows and
their retain rows into ONE right-padded batch (padded to the longest row, never to `max_length`).
"""

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import Sampler

from ._trl_compat import common_prefix_length, is_conversational, maybe_extract_prompt, pad
from ._trl_compat import tokenize as _tokenize

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""The plain prompt of QA data (TOFU's); the completion is `" " + answer`."""
PLAIN_TEMPLATE = PROMPT_TEMPLATE

FORMATS = {
    "language_modeling": "`text` (or `messages`)",
    "prompt_completion": "`prompt` + `completion`",
    "preference": "`chosen` + `rejected` (optional `prompt`)",
    "unpaired_preference": "`prompt` + `completion` + `label`",
}


# ---------------------------------------------------------------------------------------------------------- files --


def _check_stem(stem: str) -> str:
    stem = os.fspath(stem)
    if stem.endswith(".json"):
        stem = stem[: -len(".json")]
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(f"not a TOFU file stem: {stem!r}")
    return stem


def write_tofu_layout(out_dir: str | os.PathLike, data: Mapping[str, Iterable[Mapping]]) -> Path:
    """Write each split of `data` to ``out_dir/<stem>.json`` as JSON lines (``ensure_ascii=False``, UTF-8), as in
    TOFU. Creates `out_dir` if needed and returns it as a `Path`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem, rows in data.items():
        path = out / f"{_check_stem(stem)}.json"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return out


def load_tofu_split(data_dir: str | os.PathLike, stem: str) -> list[dict]:
    """Read ``data_dir/<stem>.json`` (`stem` with or without ``.json``) from a TOFU-layout folder: JSON lines, one
    object a line (real TOFU and `write_tofu_layout`); blank lines are skipped, and a file holding one JSON array is
    also accepted. Raises `FileNotFoundError` naming the missing file (and the stems that are there)."""
    path = Path(data_dir) / f"{_check_stem(stem)}.json"
    if not path.is_file():
        folder = Path(data_dir)
        if folder.is_dir():
            present = sorted(p.stem for p in folder.glob("*.json"))
            hint = f"; .json files there: {', '.join(present)}" if present else "; the folder has no .json files"
        else:
            hint = f"; the folder {str(folder)!r} does not exist"
        raise FileNotFoundError(f"TOFU split file not found: {str(path)!r}{hint}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON: {e}") from e
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected one JSON object per line")
    return rows


def qa_to_trl(rows: Iterable[Mapping], template: str | None = PROMPT_TEMPLATE, question: str = "question",
              answer: str = "answer") -> Dataset:
    """QA rows -> a TRL prompt-completion `Dataset`: standard (`prompt` = `template` with the question, `completion`
    = `" " + answer`) or, with `template=None`, conversational (one user turn, one assistant turn)."""
    rows = list(rows)
    if template is None:
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": r[question]}] for r in rows],
            "completion": [[{"role": "assistant", "content": r[answer]}] for r in rows],
        })
    return Dataset.from_dict({
        "prompt": [template.format(question=r[question]) for r in rows],
        "completion": [" " + r[answer] for r in rows],
    })


def load_text_corpus(dataset_name: str, split: str, config: str | None = "raw", text_column: str = "text") -> list[str]:
    """Documents of a raw-text corpus, as they are stored:

    - a local folder in MUSE's layout, `<dataset_name>/raw/<split>.txt` (documents separated by blank lines);
    - a local folder of JSON-lines files, `<dataset_name>/<split>.jsonl` (one object a line, its `text_column`);
    - the Hub dataset `dataset_name`, config `config`, split `split` (its `text_column`), e.g. `cais/wmdp-corpora`,
      config `cyber-forget-corpus`, split `train`.

    Empty documents are kept here: `drop_short_documents` drops them with a counted warning."""
    if os.path.isdir(dataset_name):
        muse = os.path.join(dataset_name, "raw", f"{split}.txt")
        jsonl = os.path.join(dataset_name, f"{split}.jsonl")
        if os.path.isfile(muse):
            with open(muse, encoding="utf-8") as f:
                return [d.strip() for d in f.read().split("\n\n") if d.strip()]
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(
                f"Corpus file not found: neither {muse!r} (MUSE layout: <folder>/raw/<split>.txt) nor {jsonl!r} "
                "(JSON lines: <folder>/<split>.jsonl). Check the dataset folder and the split name."
            )
        texts = []
        with open(jsonl, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jsonl}, line {lineno}: not valid JSON: {e}") from e
                if not isinstance(row, dict) or text_column not in row:
                    raise ValueError(
                        f"{jsonl}, line {lineno}: expected a JSON object with a {text_column!r} key, got "
                        f"{str(row)[:80]!r}. Set `text_column` to the key that holds the documents."
                    )
                texts.append(row[text_column])
        return _check_texts(texts, jsonl)
    from datasets import load_dataset

    dataset = load_dataset(dataset_name, config, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{dataset_name} (config {config!r}, split {split!r}) has columns {dataset.column_names}, not "
            f"{text_column!r}: set `text_column` to the column that holds the documents."
        )
    return _check_texts(list(dataset[text_column]), f"{dataset_name} ({config}, {split})")


def _check_texts(texts: list, where: str) -> list[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where}: document {i} is {t!r} ({type(t).__name__}), not a string. Fix or drop it.")
    return texts


def drop_short_documents(texts: Sequence[str], name: str, min_chars: int = 0) -> list[str]:
    """The documents that are neither empty nor whitespace-only and have more than `min_chars` characters (the
    WMDP code's `len(text) > min_len`, on the text as stored). Warns with the count of those dropped; an error when
    none is left."""
    kept = [t for t in texts if t.strip() and len(t) > min_chars]
    dropped = len(texts) - len(kept)
    if not kept:
        raise ValueError(
            f"The {name} corpus has no document left: all {len(texts)} are empty, whitespace-only or at most "
            f"min_text_chars={min_chars} characters long. Check the split and `text_column`, or lower `min_text_chars`."
        )
    if dropped:
        rule = "empty or whitespace-only" + (f", or at most {min_chars} characters long" if min_chars else "")
        logger.warning(f"Dropped {dropped} of {len(texts)} documents of the {name} corpus: {rule}.")
    return kept


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


# ------------------------------------------------------------------------------------------- QA pairs for scoring --


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
        return PromptFormat(PLAIN_TEMPLATE, " ")
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


def _item_name(names: Sequence[str] | None, i: int) -> str:
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
            raise TypeError(f"{_item_name(names, i)}: question and answer must be strings, got {q!r}, {a!r}")
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
            raise ValueError(f"{_item_name(names, i)}: no answer token left to score ({why})")
        sequences.append(seq)
        starts.append(len(p))
    return sequences, starts


# -------------------------------------------------------------------------------------------------------- formats --
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


def format_signature(dataset: Dataset, name: str) -> tuple[str, bool]:
    """(format, conversational) of a dataset, used to check that forget and retain data agree."""
    return detect_format(dataset, name), is_conversational(dataset[0])


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
    columns = {"language_modeling": ("text", "messages"), "prompt_completion": ("prompt", "completion"),
               "preference": ("prompt", "chosen", "rejected"), "unpaired_preference": ("prompt", "completion")}[fmt]
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


def resolve_datasets(forget, retain, train, retain_weight: float, num_proc: int | None = None, tokenizer=None):
    """`(forget, retain)` from the trainer's arguments: `forget_dataset` / `retain_dataset`, or the drop-in
    preference `train_dataset` (`rejected` forgotten, `chosen` retained). Checks both (same format) and warns about
    data it won't use."""
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
    return forget, retain


def split_eval(eval_dataset, num_proc: int | None = None, with_retain: bool = True):
    """`{"forget": ..., "retain": ...}` (raw) from either accepted eval form (that dict, or a preference dataset)."""
    if eval_dataset is None:
        return None
    if isinstance(eval_dataset, dict):
        if set(eval_dataset) - {"forget", "retain"} or "forget" not in eval_dataset:
            raise ValueError(f"`eval_dataset` as a dict needs keys 'forget' (and 'retain'); got {sorted(eval_dataset)}.")
        forget, retain = eval_dataset["forget"], eval_dataset.get("retain")
    else:
        forget, retain = split_preference(eval_dataset, num_proc)
    split = {"forget": forget}
    if retain is not None and with_retain:
        split["retain"] = retain
    return split


def batch_counts(batch) -> torch.Tensor:
    """`[forget samples, forget tokens, retain samples, retain tokens]` of one collated batch."""
    scored = batch["completion_mask"][:, 1:].sum(-1).float()
    f = batch["forget_mask"]
    return torch.stack([f.sum().float(), scored[f].sum(), (~f).sum().float(), scored[~f].sum()])


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


class ForgetRetainPairs(torch.utils.data.Dataset):
    """Forget rows paired with retain rows. Index with `(forget_idx, retain_idx)` (what `ForgetRetainSampler`
    yields) or with an int `i` (evaluation: retain row `i mod len(retain)`). `retain` may be None (no regulariser)."""

    def __init__(self, forget: Dataset, retain: Dataset | None):
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            f, r = index
        else:
            f, r = index, (index % len(self.retain) if self.retain is not None else -1)
        return {"forget": self.forget[int(f)], "retain": self.retain[int(r)] if self.retain is not None else None}


class ForgetRetainSampler(Sampler):
    """Yields `(forget_idx, retain_idx)`: forget rows in a (seed, epoch)-shuffled order, each paired with the next row
    of a (seed, epoch)-shuffled pass over the retain set.

    Every rank builds the same sequence and accelerate hands each rank its own batches, so ranks see different forget
    rows and (while there are at least as many retain as forget rows) different retain rows; a global batch holds the
    same pairs whatever the number of processes. Resuming re-creates the epoch's sequence from (seed, epoch).

    With `lengths=(forget_lengths, retain_lengths)` and `group_size`, rows are grouped by length: within each run of
    `group_size` positions, forget rows and retain rows are each sorted by length, so a batch pads little. Grouping
    reorders within a run only, so every row is still seen once per epoch.
    """

    def __init__(self, num_forget: int, num_retain: int, seed: int, shuffle: bool = True, lengths=None,
                 group_size: int = 0):
        self.num_forget, self.num_retain, self.seed, self.shuffle = num_forget, num_retain, seed, shuffle
        self.lengths, self.group_size = lengths, group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_forget

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        forget = rng.permutation(self.num_forget) if self.shuffle else np.arange(self.num_forget)
        if self.num_retain == 0:
            retain = np.full(self.num_forget, -1)
        else:
            passes = -(-self.num_forget // self.num_retain)
            retain = np.concatenate([rng.permutation(self.num_retain) for _ in range(passes)])[: self.num_forget]
        if self.lengths is not None and self.group_size > 1:
            forget_len, retain_len = (np.asarray(x) for x in self.lengths)
            for start in range(0, self.num_forget, self.group_size):
                run = slice(start, start + self.group_size)
                forget[run] = forget[run][np.argsort(-forget_len[forget[run]], kind="stable")]
                if self.num_retain:
                    retain[run] = retain[run][np.argsort(-retain_len[retain[run]], kind="stable")]
        yield from zip(forget.tolist(), retain.tolist())


@dataclass
class ForgetRetainCollator:
    """Pads forget rows then retain rows into one batch.

    Returns `input_ids`, `attention_mask`, `completion_mask` `[B_f + B_r, T]` (T = longest row after truncation),
    `forget_mask` `[B_f + B_r]` (True on forget rows) and, when the forget rows carry them, `ref_logps` `[B_f]`.
    Also accepts plain rows (no `forget`/`retain` keys): all treated as forget rows (reference precompute).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "forget" in examples[0]:
            forget = [ex["forget"] for ex in examples]
            retain = [ex["retain"] for ex in examples if ex["retain"] is not None]
        else:
            forget, retain = examples, []
        rows = forget + retain
        ids = [r["prompt_ids"] + r["completion_ids"] for r in rows]
        mask = [[0] * len(r["prompt_ids"]) + [1] * len(r["completion_ids"]) for r in rows]
        if self.max_length is not None:
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            ids, mask = [x[cut] for x in ids], [m[cut] for m in mask]
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(x) for x in ids], 0),
            "completion_mask": self._pad(mask, 0),
            "forget_mask": torch.tensor([True] * len(forget) + [False] * len(retain)),
        }
        # Position 0 has no label; keep_end truncation can start a row inside its completion
        batch["completion_mask"][:, 0] = 0
        if "ref_logps" in forget[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in forget], dtype=torch.float32)
        return batch

    def _pad(self, seqs, value):
        tensors = [torch.tensor(s, dtype=torch.long) for s in seqs]
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
