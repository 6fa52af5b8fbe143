"""Unlearning trainers: SimNPO, NPO, gradient ascent and GradDiff, as subclasses of TRL's `DPOTrainer`.

TRL's machinery is reused as is: model loading, PEFT / QLoRA wrapping, reference-model creation and DeepSpeed/FSDP
preparation, logging (`_metrics`), model cards. What changes is the data (forget rows paired with retain rows, see
`data.py`) and `_compute_loss`: one forward over forget and retain rows together, label log-probs from a chunked LM
head (no `(B, T, V)` logits, see `modeling.py`) and the losses of `losses.py`.

Normalisation: every term is normalised by counts over the whole optimizer step (all gradient-accumulation
micro-batches on all ranks): forget losses by the number of forget samples (token-level ones by forget tokens), the
retain term by retain tokens. So 2 micro-batches of 2 give the same update as 1 of 4, and 2 ranks the same as 1.
Logged terms are per-micro-batch means, averaged over ranks.
"""

import contextlib
import copy
import os
import signal
import textwrap
import threading
from unittest import mock

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import losses
from .config import GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig, UnlearningConfig
from .data import (
    ForgetRetainCollator,
    ForgetRetainPairs,
    ForgetRetainSampler,
    format_signature,
    split_preference,
    tokenize_dataset,
)
from .modeling import KLTeacher, add_unlearning_head

SIMNPO_CITATION = textwrap.dedent("""\
    @article{fan2024simplicity,
        title   = {{Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning}},
        author  = {Chongyu Fan and Jiancheng Liu and Licong Lin and Jinghan Jia and Ruiqi Zhang and Song Mei and Sijia Liu},
        year    = 2024,
        journal = {arXiv preprint arXiv:2410.07163},
    }""")
NPO_CITATION = textwrap.dedent("""\
    @article{zhang2024negative,
        title   = {{Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning}},
        author  = {Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei},
        year    = 2024,
        journal = {arXiv preprint arXiv:2404.05868},
    }""")
