"""The TOFU protocol at small scale, on the real TOFU files, on CPU: a sweep that can separate methods.

    python benchmarks/tofu_small.py --data_dir ../shared/data/tofu [--out outputs/tofu_small] [--reuse_models]

1. Original / Retrain. A small Llama is trained FROM SCRATCH (no pretrained model can be loaded here) on the forget
   split (default forget01: the last 2 authors, 40 QA) + the first `--retain_authors` retain authors (20: exactly the
   authors of TOFU's `retain_perturbed` evaluation set) + the Real Authors and World Facts QA (taught to both models,
   so model utility measures whether unlearning kept trained knowledge); "Retrain" is the same without the forget
   split. Both are saved in `--out` (`--reuse_models` loads them). The script checks that the target really knows
   the forget set, otherwise the study would measure nothing.
2. Sweep (seed `--seeds[0]`). Unlearning follows the published protocol's shape (`docs/method.md` §3): lr = lr_mult x
   the fine-tuning lr (the published one equals the fine-tuning lr), warm-up one epoch then linear decay, weight decay
   0.01, one forget and one retain row per item, batch = the fine-tuning batch; GA, GradDiff, NPO (β 0.1, forget
   weight 1) and SimNPO (γ 0) over lr_mult x epochs, and for SimNPO also β x forget weight (the paper's forget01/05
   weight 0.1375, and 1). Every point is scored WITHOUT generation: forget probability and truth ratio, forget
   quality with its KS statistic D, and model utility from the 6 numbers that need no generation
   (`model_utility_no_rouge`).
3. Each method's best point: the highest forget quality with utility (without ROUGE) >= `--floor` x Original's.
   It is then evaluated in full (seed `--seeds[0]`, greedy answers, ROUGE-L, TOFU's 9-number model utility); if
   its full utility falls below `--floor` x Original's full utility, the next point in the ranking is tried (at
   most `--full_checks` per method), so the chosen point keeps the utility TOFU defines.
4. Final points: each chosen point re-run with every seed of `--seeds`, evaluated with the full TOFU metrics,
   membership-inference AUC (Min-K%++ and LOSS: forget QA as
   members, QA of retain authors that no model saw as non-members; Retrain's AUC is the target), and a relearning
   attack (NLL on `--relearn_fraction` of the forget set; Retrain attacked too, as the from-scratch reference).
Writes sweep.jsonl and finals.jsonl (one line per run, so `--resume` continues a stopped run), results.json,
summary.md and the Pareto and relearning PNGs (`--figures`).
"""

import argparse
import copy
import importlib.util
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
from trl_unlearn.cli.train import METHODS
from trl_unlearn.data.files import load_tofu_split
from trl_unlearn.data.formats import PROMPT_TEMPLATE, qa_to_trl
from trl_unlearn.evaluation import EvalReport, evaluate_tofu
from trl_unlearn.evaluation.relearn import relearning_attack, select_relearn_indices
from trl_unlearn.evaluation.scoring import score_answers
from trl_unlearn.evaluation.tofu import load_tofu_eval_sets, score_tofu_sets, truth_ratios
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer
from trl_unlearn.tuning.selection import SelectionRule, rank
from trl_unlearn.tuning.study import tofu_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("tofu_example", os.path.join(ROOT, "examples", "tofu.py"))
EX = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(EX)  # the example's helpers
ks_test, mean_sd = EX.ks_test, EX.mean_sd


def rank_under_floor(points, floor, utility="model_utility_no_rouge", score="forget_quality"):
    """`tune`'s selection rule (`trl_unlearn.tuning.selection.rank`) with an absolute utility floor: the points with
    `utility >= floor`, best first (highest `score`, then higher utility, then the earlier point)."""
    rows = [{**p, "number": i} for i, p in enumerate(points)]
    rule = SelectionRule(utility_floor=1.0, score=score, utility=utility)
    return [points[r["number"]] for r in rank(rows, rule, floor)]


