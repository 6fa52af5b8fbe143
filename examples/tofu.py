"""Unlearn TOFU's forget split and evaluate with the TOFU metrics.

With no arguments it runs a complete small study offline (no Hub, no GPU, about three minutes on 2 idle CPU cores):
it builds a synthetic fictitious-author set in TOFU's layout, trains a tiny Llama from scratch on all of it
("Original"), on the retain part only ("Retrain", the target) and on the retain part again with another seed (the
ceiling: how close two Retrains get), then runs a small built-in `trl-unlearn tune` for NPO and SimNPO with equal
budgets: the same number of trials per method (each trained at the tuning seed and scored without generation), the
same rule (the best forget quality at model utility >= 0.95 x Original's) and the same report seeds, disjoint from
the tuning seed, on which the chosen settings are re-run and evaluated with the full TOFU metrics. It prints a table
with a legend and saves the models, the reports, results.json / results.md / results.png and each method's
tuning.json, pareto.png and best.yaml.

    python examples/tofu.py
    accelerate launch examples/tofu.py --config examples/recipes/tofu_forget10_simnpo.yaml
    python examples/tofu.py --model_name_or_path MODEL --dataset_name /path/to/tofu --forget_split forget05 \
        --methods simnpo --retain_report retain_forget05.json --output_dir out

With `--model_name_or_path` / `--dataset_name` it runs each method once, at the given settings, on a real model and
real TOFU files (a local folder of TOFU's JSON-lines files, or `locuslab/TOFU` from the Hub). Method hyperparameters
are `SimNPOConfig` fields (`--beta`, `--gamma`, `--forget_weight`, ...); NPO's β is `--npo_beta`. `--methods` takes
any of `trl-unlearn`'s method names (`trl_unlearn.methods.REGISTRY`: also gradascent, graddiff, rmu, wga, satimp,
idknll, idkdpo); their own hyperparameters (WGA's and IdkDPO's β, SatImp's β1 / β2, the IdK answers) keep their config
defaults here, and the shared ones (`--forget_weight`, `--retain_weight`, ...) come from the command line or recipe.
To tune a real model, use `trl-unlearn tune` (docs/tune.md).
"""

import json
import math
import os
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from accelerate import PartialState
from scipy.stats import ks_2samp
from study import method_config
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

import trl_unlearn.evaluation.metrics as M
from trl_unlearn import SimNPOConfig
from trl_unlearn.cli.train import METHODS, StudyArguments, UnlearnScriptArguments, load_qa_split
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.data.formats import qa_to_trl
from trl_unlearn.evaluation import evaluate_tofu
from trl_unlearn.loading import load_tokenizer
from trl_unlearn.toy.synthetic import iter_texts, make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer
from trl_unlearn.tuning import SelectionRule, tune

SHOWN = [  # (report metric, table column)
    ("forget_quality", "forget quality ↑"),
    ("ks_d", "KS D ↓"),
    ("model_utility", "model utility ↑"),
    ("forget_rougeL_recall", "forget ROUGE-L →R"),
    ("retain_rougeL_recall", "retain ROUGE-L ↑"),
    ("forget_probability", "forget prob →R"),
]
LEGEND = """\
How to read it (Retrain, the model that never saw the forget set, is the target; ↑ higher is better, ↓ lower is
better, →R closest to Retrain's value is best):
  forget quality  p-value of a KS test between the forget-set truth ratios of the model and of Retrain (1 = the
                  test cannot tell them apart). With n forget items it moves in coarse steps: see KS D.
  KS D            the KS statistic behind that p-value: the largest gap between the two distributions of truth
                  ratios (0 = identical, 1 = disjoint); with n items per side it is a multiple of 1/n.
  model utility   harmonic mean of probability, ROUGE-L and truth ratio on the retain, real-author and world-fact
                  questions: what the model should keep (Original's value is the reference).
  forget ROUGE-L  recall of the true forget answers in the model's greedy answers. Not "lower is better": Retrain
                  answers some templated questions right by generalising; far below Retrain = over-unlearned.
  retain ROUGE-L  the same on retain questions.
  forget prob     probability the model gives the true forget answers (mean per-token, exp(-NLL)).
  Retrain, seed {ceiling_seed}: a second Retrain (another seed), scored against the first: the ceiling, the forget
                  quality and KS D any method can be expected to reach.
  Methods: each at the setting its tune selected ({trials} trials per method at tuning seed {tuning_seed}, scored
  without generation; highest forget quality with model utility without ROUGE >= {floor} x Original's), then
  re-run and evaluated on report seeds {report_seeds}, which played no part in the selection: mean ± sd."""


