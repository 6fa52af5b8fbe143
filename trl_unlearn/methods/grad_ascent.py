"""Gradient ascent on the forget set (TOFU's GA baseline)."""

import logging
from dataclasses import dataclass, field

from .. import losses
from ..model_card import CITATIONS
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class GradAscentConfig(UnlearningConfig):
    r"""
    Configuration for [`GradAscentTrainer`]: gradient ascent on the forget set (baseline).

    Parameters:
        retain_weight (`float`, *optional*, defaults to `0.0`):
            Plain gradient ascent has no retain term (TOFU's GA baseline).
    """

    retain_weight: float = field(default=0.0, metadata={"help": "Weight of the retain regulariser (GA: 0)."})


class GradAscentTrainer(LikelihoodUnlearningTrainer):
    """Gradient ascent on the forget set: minimise the token-mean log-likelihood (TOFU's GA baseline)."""

    config_class = GradAscentConfig
    forget_normaliser = "tokens"
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["gradient-ascent"]
    _name = "GradAscent"
    _paper = {
        "title": "TOFU: A Task of Fictitious Unlearning for LLMs",
        "id": "2401.06121",
        "citation": CITATIONS["TOFU"],
    }

    def forget_loss(self, num_tokens, ref_logps):
        return losses.ga_loss
