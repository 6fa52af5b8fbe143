"""UNDIAL (Dong et al., 2024, arXiv 2402.10052): self-distillation to the frozen initial model's next-token
distribution with the target token's logit lowered by β.

Per scored forget token: `CE(softmax(t − β·e_y), softmax(z))`, with `t` the frozen teacher's logits and `z` the
model's, over the full vocabulary (`kernels/vocab_loss.py`, without `(B, T, V)` logits); a token mean over the step's
forget tokens. The teacher is the reference: a frozen copy of the initial model (or the PEFT base with the adapters
disabled, or a `ref_model`). The published setting trains on forget data alone (`retain_weight=0`).
"""

import textwrap
from dataclasses import dataclass, field

from .base_config import UnlearningConfig
from .full_vocab import FullVocabUnlearningTrainer

UNDIAL_CITATION = textwrap.dedent("""\
    @inproceedings{dong2025undial,
        title     = {{UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language Models}},
        author    = {Yijiang River Dong and Hongzhou Lin and Mikhail Belkin and Ramon Huerta and Ivan Vuli{\\'c}},
        booktitle = {Proceedings of NAACL},
        year      = 2025,
        eprint    = {arXiv:2402.10052}
    }""")


@dataclass
class UNDIALConfig(UnlearningConfig):
    r"""
    Configuration for [`UNDIALTrainer`] (UNDIAL, arXiv 2402.10052). Defaults: open-unlearning's `UNDIAL.yaml`.

    Parameters:
        beta (`float`, *optional*, defaults to `10.0`):
            How far the target token's teacher logit is lowered before the softmax (the paper's search: 3, 10, 30).
        retain_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the retain term; the paper uses no retain data (open-unlearning's `alpha: 0.0`).
        learning_rate (`float`, *optional*, defaults to `1e-4`):
            The paper's rate (LoRA on Llama-2 7B); open-unlearning's search: 1e-5, 1e-4, 3e-4.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            Must stay `False`: the teacher's whole distribution is needed at every step, so a reference is kept.
    """

    beta: float = field(default=10.0, metadata={"help": "Lowering of the target's teacher logit (paper: 3-30)."})
    retain_weight: float = field(default=0.0, metadata={"help": "Weight of the retain term (paper: 0, none)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (paper: 1e-4)."})

    def __post_init__(self):
        if self.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs=True`: UNDIAL distils from the teacher's whole next-token distribution at "
                "every step, which summed log-probs cannot replace. Remove it (a frozen copy of the model is kept)."
            )
        super().__post_init__()


class UNDIALTrainer(FullVocabUnlearningTrainer):
    """UNDIAL (Dong et al., 2024): per scored forget token, cross-entropy to the frozen initial model's distribution
    with the target's logit lowered by `beta` (module docstring). Arguments as [`UnlearningTrainer`]; `ref_model`,
    if given, is the teacher."""

    config_class = UNDIALConfig
    vocab_loss_kind = "undial"
    forget_needs_reference = True
    _tag_names = FullVocabUnlearningTrainer._tag_names + ["undial"]
    card_hyperparameters = ("beta",) + FullVocabUnlearningTrainer.card_hyperparameters
    _name = "UNDIAL"
    _paper = {
        "title": "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language Models",
        "id": "2402.10052",
        "citation": UNDIAL_CITATION,
    }

    def forget_teacher(self, model, inputs, labels):
        fmask = inputs["forget_mask"]
        return self._reference_teacher(model, inputs, fmask) if fmask.any() else None
