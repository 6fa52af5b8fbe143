"""IdkNLL: fine-tune the forget prompts towards "I don't know" answers (TOFU's "idk" baseline, Maini et al., 2024,
arXiv 2401.06121), plus the retain term. The forget rows' answers are replaced by IdK answers (`data/idk.py`); the
forget term is their token-mean NLL."""

import functools
import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset

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


def idk_eval_dataset(eval_dataset, to_forget_rows):
    """The eval set with IdK answers on its forget rows (`to_forget_rows`, as for training): a `{"forget": ...,
    "retain": ...}` dict's forget rows, or a preference dataset's (`chosen` taken as the IdK answer; no retain rows
    then). Other values (None, a name, prepared pairs) pass unchanged."""
    if isinstance(eval_dataset, dict) and "forget" in eval_dataset:
        return {**eval_dataset, "forget": to_forget_rows(eval_dataset["forget"])}
    if isinstance(eval_dataset, Dataset):
        if not {"chosen", "rejected"} <= set(eval_dataset.column_names):
            raise ValueError(
                "An IdK trainer's eval set is a dict `{'forget': ..., 'retain': ...}` (forget rows get IdK answers) "
                f"or preference rows (`chosen` = the IdK answer); got columns {sorted(eval_dataset.column_names)}."
            )
        return {"forget": to_forget_rows(eval_dataset)}
    return eval_dataset


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
        answers = load_idk_answers(args.idk_answers, args.idk_answers_file)
        self.to_forget_rows = functools.partial(with_idk_completions, answers=answers, seed=args.seed)
        if forget_dataset is not None:
            forget_dataset = self.to_forget_rows(forget_dataset)
        kwargs["eval_dataset"] = idk_eval_dataset(kwargs.get("eval_dataset"), self.to_forget_rows)
        super().__init__(model, ref_model, args, forget_dataset, retain_dataset, train_dataset, **kwargs)

    def _build_eval_pairs(self, eval_dataset):
        return super()._build_eval_pairs(idk_eval_dataset(eval_dataset, self.to_forget_rows))

    def forget_loss(self, num_tokens, ref_logps):
        return losses.nll_loss
