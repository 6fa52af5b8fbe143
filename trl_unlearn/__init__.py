"""trl-unlearn: LLM unlearning (SimNPO, NPO, GA, GradDiff) as drop-in Hugging Face TRL trainers."""

__version__ = "0.1.0.dev0"

from .config import GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig, UnlearningConfig
from .trainer import GradAscentTrainer, GradDiffTrainer, NPOTrainer, SimNPOTrainer, UnlearningTrainer

__all__ = [
    "SimNPOConfig",
    "SimNPOTrainer",
    "NPOConfig",
    "NPOTrainer",
    "GradAscentConfig",
    "GradAscentTrainer",
    "GradDiffConfig",
    "GradDiffTrainer",
    "UnlearningConfig",
    "UnlearningTrainer",
]
