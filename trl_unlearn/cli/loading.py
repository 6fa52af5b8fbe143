"""Model and tokenizer loading for the command line and the example scripts (the only place that does it)."""

import json
import os

PROMPT_FILE = "unlearning_prompt.json"


def load_model_and_tokenizer(model_path: str, tokenizer_path: str | None = None, dtype: str = "auto", device=None):
    """`AutoModelForCausalLM.from_pretrained(model_path)` in eval mode on `device` (default: CUDA when available),
    and its tokenizer (`PreTrainedTokenizerFast` when the folder has a ``tokenizer.json``, else `AutoTokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from ..modeling import check_model_path

    check_model_path(model_path)
    tokenizer_path = tokenizer_path or model_path
    if os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer


def load_tokenizer(path: str):
    """The model's tokenizer; a local `tokenizer.json` loads as `PreTrainedTokenizerFast` (AutoTokenizer can pick
    a wrong class for tokenizers saved without a class name)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ..modeling import check_model_path

    check_model_path(path, "tokenizer / model")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


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
