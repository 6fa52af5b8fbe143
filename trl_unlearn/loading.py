"""Loading a causal LM and its tokenizer the package's way (model folders or Hub ids), with a clear error for a
path that is neither, and the training prompt format recorded beside a model (`unlearning_prompt.json`). Nothing heavy
is imported until a function runs, so the command line stays light."""

import json
import os
import re


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (`org/name` or `name`), not a local folder or file."""
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def check_model_path(name: str, what: str = "model") -> None:
    """A clear error for a `model_name_or_path` that is neither an existing folder nor a Hub id."""
    if not os.path.exists(name) and not is_hub_id(name):
        raise ValueError(
            f"The {what} {name!r} is not an existing folder, and not a Hub model id (`org/name`): check the path."
        )


def safetensors_problem(path: str) -> str | None:
    """What is wrong with the safetensors file `path` (truncated, or a header that does not parse), or None. Reads
    the header only: the file must be 8 + header + data bytes long, the data ending where the last tensor does."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"truncated: {size} bytes, shorter than its {n}-byte header"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__})"
    if size < 8 + n + end:
        return f"truncated: {size} bytes of the {8 + n + end} its header describes"
    return None


def check_weights(folder: str, what: str = "model", hint: str | None = None) -> None:
    """A one-line error naming the file when a `*.safetensors` file in the local `folder` is truncated or corrupt
    (an interrupted download or save); `hint` says what to do instead (default: restore or re-download it)."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem:
                raise ValueError(
                    f"The {what} weights {os.path.join(folder, name)} are corrupt ({problem}): "
                    f"{hint or 'restore or re-download the file'}."
                )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


def load_tokenizer(path: str):
    """The model's tokenizer; a local `tokenizer.json` loads as `PreTrainedTokenizerFast` (AutoTokenizer can pick
    a wrong class for tokenizers saved without a class name)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    check_model_path(path, "tokenizer / model")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): give the tokenizer's "
            "folder or Hub id, e.g. the base model's (`--tokenizer` on the command line)."
        )
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype: str = "auto", device=None):
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype`, in eval mode on `device` (default: CUDA when
    available)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    check_weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def load_model_and_tokenizer(model_path: str, tokenizer_path: str | None = None, dtype: str = "auto", device=None):
    """`load_model(model_path, dtype, device)` and `load_tokenizer(tokenizer_path or model_path)`."""
    check_model_path(model_path)
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    return load_model(model_path, dtype, device), tokenizer


PROMPT_FILE = "unlearning_prompt.json"


def save_prompt_format(output_dir: str, prompt_format: str) -> None:
    """Record the training prompt format beside the model, for `trl-unlearn eval`'s default (written to a temporary
    file, then renamed: never half-written)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, PROMPT_FILE)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump({"prompt_format": prompt_format}, f)
    os.replace(f"{path}.tmp", path)


def saved_prompt_format(model_dir: str) -> str | None:
    """The prompt format a model folder was trained with (`save_prompt_format`), or None."""
    path = os.path.join(model_dir, PROMPT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("prompt_format")
