"""Unlearn TOFU's forget split and evaluate with the TOFU metrics.

With no arguments it runs a complete small study offline (no Hub, no GPU, about two minutes on 2 idle CPU cores): it
builds a synthetic fictitious-author set in TOFU's layout, trains a tiny Llama from scratch on all of it ("Original")
and on the retain part only ("Retrain"), and compares NPO and SimNPO FAIRLY: each method gets the same small sweep of
unlearning rates (multiples of the fine-tuning rate, as in the published protocol where they are equal) and forget
weights (SimNPO's published 0.125 and NPO's 1), each point scored without generation, and each method's setting is
chosen by the same rule (the best forget quality at model utility >= 0.95 x Original's). The chosen settings are re-run with several unlearning seeds and evaluated with the
full TOFU metrics; it prints a table with a legend, and saves results.json, sweep.json and results.png.

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
"""

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import PartialState
from scipy.stats import ks_2samp
from transformers import TrainerCallback, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

import trl_unlearn.evaluation.metrics as M
from trl_unlearn import SimNPOConfig
from trl_unlearn.cli.train import METHODS, StudyArguments, UnlearnScriptArguments, load_qa_split, method_config
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.data.formats import qa_to_trl
from trl_unlearn.evaluation import evaluate_tofu
from trl_unlearn.evaluation.tofu import load_tofu_eval_sets, score_tofu_sets, truth_ratios
from trl_unlearn.loading import load_tokenizer
from trl_unlearn.toy.synthetic import iter_texts, make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

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
  Methods: each at its best sweep setting (highest forget quality with model utility >= {floor} x Original's,
  utility measured without generation), mean ± sd over {seeds} unlearning seed(s)."""


@dataclass
class TofuArguments(UnlearnScriptArguments, StudyArguments):
    """The training command's data keys (`--forget_split`, ...) and the study keys (`--methods`, default NPO and
    SimNPO; `--retain_report`, ...), so a recipe serves both."""

    # The embedded default (no --model_name_or_path)
    num_authors: int = field(default=20, metadata={"help": "Synthetic study: fictitious authors."})
    finetune_epochs: int = field(default=20, metadata={"help": "Synthetic study: epochs to learn the set."})
    finetune_lr: float = field(default=5e-3, metadata={"help": "Synthetic study: learning rate to learn the set."})
    sweep_lr_mults: str = field(
        default="0.1,0.3,1",
        metadata={"help": "Synthetic study: unlearning learning rates swept, as multiples of --finetune_lr."})
    sweep_forget_weights: str = field(
        default="0.125,1", metadata={"help": "Synthetic study: forget weights swept (the same grid for each method)."})
    seeds: int = field(default=3, metadata={"help": "Synthetic study: unlearning seeds for each chosen setting."})
    utility_floor: float = field(
        default=0.95, metadata={"help": "Synthetic study: keep sweep points with utility >= this x Original's."})
    plot: bool = field(default=True, metadata={"help": "Save results.png (needs matplotlib)."})


# ----------------------------------------------------------------------------------------------- pure helpers --


def ks_test(ratios, retain_ratios) -> tuple[float, float]:
    """`(D, p)` of the two-sample KS test behind forget quality (`method.md` §4): D is the largest gap between the
    empirical distributions of the two sets of truth ratios, p its p-value (= forget quality)."""
    res = ks_2samp(np.asarray(ratios, dtype=float), np.asarray(retain_ratios, dtype=float))
    return float(res.statistic), float(res.pvalue)


def rank_under_floor(points: list[dict], floor: float, utility: str = "model_utility",
                     score: str = "forget_quality") -> list[dict]:
    """The points with `utility >= floor`, best first: highest `score`, ties to higher utility, then the earlier
    point."""
    kept = [(i, p) for i, p in enumerate(points) if p[utility] >= floor]
    return [p for _, p in sorted(kept, key=lambda ip: (-ip[1][score], -ip[1][utility], ip[0]))]


def best_under_floor(points: list[dict], floor: float, utility: str = "model_utility",
                     score: str = "forget_quality") -> dict | None:
    """The first of `rank_under_floor`: the highest `score` with `utility >= floor`; None when no point reaches it."""
    ranked = rank_under_floor(points, floor, utility, score)
    return ranked[0] if ranked else None


def utility_without_rouge(metrics: dict) -> float:
    """Model utility from the 6 numbers that need no generation: probability and truth ratio on retain, real
    authors and world facts (TOFU's model utility adds ROUGE-L on the three sets)."""
    return M.model_utility([metrics[f"{s}_{m}"] for s in ("retain", "real_authors", "world_facts")
                            for m in ("probability", "truth_ratio")])


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.2g}"