TOFU_CITATION = textwrap.dedent("""\
    @article{maini2024tofu,
        title   = {{TOFU: A Task of Fictitious Unlearning for LLMs}},
        author  = {Pratyush Maini and Zhili Feng and Avi Schwarzschild and Zachary C. Lipton and J. Zico Kolter},
        year    = 2024,
        journal = {arXiv preprint arXiv:2401.06121},
    }""")


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (a preempted or cancelled job), finish the current optimizer step, save a checkpoint and stop.

    Ranks agree through one tiny all-reduce per step, so they all stop at the same step."""

    def __init__(self, accelerator):
        self.accelerator, self.requested, self.stopped_at = accelerator, False, None

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(float(self.requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class UnlearningTrainer(DPOTrainer):
    """Base class: subclasses set `forget_loss` and the class attributes below.

    Args:
        model: a model id / path, a `PreTrainedModel` or a `PeftModel`, as `DPOTrainer` takes it.
        ref_model: NPO only. Without it: with PEFT the base model with adapters disabled; otherwise the reference
            log-probs of the forget set are precomputed once (or, when a live reference is needed for
            `retain_loss_type="kl"`, a frozen copy of the initial model is kept).
        args: the trainer's config (`SimNPOConfig`, `NPOConfig`, ...).
        forget_dataset / retain_dataset: data in a TRL format (language modeling, prompt-completion; standard or
            conversational), the same format for both.
        train_dataset: drop-in form instead of the two above: a preference dataset (`rejected` forgotten, `chosen`
            retained) or an unpaired preference dataset (`label=False` forgotten, `True` retained).
        eval_dataset: `{"forget": ..., "retain": ...}` or a (unpaired) preference dataset.
        processing_class, data_collator, callbacks, optimizers, quantization_config, peft_config: as in `DPOTrainer`.
    """

    config_class = UnlearningConfig
    forget_needs_reference = False  # does the forget term compare against π_ref?
    token_level_forget = False  # forget term normalised by tokens (GA) rather than by samples
    _tag_names = ["trl", "trl-unlearn", "unlearning"]

    def __init__(
        self,
        model,
        ref_model=None,
        args: UnlearningConfig | None = None,
        forget_dataset: Dataset | None = None,
        retain_dataset: Dataset | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = self.config_class(output_dir=f"{os.path.basename(str(name).rstrip('/'))}-{self._name}")
        forget_dataset, retain_dataset = self._resolve_data(args, forget_dataset, retain_dataset, train_dataset)
        self._check_model(model, ref_model, quantization_config, peft_config)

        # Reference: which one, and whether it must be live during training
        uses_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        self.retain_kl = args.retain_weight > 0 and args.retain_loss_type == "kl"
        precompute = args.precompute_ref_log_probs
        if precompute is None:  # NPOConfig's automatic mode
            precompute = ref_model is None and not uses_peft and not self.retain_kl
        if precompute and self.retain_kl and ref_model is None and not uses_peft:
            raise ValueError(
                "`retain_loss_type='kl'` needs a live reference model during training, but "
                "`precompute_ref_log_probs=True` and no `ref_model` was given. Set `precompute_ref_log_probs=False` "
                "(a frozen copy of the initial model is then kept), pass a `ref_model`, or train with PEFT."
            )
        self.precompute_forget_ref = self.forget_needs_reference and bool(precompute)
        needs_live_ref = (self.forget_needs_reference and not self.precompute_forget_ref) or self.retain_kl
        if needs_live_ref and ref_model is None and not uses_peft and not isinstance(model, str):
            # A copy of the model as given: reloading it from `name_or_path` would miss in-memory changes
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        # `precompute_ref_log_probs=True` keeps DPOTrainer from building a reference we don't need; the
        # precompute itself is `_precompute_ref_logps` below.
        args.precompute_ref_log_probs = not needs_live_ref

        eval_dataset = self._split_eval(eval_dataset, args)
        if data_collator is None:
            data_collator = ForgetRetainCollator(
                pad_token_id=0,  # set once the tokenizer is known, below
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None,
            )
        # TRL hashes the whole model to fingerprint its on-disk reference cache, which this trainer doesn't use
        with mock.patch("trl.trainer.dpo_trainer.hash_module", lambda module: ""):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=forget_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        if isinstance(self.data_collator, ForgetRetainCollator):
            self.data_collator.pad_token_id = self._tokenizer.pad_token_id
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "The model has no trainable parameter: unfreeze some parameters or pass a `peft_config`."
            )
        unwrapped = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_unlearning_head(unwrapped)
        if self.ref_model is not None:
            add_unlearning_head(self.accelerator.unwrap_model(self.ref_model))

        retain = self._tokenize(retain_dataset, "retain") if retain_dataset is not None else None
        self.train_dataset = ForgetRetainPairs(self.train_dataset, retain)
        if self.accelerator.num_processes > len(self.train_dataset.forget):
            raise ValueError(
                f"The forget set has {len(self.train_dataset.forget)} rows after preprocessing but training runs on "
                f"{self.accelerator.num_processes} processes: some ranks would get no forget data. Use fewer "
                "processes or more forget data."
            )
        if self.eval_dataset is not None:  # tokenized (and reference-scored) by DPOTrainer.__init__, key by key
            self.eval_dataset = ForgetRetainPairs(self.eval_dataset["forget"], self.eval_dataset.get("retain"))

    def train(self, *args, **kwargs):
        """`Trainer.train`; a SIGTERM during it saves a checkpoint at the end of the step and returns
        (`self.preempted_at` holds the step), so `train(resume_from_checkpoint=True)` continues exactly."""
        callback = PreemptionCallback(self.accelerator)
        self.add_callback(callback)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: setattr(callback, "requested", True))
        try:
            return super().train(*args, **kwargs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.remove_callback(callback)
            self.preempted_at = callback.stopped_at

    # ----------------------------------------------------------------------------------------------- model card --
    evaluation_summary: dict | None = None  # set it (e.g. from an EvalReport) to record results in the model card

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card plus an unlearning section: data, hyperparameters, reference, evaluation, caveat."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
                f.write(self._unlearning_card_section())

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and (output_dir is None or output_dir == self.args.output_dir):
            self.create_model_card()

    def _unlearning_card_section(self) -> str:
        a = self.args
        data = self.train_dataset
        retain = f"{len(data.retain)} examples" if getattr(data, "retain", None) is not None else "none"
        hyper = {
            "beta": a.beta, "gamma": getattr(a, "gamma", None), "forget_weight": a.forget_weight,
            "retain_weight": a.retain_weight, "retain_loss_type": a.retain_loss_type, "learning_rate": a.learning_rate,
            "num_train_epochs": a.num_train_epochs, "max_steps": a.max_steps,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "max_length": a.max_length, "seed": a.seed,
        }
        rows = "\n".join(f"| `{k}` | {v} |" for k, v in hyper.items() if v is not None)
        if not self.forget_needs_reference:
            reference = "none (reference-free)" if not self.retain_kl else "initial model, for the retain KL only"
        elif self.precompute_forget_ref:
            reference = "initial model; its forget-set log-probs precomputed before training"
        elif self.ref_model is None:
            reference = "base model with the PEFT adapters disabled"
        else:
            reference = "frozen reference model"
        if self.evaluation_summary:
            evaluation = "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in self.evaluation_summary.items())
        else:
            evaluation = (
                "No evaluation was recorded with this checkpoint. Measure it, e.g. `trl-unlearn eval tofu --model "
                "<this model> --data_dir <TOFU folder> --split forget10`."
            )
        return f"""
