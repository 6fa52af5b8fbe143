"""IdkDPO: DPO with an "I don't know" answer as the chosen response and the answer to forget as the rejected one,
against the initial model, plus the retain term (the TOFU paper's preference-optimisation baseline, Maini et al.,
2024, arXiv 2401.06121; DPO: Rafailov et al., 2023, arXiv 2305.18290).

Both answers of a forget row ride in the one forward with the retain rows (`data.idk.IdkPairCollator`): forget
answers, then their IdK answers, then retain rows. DPO couples two sequences, so the fused per-sequence kernel (one
loss per sequence) does not apply: the label log-probs come from the chunked head (`kernels.token_logps`, no
`(B, T, V)` logits) and autograd. The reference log-probs of both answers are precomputed once (default, without
PEFT or a KL retain term) or come from a live reference (`reference.plan_reference`)."""

import functools
import logging
from dataclasses import dataclass, field

from .. import losses
from ..data.idk import IdkPairCollator, idk_forget_rows, load_idk_answers, tokenize_idk_pair
from ..data.pairing import ForgetRetainPairs
from ..model_card import CITATIONS
from ..modeling import forward_logps
from ..reference import scored_labels
from .base import UnlearningTrainer
from .base_config import UnlearningConfig
from .idk_nll import IdkConfigFields, idk_datasets, idk_eval_dataset

logger = logging.getLogger(__name__)


@dataclass
class IdkDPOConfig(UnlearningConfig, IdkConfigFields):
    r"""
    Configuration for [`IdkDPOTrainer`]: DPO towards "I don't know" answers, plus the retain NLL.

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            DPO's inverse temperature (open-unlearning's `DPO.yaml`: 0.1). The loss is standard DPO, without
            open-unlearning's extra factor 2/β (docs/method.md).
        idk_answers (`list[str]`, *optional*):
            "I don't know" answers for prompt-completion forget rows; each row gets one, drawn with `seed`. Defaults
            to `None`: the package's list `trl_unlearn.data.idk.DEFAULT_IDK_ANSWERS`, unless `idk_answers_file` is
            set. Not used with preference rows (their `chosen` is the IdK answer).
        idk_answers_file (`str`, *optional*):
            A file of IdK answers instead: a JSON list (`.json`) or one answer per line. Defaults to `None`.
        precompute_ref_log_probs (`bool`, *optional*):
            Compute the reference log-probs of both answers once, before training (no reference model held).
            Defaults to `None`: automatic, as for NPO.
    """

    beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature (open-unlearning: 0.1)."})
    precompute_ref_log_probs: bool | None = field(
        default=None, metadata={"help": "Precompute reference log-probs of both answers (default: automatic)."}
    )

    def __post_init__(self):
        super().__post_init__()
        load_idk_answers(self.idk_answers, self.idk_answers_file)  # fail early on an empty list or a missing file


