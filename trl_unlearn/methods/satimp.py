"""SatImp (Yang et al., 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning", arXiv 2505.11953):
token-level gradient ascent weighted by the detached `p_t^β1 · (1 − p_t)^β2` (saturation times importance), plus
the retain term."""

import functools
import logging
from dataclasses import dataclass, field

from .. import losses
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class SatImpConfig(UnlearningConfig):
    r"""
    Configuration for [`SatImpTrainer`] (SatImp, arXiv 2505.11953). Defaults: open-unlearning's `SatImp` class and
    its `community/methods/SatImp/README.md` (β1 5, β2 1, forget weight 1, retain weight 0.1). Its
    `configs/trainer/SatImp.yaml` swaps the two weights (forget 0.1, retain 1.0): see docs/method.md.

    Parameters:
        beta1 (`float`, *optional*, defaults to `5.0`):
            Saturation exponent: the weight `p_t^β1` fades tokens that are already unlikely.
        beta2 (`float`, *optional*, defaults to `1.0`):
            Importance exponent: the weight `(1 − p_t)^β2` fades tokens the model is already sure of.
        retain_weight (`float`, *optional*, defaults to `0.1`):
            Weight of the retain regulariser (open-unlearning's `alpha`, class default and README).
    """

    beta1: float = field(default=5.0, metadata={"help": "SatImp saturation exponent (open-unlearning: 5)."})
    beta2: float = field(default=1.0, metadata={"help": "SatImp importance exponent (open-unlearning: 1)."})
    retain_weight: float = field(default=0.1, metadata={"help": "Weight of the retain regulariser (SatImp: 0.1)."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta1 < 0 or self.beta2 < 0:
            raise ValueError(f"SatImp's `beta1` and `beta2` must be >= 0, got {self.beta1} and {self.beta2}.")


class SatImpTrainer(LikelihoodUnlearningTrainer):
    """SatImp: per forget token `sg(p_t^β1 (1 − p_t)^β2) · log p_t`, a token mean over the step's forget tokens
    (minimised), plus the retain regulariser. Runs on the fused loss with one "sequence" per token. Logs
    `forget/grad_weight`, the mean token weight. Arguments as [`UnlearningTrainer`]; `ref_model` is refused."""

    config_class = SatImpConfig
    forget_normaliser = "tokens"
    token_level = True
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["satimp"]
    card_hyperparameters = ("beta1", "beta2") + LikelihoodUnlearningTrainer.card_hyperparameters
    _name = "SatImp"
    _paper = {"title": "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning", "id": "2505.11953"}

    def forget_loss(self, num_tokens, ref_logps):
        return functools.partial(losses.satimp_loss, beta1=self.args.beta1, beta2=self.args.beta2)

    def forget_grad_weight(self, logps, num_tokens, ref_logps):
        return losses.satimp_weight(logps, self.args.beta1, self.args.beta2)
