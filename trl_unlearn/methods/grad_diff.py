"""GradDiff: gradient ascent on forget data plus NLL (or KL) on retain data (TOFU's baseline)."""

import logging
from dataclasses import dataclass

from .base_config import UnlearningConfig
from .grad_ascent import GradAscentTrainer
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class GradDiffConfig(UnlearningConfig):
    r"""
    Configuration for [`GradDiffTrainer`]: gradient ascent on forget data plus NLL on retain data (TOFU baseline).
    Same defaults as [`UnlearningConfig`].
    """


class GradDiffTrainer(GradAscentTrainer):
    """GradDiff: gradient ascent on forget data plus NLL (or KL) on retain data (TOFU's baseline)."""

    config_class = GradDiffConfig
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["graddiff"]
    _name = "GradDiff"
