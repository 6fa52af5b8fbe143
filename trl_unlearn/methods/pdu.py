"""PDU (Entesari et al., 2025, arXiv 2506.05314): constrained unlearning solved by primal-dual updates.

Forget term (the paper's logit-margin flattening): per scored forget token `(max_v z_v − mean_v z_v)²` on the model's
logits `z` (`kernels/vocab_loss.py`), a token mean over the step's forget tokens. The retain loss `R` (token-mean
NLL, or KL) is held under `ε = retain_loss_eps` by a Lagrange multiplier λ:

    loss = forget_weight · forget_term + λ · (R − ε)

λ starts at `retain_weight` and, once `dual_warmup_epochs` epochs have passed, takes a projected dual-ascent step
`λ ← max(0, λ + dual_step_size · (R − ε))` after every optimizer step (`dual_update_upon="step"`, `R` that step's
retain loss over all its micro-batches and ranks) or at the end of every epoch (`"epoch"`, `R` the mean of the
epoch's step retain losses). λ is logged every step (`dual/lambda`) and saved with each checkpoint (`pdu_dual.json`),
read back on resume.
"""

import json
import os
import textwrap
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .base_config import UnlearningConfig
from .full_vocab import FullVocabUnlearningTrainer

DUAL_FILE = "pdu_dual.json"
DUAL_UPDATE_UPON = ("step", "epoch")
PDU_CITATION = textwrap.dedent("""\
    @article{entesari2025constrained,
        title   = {{Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models}},
        author  = {Taha Entesari and Arman Hatami and Rinat Khaziev and Anil Ramakrishna and Mahyar Fazlyab},
        journal = {arXiv preprint arXiv:2506.05314},
        year    = 2025
    }""")


def dual_step(lam: float, retain_loss: float, eps: float, step_size: float) -> float:
    """One projected dual-ascent step: `max(0, λ + step_size · (retain_loss − ε))`."""
    return max(0.0, lam + step_size * (retain_loss - eps))


@dataclass
class PDUConfig(UnlearningConfig):
    r"""
    Configuration for [`PDUTrainer`] (PDU, arXiv 2506.05314). Defaults: open-unlearning's `PDU.yaml`; its TOFU runs
    (`community/methods/PDU/run.sh`) use `retain_weight=100`, `dual_step_size=5`, `retain_loss_eps=0.3`.

    Parameters:
        retain_loss_eps (`float`):
            ε, the bound on the retain loss. Required: pick it somewhat above the initial model's retain loss (logged
            as `retain/loss` at the first step); the authors' TOFU value is 0.3.
        dual_step_size (`float`, *optional*, defaults to `1.0`):
            Step of the dual ascent on λ.
        dual_warmup_epochs (`float`, *optional*, defaults to `5`):
            Epochs during which λ stays at its initial value.
        dual_update_upon (`str`, *optional*, defaults to `"step"`):
            `"step"`: update λ after every optimizer step; `"epoch"`: at the end of every epoch.
        retain_weight (`float`, *optional*, defaults to `1.0`):
            The initial λ (> 0). The forget term is a squared logit gap, large at the start: the authors use 50-100.
    """

    retain_loss_eps: float | None = field(
        default=None, metadata={"help": "Bound epsilon on the retain loss (required; authors' TOFU: 0.3)."}
    )
    dual_step_size: float = field(default=1.0, metadata={"help": "Dual ascent step on lambda (TOFU runs: 5)."})
    dual_warmup_epochs: float = field(default=5, metadata={"help": "Epochs before lambda is updated (default 5)."})
    dual_update_upon: str = field(
        default="step", metadata={"help": "Update lambda per 'step' or per 'epoch'.", "choices": list(DUAL_UPDATE_UPON)}
    )
    retain_weight: float = field(default=1.0, metadata={"help": "Initial lambda, > 0 (authors' TOFU runs: 100)."})

    def __post_init__(self):
        if self.retain_loss_eps is None:
            raise ValueError(
                "PDU needs `retain_loss_eps` (ε, the bound on the retain loss): set it somewhat above the initial "
                "model's retain loss, e.g. `--retain_loss_eps 0.3` (the authors' TOFU value)."
            )
        super().__post_init__()
        if self.dual_update_upon not in DUAL_UPDATE_UPON:
            raise ValueError(f"`dual_update_upon` must be one of {DUAL_UPDATE_UPON}, got {self.dual_update_upon!r}.")
        if self.retain_weight <= 0:
            raise ValueError(
                f"`retain_weight` (PDU's initial λ) must be > 0, got {self.retain_weight}: the constraint needs retain "
                "data, which `retain_weight=0` turns off. The authors start at 100 on TOFU."
            )
        if self.dual_step_size < 0 or self.dual_warmup_epochs < 0:
            raise ValueError(
                f"`dual_step_size` and `dual_warmup_epochs` must be >= 0, got {self.dual_step_size} and "
                f"{self.dual_warmup_epochs}."
            )


