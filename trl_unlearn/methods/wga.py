"""WGA, weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective
and Go Beyond", arXiv 2502.19301): token-level gradient ascent with each token's gradient weighted by its detached
probability `p_t^β`, plus the retain term."""

import functools
import logging
from dataclasses import dataclass, field

from .. import losses
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class WGAConfig(UnlearningConfig):
    r"""
    Configuration for [`WGATrainer`] (WGA, arXiv 2502.19301). Defaults: open-unlearning's `configs/trainer/WGA.yaml`
    (β 1, forget and retain weights 1, retain NLL).

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent of the detached token weight `p_t^β` (> 0): near 0 it approaches plain (token-mean) gradient
            ascent; larger values stop pushing sooner on tokens that are already unlikely.
    """

    beta: float = field(default=1.0, metadata={"help": "WGA exponent of the token weight p^beta (open-unlearning: 1)."})


class WGATrainer(LikelihoodUnlearningTrainer):
    """WGA: per forget token `sg(p_t)^β · log p_t`, a token mean over the step's forget tokens (minimised), plus the
    retain regulariser. Runs on the fused loss with one "sequence" per token. Logs `forget/grad_weight`, the mean
    `p_t^β` over forget tokens. Arguments as [`UnlearningTrainer`]; `ref_model` is refused."""

    config_class = WGAConfig
    forget_normaliser = "tokens"
    token_level = True
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["wga"]
    card_hyperparameters = ("beta",) + LikelihoodUnlearningTrainer.card_hyperparameters
    _name = "WGA"
    _paper = {"title": "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond", "id": "2502.19301"}

    def forget_loss(self, num_tokens, ref_logps):
        return functools.partial(losses.wga_loss, beta=self.args.beta)

    def forget_grad_weight(self, logps, num_tokens, ref_logps):
        return losses.wga_weight(logps, self.args.beta)
