"""IdkNLL: fine-tune the forget prompts towards "I don't know" answers (TOFU's "idk" baseline, Maini et al., 2024,
arXiv 2401.06121), plus the retain term. The forget rows' answers are replaced by IdK answers (`data/idk.py`); the
forget term is their token-mean NLL."""

import logging
import os
from dataclasses import dataclass, field

from .. import losses
from ..data.idk import load_idk_answers, with_idk_completions
from ..model_card import CITATIONS
from .base_config import UnlearningConfig
from .likelihood import LikelihoodUnlearningTrainer

logger = logging.getLogger(__name__)


@dataclass
class IdkConfigFields:
    """The IdK answers' fields (IdkNLL, IdkDPO); documented in each config."""

    idk_answers: list[str] | None = field(
        default=None, metadata={"help": "'I don't know' answers (default: the package's list of 20)."}
    )
    idk_answers_file: str | None = field(
        default=None, metadata={"help": "File of IdK answers: a JSON list or one answer per line."}
    )


@dataclass
class IdkNLLConfig(UnlearningConfig, IdkConfigFields):
    r"""
    Configuration for [`IdkNLLTrainer`]: NLL on "I don't know" answers to the forget prompts, plus the retain NLL.
    Fields of [`UnlearningConfig`] (forget and retain weights 1, as TOFU's "idk" baseline) and the IdK answers:

    Parameters:
        idk_answers (`list[str]`, *optional*):
            "I don't know" answers; each forget row gets one, drawn with `seed` (a one-answer list gives every row
            that answer). Defaults to `None`: the package's list `trl_unlearn.data.idk.DEFAULT_IDK_ANSWERS` (20
            refusal phrasings), unless `idk_answers_file` is set.
        idk_answers_file (`str`, *optional*):
            A file of IdK answers instead: a JSON list (`.json`) or one answer per line. Defaults to `None`.
    """

    def __post_init__(self):
        super().__post_init__()
        load_idk_answers(self.idk_answers, self.idk_answers_file)  # fail early on an empty list or a missing file


def idk_datasets(trainer_cls, model, args, forget_dataset, train_dataset):
    """`(args, forget_dataset, train_dataset)` for an IdK trainer: the config (a default one if None), and a
    paired preference `train_dataset` taken as the forget rows (`chosen` = the IdK answer)."""
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
        args = trainer_cls.config_class(output_dir=f"{os.path.basename(str(name).rstrip('/'))}-{trainer_cls._name}")
    if (
        train_dataset is not None
        and forget_dataset is None
        and {"chosen", "rejected"} <= set(train_dataset.column_names)
    ):
        forget_dataset, train_dataset = train_dataset, None
    return args, forget_dataset, train_dataset


class IdkNLLTrainer(LikelihoodUnlearningTrainer):
    """IdkNLL: each forget row's answer is replaced by an "I don't know" answer (seeded, `data/idk.py`), whose
    token-mean NLL is the forget term; plus the retain regulariser. `forget/logps_per_token` logs the IdK answers'
    log-prob (it rises). Data: prompt-completion forget rows (the completion is replaced), or a preference
    `train_dataset` / `forget_dataset` whose `chosen` is the IdK answer. Arguments as [`UnlearningTrainer`]."""

    config_class = IdkNLLConfig
    forget_normaliser = "tokens"
    _tag_names = LikelihoodUnlearningTrainer._tag_names + ["idk"]
    card_hyperparameters = ("idk_answers", "idk_answers_file") + LikelihoodUnlearningTrainer.card_hyperparameters
    _name = "IdkNLL"
    _paper = {
        "title": "TOFU: A Task of Fictitious Unlearning for LLMs",
        "id": "2401.06121",
        "citation": CITATIONS["TOFU"],
    }

    def __init__(
        self, model, ref_model=None, args=None, forget_dataset=None, retain_dataset=None, train_dataset=None, **kwargs
    ):
        args, forget_dataset, train_dataset = idk_datasets(type(self), model, args, forget_dataset, train_dataset)
        if forget_dataset is not None:
            answers = load_idk_answers(args.idk_answers, args.idk_answers_file)
            forget_dataset = with_idk_completions(forget_dataset, answers, args.seed)
        super().__init__(model, ref_model, args, forget_dataset, retain_dataset, train_dataset, **kwargs)

    def forget_loss(self, num_tokens, ref_logps):
        return losses.nll_loss