class DualAscentCallback(TrainerCallback):
    """Updates the trainer's λ (`PDUTrainer.dual_lambda`) after each optimizer step or epoch (module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.epoch_at_step_start = 0.0
        self.epoch_losses = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.epoch_at_step_start = state.epoch or 0.0

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        retain_loss = trainer.pop_step_retain_loss()
        self.epoch_losses.append(retain_loss)
        if args.dual_update_upon == "step" and self.epoch_at_step_start >= args.dual_warmup_epochs:
            trainer.dual_lambda = dual_step(trainer.dual_lambda, retain_loss, args.retain_loss_eps, args.dual_step_size)

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.dual_update_upon == "epoch" and state.epoch >= args.dual_warmup_epochs and self.epoch_losses:
            mean = sum(self.epoch_losses) / len(self.epoch_losses)
            self.trainer.dual_lambda = dual_step(
                self.trainer.dual_lambda, mean, args.retain_loss_eps, args.dual_step_size
            )
        self.epoch_losses = []


class PDUTrainer(FullVocabUnlearningTrainer):
    """PDU (Entesari et al., 2025): the logit-margin flattening forget loss plus `λ · (retain − ε)`, λ updated by
    projected dual ascent (module docstring). Arguments as [`UnlearningTrainer`]; `ref_model` is refused."""

    config_class = PDUConfig
    vocab_loss_kind = "pdu"
    _tag_names = FullVocabUnlearningTrainer._tag_names + ["pdu"]
    card_hyperparameters = (
        "retain_loss_eps",
        "dual_step_size",
        "dual_warmup_epochs",
        "dual_update_upon",
    ) + FullVocabUnlearningTrainer.card_hyperparameters
    _name = "PDU"
    _paper = {
        "title": "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models",
        "id": "2506.05314",
        "citation": PDU_CITATION,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dual_lambda = float(self.args.retain_weight)
        self._step_retain = None  # this rank's share of the step's retain loss, summed over micro-batches
        self.add_callback(DualAscentCallback(self))

    def retain_coefficient(self):
        return self.dual_lambda

    def loss_offset(self, retain_tokens, counts, scale):
        # −λ·ε, shared between micro-batches and ranks in proportion to their retain tokens
        return -self.dual_lambda * self.args.retain_loss_eps * scale * retain_tokens / counts.retain_tokens.clamp(min=1)

    def record_retain_loss(self, retain_sum, counts):
        share = retain_sum / counts.retain_tokens.clamp(min=1)
        self._step_retain = share if self._step_retain is None else self._step_retain + share

    def pop_step_retain_loss(self) -> float:
        """The last optimizer step's token-mean retain loss over all its micro-batches and ranks (a collective)."""
        value = self._step_retain if self._step_retain is not None else torch.zeros((), device=self.args.device)
        self._step_retain = None
        return float(self.accelerator.reduce(value.float(), reduction="sum"))

    def unlearning_loss(self, model, inputs, counts, scale=1.0):
        loss, stats = super().unlearning_loss(model, inputs, counts, scale)
        stats.mean("dual/lambda", loss.new_tensor(self.dual_lambda), 1)
        return loss, stats

    # ------------------------------------------------------------------------------------------- checkpoints --
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`UnlearningTrainer.train`; on resume λ is read back from the checkpoint."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, DUAL_FILE)):
            with open(os.path.join(checkpoint, DUAL_FILE)) as f:
                self.dual_lambda = float(json.load(f)["lambda"])
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """Save the model (and, outside checkpoints, its card) and λ beside it."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            folder = output_dir or self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, DUAL_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"lambda": self.dual_lambda, "retain_loss_eps": self.args.retain_loss_eps}, f)
            os.replace(tmp, os.path.join(folder, DUAL_FILE))
