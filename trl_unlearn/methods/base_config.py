"""Configurations of the unlearning trainers. Each subclasses TRL's `DPOConfig`, so every `TrainingArguments` and
shared DPO field (model loading, `max_length`, `precompute_ref_batch_size`, ...) works as in TRL. The DPO-only
fields in `DPO_ONLY_FIELDS` (its loss variants and reference syncing) mean nothing here: they are hidden from the
command-line help and setting one is an error."""

import argparse
import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields

from trl import DPOConfig

logger = logging.getLogger(__name__)

RETAIN_LOSS_TYPES = ("nll", "kl")
DPO_ONLY_FIELDS = (
    "loss_type",
    "loss_weights",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "label_smoothing",
    "use_weighting",
    "discopop_tau",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "padding_free",
)
_DPO_DEFAULTS = {f.name: f for f in fields(DPOConfig) if f.name in DPO_ONLY_FIELDS}


def _float_fields(config) -> list[str]:
    """Names of the config's fields annotated `float` or `float | None`."""
    return [f.name for f in fields(config) if f.type in (float, float | None)]


def check_numbers(config) -> None:
    """One-line errors for a float field given a non-number (a string, a bool) or a non-finite number."""
    for name in _float_fields(config):
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                fix = f"pass `{name}={float(value)!r}`"
            except (TypeError, ValueError):
                fix = "pass a number"
            raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}): {fix}.")
        if not math.isfinite(value):
            raise ValueError(
                f"`{name}` is {value}: it must be a finite number (a NaN or infinite setting makes every "
                "loss or update non-finite, or turns clipping off); give a finite value."
            )


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _normalised(value):
    return [value] if isinstance(value, str) and value == "sigmoid" else value


def _hidden(name):
    """The DPO field `name` with its DPO default, hidden from `--help` (argparse.SUPPRESS)."""
    f = _DPO_DEFAULTS[name]
    return field(
        default=f.default, default_factory=f.default_factory, metadata={**f.metadata, "help": argparse.SUPPRESS}
    )


@dataclass
class UnlearningConfig(DPOConfig):
    r"""
    Fields shared by every unlearning trainer. Total loss: `forget_weight · forget_term + retain_weight · retain_term`.

    Parameters:
        forget_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the forget term. Unlearn-Simple calls it `npo_coeff`, open-unlearning `gamma`.
        retain_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the retain regulariser; `0` trains on forget data alone (then `retain_dataset` may be omitted).
            Unlearn-Simple calls it `grad_diff_coeff`, open-unlearning `alpha`.
        retain_loss_type (`str`, *optional*, defaults to `"nll"`):
            `"nll"`: token-mean negative log-likelihood of the retain data (GradDiff-style, the published setting).
            `"kl"`: token-mean KL(π_ref ‖ π) over the scored retain tokens, computed over the full vocabulary by a
            chunked kernel; needs a live reference model.
        learning_rate (`float`, *optional*, defaults to `1e-5`):
            The published TOFU and MUSE unlearning rate (SimNPO paper, §3 of docs/method.md).
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Allow a new run in an `output_dir` that already holds a trained model or checkpoints: the earlier run's
            checkpoints are deleted when training starts, and its model is replaced when the new one is saved.
            Without it such a folder is refused (resuming with `resume_from_checkpoint` is always allowed).
            Transformers' name for this until v5.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate (paper: 1e-5)."})
    forget_weight: float = field(default=1.0, metadata={"help": "Weight of the forget term."})
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the retain regulariser."})
    retain_loss_type: str = field(
        default="nll", metadata={"help": "Retain regulariser: 'nll' or 'kl'.", "choices": list(RETAIN_LOSS_TYPES)}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow an output_dir that holds a trained model or checkpoints: delete the earlier run's "
            "checkpoints at the start and replace its model (default: refuse such a folder)."
        },
    )
    # transformers 5 renamed `gradient_checkpointing`; TRL's default (on) is kept under the new name, so no warning
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Activation (gradient) checkpointing; TRL's default: on."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    loss_type: list[str] = _hidden("loss_type")
    loss_weights: list[float] | None = _hidden("loss_weights")
    ld_alpha: float | None = _hidden("ld_alpha")
    f_divergence_type: str = _hidden("f_divergence_type")
    f_alpha_divergence_coef: float = _hidden("f_alpha_divergence_coef")
    label_smoothing: float = _hidden("label_smoothing")
    use_weighting: bool = _hidden("use_weighting")
    discopop_tau: float = _hidden("discopop_tau")
    sync_ref_model: bool = _hidden("sync_ref_model")
    ref_model_mixup_alpha: float = _hidden("ref_model_mixup_alpha")
    ref_model_sync_steps: int = _hidden("ref_model_sync_steps")
    padding_free: bool = _hidden("padding_free")

    def __post_init__(self):
        check_numbers(self)
        changed = [
            n
            for n, f in _DPO_DEFAULTS.items()
            if _normalised(getattr(self, n)) != _normalised(f.default_factory() if f.default is MISSING else f.default)
        ]
        if changed:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in changed)}: DPO-only setting(s) that the unlearning trainers do not use "
                "(their loss is set by the trainer class and `forget_weight` / `retain_weight` / "
                "`retain_loss_type`). Remove them."
            )
        if self.gradient_checkpointing is not None:  # the old name, as TRL scripts and recipes write it, wins
            self.activation_checkpointing = self.gradient_checkpointing
        if not _accelerator_available():
            self.dataloader_pin_memory = False  # nothing to pin for (silences torch's warning)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning
        if self.bf16 is not False and not self.fp16 and not self.use_cpu and not _accelerator_available():
            logger.warning(
                "No GPU found: training in fp32 on the CPU (bf16, TRL's default and the recipes' "
                "setting, needs a GPU here; pass `bf16=False` to silence this, or `use_cpu=True` to "
                "force CPU bf16)."
            )
            self.bf16 = False
        super().__post_init__()
        if self.retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"`retain_loss_type` must be one of {RETAIN_LOSS_TYPES}, got {self.retain_loss_type!r}.")
        if self.forget_weight < 0 or self.retain_weight < 0:
            raise ValueError(
                f"`forget_weight` and `retain_weight` must be >= 0, got {self.forget_weight} and {self.retain_weight}."
            )
        if self.forget_weight == 0 and self.retain_weight == 0:
            raise ValueError("`forget_weight` and `retain_weight` are both 0: the loss would be identically zero.")
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        if self.learning_rate < 0:
            raise ValueError(
                f"`learning_rate` must be >= 0, got {self.learning_rate}: a negative rate reverses every "
                "term of the loss. Give a positive rate."
            )
        if self.learning_rate == 0:
            logger.warning(
                "`learning_rate=0`: no weight will change, and the saved model will be the base model "
                "(its card records the rate)."
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(
                f"`num_train_epochs={self.num_train_epochs}` and `max_steps={self.max_steps}`: no "
                "optimizer step would be taken. Set `num_train_epochs` > 0 or `max_steps` > 0."
            )
        if self.enable_jit_checkpoint:
            logger.warning(
                "`enable_jit_checkpoint` is not used: the unlearning trainers stop on SIGTERM by "
                "themselves, every rank at the same step, and save a checkpoint (trl_unlearn.preemption)."
            )
            self.enable_jit_checkpoint = False
