"""CE-U (Yang et al., 2025, arXiv 2503.01224): cross-entropy unlearning, to the model's own next-token distribution
with the target token removed.

Per scored forget token: `CE(q, softmax(z))` with `q = softmax(z)` renormalised without the target (computed from
the detached logits: `q_y = 0`), over the full vocabulary (`kernels/vocab_loss.py`). The first
`ignore_first_n_answer_tokens` scored tokens of each forget row are left out (the paper's footnote on its training
settings); the loss is a token mean over the step's remaining forget tokens. The published setting has no retain
term (`retain_weight=0`).
"""

import textwrap
from dataclasses import dataclass, field

import numpy as np
import torch

from .base_config import UnlearningConfig
from .full_vocab import FullVocabUnlearningTrainer

CEU_CITATION = textwrap.dedent("""\
    @article{yang2025ceu,
        title   = {{CE-U: Cross Entropy Unlearning}},
        author  = {Bo Yang},
        journal = {arXiv preprint arXiv:2503.01224},
        year    = 2025
    }""")


@dataclass
class CEUConfig(UnlearningConfig):
    r"""
    Configuration for [`CEUTrainer`] (CE-U, arXiv 2503.01224). Defaults: open-unlearning's `CEU.yaml` and
    `community/methods/CEU/run.sh`.

    Parameters:
        ignore_first_n_answer_tokens (`int`, *optional*, defaults to `1`):
            Scored tokens at the start of each forget completion left out of the loss (the paper's footnote: the
            first answer token often carries the question's form rather than the fact). `0` keeps every token.
        retain_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the retain term; the paper trains on forget data alone.
        learning_rate (`float`, *optional*, defaults to `1e-5`):
            open-unlearning's TOFU rate for CE-U.
    """

    ignore_first_n_answer_tokens: int = field(
        default=1, metadata={"help": "Scored tokens left out at the start of each forget completion (paper: 1)."}
    )
    retain_weight: float = field(default=0.0, metadata={"help": "Weight of the retain term (paper: 0, none)."})

    def __post_init__(self):
        super().__post_init__()
        if self.ignore_first_n_answer_tokens < 0:
            raise ValueError(f"`ignore_first_n_answer_tokens` must be >= 0, got {self.ignore_first_n_answer_tokens}.")


class CEUTrainer(FullVocabUnlearningTrainer):
    """CE-U (Yang, 2025): per scored forget token, cross-entropy to the model's own distribution with the target
    removed (module docstring). Arguments as [`UnlearningTrainer`]; `ref_model` is refused."""

    config_class = CEUConfig
    vocab_loss_kind = "ceu"
    _tag_names = FullVocabUnlearningTrainer._tag_names + ["ceu"]
    card_hyperparameters = ("ignore_first_n_answer_tokens",) + FullVocabUnlearningTrainer.card_hyperparameters
    _name = "CE-U"
    _paper = {"title": "CE-U: Cross Entropy Unlearning", "id": "2503.01224", "citation": CEU_CITATION}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_lengths(self.train_dataset.forget, "forget")
        if self.eval_dataset is not None:
            self._check_lengths(self.eval_dataset.forget, "eval forget")

    def _check_lengths(self, dataset, name):
        """Every row must keep a scored token after the ignored ones: the step's token count relies on it."""
        n = self.args.ignore_first_n_answer_tokens
        scored = np.asarray(dataset["num_scored"])
        short = int((scored <= n).sum())
        if short:
            raise ValueError(
                f"{short} of {len(scored)} {name} examples have at most `ignore_first_n_answer_tokens={n}` scored "
                f"tokens (shortest: {int(scored.min())}), so CE-U would learn nothing from them: lower "
                "`ignore_first_n_answer_tokens` or drop those examples."
            )

    def forget_labels(self, labels, forget_rows):
        """The forget rows' labels without their first `ignore_first_n_answer_tokens` scored tokens."""
        n = self.args.ignore_first_n_answer_tokens
        if n == 0:
            return labels
        scored = labels[:, 1:] != -100  # position t scores token t + 1
        drop = scored & (scored.cumsum(-1) <= n) & forget_rows[:, None]
        return torch.cat([labels[:, :1], labels[:, 1:].masked_fill(drop, -100)], dim=1)

    def forget_token_count(self, counts):
        # every forget row has more than n scored tokens (checked at construction), so exactly n per row are left out;
        # an eval set passed later to `evaluate()` is not checked: a row there with fewer tokens makes this count low
        return counts.forget_tokens - self.args.ignore_first_n_answer_tokens * counts.forget_samples
