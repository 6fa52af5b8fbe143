"""What the command line and the example scripts load and record beside a model: the model and tokenizer
(`trl_unlearn.loading`) and the training prompt format."""

import json
import os

from ..loading import load_model_and_tokenizer, load_tokenizer

__all__ = ["PROMPT_FILE", "load_model_and_tokenizer", "load_tokenizer", "save_prompt_format", "saved_prompt_format"]

PROMPT_FILE = "unlearning_prompt.json"


def save_prompt_format(output_dir: str, prompt_format: str) -> None:
    """Record the training prompt format beside the model, for `trl-unlearn eval`'s default."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, PROMPT_FILE), "w", encoding="utf-8") as f:
        json.dump({"prompt_format": prompt_format}, f)


def saved_prompt_format(model_dir: str) -> str | None:
    """The prompt format a model folder was trained with (`save_prompt_format`), or None."""
    path = os.path.join(model_dir, PROMPT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("prompt_format")