class IdkDPOTrainer(UnlearningTrainer):
    """IdkDPO: per forget row `-logσ(β·((log π_w − log π_ref,w) − (log π_l − log π_ref,l)))` with `w` its IdK answer
    and `l` its answer (summed log-probs), a mean over the step's forget rows; plus the retain regulariser. Data:
    prompt-completion forget rows plus `idk_answers`, or preference rows (`prompt`, `chosen` = IdK answer,
    `rejected` = answer to forget) as `forget_dataset` or `train_dataset`. Arguments as [`UnlearningTrainer`]."""

    config_class = IdkDPOConfig
    forget_needs_reference = True
    _tag_names = UnlearningTrainer._tag_names + ["idk", "dpo"]
    card_hyperparameters = ("beta", "idk_answers", "idk_answers_file", "retain_loss_type")
    _name = "IdkDPO"
    _paper = {
        "title": "TOFU: A Task of Fictitious Unlearning for LLMs",
        "id": "2401.06121",
        "citation": CITATIONS["TOFU"],
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        forget_dataset=None,
        retain_dataset=None,
        train_dataset=None,
        data_collator=None,
        **kwargs,
    ):
        args, forget_dataset, train_dataset = idk_datasets(type(self), model, args, forget_dataset, train_dataset)
        answers = load_idk_answers(args.idk_answers, args.idk_answers_file)
        self.to_forget_rows = functools.partial(idk_forget_rows, answers=answers, seed=args.seed)
        if forget_dataset is not None:
            forget_dataset = self.to_forget_rows(forget_dataset)
        kwargs["eval_dataset"] = idk_eval_dataset(kwargs.get("eval_dataset"), self.to_forget_rows)
        if data_collator is None:
            data_collator = IdkPairCollator(
                pad_token_id=0,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None,
            )
        super().__init__(
            model, ref_model, args, forget_dataset, retain_dataset, train_dataset, data_collator=data_collator, **kwargs
        )

    # ----------------------------------------------------------------------------------------------------- data --
    def _build_eval_pairs(self, eval_dataset):
        return super()._build_eval_pairs(idk_eval_dataset(eval_dataset, self.to_forget_rows))

    def _tokenize(self, dataset, name, args=None, tokenizer=None):
        if "idk_completion" in dataset.column_names:  # forget rows: both answers, tokenized together
            tokenizer = tokenizer or self.processing_class
            # the prompt and completion columns stay, so `tokenize_dataset` still sees the format (and then keeps
            # the ids: it tokenizes only rows without `prompt_ids`)
            dataset = dataset.map(
                tokenize_idk_pair,
                fn_kwargs={"tokenizer": tokenizer},
                remove_columns=["idk_completion"],
                desc=f"Tokenizing {name} dataset",
            )
        return super()._tokenize(dataset, name, args, tokenizer)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """`ref_logps` (the answers') and `idk_ref_logps` (the IdK answers') columns, each computed once."""
        if (
            not self.precompute_forget_ref
            or isinstance(dataset, ForgetRetainPairs)
            or name == "retain"
            or "ref_logps" in dataset.column_names
            or "idk_prompt_ids" not in dataset.column_names
        ):
            return dataset
        idk = dataset.select_columns(["idk_prompt_ids", "idk_completion_ids"]).rename_columns(
            {"idk_prompt_ids": "prompt_ids", "idk_completion_ids": "completion_ids"}
        )
        idk_ref = super()._precompute_ref_logps(idk, name, batch_size)["ref_logps"]
        return super()._precompute_ref_logps(dataset, name, batch_size).add_column("idk_ref_logps", idk_ref)

    # ----------------------------------------------------------------------------------------------------- loss --
    def unlearning_loss(self, model, inputs, counts, scale=1.0):
        """The micro-batch's share of the step's loss (times `scale`) and its `LossStats`. `counts.forget_samples`
        counts both answers of each pair: the DPO term is normalised by half of it (the pairs)."""
        args = self.args
        fmask, idk = inputs["forget_mask"], inputs["idk_mask"]
        rmask = ~fmask
        if "ref_logps" in inputs:  # forget-side rows in batch order: answers, then IdK answers
            ref_logps = inputs["ref_logps"].float()
        else:  # before the policy forward, whose activations would otherwise be held
            forget_batch = {k: inputs[k][fmask] for k in ("input_ids", "attention_mask", "completion_mask")}
            ref_logps = self._reference_token_logps(model, forget_batch).sum(-1)
        teacher = self._retain_kl_teacher(model, inputs) if self.retain_kl and rmask.any() else None
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=scored_labels(inputs),
            unlearning_forward=forward_logps,
            kl_teacher=teacher,
        )
        mask = inputs["completion_mask"][:, 1:]
        num_tokens = mask.sum(-1).float()
        logps = out.token_logps.sum(-1)  # [B], differentiable
        is_idk = idk[fmask]  # [B_f + B_f] over the forget-side rows
        f_logps = logps[fmask]
        dpo = losses.dpo_loss(f_logps[is_idk], f_logps[~is_idk], ref_logps[is_idk], ref_logps[~is_idk], args.beta)
        n_pairs = (counts.forget_samples / 2).clamp(min=1)
        loss = args.forget_weight * scale * dpo.sum() / n_pairs
        if self.retain_kl and rmask.any():
            retain_losses = losses.kl_loss(out.token_kl[rmask], mask[rmask])
        else:
            retain_losses = losses.nll_loss(logps[rmask])
        if args.retain_weight > 0 and rmask.any():
            loss = loss + args.retain_weight * scale * retain_losses.sum() / counts.retain_tokens.clamp(min=1)

        logps = logps.detach()
        answer, idk_rows = fmask & ~idk, idk
        margin = (f_logps.detach() - ref_logps)[is_idk] - (f_logps.detach() - ref_logps)[~is_idk]
        r_tokens = num_tokens[rmask].sum()
        stats = losses.LossStats()
        stats.mean("forget/loss", dpo.detach().sum(), len(dpo))
        stats.mean("forget/logps_per_token", logps[answer].sum(), num_tokens[answer].sum())
        stats.mean("forget/idk_logps_per_token", logps[idk_rows].sum(), num_tokens[idk_rows].sum())
        stats.mean("forget/reward_margin", margin.sum(), len(margin))
        stats.total("num_tokens/forget", num_tokens[answer].sum())
        stats.mean("retain/loss", retain_losses.detach().sum(), r_tokens)
        stats.mean("retain/logps_per_token", logps[rmask].sum(), r_tokens)
        stats.total("num_tokens/retain", r_tokens, rmask.any())
        return loss, stats