@dataclass
class TofuArguments(UnlearnScriptArguments, StudyArguments):
    """The training command's data keys (`--forget_split`, ...) and the study keys (`--methods`, default NPO and
    SimNPO; `--retain_report`, ...), so a recipe serves both."""

    # The embedded default (no --model_name_or_path)
    num_authors: int = field(default=20, metadata={"help": "Synthetic study: fictitious authors."})
    finetune_epochs: int = field(default=20, metadata={"help": "Synthetic study: epochs to learn the set."})
    finetune_lr: float = field(default=5e-3, metadata={"help": "Synthetic study: learning rate to learn the set."})
    n_trials: int = field(
        default=6, metadata={"help": "Synthetic study: tune trials per method (the same budget for each)."}
    )
    report_seeds: str = field(
        default="1,2,3", metadata={"help": "Synthetic study: seeds the selected settings are reported on (not --seed)."}
    )
    utility_floor: float = field(
        default=0.95, metadata={"help": "Synthetic study: keep trials with utility >= this x Original's."}
    )
    plot: bool = field(default=True, metadata={"help": "Save results.png (needs matplotlib)."})


# ----------------------------------------------------------------------------------------------- pure helpers --


def ks_test(ratios, retain_ratios) -> tuple[float, float]:
    """`(D, p)` of the two-sample KS test behind forget quality (`method.md` §4): D is the largest gap between the
    empirical distributions of the two sets of truth ratios, p its p-value (= forget quality)."""
    res = ks_2samp(np.asarray(ratios, dtype=float), np.asarray(retain_ratios, dtype=float))
    return float(res.statistic), float(res.pvalue)


def utility_without_rouge(metrics: dict) -> float:
    """Model utility from the 6 numbers that need no generation: probability and truth ratio on retain, real
    authors and world facts (TOFU's model utility adds ROUGE-L on the three sets)."""
    return M.model_utility(
        [metrics[f"{s}_{m}"] for s in ("retain", "real_authors", "world_facts") for m in ("probability", "truth_ratio")]
    )


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.2g}"


# ------------------------------------------------------------------------------------------------- training --


class LossProgress(TrainerCallback):
    """A line with the loss just logged, every `every` epochs (and at the last), so a user sees the run move."""

    def __init__(self, what, every=5):
        self.what, self.every = what, every

    def on_log(self, args, state, control, logs=None, **kwargs):
        epoch, total = round(state.epoch or 0), round(args.num_train_epochs)
        if logs and "loss" in logs and (epoch % self.every == 0 or epoch == total):
            print(f"  {self.what}: epoch {epoch}/{total}, loss {logs['loss']:.3f}", flush=True)


def quiet(trainer):
    """No raw log dicts on stdout (TRL prints them when tqdm is off)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def finetune(model, tokenizer, rows: list[dict], out: str, epochs: int, lr: float, seed: int, what: str):
    """Teach a tiny model a QA set (plain SFT on the answers) with TRL's SFTTrainer; the loss is logged per epoch."""
    args = SFTConfig(
        output_dir=out,
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="epoch",
        activation_checkpointing=False,
        completion_only_loss=True,
        max_length=128,
        seed=seed,
        disable_tqdm=True,
    )
    quiet(
        SFTTrainer(
            model=model,
            args=args,
            train_dataset=qa_to_trl(rows),
            processing_class=tokenizer,
            callbacks=[LossProgress(what)],
        )
    ).train()
    return model


def synthetic_setup(args: TofuArguments, training_args, out: str):
    """Write the synthetic set; train Original, Retrain and a second Retrain (seed + 1, the ceiling), save the first
    two (with the tokenizer) in `out/original`, `out/retrain`; return (data_dir, tokenizer, {name: model})."""
    data = make_tofu_like(num_authors=args.num_authors, seed=training_args.seed)
    data_dir = os.path.join(out, "data")
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            write_tofu_layout(data_dir, data)
    tokenizer = train_tokenizer(iter_texts(data), vocab_size=512)
    extra = data["real_authors"] + data["world_facts"]
    seed = training_args.seed
    models = {}
    for name, rows, s in [
        ("original", data["full"], seed),
        ("retrain", data[args.retain()], seed),
        ("retrain_other_seed", data[args.retain()], seed + 1),
    ]:
        model = tiny_llama(tokenizer, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, seed=s)
        set_seed(s)
        print(
            f"Fine-tuning {name} (seed {s}) on {len(rows) + len(extra)} QA pairs, {args.finetune_epochs} epochs ...",
            flush=True,
        )
        models[name] = finetune(
            model,
            tokenizer,
            rows + extra,
            os.path.join(out, name),
            args.finetune_epochs,
            args.finetune_lr,
            s,
            "fine-tuning",
        )
        if name != "retrain_other_seed":
            path = os.path.join(out, name)
            models[name].save_pretrained(path)
            tokenizer.save_pretrained(path)
            models[name].name_or_path = path  # what a model card built from it names as the base model
    return data_dir, tokenizer, models


