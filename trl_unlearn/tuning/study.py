"""The Optuna study behind `trl-unlearn tune`: every method tuned the same way.

    result = tune("simnpo", "path/to/finetuned", "path/to/tofu", forget_split="forget10",
                  retain_report="retain_forget10.json", n_trials=20, output_dir="tune_simnpo")

One trial = one point of the method's search space (`spaces`), trained from the model once per tuning seed
through the method's trainer and scored WITHOUT generation (TOFU: probability and truth ratio of the four sets;
forget quality against the retain model's forget truth ratios; model utility from the 6 numbers that need no
ROUGE), or by a user `score_fn(model, tokenizer) -> dict`. Two objectives, both maximised: `rule.score` and
`rule.utility`; Optuna keeps the Pareto front. The declared rule (`selection`) picks one trial; that setting is
then trained on the report seeds (never used in selection) and scored again, with the full TOFU evaluation
(generation, ROUGE) when asked; the gap between the tuning-seed and report-seed scores is part of the result.

Storage: an Optuna RDB URL (`sqlite:///path.db`, the default `<output_dir>/study.db`; `postgresql://...`) or
`journal:PATH` (a journal file). `n_trials` is the study's total of finished trials: a study that stopped at 4
runs 2 more for `n_trials=6`; several processes sharing one storage stop together at `n_trials` (each may finish
the trial it is running). RDB storages run a heartbeat, so a trial left running by a killed process is marked
failed when the study resumes. No pruner: Optuna does not prune multi-objective studies.

Outputs in `output_dir`: `tuning.json` (every trial, the rule, the selected trial, the seeds, the report),
`pareto.png` (needs matplotlib) and `best.yaml` (a recipe that `trl-unlearn METHOD --config best.yaml` runs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import selection, spaces

__all__ = ["make_storage", "tune"]

logger = logging.getLogger(__name__)

RUN_OVERRIDES = {"save_strategy": "no", "report_to": [], "disable_tqdm": True, "push_to_hub": False}
SHOWN = (
    "forget_quality",
    "ks_d",
    "model_utility",
    "forget_rougeL_recall",
    "retain_rougeL_recall",
    "forget_probability",
)


# --------------------------------------------------------------------------------------------------- storage --


def make_storage(url: str):
    """An Optuna storage from `url`: an RDB URL (with a heartbeat, so stale trials of a killed run are failed on
    resume), `journal:PATH`, or `memory` (none: the study ends with the process). An unreachable storage is a
    one-line error naming the fix."""
    import optuna

    if url == "memory":
        return None  # in memory: the study ends with the process
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal:") :].removeprefix("//")
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4-5, and stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as e:  # SQLAlchemy / driver / OS errors, each in its own class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot open the Optuna storage {url!r} ({type(e).__name__}: {first}): give a reachable "
            "RDB URL (sqlite:///PATH.db in an existing folder, postgresql://...) or journal:PATH."
        ) from None


# --------------------------------------------------------------------------------------------------- scoring --


def ks(ratios, reference) -> tuple[float, float]:
    """`(D, p)` of the two-sample KS test between forget truth ratios (p = forget quality)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(ratios, dtype=float), np.asarray(reference, dtype=float))
    return float(res.statistic), float(res.pvalue)


