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

@dataclass
class RMUConfig(UnlearningConfig):
    r"""
    Configuration for [`RMUTrainer`] (RMU, arXiv 2403.03218). Defaults: the WMDP code's Zephyr-7B run
    (`rmu/unlearn.py` of github.com/centerforaisafety/wmdp, run with `--steering_coeffs 6.5 --alpha 1200`).

    Parameters:
        layer_id (`int`, *optional*, defaults to `7`):
            Decoder layer (0-based) whose output is steered; the forward stops there. WMDP: 7 for Zephyr-7B (32
            layers).
        steering_coeff (`float`, *optional*, defaults to `6.5`):
            Norm `c` of the control vector `c·u`. Tune it per model and layer: it has to be large against the norm of
            the activations at `layer_id` (logged as `forget/activation_norm`); the WMDP authors use 6.5 for Zephyr-7B
            and larger values for other models and deeper layers.
        update_layers (`list[int]`, *optional*):
            Layers whose parameters train, each at most `layer_id`. Defaults to `layer_id-2 .. layer_id` (clipped at
            0), as in the paper.
        update_modules (`list[str]`, *optional*, defaults to `["mlp"]`):
            Modules of those layers that train, as names inside a layer (`"mlp"`, `"mlp.down_proj"`, ...). The WMDP code
            trains `mlp.down_proj` only (its `--param_ids 6`): pass `["mlp.down_proj"]` to reproduce it.
        retain_weight (`float`, *optional*, defaults to `1200.0`):
            α, the weight of the retain term (WMDP: 1200 for Zephyr-7B).
        learning_rate (`float`, *optional*, defaults to `5e-5`):
            WMDP: 5e-5, AdamW with a constant rate, no weight decay and no gradient clipping (hence
            `lr_scheduler_type="constant"` and `max_grad_norm=0`).
        max_length (`int`, *optional*, defaults to `512`):
            WMDP truncates forget and retain text to 512 tokens.
    """

    layer_id: int = field(default=7, metadata={"help": "Decoder layer whose output RMU steers (WMDP, Zephyr-7B: 7)."})
    steering_coeff: float = field(
        default=6.5, metadata={"help": "Norm of the control vector; tune per model (WMDP, Zephyr-7B: 6.5)."}
    )
    update_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers that train, each <= layer_id (default: layer_id-2 .. layer_id)."}
    )
    update_modules: list[str] = field(
        default_factory=lambda: ["mlp"], metadata={"help": "Modules of update_layers that train (default: mlp)."}
    )
    retain_weight: float = field(default=1200.0, metadata={"help": "RMU's alpha (WMDP, Zephyr-7B: 1200)."})
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
        if not self.steering_coeff > 0:
            raise ValueError(f"`steering_coeff` must be > 0, got {self.steering_coeff}.")
        if self.update_layers is None:
            self.update_layers = list(range(max(0, self.layer_id - 2), self.layer_id + 1))
        self.update_layers = [int(i) for i in self.update_layers]
        if not self.update_layers:
            raise ValueError("`update_layers` is empty: RMU needs at least one layer to train (default: "
                             "layer_id-2 .. layer_id).")
        bad = [i for i in self.update_layers if not 0 <= i <= self.layer_id]
        if bad:
            raise ValueError(
                f"`update_layers` {bad} lie outside 0 .. layer_id={self.layer_id}: only layers at or below `layer_id` "
                "can move its output. Pick layers in that range, or raise `layer_id`."
            )
        if not self.update_modules:
            raise ValueError("`update_modules` is empty: name the modules of `update_layers` that train, e.g. "
                             "['mlp'].")



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
            hint = ("the PEFT adapters must sit there: target those modules in `peft_config` (e.g. `target_modules="
                    "['gate_proj', 'up_proj', 'down_proj']` for a Llama MLP)" if is_peft_model(unwrapped) else
                    f"the parameters of layer {args.update_layers[0]} are "
                    f"{[n for n, _ in layers[args.update_layers[0]].named_parameters()]}")
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
        self.layer_forward = functools.partial(layer_output, layers=layers_path(unwrapped), layer_id=args.layer_id,
                                               grad_from=min(args.update_layers))
        self.ref_layer_forward = self.layer_forward
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            self.ref_layer_forward = functools.partial(layer_output, layers=layers_path(ref), layer_id=args.layer_id)
            if self.reference_plan.kind == "frozen_copy" and not self.is_deepspeed_enabled:
                ref_owner, ref_name = decoder_layers(ref)  # our own copy: drop the layers it never runs, for good
                setattr(ref_owner, ref_name, getattr(ref_owner, ref_name)[: args.layer_id + 1])
        hidden_size = causal_lm(unwrapped).config.get_text_config().hidden_size
        self.control_vector = control_vector(hidden_size, args.steering_coeff, args.seed)

    # ------------------------------------------------------------------------------------- checkpoints and card --
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`UnlearningTrainer.train`; on resume the control vector is read back from the checkpoint."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, CONTROL_VECTOR_FILE)):
            self.control_vector = torch.load(os.path.join(checkpoint, CONTROL_VECTOR_FILE), weights_only=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """Save the model (and, outside checkpoints, its card) and the control vector beside it."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            folder = output_dir or self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            torch.save(self.control_vector, os.path.join(folder, CONTROL_VECTOR_FILE))

    # ----------------------------------------------------------------------------------------------------- loss --
    def _reference_hidden(self, model, batch) -> torch.Tensor:
        """The frozen initial model's layer-`layer_id` output `[B, T, H]` on `batch`."""
        ref = self.ref_model if self.ref_model is not None else model
        unwrapped = self.accelerator.unwrap_model(model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            forward = self.ref_layer_forward if self.ref_model is not None else self.layer_forward
            return ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       unlearning_forward=functools.partial(forward, grad_from=0))

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
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       unlearning_forward=self.layer_forward)[:, :-1]
        forget = hidden[positions & fmask[:, None]].float()  # [N_f, H]
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
        stats.mean("forget/control_cosine", F.cosine_similarity(forget, control[None], dim=-1).sum(), n_forget)
        stats.mean("forget/activation_norm", forget.norm(dim=-1).sum(), n_forget)
        stats.total("num_tokens/forget", forget.new_tensor(n_forget))
        stats.mean("retain/loss", retain_dist.detach().sum(), len(retain_dist))
        stats.total("num_tokens/retain", forget.new_tensor(len(retain_dist)), rows.any())
        return loss * scale, stats