## Unlearning

This model was produced by **{self._name}** unlearning with [trl-unlearn](https://github.com/trl-unlearn/trl-unlearn).

- Base model: `{getattr(self.model.config, "_name_or_path", "") or "unknown"}`
- Forget data: {len(data.forget) if hasattr(data, "forget") else "?"} examples
- Retain data: {retain}
- Reference model: {reference}

| hyperparameter | value |
|---|---|
{rows}

### Evaluation

{evaluation}

### Limitations

Unlearning is approximate. Training lowers the model's likelihood of the forget data while regularising on the
retain data; it does not provably remove the data's influence. Forgotten content can resurface under relearning
(a few fine-tuning steps on related data), paraphrased or adversarial prompts, or membership-inference attacks.
Judge it by the evaluation above, and re-evaluate for your own threat model before relying on it.
"""

    # ----------------------------------------------------------------------------------------------------- data --
    def _resolve_data(self, args, forget, retain, train):
        if train is not None:
            if forget is not None:
                raise ValueError("Pass either `train_dataset` (preference form) or `forget_dataset`, not both.")
            forget, split_retain = split_preference(train, args.dataset_num_proc)
            retain = retain if retain is not None else split_retain
        if forget is None:
            raise ValueError(
                "No forget data: pass `forget_dataset=` (or a preference `train_dataset=` whose `rejected` column "
                "holds the data to forget)."
            )
        if isinstance(forget, IterableDataset) or isinstance(retain, IterableDataset):
            raise TypeError("Streaming (`IterableDataset`) forget/retain data is not supported: pass a `Dataset`.")
        forget_signature = format_signature(forget, "forget")
        if args.retain_weight > 0:
            if retain is None:
                raise ValueError(
                    f"`retain_weight={args.retain_weight}` but no retain data was given: pass `retain_dataset=` or "
                    "set `retain_weight=0`."
                )
            retain_signature = format_signature(retain, "retain")
            if retain_signature != forget_signature:
                raise ValueError(
                    f"Forget data is {_describe(forget_signature)} but retain data is {_describe(retain_signature)}: "
                    "give both in the same TRL format."
                )
        elif retain is not None:
            retain = None  # retain_weight == 0: the regulariser is off
        return forget, retain

    def _check_model(self, model, ref_model, quantization_config, peft_config):
        if ref_model is not None and not self.forget_needs_reference:
            raise ValueError(
                f"{type(self).__name__} is reference-free: remove `ref_model`. (With `retain_loss_type='kl'` the "
                "reference is the initial model, kept automatically.)"
            )
        quantized = quantization_config is not None or getattr(model, "is_loaded_in_4bit", False) or getattr(
            model, "is_loaded_in_8bit", False
        )
        if quantized and peft_config is None and (isinstance(model, str) or not is_peft_model(model)):
            raise ValueError(
                "The model is quantized, and quantized weights cannot be trained: pass a `peft_config` (e.g. "
                "`peft.LoraConfig(...)`) to train adapters on top of it (QLoRA)."
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Called by DPOTrainer.__init__ on the forget set
        name = "forget" if dataset_name == "train" else f"eval {dataset_name}"
        return self._tokenize(dataset, name, args, processing_class)

    def _tokenize(self, dataset, name, args=None, tokenizer=None):
        args = args or self.args
        return tokenize_dataset(
            dataset,
            tokenizer or self.processing_class,
            name,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            num_proc=args.dataset_num_proc,
        )

    @staticmethod
    def _split_eval(eval_dataset, args):
        """`{"forget": ..., "retain": ...}` (raw) from either accepted eval form; None stays None."""
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            if set(eval_dataset) - {"forget", "retain"} or "forget" not in eval_dataset:
                raise ValueError(f"`eval_dataset` as a dict needs keys 'forget' (and 'retain'); got {sorted(eval_dataset)}.")
            forget, retain = eval_dataset["forget"], eval_dataset.get("retain")
        else:
            forget, retain = split_preference(eval_dataset, args.dataset_num_proc)
        split = {"forget": forget}
        if retain is not None and args.retain_weight > 0:
            split["retain"] = retain
        return split

    def _build_eval_pairs(self, eval_dataset):
        if isinstance(eval_dataset, ForgetRetainPairs):
            return eval_dataset
        if self.precompute_forget_ref and self.state.global_step > 0:
            raise ValueError(
                "This NPO run precomputed its reference log-probs and holds no reference model, so a new eval set "
                "can't be scored against the reference after training started. Pass it as `eval_dataset` when "
                "creating the trainer, or pass a `ref_model`."
            )
        split = {k: self._tokenize(v, f"eval {k}") for k, v in self._split_eval(eval_dataset, self.args).items()}
        forget = self._precompute_ref_logps(split["forget"], "forget", self.args.per_device_eval_batch_size)
        return ForgetRetainPairs(forget, split.get("retain"))

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["forget", "retain"]

    def _get_train_sampler(self, train_dataset=None):
        """Seeded forget/retain pairing; `train_sampling_strategy="group_by_length"` groups rows of similar length
        (runs of 64 global batches) to cut padding."""
        dataset = train_dataset or self.train_dataset
        num_retain = len(dataset.retain) if dataset.retain is not None else 0
        lengths, group = None, 0
        if self.args.train_sampling_strategy == "group_by_length":
            def row_lengths(d):
                return [len(p) + len(c) for p, c in zip(d["prompt_ids"], d["completion_ids"])]

            lengths = (row_lengths(dataset.forget), row_lengths(dataset.retain) if num_retain else [])
            group = 64 * self.args.per_device_train_batch_size * self.accelerator.num_processes
        return ForgetRetainSampler(len(dataset.forget), num_retain, seed=self.args.seed, lengths=lengths,
                                   group_size=group)

    # ------------------------------------------------------------------------------------------------ reference --
    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Add a `ref_logps` column (summed reference log-probs of each forget row), computed once."""
        if not self.precompute_forget_ref or "ref_logps" in dataset.column_names or name == "retain":
            return dataset
        self.data_collator.pad_token_id = self._tokenizer.pad_token_id
        loader = self.accelerator.prepare(
            torch.utils.data.DataLoader(
                dataset.select_columns(["prompt_ids", "completion_ids"]),
                batch_size=batch_size,
                collate_fn=self.data_collator,
                shuffle=False,
            )
        )
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.model
        add_unlearning_head(self.accelerator.unwrap_model(model))
        values = []
        for batch in loader:
            logps = self._reference_token_logps(model, batch).sum(-1)
            values.append(self.accelerator.gather_for_metrics(logps).cpu())
        return dataset.add_column("ref_logps", torch.cat(values).tolist())

    @contextlib.contextmanager
    def _reference_context(self, model):
        """Reference forward: no grad, no checkpointing, and adapters off when the reference is the PEFT base."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(model)):
            unwrapped = self.accelerator.unwrap_model(model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            yield

    def _reference_token_logps(self, model, batch, return_hidden=False):
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        ref = self.ref_model if self.ref_model is not None else model
        with self._reference_context(model):
            out = ref(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                fused_logps=True,
                return_hidden=return_hidden,
            )
        return out if return_hidden else out.token_logps

    def _retain_kl_teacher(self, model, inputs):
        """The reference's hidden states at the scored retain positions, for the chunked KL kernel."""
        labels = inputs["input_ids"].masked_fill((inputs["completion_mask"] == 0) | inputs["forget_mask"][:, None], -100)
        batch = {**inputs, "completion_mask": (labels != -100).long()}
        out = self._reference_token_logps(model, batch, return_hidden=True)
        ref = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else model)
        head = (ref.get_base_model() if is_peft_model(ref) else ref).get_output_embeddings()
        return KLTeacher(mask=labels[:, 1:] != -100, hidden=out.hidden, weight=head.weight, bias=head.bias)

    # ----------------------------------------------------------------------------------------------------- loss --
    def forget_loss(self, logps, num_tokens, ref_logps):
        """Per-sample forget losses `[B_f]` (see `losses.py`); subclasses implement it."""
        raise NotImplementedError

    def forget_weight_stat(self, logps, num_tokens, ref_logps):
        """Per-sample gradient weight on `log π` `[B_f]`, logged as `forget/grad_weight`."""
        return torch.ones_like(logps) / num_tokens

    @staticmethod
    def _counts(batch) -> torch.Tensor:
        """[forget samples, forget tokens, retain samples, retain tokens] of one collated batch."""
        scored = batch["completion_mask"][:, 1:].sum(-1).float()
        f = batch["forget_mask"]
        return torch.stack([f.sum().float(), scored[f].sum(), (~f).sum().float(), scored[~f].sum()])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the step's micro-batches and count samples/tokens over all of them and all ranks; the counts
        travel to `compute_loss` as `num_items_in_batch`."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        counts = sum(self._counts(b).to(device) for b in batches)
        return batches, self.accelerator.reduce(counts, reduction="sum")

    # The loss is normalised over the whole step (see module docstring): no further division by the GA steps
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:  # evaluation: normalise over this batch only
            counts, scale = self._counts(inputs).to(inputs["input_ids"].device), 1.0
        else:  # DDP / DeepSpeed average gradients over ranks: undo it, the counts already span all ranks
            counts, scale = num_items_in_batch, float(self.accelerator.num_processes)
        loss, stats = self._unlearning_loss(model, inputs, counts)
        loss = loss * scale
        self._log_step(stats, loss)
        return (loss, None) if return_outputs else loss

    def _unlearning_loss(self, model, inputs, counts):
        """The micro-batch's loss (its share of the step's) and its statistics for logging."""
        args = self.args
        fmask = inputs["forget_mask"]
        ref_logps = None
        if self.forget_needs_reference:  # before the policy forward, whose activations would otherwise be held
            if "ref_logps" in inputs:
                ref_logps = inputs["ref_logps"].float()
            else:
                forget_batch = {k: inputs[k][fmask] for k in ("input_ids", "attention_mask", "completion_mask")}
                ref_logps = self._reference_token_logps(model, forget_batch).sum(-1)
        kl_teacher = self._retain_kl_teacher(model, inputs) if self.retain_kl and not fmask.all() else None
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_logps=True,
            kl_teacher=kl_teacher,
        )
        mask = inputs["completion_mask"][:, 1:]
        logps, num_tokens = out.token_logps.sum(-1), mask.sum(-1).float()
        local = self._counts(inputs).to(counts)
        # Each term is its mean over this micro-batch (what gets logged) times this micro-batch's share of the step
        share = local / counts.clamp(min=1)

        f_logps, f_tokens = logps[fmask], num_tokens[fmask]
        forget_term = self.forget_loss(f_logps, f_tokens, ref_logps).mean()
        loss = args.forget_weight * forget_term * share[1 if self.token_level_forget else 0]
        retain_term = torch.zeros_like(forget_term)
        r = ~fmask
        if r.any():
            if self.retain_kl:
                retain_term = losses.kl_loss(out.token_kl[r], mask[r]).mean()
            else:
                retain_term = losses.nll_loss(logps[r], num_tokens[r]).mean()
            loss = loss + args.retain_weight * retain_term * share[3]
        with torch.no_grad():
            weight = self.forget_weight_stat(f_logps.detach(), f_tokens, ref_logps)
            stats = torch.stack([
                forget_term.detach(), retain_term.detach(), r.any().float(),
                f_logps.detach().sum(), f_tokens.sum(), logps[r].detach().sum(), num_tokens[r].sum(),
                weight.sum(), fmask.sum().float(),
            ]).float()
        return loss, stats

    def _log_step(self, stats, loss):
        """Log the micro-batch's statistics, gathered over ranks in ONE collective (one host sync per micro-batch),
        and stop on a non-finite loss before it is applied."""
        mode = "train" if self.model.training else "eval"
        stats = torch.cat([stats, torch.isfinite(loss.detach()).float().reshape(1)])
        rows = self.accelerator.gather(stats[None]).cpu()
        f_term, r_term, has_retain, f_sum, f_tok, r_sum, r_tok, w_sum, n_forget, finite = rows.unbind(-1)
        metrics = self._metrics[mode]
        metrics["forget/loss"].append(f_term.mean().item())
        metrics["forget/logps_per_token"].append((f_sum.sum() / f_tok.sum().clamp(min=1)).item())
        metrics["num_tokens/forget"].append(f_tok.sum().item())
        metrics["forget/grad_weight"].append((w_sum.sum() / n_forget.sum().clamp(min=1)).item())
        if has_retain.all():
            metrics["retain/loss"].append(r_term.mean().item())
            metrics["retain/logps_per_token"].append((r_sum.sum() / r_tok.sum().clamp(min=1)).item())
            metrics["num_tokens/retain"].append(r_tok.sum().item())
        if mode == "train" and not finite.all():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"Non-finite unlearning loss at step {self.state.global_step + 1}; stopped before applying it. "
                f"Last good checkpoint: {last or 'none saved yet'}. Lower the learning rate or `beta`, or check "
                "the data; resume with `trainer.train(resume_from_checkpoint=...)`."
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._build_eval_pairs(eval_dataset)
        return super(DPOTrainer, self).evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _describe(signature):
    fmt, conversational = signature
    return f"{'conversational' if conversational else 'standard'} {fmt.replace('_', '-')}"


