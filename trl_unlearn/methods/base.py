"""`UnlearningTrainer`: the machinery every unlearning method shares, on TRL's `DPOTrainer`.

TRL's machinery is reused as is: model loading, PEFT / QLoRA wrapping, DeepSpeed / FSDP preparation, the optimizer
loop, logging (`_metrics`), `push_to_hub`. What this class adds: the data (forget rows paired with retain rows,
`data/`), the reference (`reference.py`), the model card (`model_card.py`), step-wide normalisation and the logging of
a method's `LossStats`. A method (`methods/<name>.py`) adds its config, its class attributes and its loss:
`unlearning_loss(model, inputs, counts, scale) -> (loss, LossStats)`; the likelihood methods get theirs from
`LikelihoodUnlearningTrainer` (`likelihood.py`) and define only their forget loss.

Normalisation: every term is normalised by counts over the whole optimizer step (all gradient-accumulation
micro-batches on all ranks, `StepCounts`): forget losses by the number of forget samples (token-level ones by forget
tokens), the retain term by retain tokens. So 2 micro-batches of 2 give the same update as 1 of 4, and 2 ranks the
same as 1. Logged values are pooled over the ranks of each micro-batch (`LossStats`).
"""

import copy
import logging
import os

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer

from .. import outputs
from .._trl_compat import prepare_inputs, set_signature_columns
from ..data.formats import PROMPT_TEMPLATE, resolve_datasets, split_eval
from ..data.pairing import ForgetRetainCollator, ForgetRetainPairs, ForgetRetainSampler, StepCounts, batch_counts
from ..data.tokenize import tokenize_dataset
from ..loading import PROMPT_FILE, check_model_path, check_weights, save_prompt_format
from ..losses import LossStats
from ..metric_directions import direction
from ..model_card import UnlearningCard, readable, write_card
from ..modeling import add_unlearning_forward
from ..preemption import PreemptionCallback
from ..reference import kl_teacher, plan_reference, reference_context, reference_forward, scored_labels
from .base_config import UnlearningConfig

# Config fields every card lists, after the method's own `card_hyperparameters`
SHARED_CARD_FIELDS = (
    "forget_weight",
    "retain_weight",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_length",
    "seed",
)

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job ended by SIGTERM; schedulers requeue it
EARLY_STOP_EXIT_CODE = 3  # a callback stopped training before its last step; the model and card are saved


def _name_or_path(obj) -> str | None:
    """The path or Hub id a model / tokenizer was loaded from (`str` given as is), or None."""
    if obj is None or isinstance(obj, str):
        return obj
    config = getattr(obj, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None) or None


def _plain_prompt_format(dataset) -> str | None:
    """The prompt format `trl-unlearn eval` takes for standard prompt-completion rows built with `PROMPT_TEMPLATE`
    (every prompt `"Question: ...\nAnswer:"`), "chat" for conversational rows, else None (unknown)."""
    if "prompt" not in dataset.column_names or not len(dataset):
        return None
    prompts = dataset["prompt"]
    if all(isinstance(p, list) for p in prompts):
        return "chat"
    head, tail = PROMPT_TEMPLATE.split("{question}")
    if all(isinstance(p, str) and p.startswith(head) and p.endswith(tail) for p in prompts):
        return PROMPT_TEMPLATE
    return None