def unlearn(method, model, tokenizer, forget, retain, config, model_args=None, callbacks=()):
    trainer_cls, _ = METHODS[method]
    kw = {}
    if model_args is not None:
        kw = dict(quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args))
    trainer = trainer_cls(
        model=model,
        args=config,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        **kw,
    )
    quiet(trainer).train()
    return trainer


def evaluate(model, tokenizer, data_dir, args, retain_report=None, retain_model=None, path=None, name="model"):
    print(f"Evaluating {name} (TOFU metrics: scoring and greedy answers) ...", flush=True)
    model.eval()
    # Score and generate with the prompt format the model was trained with
    prompt_format = "chat" if args.conversational else args.prompt_template
    report = evaluate_tofu(
        model,
        tokenizer,
        data_dir,
        split=args.forget_split,
        retain_report=retain_report,
        retain_model=retain_model,
        batch_size=args.eval_batch_size,
        prompt_format=prompt_format,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    )
    ref = report.reference.get("retain_forget_truth_ratio")
    if ref:
        report.metrics["ks_d"] = ks_test(report.per_item["forget"]["truth_ratio"], ref)[0]
    report.metrics["model_utility_no_rouge"] = utility_without_rouge(report.metrics)
    if path:
        report.save(path)
    return report


# ---------------------------------------------------------------------------------------------------- output --


