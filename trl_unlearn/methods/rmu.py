"""RMU: representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218).

With `h(t)` the output of decoder layer `layer_id` (the residual stream after it) at position `t`, `H` its width,
`u` a fixed random unit vector and `c = steering_coeff`, the loss of one optimizer step is

    forget_weight · mean over forget positions of ‖h_θ(t) − c·u‖² / H
    + retain_weight · mean over retain positions of ‖h_θ(t) − h_ref(t)‖² / H

(`/ H`: the mean over hidden units, torch's `mse_loss` as in the WMDP code; `retain_weight` is the paper's α; `h_ref`
the frozen initial model). Means run over all positions of the step (micro-batches and ranks), as in `trainer.py`.

Which positions count: those whose next token the other trainers score, i.e. position `t` where token `t + 1` is
scored (`completion_mask[:, 1:]`, the package's `[B, T-1]` convention). For language-modeling rows that is every
token of the text (and the BOS, if the tokenizer adds one) but not the EOS the package appends: the tokens the WMDP
code uses, without its padding. For prompt-completion rows: the last prompt token and the completion tokens but its
final EOS, the positions that produce the answer. Padding never counts.

`u`: entries uniform in [0, 1), normalised (the WMDP code's `torch.rand`), from a CPU generator seeded with `args.seed`:
the same on every rank and device, fixed for the run, saved with each checkpoint (`rmu_control_vector.pt`) and read
back on resume.

The forward stops at layer `layer_id`: the decoder runs on its first `layer_id + 1` layers only, and no LM head runs;
the backward stops at the first trained layer (`benchmarks/rmu_cost.py` measures what this saves). Only the
parameters of `update_modules` in `update_layers` train (with PEFT: the adapters there); everything else is frozen.
"""

import argparse
import functools
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers.trainer_utils import SchedulerType, get_last_checkpoint

from ..decoder_layers import control_vector, decoder_layers, layer_output, layers_path, select_parameters
from ..losses import LossStats
from ..model_card import CITATIONS
from ..modeling import causal_lm
from ..reference import reference_context
from .base import UnlearningTrainer
from .base_config import UnlearningConfig

logger = logging.getLogger(__name__)

CONTROL_VECTOR_FILE = "rmu_control_vector.pt"
RMU_RETAIN_WEIGHT = 10.0  # α default: see RMUConfig and docs/rmu.md
COSINE_RISE = 0.05  # the least rise of the control cosine, over `control_cosine_check_steps`, that counts as moving


