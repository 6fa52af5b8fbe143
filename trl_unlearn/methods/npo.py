"""NPO (Zhang et al., 2024, arXiv 2404.05868): negative preference optimisation against a reference model."""

import functools
import logging
from dataclasses import dataclass, field

from .. import losses
from ..model_card import CITATIONS
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class NPOConfig(UnlearningConfig):
    r"""
    Configuration for [`NPOTrainer`] (NPO, arXiv 2404.05868).

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            Inverse temperature of the log-ratio against the reference; NPO paper and open-unlearning default.
        precompute_ref_log_probs (`bool`, *optional*):
            Compute the reference log-probs of the forget set once, before training, so that no reference model is
            held during training. Defaults to `None`: automatic, i.e. on when no `ref_model` is passed, the model is
            not a PEFT model (whose reference is the base with adapters disabled) and `retain_loss_type="nll"`.
    """

    beta: float = field(default=0.1, metadata={"help": "NPO inverse temperature (NPO paper: 0.1)."})
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={"help": "Precompute reference log-probs of the forget set (default: automatic)."},
    )


class NPOTrainer(LikelihoodUnlearningTrainer):
    """NPO (Zhang et al., 2024): per forget sample `-(2/β)·logσ(-β·(log π − log π_ref))`; plus the retain term.
    Arguments as [`UnlearningTrainer`]; the reference is planned by `reference.plan_reference`."""

    config_class = NPOConfig
    forget_needs_reference = True
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["npo"]
    card_hyperparameters = ("beta",) + LikelihoodUnlearningTrainer.card_hyperparameters
    _name = "NPO"
    _paper = {
        "title": "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
        "id": "2404.05868",
        "citation": CITATIONS["NPO"],
    }

    def forget_loss(self, num_tokens, ref_logps):
        return functools.partial(losses.npo_loss, ref_logps=ref_logps, beta=self.args.beta)

    def forget_grad_weight(self, logps, num_tokens, ref_logps):
        return losses.npo_weight(logps, ref_logps, self.args.beta)