def print_table(rows: dict[str, dict]) -> str:
    """Markdown table; a model's value is `metrics[k]`, or mean ± sd of `metrics["per_seed"][*][k]` when given."""
    header = ["model"] + [label for _, label in SHOWN]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        seeds = metrics.get("per_seed")
        cells = [name] + [mean_sd([m.get(k) for m in seeds] if seeds else [metrics.get(k)]) for k, _ in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def plot(rows: dict[str, dict], path: str, trials: list[dict] = (), floor: float | None = None):
    """Forget quality against model utility: each model (a method: its chosen setting, each seed small and the
    geometric mean of forget quality large) and the tune trials (x). With trials, utility is the version without
    ROUGE for every point (the one the rule uses), so the floor line applies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utility = "model_utility_no_rouge" if trials else "model_utility"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {}
    for name, m in rows.items():
        seeds = m.get("per_seed") or [m]
        mu = [s[utility] for s in seeds]
        fq = [max(s.get("forget_quality") or 1e-12, 1e-12) for s in seeds]
        h = ax.errorbar(
            np.mean(mu),
            np.exp(np.mean(np.log(fq))),
            xerr=np.std(mu) if len(mu) > 1 else None,
            fmt="o",
            ms=9,
            capsize=3,
            label=name,
        )
        colors[name] = h[0].get_color()
        if len(seeds) > 1:
            ax.scatter(mu, fq, s=12, color=colors[name], alpha=0.6)
    for p in trials:
        ax.scatter(
            p["model_utility_no_rouge"],
            max(p["forget_quality"], 1e-12),
            marker="x",
            s=18,
            alpha=0.5,
            color=colors.get(p["method"], "gray"),
        )
    if trials:
        ax.scatter([], [], marker="x", color="gray", label="tune trials (tuning seed)")
    if floor is not None:
        ax.axvline(floor, color="gray", linestyle=":", label="utility floor")
    ax.set_yscale("log")
    ax.margins(x=0.15, y=0.25)
    ax.set_xlabel("model utility" + (" without ROUGE" if trials else "") + " (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title("TOFU: forget quality vs model utility")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the studies --


def tune_recipe(training_args, num_forget: int) -> dict:
    """The settings every trial starts from: the published protocol's shape at tiny scale (`method.md` §3): warm-up
    one epoch then linear decay, weight decay 0.01, 4 forget + 4 retain rows a step, retain NLL with weight 1."""
    steps_per_epoch = math.ceil(
        num_forget / (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps)
    )
    keys = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "lr_scheduler_type",
        "weight_decay",
        "max_length",
        "activation_checkpointing",
        "max_steps",
        "retain_weight",
        "retain_loss_type",
        "logging_steps",
    )
    recipe = {k: getattr(training_args, k) for k in keys}
    recipe["lr_scheduler_type"] = getattr(recipe["lr_scheduler_type"], "value", recipe["lr_scheduler_type"])
    return {**recipe, "warmup_steps": steps_per_epoch}


def embedded_study(args, training_args, out, results):
    """Train the models, tune each method with the same budget and rule, report on fresh seeds; fills `results`,
    returns (every trial, the utility threshold, timing)."""
    t0, c0 = time.time(), time.process_time()
    data_dir, tokenizer, models = synthetic_setup(args, training_args, out)
    args.dataset_name = data_dir
    forget = load_qa_split(args, args.forget_split)
    timing = {"fine-tuning (3 models)": (time.time() - t0, time.process_time() - c0)}

    t0, c0 = time.time(), time.process_time()
    report = evaluate(models["retrain"], tokenizer, data_dir, args, name="Retrain")
    # The retain model against itself: identical truth ratios, forget quality 1 by definition
    report.reference["retain_forget_truth_ratio"] = list(report.per_item["forget"]["truth_ratio"])
    report.metrics = report.recompute()
    report.metrics.update(ks_d=0.0, model_utility_no_rouge=utility_without_rouge(report.metrics))
    retain_path = os.path.join(out, "report_retrain.json")
    report.save(retain_path)
    results["Retrain"] = report.metrics
    ceiling = f"Retrain, seed {training_args.seed + 1}"
    results[ceiling] = evaluate(
        models["retrain_other_seed"],
        tokenizer,
        data_dir,
        args,
        report,
        name=ceiling,
        path=os.path.join(out, "report_retrain_other_seed.json"),
    ).metrics
    results["Original"] = evaluate(
        models["original"],
        tokenizer,
        data_dir,
        args,
        report,
        path=os.path.join(out, "report_original.json"),
        name="Original",
    ).metrics
    timing["evaluating Original and the two Retrains"] = (time.time() - t0, time.process_time() - c0)

    t0, c0 = time.time(), time.process_time()
    methods = [m.strip() for m in (args.methods or "npo,simnpo").split(",") if m.strip()]
    report_seeds = [int(x) for x in args.report_seeds.split(",") if x.strip()]
    recipe = tune_recipe(training_args, len(forget))
    fmt = "chat" if args.conversational else args.prompt_template
    print(
        f"Tuning {', '.join(methods)} with the same budget: {args.n_trials} trials each at seed "
        f"{training_args.seed}, then report seeds {report_seeds}",
        flush=True,
    )
    trials, threshold = [], None
    for method in methods:
        name = METHODS[method][0]._name
        print(f"--- {name}", flush=True)
        result = tune(
            method,
            os.path.join(out, "original"),
            data_dir,
            output_dir=os.path.join(out, f"tune_{method}"),
            forget_split=args.forget_split,
            retain_report=retain_path,
            recipe=recipe,
            prompt_format=fmt,
            n_trials=args.n_trials,
            storage="memory",
            tuning_seeds=[training_args.seed],
            report_seeds=report_seeds,
            rule=SelectionRule(utility_floor=args.utility_floor),
            base_learning_rate=args.finetune_lr,
            sampler_seed=training_args.seed,
            eval_batch_size=args.eval_batch_size,
            save_model_dir=os.path.join(out, method),
        )
        threshold = result["rule"]["utility_threshold"]
        trials += [{"method": name, **t} for t in result["trials"]]
        per_seed = result["report"]["full"]["per_seed"]
        mean = {k: v["mean"] for k, v in result["report"]["full"].items() if isinstance(v, dict) and "mean" in v}
        results[name] = {
            **mean,
            "setting": result["selected"]["config"],
            "selected_trial": result["selected"],
            "gap_in_minus_out": result["report"]["gap_in_minus_out"],
            "per_seed": per_seed,
        }
    timing[f"tuning ({args.n_trials} trials x {len(methods)} methods) and report seeds"] = (
        time.time() - t0,
        time.process_time() - c0,
    )
    for what, (wall, cpu) in timing.items():
        print(f"time: {what}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return trials, threshold, {k: {"wall_s": w, "cpu_s": c} for k, (w, c) in timing.items()}


def main(args: TofuArguments, training_args: SimNPOConfig, model_args: ModelConfig):
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    state = PartialState()
    embedded = model_args.model_name_or_path is None
    results = {}
    if embedded:
        torch.set_num_threads(1)  # tiny models: one thread is faster than two, and steadier on a busy machine
        datasets.disable_progress_bars()  # a dozen tokenising bars per trained model would bury the progress lines
        trials, floor, timing = embedded_study(args, training_args, out, results)
    else:
        data_dir = args.dataset_name
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        forget = load_qa_split(args, args.forget_split)
        retain = load_qa_split(args, args.retain())
        retain_model = None
        if args.retain_model_name_or_path:
            from transformers import AutoModelForCausalLM

            retain_model = AutoModelForCausalLM.from_pretrained(args.retain_model_name_or_path)
        retain_report = args.retain_report
        if state.is_main_process and retain_model is not None:
            report = evaluate(retain_model, tokenizer, data_dir, args, name="Retrain")
            report.reference["retain_forget_truth_ratio"] = list(report.per_item["forget"]["truth_ratio"])
            report.metrics = report.recompute()
            report.save(os.path.join(out, "report_retrain.json"))
            retain_report = report
            results["Retrain"] = report.metrics
        for method in [m.strip() for m in (args.methods or "npo,simnpo").split(",") if m.strip()]:
            config = method_config(method, training_args, os.path.join(out, method), args.npo_beta)
            config.model_init_kwargs = {
                "dtype": model_args.dtype,
                "revision": model_args.model_revision,
                "attn_implementation": model_args.attn_implementation,
            }
            print(f"Unlearning {args.forget_split} with {METHODS[method][0]._name} ...", flush=True)
            trainer = unlearn(
                method,
                model_args.model_name_or_path,
                tokenizer,
                forget,
                retain,
                config,
                model_args,
                callbacks=[LossProgress("unlearning", every=1)],
            )
            if state.is_main_process:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                report = evaluate(
                    unwrapped,
                    tokenizer,
                    data_dir,
                    args,
                    retain_report,
                    path=os.path.join(out, f"report_{method}.json"),
                    name=trainer._name,
                )
                results[trainer._name] = report.metrics
                trainer.evaluation_summary = {k: report.metrics.get(k) for k, _ in SHOWN}
            trainer.save_model(config.output_dir)
            if training_args.push_to_hub:
                trainer.push_to_hub(dataset_name=args.dataset_name)

    if state.is_main_process:
        table = print_table(results)
        if embedded:
            print(
                LEGEND.format(
                    floor=args.utility_floor,
                    trials=args.n_trials,
                    tuning_seed=training_args.seed,
                    report_seeds=args.report_seeds,
                    ceiling_seed=training_args.seed + 1,
                ),
                flush=True,
            )
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if embedded:
            with open(os.path.join(out, "trials.json"), "w") as f:
                json.dump({"utility_threshold": floor, "trials": trials, "timing": timing}, f, indent=1)
        if args.plot:
            try:
                plot(results, os.path.join(out, "results.png"), *((trials, floor) if embedded else ()))
            except ImportError:
                print("matplotlib is not installed: no plot (pip install 'trl-unlearn[plot]').")
        if embedded:
            methods = [m.strip() for m in (args.methods or "npo,simnpo").split(",") if m.strip()]
            print(
                f"In {out}: results.md, results.json, results.png, trials.json; models original/, retrain/ and "
                f"{', '.join(m + '/' for m in methods)} (the selected setting, first report seed, with its model "
                f"card); report_*.json; tune_<method>/ (tuning.json, pareto.png, best.yaml); data/",
                flush=True,
            )
        else:
            print(f"In {out}: results.md, results.json, report_<method>.json and the models <method>/", flush=True)
    return results


DEFAULTS = {  # the embedded study only (no --model_name_or_path); any flag or YAML key overrides them
    "output_dir": "outputs/tofu",
    "lr_scheduler_type": "linear",  # the published protocol: warm-up one epoch, then linear decay
    "weight_decay": 0.01,
    "per_device_train_batch_size": 4,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 10,
    "disable_tqdm": True,
    "max_length": 128,
    "seed": 0,
}


def parse(argv=None):
    parser = TrlParser((TofuArguments, SimNPOConfig, ModelConfig))
    if not torch.cuda.is_available():  # TRL configs default to bf16, which needs use_cpu on a CPU
        parser.set_defaults(use_cpu=True, bf16=False)
    parsed = parser.parse_args_and_config(argv)
    if parsed[2].model_name_or_path is None:  # the embedded study: tiny-model defaults, still overridable
        parser.set_defaults(**DEFAULTS)
        parsed = parser.parse_args_and_config(argv)
    return parsed


if __name__ == "__main__":
    main(*parse())