class SimNPOTrainer(UnlearningTrainer):
    """SimNPO (Fan et al., 2024): NPO without a reference model, with a length-normalised log-likelihood and a
    margin. Per forget sample `-(2/β)·logσ(-(β/|y|)·log π(y|x) − γ)`; plus the retain regulariser."""

    config_class = SimNPOConfig
    _tag_names = UnlearningTrainer._tag_names + ["simnpo"]
    _name = "SimNPO"
    _paper = {
        "title": "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning",
        "id": "2410.07163",
        "citation": SIMNPO_CITATION,
    }

    def forget_loss(self, logps, num_tokens, ref_logps):
        return losses.simnpo_loss(logps, num_tokens, self.args.beta, self.args.gamma)

    def forget_weight_stat(self, logps, num_tokens, ref_logps):
        return losses.simnpo_weight(logps, num_tokens, self.args.beta, self.args.gamma)


class NPOTrainer(UnlearningTrainer):
    """NPO (Zhang et al., 2024): per forget sample `-(2/β)·logσ(-β·(log π − log π_ref))`; plus the retain term."""

    config_class = NPOConfig
    forget_needs_reference = True
    _tag_names = UnlearningTrainer._tag_names + ["npo"]
    _name = "NPO"
    _paper = {
        "title": "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
        "id": "2404.05868",
        "citation": NPO_CITATION,
    }

    def forget_loss(self, logps, num_tokens, ref_logps):
        return losses.npo_loss(logps, ref_logps, self.args.beta)

    def forget_weight_stat(self, logps, num_tokens, ref_logps):
        return losses.npo_weight(logps, ref_logps, self.args.beta)


class GradAscentTrainer(UnlearningTrainer):
    """Gradient ascent on the forget set: minimise the token-mean log-likelihood (TOFU's GA baseline)."""

    config_class = GradAscentConfig
    token_level_forget = True
    _tag_names = UnlearningTrainer._tag_names + ["gradient-ascent"]
    _name = "GradAscent"
    _paper = {"title": "TOFU: A Task of Fictitious Unlearning for LLMs", "id": "2401.06121", "citation": TOFU_CITATION}

    def forget_loss(self, logps, num_tokens, ref_logps):
        return losses.ga_loss(logps, num_tokens)


class GradDiffTrainer(GradAscentTrainer):
    """GradDiff: gradient ascent on forget data plus NLL (or KL) on retain data (TOFU's baseline)."""

    config_class = GradDiffConfig
    _tag_names = UnlearningTrainer._tag_names + ["graddiff"]
    _name = "GradDiff"