# --------------------------------------------------------------------------------------------------- scoring --


def score_without_generation(model, tokenizer, sets, retain_ratios=None, prompt_format="plain", batch_size=32,
                             max_length=256) -> dict:
    """TOFU numbers that need no generation (`sets`: some or all of `load_tofu_eval_sets`): per set probability and
    truth ratio; `model_utility_no_rouge` when the three utility sets are there; with Retrain's forget truth ratios
    `forget_quality` and `ks_d`. Per forget item (lists): `forget_truth_ratios` (the reference when `model` is
    Retrain) and `forget_probabilities`."""
    cols = score_tofu_sets(model, tokenizer, sets, prompt_format=prompt_format, batch_size=batch_size,
                           max_length=max_length, progress=False)
    out = {}
    for s, c in cols.items():
        if s in ("forget", "retain"):
            prob = M.probability(c["avg_nll_answer"])
        else:
            prob = M.normalized_probability(c["avg_nll_answer"], c["avg_nll_perturbed"])
        ratios = truth_ratios(c, s)
        out[f"{s}_probability"] = float(np.mean(prob))
        out[f"{s}_truth_ratio"] = (M.truth_ratio_forget_score(ratios) if s == "forget"
                                   else M.truth_ratio_score(ratios))
        if s == "forget":
            out["forget_truth_ratios"], out["forget_probabilities"] = ratios.tolist(), prob.tolist()
    if {"retain", "real_authors", "world_facts"} <= set(cols):
        out["model_utility_no_rouge"] = utility_without_rouge(out)
    if retain_ratios is not None:
        out["ks_d"], out["forget_quality"] = ks_test(out["forget_truth_ratios"], retain_ratios)
    return out


# ------------------------------------------------------------------------------------------------- training --


class EpochProgress(TrainerCallback):
    """One line per epoch (the runs here hide tqdm bars), so a user sees the study move."""

    def __init__(self, what):
        self.what = what

    def on_epoch_end(self, args, state, control, **kwargs):
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        loss = f", loss {losses[-1]:.3f}" if losses else ""
        print(f"  {self.what}: epoch {round(state.epoch)}/{round(args.num_train_epochs)}{loss}", flush=True)


def finetune(model, tokenizer, rows: list[dict], out: str, epochs: int, lr: float, seed: int):
    """Teach a tiny model a QA set (plain SFT on the answers) with TRL's SFTTrainer."""
    args = SFTConfig(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=lr,
                     lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, use_cpu=not torch.cuda.is_available(),
                     bf16=False, report_to=[], save_strategy="no", logging_steps=50, activation_checkpointing=False,
                     completion_only_loss=True, max_length=128, seed=seed, disable_tqdm=True)
    SFTTrainer(model=model, args=args, train_dataset=qa_to_trl(rows), processing_class=tokenizer,
               callbacks=[EpochProgress("fine-tuning")]).train()
    return model


def synthetic_setup(args: TofuArguments, training_args, out: str):
    """Write the synthetic set, train Original and Retrain models; return (data_dir, tokenizer, original, retain)."""
    data = make_tofu_like(num_authors=args.num_authors, seed=training_args.seed)
    data_dir = os.path.join(out, "data")
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            write_tofu_layout(data_dir, data)
    tokenizer = train_tokenizer(iter_texts(data), vocab_size=512)
    extra = data["real_authors"] + data["world_facts"]
    models = []
    for name, rows in [("original", data["full"]), ("retrain", data[args.retain()])]:
        model = tiny_llama(tokenizer, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                           seed=training_args.seed)
        set_seed(training_args.seed)
        print(f"Fine-tuning the {name} model on {len(rows) + len(extra)} QA pairs ...", flush=True)
        models.append(finetune(model, tokenizer, rows + extra, os.path.join(out, name), args.finetune_epochs,
                               args.finetune_lr, training_args.seed))
    return data_dir, tokenizer, *models