def parse_steering_coeff(value) -> float | str:
    """`"auto"`, or the steering coefficient as a positive float (a command line gives it as a string)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        coeff = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`steering_coeff` must be 'auto' or a number > 0, got {value!r}.") from None
    if not coeff > 0:
        raise ValueError(f"`steering_coeff` must be > 0 (or 'auto'), got {value}.")
    return coeff


@dataclass
class RMUConfig(UnlearningConfig):
    r"""
    Configuration for [`RMUTrainer`] (RMU, arXiv 2403.03218). Defaults: the WMDP code's Zephyr-7B run
    (`rmu/unlearn.py` of github.com/centerforaisafety/wmdp, `--lr 5e-5`, no scheduler, no clipping, 512 tokens),
    except the steering coefficient, measured on the model (Adaptive RMU, Dang et al., 2025, arXiv 2408.06223), and
    α (`retain_weight`), set so that the retain term does not swamp the forget term on small models (docs/rmu.md).

    Parameters:
        layer_id (`int`, *optional*, defaults to `7`):
            Decoder layer (0-based) whose output is steered; the forward stops there. WMDP: 7 for Zephyr-7B (32
            layers).
        steering_coeff (`float` or `"auto"`, *optional*, defaults to `"auto"`):
            Norm `c` of the control vector `c·u`. `"auto"`: `c = steering_scale × ‖h‖`, with `‖h‖` the mean norm of
            the initial model's forget activations at `layer_id`, measured on the first micro-batch the trainer
            scores (training's, or an evaluation's before it), before any update, over all ranks; the value is
            logged (`forget/steering_coeff`) and recorded in the model card. A number fixes `c` (WMDP: 6.5 for
            Zephyr-7B's layer 7).
        steering_scale (`float`, *optional*, defaults to `3.0`):
            With `steering_coeff="auto"`: `c` in units of the forget activations' mean norm (this package's
            real-knowledge pilot used c ≈ 2.9 × the norm; docs/rmu.md).
        control_cosine_check_steps (`int`, *optional*, defaults to `20`):
            After this many optimizer steps, warn if the mean cosine between the forget activations and `u` has risen
            by less than 0.05 since the first step (RMU is not forgetting: `c` or the learning rate too small, or
            `retain_weight` too large); 0 disables the check.
        update_layers (`list[int]`, *optional*):
            Layers whose parameters train, each at most `layer_id`. Defaults to `layer_id-2 .. layer_id` (clipped at
            0), as in the paper.
        update_modules (`list[str]`, *optional*, defaults to `["mlp"]`):
            Modules of those layers that train, as names inside a layer (`"mlp"`, `"mlp.down_proj"`, ...). The WMDP code
            trains `mlp.down_proj` only (its `--param_ids 6`): pass `["mlp.down_proj"]` to reproduce it.
        retain_weight (`float`, *optional*, defaults to `10.0`):
            α, the weight of the retain term. WMDP uses 1200 with `c = 6.5` on Zephyr-7B; on a tiny model that α
            holds the forget activations in place, 10 forgets selectively (measured in docs/rmu.md).
        learning_rate (`float`, *optional*, defaults to `5e-5`):
            WMDP: 5e-5, AdamW with a constant rate, no weight decay and no gradient clipping (hence
            `lr_scheduler_type="constant"` and `max_grad_norm=0`).
        max_length (`int`, *optional*, defaults to `512`):
            WMDP truncates forget and retain text to 512 tokens.
    """

    layer_id: int = field(default=7, metadata={"help": "Decoder layer whose output RMU steers (WMDP, Zephyr-7B: 7)."})
    # `str`: HfArgumentParser takes one type per field; numbers are parsed in __post_init__
    steering_coeff: str = field(
        default="auto",
        metadata={"help": "Norm of the control vector, or 'auto': steering_scale x the forget activations' norm."},
    )
    steering_scale: float = field(
        default=3.0, metadata={"help": "With steering_coeff='auto': c in units of the forget activations' norm."}
    )
    control_cosine_check_steps: int = field(
        default=20, metadata={"help": "Warn if the control cosine has not risen after this many steps (0: off)."}
    )
    update_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers that train, each <= layer_id (default: layer_id-2 .. layer_id)."}
    )
    update_modules: list[str] = field(
        default_factory=lambda: ["mlp"], metadata={"help": "Modules of update_layers that train (default: mlp)."}
    )
    retain_weight: float = field(
        default=RMU_RETAIN_WEIGHT, metadata={"help": "RMU's alpha (WMDP's Zephyr run: 1200; see docs/rmu.md)."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Initial AdamW learning rate (WMDP: 5e-5)."})
    lr_scheduler_type: SchedulerType | str = field(
        default="constant", metadata={"help": "Learning-rate schedule (WMDP: constant)."}
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none (WMDP: none)."})
    max_length: int | None = field(default=512, metadata={"help": "Maximum tokens per row (WMDP: 512)."})
    retain_loss_type: str = field(default="nll", metadata={"help": argparse.SUPPRESS})  # no log-prob retain loss

    def __post_init__(self):
        if self.retain_loss_type != "nll":
            raise ValueError(
                f"`retain_loss_type={self.retain_loss_type!r}`: RMU's retain term is the distance to the frozen "
                "model's activations at `layer_id`, not a log-prob loss. Remove `retain_loss_type`."
            )
        if self.precompute_ref_log_probs:
            raise ValueError("`precompute_ref_log_probs`: RMU uses no log-probs. Remove it.")
        super().__post_init__()
        if self.layer_id < 0:
            raise ValueError(f"`layer_id` must be >= 0 (a 0-based decoder layer), got {self.layer_id}.")
        self.steering_coeff = parse_steering_coeff(self.steering_coeff)
        if self.steering_coeff == "auto" and not self.steering_scale > 0:
            raise ValueError(f"`steering_scale` must be > 0, got {self.steering_scale}.")
        if self.control_cosine_check_steps < 0:
            raise ValueError(f"`control_cosine_check_steps` must be >= 0, got {self.control_cosine_check_steps}.")
        if self.update_layers is None:
            self.update_layers = list(range(max(0, self.layer_id - 2), self.layer_id + 1))
        self.update_layers = [int(i) for i in self.update_layers]
        if not self.update_layers:
            raise ValueError(
                "`update_layers` is empty: RMU needs at least one layer to train (default: layer_id-2 .. layer_id)."
            )
        bad = [i for i in self.update_layers if not 0 <= i <= self.layer_id]
        if bad:
            raise ValueError(
                f"`update_layers` {bad} lie outside 0 .. layer_id={self.layer_id}: only layers at or below `layer_id` "
                "can move its output. Pick layers in that range, or raise `layer_id`."
            )
        if not self.update_modules:
            raise ValueError("`update_modules` is empty: name the modules of `update_layers` that train, e.g. ['mlp'].")


class RMUTrainer(UnlearningTrainer):
    """RMU (Li et al., 2024): steer the layer-`layer_id` activations of forget text toward a fixed random direction
    `c·u` and hold those of retain text at the frozen model's (module docstring). Arguments as
    [`UnlearningTrainer`]; `ref_model` is refused: the reference is the initial model, kept automatically (a frozen
    copy cut after `layer_id`, or the PEFT base with the adapters disabled)."""

    config_class = RMUConfig
    retain_needs_reference = True
    ref_model_refusal = (
        "RMUTrainer's retain term compares with the initial model, which it keeps itself (a frozen copy, or the PEFT "
        "base with the adapters disabled): remove `ref_model`."
    )
    _tag_names = UnlearningTrainer._tag_names + ["rmu"]
    _name = "RMU"
    _paper = {
        "title": "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning",
        "id": "2403.03218",
        "citation": CITATIONS["WMDP"],
    }
    card_hyperparameters = ("layer_id", "steering_coeff", "update_layers", "update_modules", "max_grad_norm")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        args = self.args
        unwrapped = self.accelerator.unwrap_model(self.model)
        owner, name = decoder_layers(unwrapped)
        layers = getattr(owner, name)
        if args.layer_id >= len(layers):
            raise ValueError(
                f"`layer_id={args.layer_id}` but the model has {len(layers)} decoder layers (0 .. {len(layers) - 1}). "
                "Pick a layer in range (WMDP's 7 is for the 32 layers of Zephyr-7B)."
            )
        self.update_parameters, frozen = select_parameters(unwrapped, layers, args.update_layers, args.update_modules)
        if not self.update_parameters:
            hint = (
                "the PEFT adapters must sit there: target those modules in `peft_config` (e.g. `target_modules="
                "['gate_proj', 'up_proj', 'down_proj']` for a Llama MLP)"
                if is_peft_model(unwrapped)
                else f"the parameters of layer {args.update_layers[0]} are "
                f"{[n for n, _ in layers[args.update_layers[0]].named_parameters()]}"
            )
            raise ValueError(
                f"No trainable parameter in `update_modules` {args.update_modules} of `update_layers` "
                f"{args.update_layers}: {hint}."
            )
        if frozen and is_peft_model(unwrapped):
            logger.warning(
                f"RMU froze {frozen} PEFT adapter tensors outside `update_modules` {args.update_modules} of "
                f"`update_layers` {args.update_layers} (only those train). Restrict the adapters with "
                "`LoraConfig(target_modules=..., layers_to_transform=...)` to avoid creating them."
            )
        # The forward to `layer_id` (`decoder_layers.layer_output`), for the policy and the reference
        self.layer_forward = functools.partial(
            layer_output, layers=layers_path(unwrapped), layer_id=args.layer_id, grad_from=min(args.update_layers)
        )
        # the reference's: no gradient, from its own layers (the policy's when the reference is the PEFT base)
        ref = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else unwrapped
        self.ref_layer_forward = functools.partial(layer_output, layers=layers_path(ref), layer_id=args.layer_id)
        if self.ref_model is not None:
            if self.reference_plan.kind == "frozen_copy" and not self.is_deepspeed_enabled:
                ref_owner, ref_name = decoder_layers(ref)  # our own copy: drop the layers it never runs, for good
                setattr(ref_owner, ref_name, getattr(ref_owner, ref_name)[: args.layer_id + 1])
        hidden_size = causal_lm(unwrapped).config.get_text_config().hidden_size
        # `c·u` [H]; with steering_coeff="auto" set at the first loss, from the initial forget activations
        self.control_vector = None
        self.unit_control = control_vector(hidden_size, 1.0, args.seed)
        if args.steering_coeff != "auto":
            self.control_vector = args.steering_coeff * self.unit_control
        self.steering_coeff = None if self.control_vector is None else float(args.steering_coeff)
        self._cosine_start = None  # the first training step's mean control cosine (this rank's), for the check
        self._cosine_checked = False

    # ------------------------------------------------------------------------------------- checkpoints and card --
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`UnlearningTrainer.train`; on resume the control vector is read back from the checkpoint."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, CONTROL_VECTOR_FILE)):
            self.control_vector = torch.load(os.path.join(checkpoint, CONTROL_VECTOR_FILE), weights_only=True)
            self.steering_coeff = float(self.control_vector.norm())
        elif isinstance(checkpoint, str) and self.control_vector is None:
            raise ValueError(
                f"The checkpoint {checkpoint} has no {CONTROL_VECTOR_FILE}, and `steering_coeff='auto'` can't be "
                "measured again on a trained model. Pass the coefficient the run used (its model card or the "
                "logged `forget/steering_coeff`) as `steering_coeff`."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """Save the model (and, outside checkpoints, its card) and the control vector beside it."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero() and self.control_vector is not None:
            folder = output_dir or self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            torch.save(self.control_vector, os.path.join(folder, CONTROL_VECTOR_FILE))

    def model_card_facts(self, dataset_name=None, tags=None):
        """`UnlearningTrainer.model_card_facts`, with the steering coefficient the run used (measured, for "auto")."""
        facts = super().model_card_facts(dataset_name, tags)
        if self.args.steering_coeff == "auto":
            used = "not measured (no step ran)" if self.steering_coeff is None else f"{self.steering_coeff:.6g}"
            scale = self.args.steering_scale
            facts.hyperparameters["steering_coeff"] = f"auto ({scale} × forget activation norm): {used}"
        return facts

    # ----------------------------------------------------------------------------------------------------- loss --
    def _measure_control_vector(self, forget: torch.Tensor) -> None:
        """Adaptive RMU: `c = steering_scale × mean ‖h‖` over the forget activations `[N_f, H]` of this first
        micro-batch, pooled over ranks (every rank calls this at its first loss, before any update)."""
        if self.state.global_step > 0:
            raise ValueError(
                "RMU's `steering_coeff='auto'` is measured on the initial model, but training has already taken "
                f"{self.state.global_step} steps. Pass the coefficient as a number."
            )
        local = torch.stack([forget.norm(dim=-1).sum(), forget.new_tensor(len(forget))]).detach().float()
        total, count = self.accelerator.reduce(local, reduction="sum").tolist()
        if count == 0:
            raise ValueError(
                "RMU's `steering_coeff='auto'`: the first batch has no forget positions to measure. "
                "Check the forget data, or pass `steering_coeff` as a number."
            )
        self.steering_coeff = self.args.steering_scale * total / count
        self.control_vector = self.steering_coeff * self.unit_control
        logger.info(
            f"RMU steering_coeff='auto': c = {self.args.steering_scale} × {total / count:.4g} (the initial "
            f"forget activations' mean norm at layer {self.args.layer_id}) = {self.steering_coeff:.4g}."
        )

    def _check_control_cosine(self, cosine: torch.Tensor) -> None:
        """Remember the first training step's mean control cosine; `control_cosine_check_steps` steps later, warn
        (once) if it has risen by less than `COSINE_RISE` (one host sync each time)."""
        steps = self.args.control_cosine_check_steps
        if not steps or not self.model.training or self._cosine_checked:
            return
        if self._cosine_start is None:
            self._cosine_start = float(cosine)
        elif self.state.global_step >= steps:
            now, start = float(cosine), self._cosine_start
            self._cosine_checked = True
            if now - start < COSINE_RISE:
                logger.warning(
                    f"RMU: after {self.state.global_step} steps the forget activations' mean cosine with the control "
                    f"vector moved from {start:.3f} to {now:.3f} (less than {COSINE_RISE}): the forget term is not "
                    f"steering them. Raise the learning rate or `steering_coeff` (now {self.steering_coeff:.4g}), or "
                    f"lower `retain_weight` ({self.args.retain_weight})."
                )

    def _reference_hidden(self, model, batch) -> torch.Tensor:
        """The frozen initial model's layer-`layer_id` output `[B, T, H]` on `batch`."""
        ref = self.ref_model if self.ref_model is not None else model
        unwrapped = self.accelerator.unwrap_model(model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            return ref(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                unlearning_forward=self.ref_layer_forward,
            )

    def unlearning_loss(self, model, inputs, counts, scale=1.0):
        """The micro-batch's share of the step's RMU loss (module docstring), times `scale`, and its `LossStats`."""
        args = self.args
        fmask = inputs["forget_mask"]
        rows = ~fmask
        positions = inputs["completion_mask"][:, 1:] != 0  # [B, T-1]: position t scores token t + 1
        ref = None
        if rows.any():  # before the policy forward, whose activations would otherwise be held
            batch = {k: inputs[k][rows] for k in ("input_ids", "attention_mask")}
            ref = self._reference_hidden(model, batch)[:, :-1][positions[rows]].float()  # [N_r, H]
        hidden = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            unlearning_forward=self.layer_forward,
        )[:, :-1]
        forget = hidden[positions & fmask[:, None]].float()  # [N_f, H]
        if self.control_vector is None:
            self._measure_control_vector(forget)
        control = self.control_vector.to(forget.device)
        forget_dist = (forget - control).pow(2).mean(-1)  # [N_f]
        loss = args.forget_weight * forget_dist.sum() / counts.forget_tokens.clamp(min=1)
        retain_dist = forget_dist.new_zeros(0)
        if ref is not None:
            retain_dist = (hidden[positions & rows[:, None]].float() - ref).pow(2).mean(-1)  # [N_r]
            loss = loss + args.retain_weight * retain_dist.sum() / counts.retain_tokens.clamp(min=1)
        forget = forget.detach()
        n_forget = len(forget_dist)
        stats = LossStats()
        stats.mean("forget/loss", forget_dist.detach().sum(), n_forget)
        cosine = F.cosine_similarity(forget, control[None], dim=-1).sum()
        stats.mean("forget/control_cosine", cosine, n_forget)
        stats.mean("forget/steering_coeff", forget.new_tensor(self.steering_coeff), 1)  # the same on every rank
        stats.mean("forget/activation_norm", forget.norm(dim=-1).sum(), n_forget)
        stats.total("num_tokens/forget", forget.new_tensor(n_forget))
        stats.mean("retain/loss", retain_dist.detach().sum(), len(retain_dist))
        stats.total("num_tokens/retain", forget.new_tensor(len(retain_dist)), rows.any())
        self._check_control_cosine(cosine / max(n_forget, 1))
        return loss * scale, stats
