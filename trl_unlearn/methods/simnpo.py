"""SimNPO (Fan et al., 2024, arXiv 2410.07163): NPO without a reference model, with a length-normalised
log-likelihood and a margin."""

import functools
import logging
from dataclasses import dataclass, field

from .. import losses
from ..model_card import CITATIONS
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)

GAMMA_SATURATED = 20.0  # a margin beyond which logσ(x − γ) is linear in x for any plausible x = β·(per-token NLL)


@dataclass
class SimNPOConfig(UnlearningConfig):
    r"""
    Configuration for [`SimNPOTrainer`] (SimNPO, arXiv 2410.07163).

    Parameters:
        beta (`float`, *optional*, defaults to `2.5`):
            Inverse temperature of the length-normalised log-likelihood; the paper's TOFU forget05 value (4.5 on
            forget10, about 0.7 on MUSE).
        gamma (`float`, *optional*, defaults to `0.0`):
            Reward margin, outside β as in the paper: `logσ(-(β/|y|)·log π − γ)`. Every published TOFU run uses 0;
            MUSE News uses 3.0. (Unlearn-Simple's TOFU code puts it inside β: its `gamma` equals ours divided by β.)
    """

    beta: float = field(default=2.5, metadata={"help": "SimNPO inverse temperature (paper TOFU forget05: 2.5)."})
    gamma: float = field(default=0.0, metadata={"help": "SimNPO margin, outside beta (paper: 0 on TOFU)."})

    def __post_init__(self):
        super().__post_init__()
        if self.gamma > GAMMA_SATURATED:
            logger.warning(
                f"SimNPO `gamma={self.gamma}` > {GAMMA_SATURATED}: the sigmoid saturates "
                f"(σ(−{GAMMA_SATURATED}) ≈ 2e-9), every forget sample gets the same gradient weight and SimNPO "
                "becomes length-normalised gradient ascent (the collapse the method avoids); published values are 0 "
                "to 3. Unlearn-Simple's `gamma` is ours divided by β."
            )
        if self.gamma < 0:
            logger.warning(
                f"SimNPO `gamma={self.gamma}` < 0: a negative margin lowers the forget loss of every sample; the paper "
                "uses gamma >= 0 (0 on TOFU and MUSE Books, 3.0 on MUSE News)."
            )


class SimNPOTrainer(LikelihoodUnlearningTrainer):
    """SimNPO (Fan et al., 2024): NPO without a reference model, with a length-normalised log-likelihood and a
    margin. Per forget sample `-(2/β)·logσ(-(β/|y|)·log π(y|x) − γ)`; plus the retain regulariser. Arguments as
    [`UnlearningTrainer`]; `ref_model` is refused."""

    config_class = SimNPOConfig
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["simnpo"]
    card_hyperparameters = ("beta", "gamma") + LikelihoodUnlearningTrainer.card_hyperparameters
    _name = "SimNPO"
    _paper = {
        "title": "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning",
        "id": "2410.07163",
        "citation": CITATIONS["SimNPO"],
    }

    def forget_loss(self, num_tokens, ref_logps):
        return functools.partial(losses.simnpo_loss, num_tokens=num_tokens, beta=self.args.beta, gamma=self.args.gamma)

    def forget_grad_weight(self, logps, num_tokens, ref_logps):
        return losses.simnpo_weight(logps, num_tokens, self.args.beta, self.args.gamma)