def embedded_config(method, args, training_args, out, lr, forget_weight, seed, num_forget):
    """The embedded study's config of `method`: the published protocol's shape (`method.md` §3) at tiny scale:
    `lr`, warm-up one epoch then linear decay, weight decay 0.01, `forget_weight`; β: NPO `--npo_beta` (0.1),
    SimNPO `--beta` (4.5, the paper's forget10 value)."""
    base = copy.copy(training_args)
    steps_per_epoch = math.ceil(num_forget / (base.per_device_train_batch_size * base.gradient_accumulation_steps))
    base.learning_rate, base.forget_weight, base.seed, base.warmup_steps = lr, forget_weight, seed, steps_per_epoch
    return method_config(method, base, out, args.npo_beta)


def unlearn(method, model, tokenizer, forget, retain, config, model_args=None, callbacks=()):
    trainer_cls, _ = METHODS[method]
    kw = {}
    if model_args is not None:
        kw = dict(quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args))
    trainer = trainer_cls(model=model, args=config, forget_dataset=forget, retain_dataset=retain,
                          processing_class=tokenizer, callbacks=list(callbacks), **kw)
    trainer.train()
    return trainer


def evaluate(model, tokenizer, data_dir, args, retain_report=None, retain_model=None, path=None, name="model"):
    print(f"Evaluating {name} (TOFU metrics: scoring and greedy answers) ...", flush=True)
    model.eval()
    # Score and generate with the prompt format the model was trained with
    prompt_format = "chat" if args.conversational else args.prompt_template
    report = evaluate_tofu(model, tokenizer, data_dir, split=args.forget_split, retain_report=retain_report,
                           retain_model=retain_model, batch_size=args.eval_batch_size, prompt_format=prompt_format,
                           max_new_tokens=args.max_new_tokens, progress=False)
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