def tofu_scores(cols: Mapping[str, Mapping[str, list]], retain_ratios: Sequence[float] | None) -> dict:
    """TOFU numbers without generation from `score_tofu_sets` columns: per set probability and truth ratio;
    `model_utility_no_rouge` (hmean of the 6 numbers that need no ROUGE; TOFU's model utility adds ROUGE-L);
    `forget_nll` (mean per-token NLL of the forget answers); with the retain model's ratios `forget_quality`, `ks_d`.
    Sets missing from `cols` are skipped (utility needs retain, real_authors and world_facts)."""
    import trl_unlearn.evaluation.metrics as M
    from trl_unlearn.evaluation.tofu import truth_ratios

    out = {}
    for s, c in cols.items():
        paraphrased = s in ("forget", "retain")
        prob = (
            M.probability(c["avg_nll_answer"])
            if paraphrased
            else M.normalized_probability(c["avg_nll_answer"], c["avg_nll_perturbed"])
        )
        ratios = truth_ratios(c, s)
        out[f"{s}_probability"] = float(np.mean(prob))
        out[f"{s}_truth_ratio"] = M.truth_ratio_forget_score(ratios) if s == "forget" else M.truth_ratio_score(ratios)
        if s == "forget":
            out["forget_nll"] = float(np.mean(c["avg_nll_answer"]))
            if retain_ratios is not None:
                out["ks_d"], out["forget_quality"] = ks(ratios, retain_ratios)
    if {"retain", "real_authors", "world_facts"} <= set(cols):
        out["model_utility_no_rouge"] = M.model_utility(
            [out[f"{s}_{m}"] for s in ("retain", "real_authors", "world_facts") for m in ("probability", "truth_ratio")]
        )
    return out


class TofuScorer:
    """Scores a model on a TOFU-layout folder without generation, against a retain report's forget truth ratios
    (`EvalReport` of the retain model on the same split and prompt format)."""

    def __init__(self, data_dir, split, tokenizer, prompt_format, retain_report=None, batch_size=32):
        from trl_unlearn.data.formats import resolve_prompt_format
        from trl_unlearn.evaluation.tofu import load_tofu_eval_sets, truth_ratios

        self.sets = load_tofu_eval_sets(data_dir, split)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.format = resolve_prompt_format(tokenizer, prompt_format)
        self.retain_report, self.retain_ratios, self.max_length = retain_report, None, 512
        self.retain_forget_nll = None
        if retain_report is not None:
            s = retain_report.settings
            n = len(self.sets["forget"][0])
            problems = [
                f"{k} {s.get(k)!r} there vs {v!r} here"
                for k, v in (("split", split), ("prompt_format", self.format.name))
                if s.get(k) != v
            ]
            self.retain_ratios = truth_ratios(retain_report.per_item["forget"], "forget").tolist()
            self.retain_forget_nll = float(np.mean(retain_report.per_item["forget"]["avg_nll_answer"]))
            if len(self.retain_ratios) != n:
                problems.append(f"{len(self.retain_ratios)} forget items there vs {n} here")
            if problems:
                raise ValueError(
                    f"the retain report was made with other settings ({'; '.join(problems)}): evaluate "
                    "the retain model with `trl-unlearn eval tofu` on this split and prompt format."
                )
            self.max_length = s.get("max_length", 512)

    def __call__(self, model, tokenizer=None) -> dict:
        from trl_unlearn.evaluation.tofu import score_tofu_sets

        model.eval()
        cols = score_tofu_sets(
            model,
            tokenizer or self.tokenizer,
            self.sets,
            prompt_format=self.format,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=False,
        )
        return tofu_scores(cols, self.retain_ratios)

    def full(self, model, data_dir, split) -> dict:
        """The full TOFU evaluation (generation, ROUGE; the retain report's settings) of a reported point."""
        from trl_unlearn.evaluation.tofu import evaluate_tofu

        s = self.retain_report.settings
        report = evaluate_tofu(
            model,
            self.tokenizer,
            data_dir,
            split,
            retain_report=self.retain_report,
            prompt_format=self.format,
            batch_size=self.batch_size,
            max_length=self.max_length,
            max_new_tokens=s.get("max_new_tokens", 200),
            progress=False,
        )
        out = {k: v for k, v in report.metrics.items() if v is not None}
        out["ks_d"] = ks(report.per_item["forget"]["truth_ratio"], self.retain_ratios)[0]
        out["model_utility_no_rouge"] = tofu_scores(
            {s: report.per_item[s] for s in ("retain", "real_authors", "world_facts")}, None
        )["model_utility_no_rouge"]
        return out


