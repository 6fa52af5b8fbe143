"""The TOFU protocol at small scale, on the real TOFU files, on CPU: each method tuned the same way (`tune`).

    python benchmarks/tofu_small.py --data_dir ../shared/data/tofu [--out outputs/tofu_small] [--resume]

1. Models. No pretrained model can be loaded here, so a small Llama is trained FROM SCRATCH on the forget split
   (default forget01: the last 2 authors, 40 QA) + the first `--retain_authors` retain authors (20: exactly the
   authors of TOFU's `retain_perturbed` evaluation set) + the Real Authors and World Facts QA (taught to every
   model, so model utility measures whether unlearning kept trained knowledge). Original: all of it. Retrain: the
   same without the forget split. A second Retrain with seed `--seed + 1` is the CEILING: its forget quality against
   the first is the best value any method can be expected to reach. All three are cached in `--out`.
2. Data. `--out/data` holds the study's TOFU-layout folder: the forget split, `retain<N>authors` (the retain rows
   the models learned, which the retain term trains on), `holdoutNN` (as many QA of retain authors that no model
   saw: the non-members of membership inference) and the four evaluation files copied from `--data_dir`.
3. Tuning: `trl_unlearn.tuning.tune` for every method of `--methods` with the SAME budget (`--n_trials` Optuna
   trials, TPE sampler seed 0), the same rule (the highest forget quality among trials whose model utility without
   ROUGE is >= `--floor` x Original's), the package's default search spaces (lr 0.1-3x the fine-tuning lr, 2-10
   epochs, forget weight, NPO β, SimNPO β (tied to the measured forget NLL) and γ, RMU's steering scale and α),
   trials trained at tuning seed `--tuning_seed` and scored without generation. Every trial starts from the
   published protocol's shape (`docs/method.md` §3): warm-up one epoch then linear decay, weight decay 0.01, one
   forget and one retain row per item, batch = the fine-tuning batch, retain NLL with weight 1 (GA: none).
4. Report seeds (`--report_seeds`, never used in selection): `tune` re-runs the selected setting and evaluates it in
   full (greedy answers, ROUGE-L, TOFU's 9-number model utility). This script trains those runs once more (the same
   `Runner`, so the same model: checked) for membership inference (Min-K%++ and LOSS AUC: forget QA against QA of
   retain authors no model saw) and a relearning attack (NLL on `--relearn_fraction` of the forget set; the
   relearned and the held-out items reported apart; Retrain attacked too).
Each method's study lives in `--out/tune_<method>` (SQLite: an interrupted run resumes, `--resume` reuses finished
tunes and attacks). Writes results.json and summary.md in `--out`, and the Pareto and relearning PNGs (`--figures`).
On 2 cores the methods can run in two processes sharing `--out`: once the models and the three reports exist
(`report_*.json`), `--resume --methods gradascent,graddiff,npo` and `--resume --methods simnpo,rmu` side by side,
then `--resume` with every method assembles the tables from their caches.
"""

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

import trl_unlearn.evaluation.metrics as M
from trl_unlearn.data.files import load_tofu_split, write_tofu_layout
from trl_unlearn.data.formats import PROMPT_TEMPLATE, qa_to_trl
from trl_unlearn.evaluation import EvalReport, evaluate_tofu
from trl_unlearn.evaluation.relearn import relearning_attack, select_relearn_indices
from trl_unlearn.evaluation.scoring import score_answers
from trl_unlearn.evaluation.tofu import score_tofu_sets, tofu_files, truth_ratios
from trl_unlearn.methods import REGISTRY, get_method
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer
from trl_unlearn.tuning import NoTrialAboveFloor, SelectionRule, tune
from trl_unlearn.tuning.spaces import to_config_values
from trl_unlearn.tuning.study import Runner, TofuScorer, tofu_datasets, tofu_scores, unwrapped

RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
FINAL = (
    "forget_quality",
    "ks_d",
    "model_utility",
    "model_utility_no_rouge",
    "forget_rougeL_recall",
    "forget_probability",
    "retain_rougeL_recall",
    "mia_minkpp_auc",
    "mia_loss_auc",
)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of TOFU's JSON-lines files")
    p.add_argument("--out", default="outputs/tofu_small")
    p.add_argument("--figures", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures"))
    p.add_argument("--split", default="forget01")
    p.add_argument("--retain_authors", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--finetune_epochs", type=int, default=25)
    p.add_argument("--finetune_lr", type=float, default=3e-3, help="also the base of the tune's lr_mult")
    p.add_argument("--batch", type=int, default=16, help="fine-tuning batch; unlearning: this many forget + retain")
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo,rmu")
    p.add_argument("--n_trials", type=int, default=20, help="Optuna trials per method (the same for every method)")
    p.add_argument("--tuning_seed", type=int, default=0)
    p.add_argument("--report_seeds", default="1,2,3", help="fresh unlearning seeds the selected setting is run on")
    p.add_argument("--floor", type=float, default=0.95, help="selection: utility w/o ROUGE >= floor x Original's")
    p.add_argument("--relearn_fraction", type=float, default=0.1)
    p.add_argument("--relearn_steps", type=int, default=30)
    p.add_argument("--relearn_lr_mult", type=float, default=0.1, help="relearning lr, x --finetune_lr")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and fine-tuning (ceiling: seed + 1)")
    p.add_argument("--resume", action="store_true", help="reuse the models, reports and finished tunes in --out")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- models, data --


def finetune(model, tokenizer, rows, a, seed):
    args = SFTConfig(
        output_dir=os.path.join(a.out, "sft"),
        num_train_epochs=a.finetune_epochs,
        per_device_train_batch_size=a.batch,
        learning_rate=a.finetune_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=100,
        activation_checkpointing=False,
        completion_only_loss=True,
        max_length=256,
        seed=seed,
        disable_tqdm=True,
    )
    set_seed(seed)
    SFTTrainer(model=model, args=args, train_dataset=qa_to_trl(rows), processing_class=tokenizer).train()
    return model.eval()


def study_data(a):
    """The study's rows, and its TOFU-layout folder `--out/data` (forget split, retain rows, evaluation files)."""
    forget = load_tofu_split(a.data_dir, a.split)
    retain_all = load_tofu_split(a.data_dir, RETAIN_OF[a.split])
    retain = retain_all[: 20 * a.retain_authors]  # TOFU: 20 QA per author, authors in order
    holdout = retain_all[20 * a.retain_authors : 20 * a.retain_authors + len(forget)]  # seen by no model
    extra = load_tofu_split(a.data_dir, "real_authors") + load_tofu_split(a.data_dir, "world_facts")
    retain_split = f"retain{a.retain_authors}authors"
    files = {a.split: forget, retain_split: retain, "holdout" + a.split[len("forget") :]: holdout}
    files.update({stem: load_tofu_split(a.data_dir, stem) for stem in tofu_files(a.split).values()})
    folder = str(write_tofu_layout(os.path.join(a.out, "data"), files))
    return {"forget": forget, "retain": retain, "holdout": holdout, "extra": extra}, folder, retain_split


def train_models(a, rows):
    """Original, Retrain and the ceiling's second Retrain (seed + 1); trained once, then loaded from `--out`."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    plan = {
        "original": (rows["forget"] + rows["retain"] + rows["extra"], a.seed),
        "retrain": (rows["retain"] + rows["extra"], a.seed),
        "retrain_other_seed": (rows["retain"] + rows["extra"], a.seed + 1),
    }
    paths = {name: os.path.join(a.out, name) for name in plan}
    if a.resume and all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["original"])
        print(f"loaded Original, Retrain and the second Retrain from {a.out}", flush=True)
        return tokenizer, {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in paths.items()}, paths
    eval_texts = []
    for stem in tofu_files(a.split).values():
        for r in load_tofu_split(a.data_dir, stem):
            eval_texts += [r["question"], r["answer"], r.get("paraphrased_answer", "")] + list(r["perturbed_answer"])
    train_texts = [PROMPT_TEMPLATE.format(question=r["question"]) + " " + r["answer"] for r in plan["original"][0]]
    tokenizer = train_tokenizer(train_texts + eval_texts, vocab_size=a.vocab)
    models = {}
    for name, (train_rows, seed) in plan.items():
        model = tiny_llama(
            tokenizer, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4, seed=seed
        )
        models[name] = finetune(model, tokenizer, train_rows, a, seed)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"trained {name} (seed {seed}, {n_params:.2f}M params) on {len(train_rows)} QA", flush=True)
    return tokenizer, models, paths


def membership_aucs(model, tokenizer, members, nonmembers) -> dict:
    """ROC AUC of forget QA (members) against unseen QA (non-members), scoring the answer given the question:
    Min-K%++ (k 0.4; higher = member) and LOSS (lower = member). 1 = members stand out, 0.5 = chance."""
    rows = members + nonmembers
    res = score_answers(
        model,
        tokenizer,
        [r["question"] for r in rows],
        [r["answer"] for r in rows],
        prompt_format=PROMPT_TEMPLATE,
        batch_size=32,
        max_length=256,
        vocab_stats=True,
        progress=False,
    )
    mkpp = np.array(
        [M.min_k_plus_plus(lp, mu, sg, k=0.4) for lp, mu, sg in zip(res.token_logps, res.token_mu, res.token_sigma)]
    )
    n = len(members)
    return {
        "mia_minkpp_auc": M.membership_auc(mkpp[:n], mkpp[n:]),
        "mia_loss_auc": M.membership_auc(res.avg_nll[:n], res.avg_nll[n:], higher_is_member=False),
    }


def recipe(a, num_forget: int) -> dict:
    """What every trial starts from: the published protocol's shape at this scale (module docstring)."""
    return {
        "per_device_train_batch_size": a.batch,
        "lr_scheduler_type": "linear",
        "warmup_steps": math.ceil(num_forget / a.batch),  # one epoch
        "weight_decay": 0.01,
        "max_length": 256,
        "activation_checkpointing": False,
        "logging_steps": 1000,
    }


def stored_trials(out: str, study_name: str) -> list[dict]:
    """The finished trials of a study in `out/study.db`, in the rows `tune` writes to tuning.json."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{os.path.abspath(out)}/study.db")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return [
        {"number": t.number, "params": t.params, **t.user_attrs["scores"], "seconds": t.user_attrs["seconds"]}
        for t in done
    ]


# ------------------------------------------------------------------------------------------------ attacks --


class Relearn:
    """The relearning attack of the study: NLL on a fixed `--relearn_fraction` of the forget items; the forget
    probability of the relearned and of the held-out items tracked apart."""

    def __init__(self, a, tokenizer, forget_rows, sets, retain_ratios):
        self.a, self.tokenizer, self.rows = a, tokenizer, forget_rows
        self.forget_only, self.retain_ratios = {"forget": sets["forget"]}, retain_ratios
        self.idx = select_relearn_indices(len(forget_rows), a.relearn_fraction, 0)
        self.held_out = np.ones(len(forget_rows), bool)
        self.held_out[self.idx] = False

    def evaluate(self, model):
        cols = score_tofu_sets(
            model, self.tokenizer, self.forget_only, prompt_format=PROMPT_TEMPLATE, max_length=256, progress=False
        )
        q = tofu_scores(cols, self.retain_ratios)
        prob = M.probability(cols["forget"]["avg_nll_answer"])
        return {
            "forget_probability": q["forget_probability"],
            "forget_probability_relearned": float(prob[self.idx].mean()),
            "forget_probability_held_out": float(prob[self.held_out].mean()),
            "forget_truth_ratio_held_out": float(
                M.truth_ratio_forget_score(truth_ratios(cols["forget"], "forget")[self.held_out])
            ),
            "forget_quality": q["forget_quality"],
            "ks_d": q["ks_d"],
        }

    def __call__(self, model, seed):
        curve = relearning_attack(
            model,
            self.tokenizer,
            self.rows,
            indices=self.idx,
            steps=self.a.relearn_steps,
            eval_every=max(1, self.a.relearn_steps // 5),
            learning_rate=self.a.relearn_lr_mult * self.a.finetune_lr,
            batch_size=4,
            seed=seed,
            evaluate=self.evaluate,
            prompt_format=PROMPT_TEMPLATE,
            max_length=256,
            progress=False,
        )
        return {"steps": curve.steps, **{k: curve.series(k) for k in curve.metrics[0]}}


# ---------------------------------------------------------------------------------------------------- output --


def mean_sd(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3g}" if len(v) == 1 else f"{v.mean():.3g} ± {v.std(ddof=1):.2g}"


def plot_trials(tunes, base, threshold, path):
    """Every trial of every method: forget quality and KS D against utility without ROUGE (circle: selected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    left = threshold - 0.1
    for i, (name, res) in enumerate(tunes.items()):
        rows, color, marker = res["trials"], f"C{i}", "osD^v"[i % 5]
        util = [max(r["model_utility_no_rouge"], left) for r in rows]
        ax1.scatter(util, [max(r["forget_quality"], 1e-30) for r in rows], color=color, marker=marker, alpha=0.6)
        ax2.scatter(util, [r["ks_d"] for r in rows], color=color, marker=marker, alpha=0.6, label=name)
        if res["selected"] is None:
            continue
        sel = next(r for r in rows if r["number"] == res["selected"]["trial"])
        for ax, y in ((ax1, max(sel["forget_quality"], 1e-30)), (ax2, sel["ks_d"])):
            ax.scatter(sel["model_utility_no_rouge"], y, s=180, facecolors="none", edgecolors=color, linewidths=2)
    for name, marker in (("Original", "*"), ("Retrain", "P"), ("Retrain, other seed", "X")):
        m = base[name]
        ax1.scatter(m["model_utility_no_rouge"], max(m["forget_quality"], 1e-30), color="k", marker=marker, s=110)
        ax2.scatter(m["model_utility_no_rouge"], m["ks_d"], color="k", marker=marker, s=110, label=name)
    for ax in (ax1, ax2):
        ax.axvline(threshold, color="gray", linestyle=":", label="utility floor" if ax is ax2 else None)
        ax.set_xlabel(f"model utility without ROUGE (trials below {left:.2f} drawn at {left:.2f})")
    ax1.set_yscale("log")
    ax1.set_ylabel("forget quality (KS p-value, higher is better)")
    ax2.set_ylabel("KS statistic D (lower is better)")
    ax1.set_title("tune trials (tuning seed; o: selected)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_relearn(curves: dict, retrain_prob: float, path: str):
    """The held-out forget items (the claim: do they come back?) and the relearned ones, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, key, title in (
        (axes[0], "forget_probability_held_out", "held-out forget items (not relearned)"),
        (axes[1], "forget_probability_relearned", "the relearned forget items"),
    ):
        for i, (name, runs) in enumerate(curves.items()):
            steps = runs[0]["steps"]
            y = np.array([r[key] for r in runs])
            color = "k" if name == "Retrain" else f"C{i - 1}"
            ax.plot(steps, y.mean(0), "-", marker="o", ms=3, color=color, label=name)
            if len(runs) > 1:
                ax.fill_between(steps, y.min(0), y.max(0), color=color, alpha=0.15)
        ax.axhline(retrain_prob, color="gray", linestyle="--", label="Retrain before the attack")
        ax.set_yscale("log")
        ax.set_xlabel("relearning steps")
        ax.set_title(title)
    axes[0].set_ylabel("forget probability (mean exp(-NLL))")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Relearning attack (lines: mean over report seeds; band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main --


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.figures, exist_ok=True)
    report_seeds = [int(s) for s in a.report_seeds.split(",") if s.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(REGISTRY)}")
    t_start, c_start, load_start = time.time(), time.process_time(), os.getloadavg()
    phases = {}

    def phase(name, t0, c0):
        phases[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        phases[name]["load_avg_end"] = os.getloadavg()[0]
        print(f"time: {name}: {phases[name]}", flush=True)

    t0, c0 = time.time(), time.process_time()
    rows, data_dir, retain_split = study_data(a)
    tokenizer, models, paths = train_models(a, rows)
    phase("models", t0, c0)

    # ----------------------------------------------------------------- Retrain, the ceiling, Original: in full
    t0, c0 = time.time(), time.process_time()
    reports = {}
    for name, key in (("Retrain", "retrain"), ("Retrain, other seed", "retrain_other_seed"), ("Original", "original")):
        path = os.path.join(a.out, f"report_{key}.json")
        if a.resume and os.path.isfile(path):
            reports[name] = EvalReport.load(path)
            continue
        reports[name] = evaluate_tofu(
            models[key],
            tokenizer,
            data_dir,
            split=a.split,
            retain_report=reports.get("Retrain"),
            prompt_format=PROMPT_TEMPLATE,
            batch_size=32,
            max_new_tokens=a.max_new_tokens,
            max_length=256,
            progress=False,
        )
        if name == "Retrain":  # against itself: identical truth ratios, forget quality 1 by definition
            reports[name].reference["retain_forget_truth_ratio"] = list(reports[name].per_item["forget"]["truth_ratio"])
            reports[name].metrics = reports[name].recompute()
        reports[name].save(path)
    retain_report = os.path.join(a.out, "report_retrain.json")
    scorer = TofuScorer(data_dir, a.split, tokenizer, PROMPT_TEMPLATE, reports["Retrain"])
    base = {}
    for name, key in (("Original", "original"), ("Retrain", "retrain"), ("Retrain, other seed", "retrain_other_seed")):
        quick = scorer(models[key])
        base[name] = {
            **{k: v for k, v in reports[name].metrics.items() if v is not None},
            "ks_d": quick["ks_d"],
            "model_utility_no_rouge": quick["model_utility_no_rouge"],
            **membership_aucs(models[key], tokenizer, rows["forget"], rows["holdout"]),
        }
    o, r = base["Original"], base["Retrain"]
    print(
        f"target knows the forget set? forget ROUGE-L recall {o['forget_rougeL_recall']:.3f} vs Retrain "
        f"{r['forget_rougeL_recall']:.3f}; forget probability {o['forget_probability']:.3g} vs "
        f"{r['forget_probability']:.3g}; ceiling (second Retrain vs Retrain): forget quality "
        f"{base['Retrain, other seed']['forget_quality']:.3g}, KS D {base['Retrain, other seed']['ks_d']:.3f}",
        flush=True,
    )
    if not (
        o["forget_rougeL_recall"] > r["forget_rougeL_recall"] + 0.2
        and o["forget_probability"] > 2 * r["forget_probability"]
    ):
        raise SystemExit("The target does not clearly know the forget set: train longer (--finetune_epochs).")
    phase("evaluating Original and the two Retrains", t0, c0)

    # -------------------------------------------------------------------------------- tune, equal budgets
    rule = SelectionRule(utility_floor=a.floor)
    start = recipe(a, len(rows["forget"]))
    tunes, tune_time = {}, {}
    for method in methods:
        name = get_method(method)[0]._name
        out = os.path.join(a.out, f"tune_{method}")
        done = os.path.join(out, "tuning.json")
        if a.resume and os.path.isfile(done):
            with open(done) as f:
                res = json.load(f)
            if res["study"]["finished_trials"] >= a.n_trials and res["report_seeds"] == report_seeds:
                tunes[name] = res
                print(f"{name}: reusing {done}", flush=True)
                continue
        print(f"--- tune {name}: {a.n_trials} trials", flush=True)
        t0, c0 = time.time(), time.process_time()
        try:
            tunes[name] = tune(
                method,
                paths["original"],
                data_dir,
                output_dir=out,
                forget_split=a.split,
                retain_split=retain_split,
                retain_report=retain_report,
                recipe=start,
                n_trials=a.n_trials,
                tuning_seeds=[a.tuning_seed],
                report_seeds=report_seeds,
                rule=rule,
                base_learning_rate=a.finetune_lr,
                sampler_seed=0,
                save_model_dir=os.path.join(a.out, "models", method),
                progress=True,
            )
        except NoTrialAboveFloor as e:  # an honest outcome of the budget: recorded, the method has no report row
            print(f"{name}: {e}", flush=True)
            tunes[name] = {
                "trials": stored_trials(out, f"{method}-{a.split}"),
                "selected": None,
                "no_selection": str(e),
            }
        tune_time[name] = {
            "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "trials_wall_s": round(sum(t["seconds"] for t in tunes[name]["trials"]), 1),
            "load_avg_end": os.getloadavg()[0],
        }
        print(f"time: tune {name}: {tune_time[name]}", flush=True)

    # ------------------------------------------------------ report seeds: membership and relearning attacks
    t0, c0 = time.time(), time.process_time()
    relearn = Relearn(a, tokenizer, rows["forget"], scorer.sets, scorer.retain_ratios)
    curves = {"Retrain": [relearn(models["retrain"], report_seeds[0])]}
    finals = {}
    forget_ds, retain_ds = tofu_datasets(data_dir, a.split, retain_split)
    for method, (name, res) in zip(methods, tunes.items()):
        if res["selected"] is None:
            continue
        runs = []
        attacks_path = os.path.join(a.out, f"tune_{method}", "attacks.json")  # one per method: runs may share --out
        cached = json.load(open(attacks_path)) if a.resume and os.path.isfile(attacks_path) else {}
        for full in res["report"]["full"]["per_seed"]:
            seed, key = full["seed"], f"{method} {json.dumps(res['selected']['params'], sort_keys=True)} {full['seed']}"
            if key not in cached:
                runner = Runner(method, paths["original"], forget_ds, retain_ds, tokenizer, start, a.out)
                model = unwrapped(runner.train(to_config_values(res["selected"]["params"], a.finetune_lr), seed))
                again = scorer(model)["forget_quality"]
                if abs(again - full["forget_quality"]) > 1e-9:
                    print(
                        f"warning: {name} seed {seed}: re-run gives forget quality {again:.4g}, tune's "
                        f"{full['forget_quality']:.4g} (not deterministic)",
                        flush=True,
                    )
                cached[key] = {
                    **membership_aucs(model, tokenizer, rows["forget"], rows["holdout"]),
                    "relearn": relearn(model, seed),
                    "rerun_forget_quality": again,
                }
                with open(attacks_path, "w") as f:
                    json.dump(cached, f)
            runs.append({**full, **cached[key]})
        finals[name] = runs
        curves[name] = [run["relearn"] for run in runs]
    phase("report seeds: membership and relearning", t0, c0)

    # --------------------------------------------------------------------------------------------- output
    threshold = a.floor * o["model_utility_no_rouge"]
    lines = ["| model | " + " | ".join(FINAL) + " |", "|---|" + "---|" * len(FINAL)]
    for name in base:
        lines.append(f"| {name} | " + " | ".join(f"{base[name].get(k, float('nan')):.3g}" for k in FINAL) + " |")
    for name, runs in finals.items():
        lines.append(f"| {name} | " + " | ".join(mean_sd([x[k] for x in runs]) for k in FINAL) + " |")
    n_forget = len(rows["forget"])
    trial_lines = [
        "| method | selected trial | its setting | tuning-seed FQ / utility | trials >= floor | best FQ >= floor "
        "| best FQ anywhere (its utility) | report seeds FQ (D×n) | in − out FQ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in tunes.items():
        ok = [t for t in res["trials"] if t["model_utility_no_rouge"] >= threshold]
        best = max(res["trials"], key=lambda t: t["forget_quality"])
        sel = res["selected"]
        if sel is None:
            trial_lines.append(
                f"| {name} | none reaches the floor | - | - | 0 of {len(res['trials'])} | - | "
                f"{best['forget_quality']:.3g} ({best['model_utility_no_rouge']:.3f}) | - | - |"
            )
            continue
        per_seed = ", ".join(
            f"{x['forget_quality']:.3g} ({round(x['ks_d'] * n_forget)})" for x in res["report"]["full"]["per_seed"]
        )
        trial_lines.append(
            f"| {name} | {sel['trial']} | {', '.join(f'{k} {v:.3g}' for k, v in sel['params'].items())} | "
            f"{sel['forget_quality']:.3g} / {sel['model_utility_no_rouge']:.3f} | {len(ok)} of {len(res['trials'])} "
            f"| {max(t['forget_quality'] for t in ok):.3g} | {best['forget_quality']:.3g} "
            f"({best['model_utility_no_rouge']:.3f}) | {per_seed} | "
            f"{res['report']['gap_in_minus_out'].get('forget_quality', float('nan')):+.3g} |"
        )
    steps = curves["Retrain"][0]["steps"]
    rl = ["| model | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, runs in curves.items():
        cells = [mean_sd([x["forget_probability_held_out"][j] for x in runs]) for j in range(len(steps))]
        rl.append(f"| {name} | " + " | ".join(cells) + " |")
    try:
        plot_trials(tunes, base, threshold, os.path.join(a.figures, "tofu_small_pareto.png"))
        plot_relearn(curves, r["forget_probability"], os.path.join(a.figures, "tofu_small_relearn.png"))
    except ImportError:
        print("matplotlib is not installed: no plots", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    total = {
        "wall_s": round(time.time() - t_start, 1),
        "cpu_s": round(time.process_time() - c_start, 1),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    summary = (
        f"## TOFU-small ({a.split}, trained from scratch), tuned with `tune`\n\nmachine: {machine}, {a.threads} "
        f"thread(s); total {json.dumps(total)}\n\nphases: {json.dumps(phases)}\n\ntune time per method: "
        f"{json.dumps(tune_time)}\n\nsettings: {json.dumps(vars(a))}\n\nRule: the highest forget quality with model "
        f"utility without ROUGE >= {a.floor} x Original's = {threshold:.4f}\n\n"
        f"Tuning ({a.n_trials} trials per method, tuning seed {a.tuning_seed}):\n\n"
        + "\n".join(trial_lines)
        + f"\n\nSelected settings on report seeds {report_seeds} (mean ± sd):\n\n"
        + "\n".join(lines)
        + f"\n\nRelearning: forget probability of the {int(relearn.held_out.sum())} held-out forget items (NLL on "
        f"{len(relearn.idx)} items):\n\n" + "\n".join(rl) + "\n"
    )
    print(summary, flush=True)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(
            {
                "settings": vars(a),
                "machine": machine,
                "time": total,
                "phases": phases,
                "tune_time": tune_time,
                "baselines": base,
                "finals": finals,
                "tunes": {
                    k: {x: v.get(x) for x in ("selected", "rule", "search_space", "trials", "no_selection")}
                    for k, v in tunes.items()
                },
                "relearn_retrain": curves["Retrain"],
                "relearned_items": [int(i) for i in relearn.idx],
            },
            f,
            indent=1,
        )
    return finals


if __name__ == "__main__":
    main()