class UnlearningTrainer(DPOTrainer):
    """Base class of the unlearning trainers; a method subclasses it (or `LikelihoodUnlearningTrainer`), sets the
    class attributes below and defines `unlearning_loss`.

    Args:
        model (`str`, `PreTrainedModel` or `PeftModel`): the model to unlearn from, as `DPOTrainer` takes it.
        ref_model (`PreTrainedModel`, *optional*): NPO only. Without it: with PEFT the base model with adapters
            disabled; otherwise the forget set's reference log-probs are precomputed once (or, when a live
            reference is needed for `retain_loss_type="kl"`, a frozen copy of the initial model is kept). See
            `reference.plan_reference`.
        args (`UnlearningConfig`, *optional*): the trainer's config (`SimNPOConfig`, `NPOConfig`, ...); not modified.
        forget_dataset, retain_dataset (`datasets.Dataset`): data in a TRL format (language modeling,
            prompt-completion; standard or conversational), the same format for both.
        train_dataset (`datasets.Dataset`, *optional*): drop-in form instead of the two above: a preference dataset
            (`rejected` forgotten, `chosen` retained) or an unpaired one (`label=False` forgotten, `True` retained).
        eval_dataset: `{"forget": ..., "retain": ...}` or a (unpaired) preference dataset.
        processing_class, data_collator, callbacks, optimizers, quantization_config, peft_config: as in `DPOTrainer`.

    Example:
        ```python
        from datasets import Dataset
        from trl_unlearn import SimNPOConfig, SimNPOTrainer

        forget = Dataset.from_dict({"prompt": ["Question: Who wrote X?\\nAnswer:"], "completion": [" Jane Roe."]})
        retain = Dataset.from_dict({"prompt": ["Question: Capital of France?\\nAnswer:"], "completion": [" Paris."]})
        trainer = SimNPOTrainer("path/to/model", args=SimNPOConfig(output_dir="out"), forget_dataset=forget,
                                retain_dataset=retain)
        trainer.train()
        ```
    """

    config_class = UnlearningConfig
    forget_needs_reference = False  # does the forget term compare against π_ref?
    retain_needs_reference = False  # does the retain term always compare against π_ref (RMU), whatever its type?
    ref_model_refusal: str | None = None  # why this method takes no `ref_model` (None: the reference plan decides)
    card_hyperparameters: tuple = ()  # the method's own config fields for its model card
    _tag_names = ["trl", "trl-unlearn", "unlearning"]
    _name = "Unlearning"
    _paper = {}
    evaluation_summary: dict | None = None  # `{metric: value}` recorded in the model card (see `model_card.py`)
    card_data: dict  # `forget_data`, `retain_data`, `datasets`, `eval_dataset`, `prompt_format`: model-card facts

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
        if ref_model is not None and self.ref_model_refusal:
            raise ValueError(self.ref_model_refusal)
        if isinstance(model, str):
            check_model_path(model)
            check_weights(model)
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = self.config_class(output_dir=f"{os.path.basename(str(name).rstrip('/'))}-{self._name}")
        args = copy.copy(args)  # the user's config stays as given
        self._reading = {
            "model": _name_or_path(model),
            "ref_model": _name_or_path(ref_model),
            "processing_class": getattr(processing_class, "name_or_path", None),
        }
        outputs.check_output_dir(args.output_dir, self._reading)
        if args.precompute_ref_log_probs and not self.forget_needs_reference:
            logger.warning(
                f"`precompute_ref_log_probs=True` does nothing for {self._name}: only NPO's forget term "
                "uses reference log-probs. Remove it."
            )
        forget_dataset, retain_dataset = resolve_datasets(
            forget_dataset,
            retain_dataset,
            train_dataset,
            args.retain_weight,
            args.dataset_num_proc,
            processing_class,
        )
        self._check_quantized(model, quantization_config, peft_config)
        uses_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        self.retain_kl = args.retain_weight > 0 and args.retain_loss_type == "kl"
        self.reference_plan = plan_reference(
            forget_needs_reference=self.forget_needs_reference,
            retain_kl=self.retain_kl or (self.retain_needs_reference and args.retain_weight > 0),
            precompute=args.precompute_ref_log_probs,
            has_ref_model=ref_model is not None,
            uses_peft=uses_peft,
            model_is_instance=not isinstance(model, str),
            method=type(self).__name__,
        )
        if self.reference_plan.copy_model:
            # A copy of the model as given: reloading it from `name_or_path` would miss in-memory changes
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        # TRL builds no reference of its own when told the log-probs are precomputed; the precompute itself is
        # `_precompute_ref_logps` below, and runs only for NPO's forget term.
        args.precompute_ref_log_probs = not self.reference_plan.live
        if isinstance(ref_model, torch.nn.Module):
            add_unlearning_forward(ref_model)

        if data_collator is None:
            data_collator = ForgetRetainCollator(
                pad_token_id=0,  # set once the tokenizer is known, below
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None,
            )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=forget_dataset,
            eval_dataset=split_eval(eval_dataset, args.dataset_num_proc, with_retain=args.retain_weight > 0),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # TRL's evaluate() precomputes reference log-probs of new eval sets when this is set: only NPO's forget term
        self.precompute_ref_logps = self.reference_plan.precompute_forget
        if isinstance(self.data_collator, ForgetRetainCollator):
            self.data_collator.pad_token_id = self._tokenizer.pad_token_id
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("The model has no trainable parameter: unfreeze some parameters or pass a `peft_config`.")
        add_unlearning_forward(self.model)
        if self.ref_model is not None:
            add_unlearning_forward(self.accelerator.unwrap_model(self.ref_model))

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
        self._check_vocabulary()
        self.card_data = {
            "forget_data": f"{len(self.train_dataset.forget)} examples",
            "retain_data": f"{len(retain)} examples" if retain is not None else "none",
            "base_model": _name_or_path(model)
            or "an in-memory model (not loaded from a folder or the Hub; its origin is not recorded)",
            "prompt_format": _plain_prompt_format(forget_dataset),
        }
        self._prompted = "prompt" in forget_dataset.column_names
        self.stop_reason: str | None = None  # why the last `train` ended before its last step (None: it did not)
        self._saved_dirs: set[str] = set()

    def _check_vocabulary(self):
        """Every token id of the data (and the padding id) must index a row of the input embedding."""
        import pyarrow.compute as pc

        embedding = self.accelerator.unwrap_model(self.model).get_input_embeddings()
        rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
        ids = [self._tokenizer.pad_token_id or 0]
        for part in (self.train_dataset.forget, self.train_dataset.retain):
            for column in ("prompt_ids", "completion_ids") if part is not None else ():
                ids.append(pc.max(pc.list_flatten(part.data.column(column))).as_py() or 0)
        if max(ids) >= rows:
            raise ValueError(
                f"The tokenizer gives token id {max(ids)} but the model's input embedding has {rows} rows "
                f"(tokenizer size {len(self._tokenizer)}): the tokenizer is not this model's. Pass the model's own "
                "tokenizer, or resize the model first (`model.resize_token_embeddings(len(tokenizer))`)."
            )
        if len(self._tokenizer) > rows:
            logger.warning(
                f"The tokenizer has {len(self._tokenizer)} tokens but the model's input embedding has "
                f"{rows} rows; the data fit, but ids >= {rows} would fail: check it is the model's "
                "tokenizer."
            )

    @property
    def precompute_forget_ref(self) -> bool:
        """NPO's forget reference log-probs were computed once before training (no reference model is held)."""
        return self.reference_plan.precompute_forget

    @staticmethod
    def _check_quantized(model, quantization_config, peft_config):
        quantized = (
            quantization_config is not None
            or getattr(model, "is_loaded_in_4bit", False)
            or getattr(model, "is_loaded_in_8bit", False)
        )
        if quantized and peft_config is None and (isinstance(model, str) or not is_peft_model(model)):
            raise ValueError(
                "The model is quantized, and quantized weights cannot be trained: pass a `peft_config` (e.g. "
                "`peft.LoraConfig(...)`) to train adapters on top of it (QLoRA)."
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, after checking the output folder (`outputs.check_previous_run`; with
        `overwrite_output_dir` the earlier run's checkpoints are deleted first). A SIGTERM during it saves a
        checkpoint at the end of the step and returns (`self.preempted_at` holds the step), so
        `train(resume_from_checkpoint=True)` continues exactly. `self.stop_reason` says why a run ended before its
        last step (None when it did not). A run that took no optimizer step is an error."""
        resume = outputs.resume_flag(resume_from_checkpoint)
        self._check_resume(resume)
        again = os.path.realpath(self.args.output_dir) in self._saved_dirs  # this trainer's own earlier run
        outputs.check_previous_run(self.args.output_dir, self.args.overwrite_output_dir, bool(resume) or again)
        stale = outputs.stale_checkpoints(self.args.output_dir, self.args.overwrite_output_dir, bool(resume))
        if stale and self.is_world_process_zero():
            logger.warning(f"`overwrite_output_dir`: deleting the earlier run's checkpoints {stale}.")
            outputs.remove_folders(stale)
        self.accelerator.wait_for_everyone()
        self._saved_dirs.add(os.path.realpath(self.args.output_dir))  # what this run writes there is its own
        callback = PreemptionCallback(self.accelerator)
        self.add_callback(callback)
        try:
            with callback:
                result = super().train(resume, *args, **kwargs)
        finally:
            self.remove_callback(callback)
            self.preempted_at = callback.stopped_at
        self.stop_reason = self._stop_reason()
        self.card_data["training"] = self._training_summary()
        checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.preempted_at}")
        if self.preempted_at is not None and self.is_world_process_zero() and os.path.isdir(checkpoint):
            write_card(self.model_card_facts(), checkpoint)  # the checkpoint says where and why it stopped
        if self.state.global_step == 0:
            raise ValueError(
                "Training took no optimizer step (the data loader gave no batch, or `max_steps` / "
                "`num_train_epochs` allow none): the model is unchanged and nothing was saved. Check "
                "`max_steps`, `num_train_epochs` and the data."
            )
        return result

    def _check_resume(self, resume):
        """Clear errors for a `resume_from_checkpoint` that names no usable checkpoint, or whose weights are
        corrupt (naming the previous checkpoint to resume from instead)."""
        if not resume:
            return
        out = self.args.output_dir
        if resume is True:
            last = get_last_checkpoint(out) if os.path.isdir(out) else None
            if last is None:
                raise ValueError(
                    f"`resume_from_checkpoint=True` but {out!r} holds no `checkpoint-N` folder: start a "
                    "new run without it, or give a checkpoint's path."
                )
            resume = last
        if not isinstance(resume, str) or not os.path.isdir(resume):
            found = outputs.checkpoints(out)
            raise ValueError(
                f"`resume_from_checkpoint` {resume!r} is not a checkpoint folder; {out!r} holds "
                f"{found or 'no checkpoint'}. Give one of them (or `true` for the last)."
            )
        parent, name = os.path.split(os.path.abspath(resume))
        step = int(name.split("-")[1]) if outputs.CHECKPOINT.fullmatch(name) else None
        earlier = [n for n in outputs.checkpoints(parent) if step is not None and int(n.split("-")[1]) < step]
        hint = (
            f"resume from the previous checkpoint, {os.path.join(parent, earlier[-1])}, instead"
            if earlier
            else "no earlier checkpoint is left: start a new run"
        )
        check_weights(resume, "checkpoint", hint)

    def _stop_reason(self) -> str | None:
        if self.preempted_at is not None:
            return "SIGTERM (preempted or cancelled)"
        if self.state.global_step < self.state.max_steps:
            stoppers = [
                type(cb).__name__
                for cb in self.callback_handler.callbacks
                if getattr(cb, "stopped_at", None) is not None
            ]
            return f"stopped early by {', '.join(stoppers) or 'a callback'} (`control.should_training_stop`)"
        return None

    def _training_summary(self) -> str:
        """The card's line on how training went: steps done of planned, and why it ended early if it did."""
        done, planned = self.state.global_step, self.state.max_steps
        if self.stop_reason is None:
            return f"completed: {done} of {planned} optimizer steps"
        return f"stopped at optimizer step {done} of {planned}: {self.stop_reason}"

    # ----------------------------------------------------------------------------------------------- model card --
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """Write the model card (README.md in `output_dir`): base model, data, method, settings, reference,
        evaluation (`evaluation_summary`), with the Hub metadata. `dataset_name` names the data (Hub id)."""
        if self.is_world_process_zero():
            write_card(self.model_card_facts(dataset_name, tags), self.args.output_dir)

    def model_card_facts(self, dataset_name=None, tags=None) -> UnlearningCard:
        """The facts of this run for its card: the method, the base model, `card_data` (data descriptions, Hub
        datasets, eval dataset, prompt format), the reference plan, `evaluation_summary`, and the config fields in
        `card_hyperparameters` (the method's) and `SHARED_CARD_FIELDS`."""
        info = self.card_data
        names = tuple(self.card_hyperparameters) + SHARED_CARD_FIELDS
        hyper = {k: readable(getattr(self.args, k, None)) for k in names}
        if (hyper.get("max_steps") or 0) > 0:  # `max_steps` overrides the epochs: showing both would mislead
            hyper.pop("num_train_epochs", None)
        evaluation = self.evaluation_summary or {}
        directions = {k: direction(k.split("/")[-1]) for k in evaluation}
        return UnlearningCard(
            method=self._name,
            base_model=info.get("base_model") or "not recorded",
            forget_data=info["forget_data"],
            retain_data=info["retain_data"],
            reference=self.reference_plan.describe(),
            hyperparameters=hyper,
            paper=self._paper,
            tags=list(self._tag_names) + ([tags] if isinstance(tags, str) else list(tags or [])),
            datasets=list(info.get("datasets") or ([dataset_name] if dataset_name else [])),
            evaluation=self.evaluation_summary,
            eval_dataset=info.get("eval_dataset"),
            prompt_format=info.get("prompt_format"),
            directions={k: v for k, v in directions.items() if v},
            eval_reference=info.get("eval_reference"),
            training=info.get("training"),
        )

    def save_model(self, output_dir=None, _internal_call=False):
        """`Trainer.save_model`; a user's save (not a checkpoint) is refused when no optimizer step was taken or
        when `output_dir` holds a model this trainer did not save (unless `overwrite_output_dir`), is written to a
        staging folder and moved into place file by file (`outputs.replace_files`), and records the prompt format
        (`unlearning_prompt.json`, when known) and, in `args.output_dir`, the model card."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        if self.state.global_step == 0:
            raise ValueError(
                f"Nothing to save to {folder!r}: no optimizer step was taken, so the model is the base "
                "model. Call `trainer.train()` first."
            )
        self._check_save_target(folder)
        staging = os.path.join(folder, outputs.STAGING_DIR)
        if self.is_world_process_zero():
            outputs.staging_dir(folder)
        self.accelerator.wait_for_everyone()
        super().save_model(staging, _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            prompt_format = self.card_data.get("prompt_format")
            if prompt_format is not None:
                save_prompt_format(staging, prompt_format)
            elif os.path.isfile(os.path.join(folder, PROMPT_FILE)):
                os.remove(os.path.join(folder, PROMPT_FILE))  # an earlier model's; this one's format is unknown
            outputs.replace_files(staging, folder)
            if prompt_format is None and self._prompted:
                logger.warning(
                    f"No prompt format recorded in {folder}: the forget prompts do not all follow "
                    f"{PROMPT_TEMPLATE!r}. Set `trainer.card_data['prompt_format']` (a string with "
                    "{question}, or 'chat') before saving, or pass `--prompt_format` to `trl-unlearn eval`."
                )
        self.accelerator.wait_for_everyone()
        self._saved_dirs.add(os.path.realpath(folder))
        if output_dir is None or output_dir == self.args.output_dir:
            self.create_model_card()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _check_save_target(self, folder):
        """`outputs.check_output_dir`, and a folder holding a model that this trainer did not save is refused
        unless `overwrite_output_dir` (the training output folder was checked when training started)."""
        outputs.check_output_dir(folder, self._reading)
        ours = os.path.realpath(folder) in self._saved_dirs
        if not ours and not self.args.overwrite_output_dir and outputs.weight_files(folder):
            raise ValueError(
                f"{folder!r} already holds a model ({', '.join(outputs.weight_files(folder))}): save to "
                "another folder, or set `overwrite_output_dir=True` to replace it."
            )

    # ----------------------------------------------------------------------------------------------------- data --
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Called by DPOTrainer.__init__ on the forget set and by DPOTrainer.evaluate
        if isinstance(dataset, ForgetRetainPairs):
            return dataset
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

    def _build_eval_pairs(self, eval_dataset):
        if isinstance(eval_dataset, ForgetRetainPairs):
            return eval_dataset
        if self.precompute_forget_ref and self.ref_model is None and self.state.global_step > 0:
            raise ValueError(
                "This NPO run precomputed its reference log-probs and holds no reference model, so a new eval set "
                "can't be scored against the reference after training started. Pass it as `eval_dataset` when "
                "creating the trainer, or pass a `ref_model`."
            )
        split = split_eval(eval_dataset, self.args.dataset_num_proc, with_retain=self.args.retain_weight > 0)
        split = {k: self._tokenize(v, f"eval {k}") for k, v in split.items()}
        forget = self._precompute_ref_logps(split["forget"], "forget", self.args.per_device_eval_batch_size)
        return ForgetRetainPairs(forget, split.get("retain"))

    def _set_signature_columns_if_needed(self):
        set_signature_columns(self, ["forget", "retain"])

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
        return ForgetRetainSampler(
            len(dataset.forget), num_retain, seed=self.args.seed, lengths=lengths, group_size=group
        )

    # ------------------------------------------------------------------------------------------------ reference --
    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Add a `ref_logps` column (summed reference log-probs of each forget row), computed once."""
        if (
            not self.precompute_forget_ref
            or isinstance(dataset, ForgetRetainPairs)
            or name == "retain"
            or "ref_logps" in dataset.column_names
        ):
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
        model = self.model
        if self.ref_model is None and self.is_deepspeed_enabled:  # parameters still on CPU / sharded: an engine
            from .._trl_compat import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        add_unlearning_forward(self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else model))
        values = []
        for batch in loader:
            logps = self._reference_token_logps(model, batch).sum(-1)
            values.append(self.accelerator.gather_for_metrics(logps).cpu())
        return dataset.add_column("ref_logps", torch.cat(values).tolist())

    def _reference_token_logps(self, model, batch, rows=None, return_hidden=False):
        """The reference's forward on `batch` (its `rows` only): `[B, T-1]` label log-probs (or the full output)."""
        ref = self.ref_model if self.ref_model is not None else model
        unwrapped = self.accelerator.unwrap_model(model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            out = reference_forward(ref, batch, scored_labels(batch, rows), return_hidden=return_hidden)
        return out if return_hidden else out.token_logps

    def _retain_kl_teacher(self, model, inputs):
        ref = self.ref_model if self.ref_model is not None else model
        unwrapped = self.accelerator.unwrap_model(model)
        with reference_context(self.model, unwrapped, self.ref_model, self.args.gradient_checkpointing_kwargs):
            return kl_teacher(ref, self.accelerator.unwrap_model(ref), inputs, ~inputs["forget_mask"])

    # ----------------------------------------------------------------------------------------------------- loss --
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the step's micro-batches and count samples/tokens over all of them and all ranks; the counts
        travel to `compute_loss` as `num_items_in_batch`."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        counts = sum(batch_counts(b).to(device) for b in batches)
        return batches, self.accelerator.reduce(counts, reduction="sum")

    # The loss is normalised over the whole step (see module docstring): no further division by the GA steps
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`unlearning_loss` with the step's counts (this batch's in evaluation), logged through `LossStats`."""
        if num_items_in_batch is None:  # evaluation: normalise over this batch only
            counts, scale = batch_counts(inputs).to(inputs["input_ids"].device), 1.0
        else:  # DDP / DeepSpeed average gradients over ranks: undo it, the counts already span all ranks
            counts, scale = num_items_in_batch, float(self.accelerator.num_processes)
        loss, stats = self.unlearning_loss(model, inputs, StepCounts(*counts.unbind()), scale)
        self._log_step(stats, loss)
        return (loss, None) if return_outputs else loss

    def _log_step(self, stats: LossStats, loss):
        """Log the micro-batch's `LossStats`, gathered over ranks in ONE collective (one host sync per micro-batch),
        and stop on a non-finite loss before it is applied."""
        mode = "train" if self.model.training else "eval"
        values = torch.cat([stats.flat().to(loss.device), torch.isfinite(loss.detach()).float().reshape(1)])
        rows = self.accelerator.gather(values[None]).cpu()
        for name, value in stats.reduce(rows[:, :-1]).items():
            self._metrics[mode][name].append(value)
        if mode == "train" and not rows[:, -1].all():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"Non-finite unlearning loss at step {self.state.global_step + 1}; stopped before applying it. "
                f"Last good checkpoint: {last or 'none saved yet'}. Lower the learning rate or `beta`, or check "
                "the data; resume with `trainer.train(resume_from_checkpoint=...)`."
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._build_eval_pairs(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = prepare_inputs(self, inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