def plot(rows: dict[str, dict], path: str, sweep: list[dict] = (), floor: float | None = None):
    """Forget quality against model utility: each model (a method: its chosen setting, each seed small and the
    geometric mean of forget quality large) and the sweep points (x). With a sweep, utility is the version without
    ROUGE for every point (the one the rule uses), so the floor line applies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utility = "model_utility_no_rouge" if sweep else "model_utility"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {}
    for name, m in rows.items():
        seeds = m.get("per_seed") or [m]
        mu = [s[utility] for s in seeds]
        fq = [max(s.get("forget_quality") or 1e-12, 1e-12) for s in seeds]
        h = ax.errorbar(np.mean(mu), np.exp(np.mean(np.log(fq))), xerr=np.std(mu) if len(mu) > 1 else None,
                        fmt="o", ms=9, capsize=3, label=name)
        colors[name] = h[0].get_color()
        if len(seeds) > 1:
            ax.scatter(mu, fq, s=12, color=colors[name], alpha=0.6)
    for p in sweep:
        ax.scatter(p["model_utility_no_rouge"], max(p["forget_quality"], 1e-12), marker="x", s=18, alpha=0.5,
                   color=colors.get(p["method"], "gray"))
    if sweep:
        ax.scatter([], [], marker="x", color="gray", label="sweep points (seed 0)")
    if floor is not None:
        ax.axvline(floor, color="gray", linestyle=":", label="utility floor")
    ax.set_yscale("log")
    ax.margins(x=0.15, y=0.25)
    ax.set_xlabel("model utility" + (" without ROUGE" if sweep else "") + " (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title("TOFU: forget quality vs model utility")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the studies --


def embedded_study(args, training_args, out, results):
    """Sweep, select with one rule, re-run with seeds, evaluate; fills `results`, returns the sweep points."""
    t0, c0 = time.time(), time.process_time()
    data_dir, tokenizer, original, retrain = synthetic_setup(args, training_args, out)
    args.dataset_name = data_dir
    forget, retain = (load_qa_split(args, s) for s in (args.forget_split, args.retain()))
    timing = {"fine-tuning (2 models)": (time.time() - t0, time.process_time() - c0)}

    t0, c0 = time.time(), time.process_time()
    report = evaluate(retrain, tokenizer, data_dir, args, name="Retrain")
    # The retain model against itself: identical truth ratios, forget quality 1 by definition
    report.reference["retain_forget_truth_ratio"] = list(report.per_item["forget"]["truth_ratio"])
    report.metrics = report.recompute()
    report.metrics.update(ks_d=0.0, model_utility_no_rouge=utility_without_rouge(report.metrics))
    report.save(os.path.join(out, "report_retrain.json"))
    retain_report = report
    results["Retrain"] = report.metrics
    results["Original"] = evaluate(original, tokenizer, data_dir, args, retain_report,
                                   path=os.path.join(out, "report_original.json"), name="Original").metrics
    timing["evaluating Original and Retrain"] = (time.time() - t0, time.process_time() - c0)

    t0, c0 = time.time(), time.process_time()
    sets = load_tofu_eval_sets(data_dir, args.forget_split)
    fmt = "chat" if args.conversational else args.prompt_template
    score = lambda m, ref=None: score_without_generation(m, tokenizer, sets, ref, fmt, args.eval_batch_size)  # noqa
    retain_ratios = score(retrain)["forget_truth_ratios"]
    floor = args.utility_floor * score(original, retain_ratios)["model_utility_no_rouge"]
    methods = [m.strip() for m in (args.methods or "npo,simnpo").split(",") if m.strip()]
    mults = [float(x) for x in args.sweep_lr_mults.split(",")]
    weights = [float(x) for x in args.sweep_forget_weights.split(",")]
    print(f"Sweep, the same grid for {', '.join(methods)}: unlearning lr = {mults} x {args.finetune_lr:g}, forget "
          f"weight {weights}; each point scored without generation; keep model utility >= {floor:.3f} "
          f"({args.utility_floor} x Original's)", flush=True)
    sweep = []
    for method in methods:
        for weight, mult in [(w, m) for w in weights for m in mults]:
            config = embedded_config(method, args, training_args, os.path.join(out, "sweep"),
                                     mult * args.finetune_lr, weight, training_args.seed, len(forget))
            trainer = unlearn(method, copy.deepcopy(original).train(), tokenizer, forget, retain, config)
            m = score(trainer.model, retain_ratios)
            point = {"method": trainer._name, "lr_mult": mult, "learning_rate": config.learning_rate,
                     "beta": config.beta, "forget_weight": config.forget_weight,
                     "seed": config.seed, **{k: v for k, v in m.items() if not isinstance(v, list)}}
            sweep.append(point)
            print(f"  {trainer._name} lr x{mult:g}, forget weight {weight:g}: forget quality {m['forget_quality']:.3g} (D {m['ks_d']:.2f}), "
                  f"utility (no ROUGE) {m['model_utility_no_rouge']:.3f}, forget prob {m['forget_probability']:.3f}",
                  flush=True)
    timing[f"sweep ({len(sweep)} unlearning runs, scored without generation)"] = (time.time() - t0,
                                                                                 time.process_time() - c0)

    t0, c0 = time.time(), time.process_time()
    for method in methods:
        name = METHODS[method][0]._name
        best = best_under_floor([p for p in sweep if p["method"] == name], floor, utility="model_utility_no_rouge")
        if best is None:
            print(f"{name}: no sweep point keeps model utility >= {floor:.3f}; not evaluated further.", flush=True)
            continue
        print(f"{name}: chosen lr x{best['lr_mult']:g} ({best['learning_rate']:g}), forget weight "
              f"{best['forget_weight']:g}; re-running with "
              f"{args.seeds} seed(s)", flush=True)
        per_seed = []
        for k in range(args.seeds):
            seed = training_args.seed + k
            folder = os.path.join(out, method) if k == 0 else os.path.join(out, "seeds", f"{method}_{seed}")
            config = embedded_config(method, args, training_args, folder, best["learning_rate"], best["forget_weight"],
                                     seed, len(forget))
            trainer = unlearn(method, copy.deepcopy(original).train(), tokenizer, forget, retain, config,
                              callbacks=[EpochProgress(f"unlearning ({name}, seed {seed})")])
            report = evaluate(trainer.model, tokenizer, data_dir, args, retain_report, name=f"{name} (seed {seed})",
                              path=os.path.join(out, f"report_{method}.json") if k == 0 else None)
            per_seed.append({"seed": seed, **report.metrics})
            if k == 0:  # the first seed's model is saved, with its evaluation in the model card
                trainer.evaluation_summary = {k2: report.metrics.get(k2) for k2, _ in SHOWN}
                trainer.save_model(config.output_dir)
        mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]
                if k != "seed" and all(isinstance(s.get(k), (int, float)) for s in per_seed)}
        results[name] = {**mean, "setting": {k: best[k] for k in ("lr_mult", "learning_rate", "beta", "forget_weight")},
                         "per_seed": per_seed}
    timing["chosen settings: unlearning with seeds + full evaluation"] = (time.time() - t0, time.process_time() - c0)
    for what, (wall, cpu) in timing.items():
        print(f"time: {what}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return sweep, floor, {k: {"wall_s": w, "cpu_s": c} for k, (w, c) in timing.items()}


def main(args: TofuArguments, training_args: SimNPOConfig, model_args: ModelConfig):
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    state = PartialState()
    embedded = model_args.model_name_or_path is None
    results = {}
    if embedded:
        torch.set_num_threads(1)  # tiny models: one thread is faster than two, and steadier on a busy machine
        sweep, floor, timing = embedded_study(args, training_args, out, results)
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
            config.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision,
                                        "attn_implementation": model_args.attn_implementation}
            print(f"Unlearning {args.forget_split} with {METHODS[method][0]._name} ...", flush=True)
            trainer = unlearn(method, model_args.model_name_or_path, tokenizer, forget, retain, config, model_args,
                              callbacks=[EpochProgress("unlearning")])
            if state.is_main_process:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                report = evaluate(unwrapped, tokenizer, data_dir, args, retain_report,
                                  path=os.path.join(out, f"report_{method}.json"), name=trainer._name)
                results[trainer._name] = report.metrics
                trainer.evaluation_summary = {k: report.metrics.get(k) for k, _ in SHOWN}
            trainer.save_model(config.output_dir)
            if training_args.push_to_hub:
                trainer.push_to_hub(dataset_name=args.dataset_name)

    if state.is_main_process:
        table = print_table(results)
        if embedded:
            print(LEGEND.format(floor=args.utility_floor, seeds=args.seeds), flush=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if embedded:
            with open(os.path.join(out, "sweep.json"), "w") as f:
                json.dump({"utility_floor": floor, "points": sweep, "timing": timing}, f, indent=1)
        if args.plot:
            try:
                plot(results, os.path.join(out, "results.png"), *((sweep, floor) if embedded else ()))
            except ImportError:
                print("matplotlib is not installed: no plot (pip install 'trl-unlearn[plot]').")
        print(f"Reports, models and results are in {out}", flush=True)
    return results


DEFAULTS = {  # the embedded study only (no --model_name_or_path); any flag or YAML key overrides them
    "output_dir": "outputs/tofu",
    "num_train_epochs": 10,  # the published protocol: 10 epochs, warm-up one epoch, then linear decay
    "lr_scheduler_type": "linear",
    "weight_decay": 0.01,
    "per_device_train_batch_size": 4,
    "beta": 4.5,  # SimNPO on forget10 (paper: beta 4.5, forget weight 0.125); NPO: beta 0.1 (--npo_beta)
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
