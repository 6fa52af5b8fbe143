"""Files in, rows out: TOFU's layout (JSON lines, one file a split) and raw-text corpora.

`read_json_rows` is the one JSON / JSON-lines reader: TOFU splits, JSON-lines corpora and the audit's paraphrase
files use it.
"""

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _check_stem(stem: str) -> str:
    stem = os.fspath(stem)
    if stem.endswith(".json"):
        stem = stem[: -len(".json")]
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(f"not a TOFU file stem: {stem!r}")
    return stem


def read_json_rows(path: str | os.PathLike, fix: str = "") -> list:
    """The values of a JSON file holding one array, or of a JSON-lines file (one value a line, blank lines
    skipped). Invalid JSON: a one-line `ValueError` naming the file (and the line), ending with `fix` when given."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tail = f"; {fix}" if fix else ""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}){tail}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg}){tail}") from None
    return rows


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
    rows = read_json_rows(path)
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected one JSON object per line")
    return rows


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
        for i, row in enumerate(read_json_rows(jsonl)):
            if not isinstance(row, dict) or text_column not in row:
                raise ValueError(
                    f"{jsonl}, row {i}: expected a JSON object with a {text_column!r} key, got {str(row)[:80]!r}. "
                    "Set `text_column` to the key that holds the documents."
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