def score_without_generation(
    model, tokenizer, sets, retain_ratios=None, prompt_format="plain", batch_size=32, max_length=256
):
    """`tune`'s scores without generation (`trl_unlearn.tuning.study.tofu_scores`) plus the per-item forget truth
    ratios and probabilities (lists: `forget_truth_ratios`, `forget_probabilities`)."""
    cols = score_tofu_sets(
        model,
        tokenizer,
        sets,
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
    )
    out = tofu_scores(cols, retain_ratios)
    out["forget_truth_ratios"] = truth_ratios(cols["forget"], "forget").tolist()
    out["forget_probabilities"] = M.probability(cols["forget"]["avg_nll_answer"]).tolist()
    return out


RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
NAMES = {m: cls._name for m, (cls, _) in METHODS.items()}
FINAL = [
    "forget_quality",
    "ks_d",
    "model_utility",
    "model_utility_no_rouge",
    "forget_rougeL_recall",
    "forget_probability",
    "retain_rougeL_recall",
    "mia_minkpp_auc",
    "mia_loss_auc",
]


def floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of TOFU's JSON-lines files")
    p.add_argument("--out", default="outputs/tofu_small")
    p.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"), help="where the PNGs go")
    p.add_argument("--split", default="forget01")
    p.add_argument("--retain_authors", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--finetune_epochs", type=int, default=25)
    p.add_argument("--finetune_lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=16, help="fine-tuning batch; unlearning: this many forget + retain")
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo")
    p.add_argument("--lr_mults", default="0.1,0.2,0.5,1", help="unlearning lr as multiples of --finetune_lr")
    p.add_argument("--epochs", default="5,10", help="unlearning epochs (published: 10)")
    p.add_argument("--npo_beta", type=float, default=0.1)
    p.add_argument("--simnpo_betas", default="2.5,4.5")
    p.add_argument("--simnpo_forget_weights", default="0.1375,1")
    p.add_argument("--floor", type=float, default=0.95, help="keep points with utility >= floor x Original's")
    p.add_argument(
        "--full_checks",
        type=int,
        default=5,
        help="per method, at most this many sweep points (best first) evaluated in full to find one whose "
        "full model utility also reaches the floor",
    )
    p.add_argument("--seeds", default="0,1,2", help="unlearning seeds; the sweep uses the first")
    p.add_argument("--relearn_fraction", type=float, default=0.1)
    p.add_argument("--relearn_steps", type=int, default=30)
    p.add_argument("--relearn_lr_mult", type=float, default=0.1, help="relearning lr, x --finetune_lr")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and fine-tuning")
    p.add_argument(
        "--reuse_models",
        action="store_true",
        help="load Original/Retrain (and the tokenizer) saved in --out by an earlier run instead of training",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the sweep points in --out/sweep.jsonl and the saved Original/Retrain reports",
    )
    return p.parse_args(argv)


def grid(a) -> list[dict]:
    """The sweep's points, method by method: lr_mult x epochs (x β x forget weight for SimNPO)."""
    points = []
    for method in a.methods.split(","):
        if method == "simnpo":
            extra = [
                {"beta": b, "forget_weight": w} for b in floats(a.simnpo_betas) for w in floats(a.simnpo_forget_weights)
            ]
        else:
            extra = [{"beta": a.npo_beta if method == "npo" else None, "forget_weight": 1.0}]
        for epochs in [int(e) for e in floats(a.epochs)]:
            for mult in floats(a.lr_mults):
                points += [{"method": method, "lr_mult": mult, "epochs": epochs, **x} for x in extra]
    return points


def key(point: dict, seed: int) -> str:
    return json.dumps([point[k] for k in ("method", "lr_mult", "epochs", "beta", "forget_weight")] + [seed])


def finetune(model, tokenizer, rows, a, out):
    args = SFTConfig(
        output_dir=out,
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
        seed=a.seed,
        disable_tqdm=True,
    )
    set_seed(a.seed)
    SFTTrainer(model=model, args=args, train_dataset=qa_to_trl(rows), processing_class=tokenizer).train()
    return model.eval()


def unlearn(point, seed, target, tokenizer, forget, retain, a):
    """One unlearning run in the published protocol's shape (module docstring); returns the unlearned model."""
    method = point["method"]
    trainer_cls, config_cls = METHODS[method]
    kw = {"beta": point["beta"]} if method in ("npo", "simnpo") else {}
    config = config_cls(
        output_dir=os.path.join(a.out, "unlearn"),
        num_train_epochs=point["epochs"],
        per_device_train_batch_size=a.batch,
        learning_rate=point["lr_mult"] * a.finetune_lr,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(len(forget) / a.batch),
        weight_decay=0.01,
        forget_weight=point["forget_weight"],
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        activation_checkpointing=False,
        max_length=256,
        seed=seed,
        disable_tqdm=True,
        **kw,
    )
    trainer = trainer_cls(
        model=copy.deepcopy(target).train(),
        args=config,
        forget_dataset=forget,
        retain_dataset=retain if method != "gradascent" else None,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.model.eval()


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


def d_lattice(d: float, n: int) -> str:
    return f"{d:.3f} ({round(d * n)}/{n})"


def plot_pareto(sweep, base, chosen, rejected, floor, path, n, colors):
    """Forget quality and KS D against utility for every sweep point (circled: chosen; crossed: rejected on the full
    utility); points far below the floor (utility < floor - 0.1) are drawn at the left edge as "<"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    left = floor - 0.1
    clipped = 0
    for i, method in enumerate(dict.fromkeys(p["method"] for p in sweep)):
        pts = [p for p in sweep if p["method"] == method]
        color, marker = colors[NAMES[method]], "osD^v"[i % 5]
        for inside in (True, False):
            sub = [p for p in pts if (p["model_utility_no_rouge"] >= left) == inside]
            mu = [max(p["model_utility_no_rouge"], left) for p in sub]
            clipped += 0 if inside else len(sub)
            style = dict(
                color=color, marker=marker if inside else "<", alpha=0.6, label=NAMES[method] if inside else None
            )
            ax1.scatter(mu, [max(p["forget_quality"], 1e-30) for p in sub], **style)
            ax2.scatter(mu, [p["ks_d"] for p in sub], **style)
        for r in rejected.get(method, []):
            ax1.scatter(r["model_utility_no_rouge"], max(r["forget_quality"], 1e-30), s=120, marker="x", color="k")
            ax2.scatter(r["model_utility_no_rouge"], r["ks_d"], s=120, marker="x", color="k")
        c = chosen.get(method)
        if c is not None:
            ax1.scatter(
                c["model_utility_no_rouge"],
                max(c["forget_quality"], 1e-30),
                s=180,
                facecolors="none",
                edgecolors=color,
                linewidths=2,
            )
            ax2.scatter(
                c["model_utility_no_rouge"], c["ks_d"], s=180, facecolors="none", edgecolors=color, linewidths=2
            )
    for name, m, marker in [("Original", base["Original"], "*"), ("Retrain", base["Retrain"], "P")]:
        ax1.scatter(
            m["model_utility_no_rouge"], max(m["forget_quality"], 1e-30), color="k", marker=marker, s=120, label=name
        )
        ax2.scatter(m["model_utility_no_rouge"], m["ks_d"], color="k", marker=marker, s=120, label=name)
    for ax in (ax1, ax2):
        ax.axvline(floor, color="gray", linestyle=":", label="utility floor")
        ax.set_xlabel("model utility without ROUGE (higher is better)")
        if clipped:
            ax.text(0.01, 0.01, f"<: {clipped} points with utility < {left:.2f}", transform=ax.transAxes, fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("forget quality, KS p-value (higher is better)")
    ax2.set_ylabel(f"KS statistic D (lower is better; steps of 1/{n})")
    ax1.set_title("Sweep: forget quality vs utility (o: chosen, x: rejected)")
    ax2.set_title("Sweep: KS D vs utility")
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_relearn(curves: dict, retrain_prob: float, path: str, colors):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for name, runs in curves.items():
        steps = runs[0]["steps"]
        unseen = np.array([r["forget_probability_unseen"] for r in runs])
        relearned = np.array([r["forget_probability_relearned"] for r in runs])
        color = colors.get(name, "k")
        ax.plot(steps, unseen.mean(0), "-", marker="o", ms=3, color=color, label=f"{name}: items not relearned")
        ax.plot(steps, relearned.mean(0), ":", color=color, label=f"{name}: the relearned items")
        if len(runs) > 1:
            ax.fill_between(steps, unseen.min(0), unseen.max(0), color=color, alpha=0.15)
    ax.axhline(retrain_prob, color="gray", linestyle="--", label="Retrain before the attack")
    ax.set_yscale("log")
    ax.set_xlabel("relearning steps")
    ax.set_ylabel("forget probability (mean exp(-NLL))")
    ax.set_title("Relearning attack (lines: mean over seeds; band: min-max)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.figures, exist_ok=True)
    seeds = [int(s) for s in floats(a.seeds)]
    t_start, c_start, load_start = time.time(), time.process_time(), os.getloadavg()
    phases = {}

    def phase(name, t0, c0):
        phases[name] = {
            "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "load_avg_end": os.getloadavg()[0],
        }
        print(
            f"time: {name}: {phases[name]['wall_s']:.0f} s wall, {phases[name]['cpu_s']:.0f} s CPU, "
            f"load {phases[name]['load_avg_end']:.1f}",
            flush=True,
        )

    # ---------------------------------------------------------------------------------- data, Original, Retrain
    forget_rows = load_tofu_split(a.data_dir, a.split)
    retain_all = load_tofu_split(a.data_dir, RETAIN_OF[a.split])
    retain_rows = retain_all[: 20 * a.retain_authors]  # TOFU: 20 QA per author, authors in order
    holdout_rows = retain_all[20 * a.retain_authors : 20 * a.retain_authors + len(forget_rows)]  # seen by no model
    extra = load_tofu_split(a.data_dir, "real_authors") + load_tofu_split(a.data_dir, "world_facts")
    saved = {name: os.path.join(a.out, name.lower()) for name in ("Original", "Retrain")}
    reuse = a.reuse_models and all(os.path.isfile(os.path.join(d, "config.json")) for d in saved.values())
    t0, c0 = time.time(), time.process_time()
    if reuse:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(saved["Original"])
        models = {n: AutoModelForCausalLM.from_pretrained(d).eval() for n, d in saved.items()}
        print(f"loaded Original and Retrain from {a.out}", flush=True)
    else:
        eval_texts = []
        for stem in [f"{a.split}_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]:
            for r in load_tofu_split(a.data_dir, stem):
                eval_texts += [r["question"], r["answer"], r.get("paraphrased_answer", "")] + list(
                    r["perturbed_answer"]
                )
        train_texts = [
            PROMPT_TEMPLATE.format(question=r["question"]) + " " + r["answer"]
            for r in forget_rows + retain_rows + extra
        ]
        tokenizer = train_tokenizer(train_texts + eval_texts, vocab_size=a.vocab)
        models = {}
        for name, rows in [("Original", forget_rows + retain_rows + extra), ("Retrain", retain_rows + extra)]:
            model = tiny_llama(
                tokenizer, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4, seed=a.seed
            )
            models[name] = finetune(model, tokenizer, rows, a, saved[name])
            model.save_pretrained(saved[name])
            tokenizer.save_pretrained(saved[name])
            print(
                f"trained {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {len(rows)} QA",
                flush=True,
            )
        phase("training Original and Retrain", t0, c0)
    print(
        f"data: forget {len(forget_rows)}, retain {len(retain_rows)}, real_authors+world_facts {len(extra)}, "
        f"holdout {len(holdout_rows)}; tokenizer vocab {len(tokenizer)}",
        flush=True,
    )

    def full_eval(model, retain_report=None):
        return evaluate_tofu(
            model.eval(),
            tokenizer,
            a.data_dir,
            split=a.split,
            retain_report=retain_report,
            prompt_format=PROMPT_TEMPLATE,
            batch_size=32,
            max_new_tokens=a.max_new_tokens,
            max_length=256,
            progress=False,
        )

    t0, c0 = time.time(), time.process_time()
    reports = {}
    for name in ("Retrain", "Original"):
        path = os.path.join(a.out, f"report_{name.lower()}.json")
        if a.resume and os.path.isfile(path):
            reports[name] = EvalReport.load(path)
            continue
        reports[name] = full_eval(models[name], reports.get("Retrain"))
        if name == "Retrain":  # against itself: identical truth ratios, forget quality 1 by definition
            reports[name].reference["retain_forget_truth_ratio"] = list(reports[name].per_item["forget"]["truth_ratio"])
            reports[name].metrics = reports[name].recompute()
        reports[name].save(path)
    retain_ratios = reports["Retrain"].reference["retain_forget_truth_ratio"]
    n = len(retain_ratios)
    sets = load_tofu_eval_sets(a.data_dir, a.split)
    score = lambda m: score_without_generation(m, tokenizer, sets, retain_ratios, PROMPT_TEMPLATE)  # noqa: E731
    base = {}
    for name in ("Original", "Retrain"):
        quick = score(models[name])
        base[name] = {
            **reports[name].metrics,
            "ks_d": quick["ks_d"],
            "model_utility_no_rouge": quick["model_utility_no_rouge"],
            **membership_aucs(models[name], tokenizer, forget_rows, holdout_rows),
        }
    o, r = base["Original"], base["Retrain"]
    print(
        f"target knows the forget set? forget ROUGE-L recall {o['forget_rougeL_recall']:.3f} vs Retrain "
        f"{r['forget_rougeL_recall']:.3f}; forget probability {o['forget_probability']:.3f} vs "
        f"{r['forget_probability']:.3f}",
        flush=True,
    )
    if not (
        o["forget_rougeL_recall"] > r["forget_rougeL_recall"] + 0.2
        and o["forget_probability"] > 2 * r["forget_probability"]
    ):
        raise SystemExit("The target does not clearly know the forget set: train longer (--finetune_epochs).")
    floor = a.floor * o["model_utility_no_rouge"]
    phase("evaluating Original and Retrain", t0, c0)

    # ------------------------------------------------------------------------------------------------- sweep
    forget, retain = qa_to_trl(forget_rows), qa_to_trl(retain_rows)
    sweep_path = os.path.join(a.out, "sweep.jsonl")
    done = {}
    if a.resume and os.path.isfile(sweep_path):
        for line in open(sweep_path):
            p = json.loads(line)
            done[key(p, p["seed"])] = p
    elif os.path.isfile(sweep_path):
        os.remove(sweep_path)
    points = grid(a)
    print(
        f"sweep: {len(points)} points (seed {seeds[0]}), {sum(key(p, seeds[0]) in done for p in points)} "
        f"already done; utility floor {floor:.4f} = {a.floor} x Original's {o['model_utility_no_rouge']:.4f} "
        f"(no ROUGE)",
        flush=True,
    )
    t0, c0 = time.time(), time.process_time()
    sweep = []
    for i, point in enumerate(points):
        k = key(point, seeds[0])
        if k not in done:
            t = time.time()
            m = score(unlearn(point, seeds[0], models["Original"], tokenizer, forget, retain, a))
            done[k] = {
                **point,
                "seed": seeds[0],
                **{x: v for x, v in m.items() if not isinstance(v, list)},
                "wall_s": round(time.time() - t, 1),
            }
            with open(sweep_path, "a") as f:
                f.write(json.dumps(done[k]) + "\n")
            p = done[k]
            print(
                f"[{i + 1}/{len(points)}] {NAMES[p['method']]} lr x{p['lr_mult']:g} {p['epochs']} ep"
                + (f" β {p['beta']:g}" if p["beta"] is not None else "")
                + f" fw {p['forget_weight']:g}: "
                f"FQ {p['forget_quality']:.3g} D {d_lattice(p['ks_d'], n)} MU6 {p['model_utility_no_rouge']:.4f} "
                f"forget prob {p['forget_probability']:.3g} ({p['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        sweep.append(done[k])
    phase(f"sweep ({len(sweep)} points)", t0, c0)

    # ------------------------------------------------------------------------------------ final (best) points
    t0, c0 = time.time(), time.process_time()
    idx = select_relearn_indices(len(forget_rows), a.relearn_fraction, 0)
    forget_only = {"forget": sets["forget"]}

    def relearn_eval(m):
        q = score_without_generation(m, tokenizer, forget_only, retain_ratios, PROMPT_TEMPLATE)
        prob = np.array(q["forget_probabilities"])
        unseen = np.ones(len(prob), bool)
        unseen[idx] = False
        return {
            "forget_probability": q["forget_probability"],
            "forget_probability_relearned": float(prob[idx].mean()),
            "forget_probability_unseen": float(prob[unseen].mean()),
            "forget_quality": q["forget_quality"],
            "ks_d": q["ks_d"],
        }

    def attack(model, seed):
        c = relearning_attack(
            model,
            tokenizer,
            forget_rows,
            indices=idx,
            steps=a.relearn_steps,
            eval_every=max(1, a.relearn_steps // 5),
            learning_rate=a.relearn_lr_mult * a.finetune_lr,
            batch_size=4,
            seed=seed,
            evaluate=relearn_eval,
            prompt_format=PROMPT_TEMPLATE,
            max_length=256,
            progress=False,
        )
        return {"steps": c.steps, **{k: c.series(k) for k in c.metrics[0]}}

    curves = {"Retrain": [attack(models["Retrain"], seeds[0])]}  # no unlearning seed: one curve
    finals_path = os.path.join(a.out, "finals.jsonl")
    finals_done = {}
    if a.resume and os.path.isfile(finals_path):
        for line in open(finals_path):
            run = json.loads(line)
            finals_done[run["key"]] = run
    elif os.path.isfile(finals_path):
        os.remove(finals_path)

    def final_run(point, seed):
        """One final point and seed: full TOFU evaluation, membership AUCs, relearning (cached in finals.jsonl)."""
        k = key(point, seed)
        if k not in finals_done:
            model = unlearn(point, seed, models["Original"], tokenizer, forget, retain, a)
            quick = score(model)
            report = full_eval(model, reports["Retrain"])
            tag = "_".join(
                f"{x}{point[x]:g}" for x in ("lr_mult", "epochs", "beta", "forget_weight") if point[x] is not None
            )
            report.save(os.path.join(a.out, f"report_{point['method']}_{tag}_seed{seed}.json"))
            run = {
                "key": k,
                "seed": seed,
                **report.metrics,
                "ks_d": quick["ks_d"],
                "model_utility_no_rouge": quick["model_utility_no_rouge"],
                **membership_aucs(model, tokenizer, forget_rows, holdout_rows),
                "relearn": attack(model, seed),
            }
            if seed == seeds[0] and abs(quick["forget_quality"] - point["forget_quality"]) > 1e-9:
                print(
                    f"warning: {NAMES[point['method']]} seed {seed} re-run gives FQ {quick['forget_quality']:.4g}, "
                    f"the sweep {point['forget_quality']:.4g} (not deterministic)",
                    flush=True,
                )
            with open(finals_path, "a") as f:
                f.write(json.dumps(run) + "\n")
            finals_done[k] = run
            print(f"{NAMES[point['method']]} seed {seed}: " + ", ".join(f"{x} {run[x]:.3g}" for x in FINAL), flush=True)
        return finals_done[k]

    full_floor = a.floor * o["model_utility"]
    chosen, rejected, finals = {}, {}, {}
    for method in a.methods.split(","):
        ranked = rank_under_floor([p for p in sweep if p["method"] == method], floor, utility="model_utility_no_rouge")
        for point in ranked[: a.full_checks]:
            full = final_run(point, seeds[0])["model_utility"]
            if full >= full_floor:
                chosen[method] = point
                break
            rejected.setdefault(method, []).append({**point, "full_model_utility": full})
            print(
                f"{NAMES[method]}: {key(point, seeds[0])} keeps utility {point['model_utility_no_rouge']:.4f} without "
                f"ROUGE but its full model utility {full:.4f} < {full_floor:.4f}: next point",
                flush=True,
            )
        if method not in chosen:
            print(
                f"{NAMES[method]}: none of its {min(len(ranked), a.full_checks)} best points under the floor keeps "
                f"the full model utility >= {full_floor:.4f}; no final point",
                flush=True,
            )
            continue
        finals[method] = [final_run(chosen[method], seed) for seed in seeds]
        curves[NAMES[method]] = [r["relearn"] for r in finals[method]]
    phase(f"final points ({len(chosen)} methods x {len(seeds)} seeds, with relearning and MIA)", t0, c0)

    # ------------------------------------------------------------------------------------------------ output
    setting = lambda p: (
        f"lr {p['lr_mult']:g}x ({p['lr_mult'] * a.finetune_lr:.2g}), {p['epochs']} ep"  # noqa: E731
        + (f", β {p['beta']:g}" if p["beta"] is not None else "")
        + f", fw {p['forget_weight']:g}"
    )
    rejected_lines = (
        "".join(
            f"- {NAMES[m]}: {setting(p)} was first by the rule, but its full model utility (seed "
            f"{seeds[0]}) is {p['full_model_utility']:.4f} < {full_floor:.4f}\n"
            for m, ps in rejected.items()
            for p in ps
        )
        or "- none\n"
    )
    lines = ["| model | setting | " + " | ".join(FINAL) + " | FQ per seed |", "|---|---|" + "---|" * (len(FINAL) + 1)]
    for name in ("Original", "Retrain"):
        lines.append(f"| {name} | - | " + " | ".join(f"{base[name][k]:.3g}" for k in FINAL) + " | - |")
    for method, runs in finals.items():
        lines.append(
            f"| {NAMES[method]} | {setting(chosen[method])} | "
            + " | ".join(mean_sd([r[k] for r in runs]) for k in FINAL)
            + " | "
            + ", ".join(f"{r['forget_quality']:.2g}" for r in runs)
            + " |"
        )
    final_table = "\n".join(lines)
    rejected_keys = {key(r, 0) for rs in rejected.values() for r in rs}
    sweep_lines = [
        "| method | lr_mult | epochs | β | fw | FQ | D | MU6 | forget prob | forget TR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sweep:
        mark = "**" if chosen.get(p["method"]) is p else "~~" if key(p, 0) in rejected_keys else ""
        beta = "-" if p["beta"] is None else f"{p['beta']:g}"
        sweep_lines.append(
            f"| {mark}{NAMES[p['method']]}{mark} | {p['lr_mult']:g} | {p['epochs']} | {beta} | "
            f"{p['forget_weight']:g} | {p['forget_quality']:.3g} | {d_lattice(p['ks_d'], n)} | "
            f"{p['model_utility_no_rouge']:.4f} | {p['forget_probability']:.3g} | {p['forget_truth_ratio']:.3f} |"
        )
    sweep_table = "\n".join(sweep_lines)
    steps = curves["Retrain"][0]["steps"]
    rl = ["| model | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, runs in curves.items():
        rl.append(
            f"| {name} | "
            + " | ".join(mean_sd([r["forget_probability_unseen"][j] for r in runs]) for j in range(len(steps)))
            + " |"
        )
    relearn_table = "\n".join(rl)

    colors = {NAMES[m]: f"C{i}" for i, m in enumerate(a.methods.split(","))}
    try:
        plot_pareto(sweep, base, chosen, rejected, floor, os.path.join(a.figures, "tofu_small_pareto.png"), n, colors)
        plot_relearn(
            curves, base["Retrain"]["forget_probability"], os.path.join(a.figures, "tofu_small_relearn.png"), colors
        )
    except ImportError:
        print("matplotlib is not installed: no plots", flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{a.threads} thread(s)"
    )
    total = {
        "wall_s": round(time.time() - t_start, 1),
        "cpu_s": round(time.process_time() - c_start, 1),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    summary = (
        f"## TOFU-small ({a.split}, trained from scratch)\n\nmachine: {machine}; wall {total['wall_s'] / 60:.1f} "
        f"min, CPU {total['cpu_s'] / 60:.1f} min, load average (1/5/15 min) at start {load_start}, at end "
        f"{total['load_avg_end']}\n\nphases: {json.dumps(phases)}\n\nsettings: {json.dumps(vars(a))}\n\n"
        f"Utility floors: {floor:.4f} = {a.floor} x Original's model utility without ROUGE (sweep); "
        f"{full_floor:.4f} = {a.floor} x Original's full model utility (check of the chosen points).\n\n"
        f"Points first by the rule but rejected on the full utility:\n{rejected_lines}\n"
        f"Best point per method, seeds {seeds} (mean ± sd):\n\n{final_table}\n\n"
        f"Relearning attack: forget probability of the {len(forget_rows) - len(idx)} forget items NOT relearned "
        f"(NLL on {len(idx)} items, lr {a.relearn_lr_mult * a.finetune_lr:.2g}, batch 4):\n\n{relearn_table}\n\n"
        f"Sweep (seed {seeds[0]}, no generation; chosen points in bold, rejected ones struck through):\n\n"
        f"{sweep_table}\n"
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
                "floor": floor,
                "floor_full": full_floor,
                "baselines": base,
                "sweep": sweep,
                "chosen": chosen,
                "rejected": rejected,
                "finals": finals,
                "relearn_retrain": curves["Retrain"],
            },
            f,
            indent=1,
        )
    return finals


if __name__ == "__main__":
    main()