# -------------------------------------------------------------------------------------------------- training --


TOFU_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def tofu_datasets(data_dir: str, forget_split: str, retain_split: str | None = None, prompt_template=None):
    """Forget and retain QA splits of a TOFU-layout folder as prompt-completion datasets (`qa_to_trl`, default
    template `PROMPT_TEMPLATE`); the retain split defaults to the forget split's complement."""
    from datasets import Dataset

    from trl_unlearn.data.files import load_tofu_split
    from trl_unlearn.data.formats import PROMPT_TEMPLATE, qa_to_trl

    if retain_split is None:
        if forget_split not in TOFU_RETAIN:
            raise ValueError(f"give the retain split: {forget_split!r} is not a TOFU forget split (e.g. forget10).")
        retain_split = TOFU_RETAIN[forget_split]
    template = prompt_template or PROMPT_TEMPLATE
    return tuple(
        qa_to_trl(Dataset.from_list(load_tofu_split(data_dir, s)), template) for s in (forget_split, retain_split)
    )


def unwrapped(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


class Runner:
    """Trains `method` from the model at `model_path` on fixed forget / retain datasets, from `config_values`
    (fields of the method's config) plus a trial's values and seed."""

    def __init__(
        self,
        method,
        model_path,
        forget,
        retain,
        tokenizer,
        config_values: Mapping,
        output_dir,
        peft_config=None,
        quantization_config=None,
    ):
        import torch

        from trl_unlearn.methods import get_method

        self.method, self.model_path, self.tokenizer = method, model_path, tokenizer
        self.forget, self.retain, self.peft, self.quantization = forget, retain, peft_config, quantization_config
        self.trainer_cls, self.config_cls = get_method(method)
        fields = {f.name for f in dataclasses.fields(self.config_cls) if f.init}
        unknown = sorted(set(config_values) - fields)
        if unknown:
            raise ValueError(
                f"recipe keys {unknown} are not fields of {self.config_cls.__name__}: remove them "
                f"(the fields are listed by `trl-unlearn {method} --help`)."
            )
        self.base_values = {**config_values, **RUN_OVERRIDES, "output_dir": os.path.join(output_dir, "runs")}
        if not torch.cuda.is_available():
            self.base_values.update(use_cpu=True, bf16=False)
        self.default_lr = config_values.get("learning_rate", self.config_cls.learning_rate)
        self.dtype = (config_values.get("model_init_kwargs") or {}).get("dtype") or "auto"
        self.config({}, 0)  # a bad recipe value fails here, before any training

    def config(self, values: Mapping, seed: int):
        return self.config_cls(**{**self.base_values, **values, "seed": seed})

    def train(self, values: Mapping, seed: int):
        """The trainer, trained in memory, for config `values` and `seed` (`unwrapped(trainer)`: its model)."""
        from transformers import PrinterCallback

        trainer = self.trainer_cls(
            model=self.model_path,
            args=self.config(values, seed),
            forget_dataset=self.forget,
            retain_dataset=self.retain,
            processing_class=self.tokenizer,
            peft_config=self.peft,
            quantization_config=self.quantization,
        )
        trainer.remove_callback(PrinterCallback)  # no raw log dicts between the progress lines
        trainer.train()
        return trainer

    def original(self):
        from trl_unlearn.loading import load_model

        return load_model(self.model_path, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------- output --


def mean_sd(rows: Sequence[Mapping]) -> dict:
    """name -> {mean, sd} over rows (sd with ddof 1; None with one row) for the numbers every row has."""
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return {
        k: {
            "mean": float(np.mean([r[k] for r in rows])),
            "sd": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else None,
        }
        for k in keys
    }


def fmt_ms(d: Mapping | None) -> str:
    if not d:
        return "n/a"
    return f"{d['mean']:.3g}" + (f" ± {d['sd']:.2g}" if d.get("sd") is not None else "")


def plot_pareto(rows, front, selected, rule, threshold, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    floor = 1e-12
    ax.scatter(
        [r[rule.utility] for r in rows],
        [max(r[rule.score], floor) for r in rows],
        s=18,
        color="gray",
        alpha=0.6,
        label="trials",
    )
    fx = sorted(front, key=lambda r: r[rule.utility])
    ax.plot(
        [r[rule.utility] for r in fx],
        [max(r[rule.score], floor) for r in fx],
        "o-",
        color="C0",
        ms=5,
        label="Pareto front",
    )
    if selected is not None:
        ax.scatter(
            [selected[rule.utility]],
            [max(selected[rule.score], floor)],
            s=120,
            marker="*",
            color="C3",
            zorder=5,
            label=f"selected (trial {selected['number']})",
        )
    ax.axvline(threshold, color="gray", linestyle=":", label="utility floor")
    if all(r[rule.score] > 0 for r in rows) and rule.score == "forget_quality":
        ax.set_yscale("log")
    ax.set_xlabel(f"{rule.utility} (higher is better)")
    ax.set_ylabel(f"{rule.score} (higher is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_yaml(obj: Mapping, path: str, header: str = "") -> None:
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(dict(obj), f, sort_keys=False)
    os.replace(tmp, path)


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if hasattr(v, "value") and not isinstance(v, (int, float, str)):  # enums (lr_scheduler_type)
        return v.value
    return v


# ------------------------------------------------------------------------------------------------------ tune --


def _trial_rows(study, rule) -> list[dict]:
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        scores = t.user_attrs.get("scores", {})
        rows.append(
            {
                "number": t.number,
                "params": dict(t.params),
                **scores,
                rule.score: t.values[0],
                rule.utility: t.values[1],
                "per_seed": t.user_attrs.get("per_seed", []),
                "seconds": t.user_attrs.get("seconds"),
            }
        )
    return rows


def _check_seeds(tuning_seeds, report_seeds):
    if not tuning_seeds:
        raise ValueError("`tuning_seeds` is empty: give at least one seed to select on (e.g. --tuning_seeds 0).")
    shared = sorted(set(tuning_seeds) & set(report_seeds))
    if shared:
        raise ValueError(
            f"seed(s) {shared} are both tuning and report seeds: report seeds must be fresh "
            "(e.g. --tuning_seeds 0 --report_seeds 1,2,3)."
        )


def _tune(
    method: str,
    model_name_or_path: str,
    data_dir: str | None = None,
    *,
    output_dir: str,
    forget_split: str = "forget10",
    retain_split: str | None = None,
    retain_report=None,
    recipe: Mapping | None = None,
    search_space: Mapping | None = None,
    forget_dataset=None,
    retain_dataset=None,
    prompt_format: str | None = None,
    peft_config=None,
    quantization_config=None,
    recipe_data: Mapping | None = None,
    n_trials: int = 20,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    tuning_seeds: Sequence[int] = (0,),
    report_seeds: Sequence[int] = (1, 2, 3),
    rule: selection.SelectionRule | None = None,
    base_learning_rate: float | None = None,
    sampler_seed: int = 0,
    score_fn: Callable | None = None,
    report_generation: bool = True,
    eval_batch_size: int = 32,
    save_model_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Tune `method` on the model at `model_name_or_path` (see the module docstring); returns what `tuning.json`
    holds.

    Data: `forget_dataset` / `retain_dataset` (any TRL format the trainers take), by default the QA splits of the
    TOFU-layout folder `data_dir` (`forget_split`, `retain_split`: its complement) with `prompt_format` (default
    `PROMPT_TEMPLATE`; "chat" for conversational rows). `recipe`: fields of the method's config every trial starts
    from (a `search_space:` key in it overrides the default space, as `search_space` does); `recipe_data`: data
    keys written into `best.yaml` beside them (default: `dataset_name`, `forget_split`, `retain_split`).
    Scoring: the TOFU evaluation sets of `data_dir` against `retain_report` (an `EvalReport` or its path: the
    retain model on the same split), or `score_fn(model, tokenizer) -> dict`, which must return `rule.score` and
    `rule.utility` (and `forget_nll` when SimNPO's default β range is used; `target_forget_nll`, the retain model's,
    optionally). `save_model_dir`: where the model of the first report seed is saved, with its scores in the model
    card (default: no model is saved)."""
    import optuna

    from trl_unlearn.evaluation.report import EvalReport, save_json
    from trl_unlearn.methods import REGISTRY

    rule = rule or selection.SelectionRule()
    if method not in REGISTRY:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(REGISTRY)}.")
    if n_trials < 1:
        raise ValueError(f"`n_trials={n_trials}` must be >= 1 (the total of finished trials the study should hold).")
    tuning_seeds, report_seeds = [int(s) for s in tuning_seeds], [int(s) for s in report_seeds]
    _check_seeds(tuning_seeds, report_seeds)
    recipe = dict(recipe or {})
    if "search_space" in recipe:
        if search_space is not None:
            raise ValueError("search space given twice (recipe `search_space:` and `search_space=`): keep one.")
        search_space = recipe.pop("search_space")
    if score_fn is None and retain_report is None:
        raise ValueError(
            "forget quality needs the retain model's forget truth ratios: give --retain_report R.json "
            "(`trl-unlearn eval tofu --model RETAIN ... --output R.json`)."
        )
    os.makedirs(output_dir, exist_ok=True)
    storage_url = storage or f"sqlite:///{os.path.abspath(os.path.join(output_dir, 'study.db'))}"
    study_storage = make_storage(storage_url)
    if isinstance(retain_report, (str, os.PathLike)):
        retain_report = EvalReport.load(retain_report)

    from trl_unlearn.data.formats import PROMPT_TEMPLATE
    from trl_unlearn.loading import load_tokenizer

    prompt_format = prompt_format or PROMPT_TEMPLATE
    if forget_dataset is None:
        if data_dir is None:
            raise ValueError("no data: give data_dir (a TOFU-layout folder) or forget_dataset / retain_dataset.")
        forget_dataset, retain_dataset = tofu_datasets(
            data_dir, forget_split, retain_split, None if prompt_format == "chat" else prompt_format
        )
    tokenizer = load_tokenizer(model_name_or_path)
    runner = Runner(
        method,
        model_name_or_path,
        forget_dataset,
        retain_dataset,
        tokenizer,
        recipe,
        output_dir,
        peft_config,
        quantization_config,
    )
    scorer = None
    if score_fn is None:
        if data_dir is None:
            raise ValueError("TOFU scoring needs data_dir (its evaluation sets); or pass score_fn.")
        scorer = TofuScorer(data_dir, forget_split, tokenizer, prompt_format, retain_report, eval_batch_size)
        score_fn = scorer
    base_lr = base_learning_rate if base_learning_rate is not None else runner.default_lr

    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    say(f"Scoring the original model {model_name_or_path} (no generation) ...")
    original = score_fn(runner.original(), tokenizer)
    for key in (rule.score, rule.utility):
        if key not in original:
            raise ValueError(f"the scores have no {key!r} (got {sorted(original)}): return it from score_fn.")
    forget_nll = original.get("forget_nll")
    num_layers = None
    if method == "rmu":
        from transformers import AutoConfig

        num_layers = AutoConfig.from_pretrained(model_name_or_path).num_hidden_layers
    target_nll = scorer.retain_forget_nll if scorer is not None else original.get("target_forget_nll")
    space = spaces.resolve_space(method, search_space, forget_nll, num_layers, target_nll)
    space_json = spaces.space_to_dict(space)

    name = study_name or f"{method}-{forget_split}"
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=study_storage,
        directions=["maximize", "maximize"],
        sampler=sampler,
        load_if_exists=True,
    )
    if study.trials:  # resuming: a sampler restarted with the same seed would draw the first points again
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials))
    attrs = study.user_attrs
    mine = {
        "method": method,
        "space": space_json,
        "tuning_seeds": tuning_seeds,
        "rule": rule.__dict__,
        "base_learning_rate": base_lr,
    }
    if "space" in attrs:
        changed = [k for k, v in mine.items() if not _same(attrs.get(k), v)]
        if changed:
            raise ValueError(
                f"study {name!r} in {storage_url} was made with other {', '.join(changed)}: resume with "
                "the same settings, or start another study (--study_name NAME)."
            )
        reference_utility = attrs["reference_utility"]
        space = spaces.space_from_dict(attrs["space"])  # draw exactly the stored ranges
    else:
        reference_utility = original[rule.utility]
        for k, v in {**mine, "reference_utility": reference_utility, "original": _plain_dict(original)}.items():
            study.set_user_attr(k, v)
    threshold = rule.utility_floor * reference_utility
    if method == "simnpo" and forget_nll is not None:
        w = spaces.check_simnpo_weight(space, forget_nll)
        target = f", of the retain model (the target): {target_nll:.3f}" if target_nll else ""
        say(
            f"forget NLL̄ of the original model: {forget_nll:.3f} nats/token{target}; SimNPO weight 2σ(−β·NLL̄−γ) at "
            f"the largest β, γ of the space and the original NLL̄: {w:.3f}"
        )
    say(
        f"Search space of {method}: "
        + ", ".join(f"{k} {_describe(p)}" for k, p in space.items())
        + (f" (lr_mult x {base_lr:g})" if "lr_mult" in space else "")
    )
    say(
        f"Rule: highest {rule.score} with {rule.utility} >= {rule.utility_floor} x {reference_utility:.4g} = "
        f"{threshold:.4g}; tuning seeds {tuning_seeds}, report seeds {report_seeds}"
    )

    def objective(trial):
        t0 = time.time()
        params = spaces.suggest(trial, space)
        values = spaces.to_config_values(params, base_lr)
        per_seed = []
        for seed in tuning_seeds:
            per_seed.append({"seed": seed, **_plain_dict(score_fn(unwrapped(runner.train(values, seed)), tokenizer))})
        scores = {k: v["mean"] for k, v in mean_sd(per_seed).items() if k != "seed"}
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("per_seed", per_seed)
        trial.set_user_attr("seconds", time.time() - t0)
        return scores[rule.score], scores[rule.utility]

    done = _count_complete(study)
    remaining = n_trials - done
    t_study = time.time()
    if remaining > 0:
        say(f"Study {name!r} ({storage_url}): {done} finished trial(s), running up to {remaining} more")
        bar = _Progress(n_trials, done, rule, threshold, enabled=progress)
        try:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=timeout,
                gc_after_trial=True,
                callbacks=[optuna.study.MaxTrialsCallback(n_trials), bar],
            )
        finally:
            bar.close()
    else:
        say(f"Study {name!r} already holds {done} finished trial(s) (>= --n_trials {n_trials}): nothing to run")
    study_seconds = time.time() - t_study

    rows = _trial_rows(study, rule)
    front = selection.pareto_front(rows, rule)
    chosen = selection.select(rows, rule, reference_utility)
    best_values = spaces.to_config_values(chosen["params"], base_lr)
    say(
        f"Selected trial {chosen['number']}: {_params_text(chosen['params'])}: {rule.score} "
        f"{chosen[rule.score]:.3g}, {rule.utility} {chosen[rule.utility]:.3f} (tuning seeds)"
    )

    report_rows, full_rows = [], []
    for seed in report_seeds:
        say(f"Report seed {seed}: training the selected setting ...")
        trainer = runner.train(best_values, seed)
        model = unwrapped(trainer)
        report_rows.append({"seed": seed, **_plain_dict(score_fn(model, tokenizer))})
        if report_generation and scorer is not None:
            full_rows.append({"seed": seed, **_plain_dict(scorer.full(model, data_dir, forget_split))})
        if save_model_dir and seed == report_seeds[0]:
            summary = full_rows[-1] if full_rows else report_rows[-1]
            trainer.evaluation_summary = {k: summary[k] for k in SHOWN + ("model_utility_no_rouge",) if k in summary}
            _save_with_card(trainer, save_model_dir, data_dir, forget_split, retain_split, prompt_format)
            say(f"Saved the report-seed-{seed} model to {save_model_dir} (its model card holds the scores above)")
    report = {}
    if report_rows:
        ms = mean_sd(report_rows)
        ms.pop("seed", None)
        report = {
            "no_generation": {"per_seed": report_rows, **ms},
            "gap_in_minus_out": {k: chosen[k] - ms[k]["mean"] for k in (rule.score, rule.utility) if k in ms},
        }
        if full_rows:
            full = mean_sd(full_rows)
            full.pop("seed", None)
            report["full"] = {"per_seed": full_rows, **full}
        say(
            f"Report seeds {report_seeds} (never used in selection): {rule.score} {fmt_ms(ms.get(rule.score))}, "
            f"{rule.utility} {fmt_ms(ms.get(rule.utility))}; in-sample minus out-of-sample: "
            + ", ".join(f"{k} {v:+.3g}" for k, v in report["gap_in_minus_out"].items())
        )
        if full_rows:
            say(
                "Full TOFU evaluation on the report seeds: "
                + ", ".join(
                    f"{k} {fmt_ms(report['full'].get(k))}"
                    for k in (
                        "forget_quality",
                        "ks_d",
                        "model_utility",
                        "model_utility_no_rouge",
                        "forget_rougeL_recall",
                    )
                    if k in report["full"]
                )
            )

    if recipe_data is None:
        recipe_data = {"dataset_name": data_dir, "forget_split": forget_split}
        if retain_split is not None:
            recipe_data["retain_split"] = retain_split
        if prompt_format == "chat":
            recipe_data["conversational"] = True
        elif prompt_format != PROMPT_TEMPLATE:
            recipe_data["prompt_template"] = prompt_format
    best_recipe = {k: _plain(v) for k, v in {**recipe_data, **recipe, **best_values}.items() if v is not None}
    best_recipe["seed"] = tuning_seeds[0]
    result = {
        "method": method,
        "model": model_name_or_path,
        "data_dir": data_dir,
        "forget_split": forget_split,
        "study": {
            "name": name,
            "storage": storage_url,
            "n_trials": n_trials,
            "finished_trials": len(rows),
            "seconds_this_run": study_seconds,
            "sampler": f"TPESampler(seed={sampler_seed} + trials already in the study at each start)",
            "pruner": None,
        },
        "search_space": space_json,
        "base_learning_rate": base_lr,
        "original": study.user_attrs.get("original"),
        "rule": selection.describe_rule(rule, reference_utility),
        "tuning_seeds": tuning_seeds,
        "report_seeds": report_seeds,
        "trials": rows,
        "pareto_front": [r["number"] for r in front],
        "selected": {
            "trial": chosen["number"],
            "params": chosen["params"],
            "config": best_values,
            rule.score: chosen[rule.score],
            rule.utility: chosen[rule.utility],
        },
        "report": report,
    }
    save_json(result, os.path.join(output_dir, "tuning.json"))
    header = (
        f"# trl-unlearn tune {method}: trial {chosen['number']} of study {name!r}, selected by: "
        f"{result['rule']['text']}.\n# Run: trl-unlearn {method} --config best.yaml --model_name_or_path "
        f"{model_name_or_path} --output_dir OUT\n"
    )
    write_yaml(best_recipe, os.path.join(output_dir, "best.yaml"), header)
    try:
        plot_pareto(
            rows,
            front,
            chosen,
            rule,
            threshold,
            os.path.join(output_dir, "pareto.png"),
            f"{method}: {len(rows)} trials, tuning seeds {tuning_seeds}",
        )
    except ImportError:
        logger.warning("matplotlib is not installed: no pareto.png (pip install 'trl-unlearn[plot]').")
    runs = os.path.join(output_dir, "runs")  # the trainers' output_dir; they save nothing there
    if os.path.isdir(runs) and not os.listdir(runs):
        os.rmdir(runs)
    say(f"Wrote {os.path.join(output_dir, 'tuning.json')}, pareto.png and best.yaml")
    return result


def _save_with_card(trainer, folder, data_dir, forget_split, retain_split, prompt_format):
    """Save a reported model with its model card (the trainer writes cards only into its own `output_dir`)."""
    from trl_unlearn.model_card import write_card

    trainer.save_model(folder)
    rows = trainer.train_dataset
    where = f"{data_dir} " if data_dir else ""
    retain_name = retain_split or TOFU_RETAIN.get(forget_split, "retain")
    trainer.card_data.update(
        forget_data=f"{where}({forget_split}), {len(rows.forget)} examples",
        retain_data=f"{where}({retain_name}), {len(rows.retain)} examples" if rows.retain is not None else "none",
        prompt_format=prompt_format,
    )
    if trainer.is_world_process_zero():
        write_card(trainer.model_card_facts(), folder)


@functools.wraps(_tune)
def tune(*args, **kwargs):
    quiet = _QuietLibraries()  # the per-trial load / tokenize bars of datasets and transformers would bury the lines
    try:
        return _tune(*args, **kwargs)
    finally:
        quiet.restore()


def _same(a, b) -> bool:
    """Equal as JSON values, floats to a relative 1e-3 (a β range computed from an NLL measured on another machine
    differs in the last digits)."""
    a, b = json.loads(json.dumps(a, default=str)), json.loads(json.dumps(b, default=str))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-3)
    return a == b


def _plain_dict(d: Mapping) -> dict:
    return {k: _plain(v) for k, v in d.items() if not isinstance(v, (list, tuple, dict))}


def _count_complete(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _describe(p: spaces.Param) -> str:
    if p.kind == "categorical":
        return f"in {list(p.choices)}"
    return f"{'int ' if p.kind == 'int' else ''}[{p.low:g}, {p.high:g}]{' log' if p.log else ''}"


def _params_text(params: Mapping) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


class _QuietLibraries:
    """Hides the progress bars of `datasets` and `transformers` until `restore()`."""

    def __init__(self):
        import datasets
        from transformers.utils import logging as hf_logging

        self.datasets_on = datasets.is_progress_bar_enabled()
        self.hf_on = hf_logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()

    def restore(self):
        import datasets
        from transformers.utils import logging as hf_logging

        if self.datasets_on:
            datasets.enable_progress_bars()
        if self.hf_on:
            hf_logging.enable_progress_bar()


class _Progress:
    """A tqdm bar over the study's finished trials, with the best trial so far under the rule in its postfix, and
    one line per finished trial."""

    def __init__(self, total, done, rule, threshold, enabled=True):
        self.rule, self.threshold, self.enabled = rule, threshold, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():  # a bar redrawn in a log file is noise: lines only there
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, desc="trials", unit="trial", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, study, trial):
        import optuna

        if not self.enabled:
            return
        if trial.state == optuna.trial.TrialState.COMPLETE:
            s, u = trial.values
            line = (
                f"  trial {trial.number}: {_params_text(trial.params)}: {self.rule.score} {s:.3g}, "
                f"{self.rule.utility} {u:.3f} ({trial.user_attrs.get('seconds', math.nan):.0f} s)"
            )
        else:
            line = f"  trial {trial.number}: {trial.state.name.lower()}"
        best = None
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.values[1] >= self.threshold and (best is None or (t.values[0], t.values[1]) > tuple(best.values)):
                best = t
        text = (
            f"best: trial {best.number}, {self.rule.score} {best.values[0]:.3g}"
            if best is not None
            else "best: none above the floor yet"
        )
        if self.bar is not None:
            self.bar.write(line)
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(f"{line} | {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
