"""Weight-only quantization for the audit's quantization attack (Zhang et al., "Catastrophic failure of LLM unlearning
via quantization", ICLR 2025, arXiv 2410.16454; `method.md` §9).

* `rtn_quantize_weight(w, bits, group_size)`: symmetric round-to-nearest of a `[out, in]` weight, returned
  dequantized (same shape and dtype). Per output channel (`group_size=None`: one scale per row) or group-wise (one
  scale per `group_size` consecutive inputs of a row). Scale `s = max|w| / (2^(bits-1) - 1)` over the row or group;
  `q = clamp(round(w / s), -(2^(bits-1) - 1), 2^(bits-1) - 1)`; the result is `q * s`. A weight moved by less than
  `s / 2` away from a grid point (with the row's / group's largest magnitude unchanged) rounds back to that point:
  the mechanism by which quantization undoes small, utility-preserving unlearning updates.
* `quantize_model_rtn(model, bits, group_size)`: a quantized COPY of a model: every `torch.nn.Linear` weight of
  the decoder (the LM head and the embeddings kept in full precision, as GPTQ / AWQ / RTN setups do). Plain torch,
  so it runs on CPU and on any architecture built from `nn.Linear`.
* `load_bnb(path, kind)`: the model reloaded through bitsandbytes, ``"int8"`` (LLM.int8) or ``"nf4"`` (4-bit
  NormalFloat), the configurations Zhang et al. report; needs a CUDA device (`bnb_unavailable_reason` says why not).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

__all__ = [
    "QuantSpec",
    "bnb_unavailable_reason",
    "load_bnb",
    "quant_specs",
    "quantize_model_rtn",
    "rtn_quantize_weight",
]


@dataclass(frozen=True)
class QuantSpec:
    """One quantization setting: `backend` ``"rtn"`` (plain torch) or ``"bnb"``; `bits` 8 or 4; `group_size` None
    for per-channel RTN; `name` the label in reports (``"rtn4_g128"``, ``"rtn8_channel"``, ``"bnb_nf4"``, ...)."""

    backend: str
    bits: int
    group_size: int | None = None

    @property
    def name(self) -> str:
        if self.backend == "bnb":
            return "bnb_int8" if self.bits == 8 else "bnb_nf4"
        return f"rtn{self.bits}_" + ("channel" if self.group_size is None else f"g{self.group_size}")


def quant_specs(
    bits: tuple[int, ...] = (8, 4), group_size: int = 128, bnb: bool = True, all_variants: bool = False
) -> list[QuantSpec]:
    """The audit's settings, in order of `bits`: per channel at 8 bits and group-wise (`group_size`) below 8 bits
    (`rtn8_channel`, `rtn4_g128` by default: the common int8 and 4-bit g128 setups), or both at every bit width
    with `all_variants`; then bitsandbytes int8 and NF4 (when `bnb`; they are skipped with a reason later on a
    machine without CUDA)."""
    for b in bits:
        if b not in (2, 3, 4, 8):
            raise ValueError(f"quantization bits must be among 2, 3, 4, 8, got {b}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    specs = []
    for b in bits:
        groups = (None, group_size) if all_variants else (None,) if b == 8 else (group_size,)
        specs += [QuantSpec("rtn", b, g) for g in groups]
    if bnb:
        specs += [QuantSpec("bnb", 8), QuantSpec("bnb", 4)]
    return specs


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest of a 2-D weight `[out, in]`, dequantized back to `weight.dtype` (computed in fp32).

    `group_size=None`: one scale per output row; else one per `group_size` consecutive columns of a row (the last
    group of a row may be shorter). An all-zero row / group stays zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    out_features, in_features = w.shape
    g = in_features if group_size is None else min(group_size, in_features)
    pad = (-in_features) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    groups = w.reshape(out_features, -1, g)  # [out, n_groups, g]
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / safe), -qmax, qmax) * scale
    return q.reshape(out_features, -1)[:, :in_features].to(weight.dtype)


def quantize_model_rtn(model, bits: int, group_size: int | None = None):
    """A copy of `model` with every decoder `nn.Linear` weight replaced by its RTN quantization (dequantized, same
    dtype); the LM head, embeddings, norms and biases unchanged. The caller's model is not modified. Returns
    `(copy, number of quantized weights)`; a model with no `nn.Linear` raises `ValueError`."""
    quantized = copy.deepcopy(model)
    head = quantized.get_output_embeddings()
    count = 0
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(rtn_quantize_weight(module.weight, bits, group_size))
                count += 1
    if count == 0:
        raise ValueError("the model has no nn.Linear layer besides the LM head: nothing to quantize")
    return quantized, count


def bnb_unavailable_reason() -> str | None:
    """Why bitsandbytes quantization cannot run here (None when it can): it needs CUDA and the package."""
    if not torch.cuda.is_available():
        return "bitsandbytes int8 / NF4 need a CUDA device; this machine has none (the plain-torch RTN rows still run)"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed: pip install bitsandbytes"
    return None


def load_bnb(path: str, bits: int):
    """The model at `path` loaded through bitsandbytes on the first CUDA device: `bits=8` LLM.int8, `bits=4` NF4 with
    fp16 compute (Zhang et al.'s settings). Raises `RuntimeError` with `bnb_unavailable_reason` when it cannot run."""
    reason = bnb_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    else:
        raise ValueError(f"bitsandbytes quantization is 8 or 4 bits, got {bits}")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": 0}).eval()
