"""The TOFU protocol at small scale, on the real TOFU files, on CPU.

    python benchmarks/tofu_small.py --data_dir ../shared/data/tofu [--out outputs/tofu_small]

A small Llama is trained FROM SCRATCH (no pretrained model can be loaded here) on:
- target ("Original"): the forget split (default forget01: the last 2 authors, 40 QA) + the first
  `--retain_authors` retain authors (20 by default: exactly the authors of TOFU's `retain_perturbed` evaluation
  set) + the Real Authors and World Facts QA (a model trained from scratch knows only what it is taught, so these
  are taught to both models: model utility then measures whether unlearning kept trained knowledge);
- "Retrain": the same without the forget split.
The target is then unlearned with GA, GradDiff, NPO and SimNPO (forget = the forget split, retain = the retain
authors), every model is evaluated with the package's TOFU metrics (forget quality against Retrain), and each
unlearned model is put through a relearning attack (fine-tuning on 10% of the forget split). The script first checks
that the target really knows the forget set (ROUGE-L recall and probability well above Retrain's), otherwise the
study would measure nothing. Prints tables; writes reports, curves and PNGs to `--out`.
"""

import argparse
import copy
import json
import os
import platform
import time

import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from trl_unlearn.evaluation import evaluate_tofu
from trl_unlearn.evaluation.relearn import plot_relearn_curves, relearning_attack
from trl_unlearn.data import PROMPT_TEMPLATE, load_tofu_split, qa_to_trl
from trl_unlearn.tiny import tiny_llama, train_tokenizer
from trl_unlearn.cli.train import METHODS

RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
SHOWN = ["forget_quality", "model_utility", "forget_rougeL_recall", "forget_probability", "retain_rougeL_recall",
         "retain_probability", "real_authors_rougeL_recall", "world_facts_rougeL_recall"]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of TOFU's JSON-lines files")
    p.add_argument("--out", default="outputs/tofu_small")
    p.add_argument("--split", default="forget01")
    p.add_argument("--retain_authors", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--finetune_epochs", type=int, default=25)
    p.add_argument("--finetune_lr", type=float, default=3e-3)
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo")
    p.add_argument("--unlearn_epochs", type=int, default=5)
    p.add_argument("--unlearn_lr", type=float, default=2e-4)
    p.add_argument("--npo_beta", type=float, default=0.1)
    p.add_argument("--simnpo_beta", type=float, default=2.5)
    p.add_argument("--relearn_fraction", type=float, default=0.1)
    p.add_argument("--relearn_steps", type=int, default=30)
    p.add_argument("--relearn_lr", type=float, default=2e-4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse_models", action="store_true",
                   help="load Original/Retrain (and the tokenizer) saved in --out by an earlier run instead of training")
    return p.parse_args()


def finetune(model, tokenizer, rows, epochs, lr, seed, out):
    args = SFTConfig(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=lr,
                     lr_scheduler_type="cosine", warmup_steps=0.05, use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=100, gradient_checkpointing=False, completion_only_loss=True,
                     max_length=256, seed=seed, disable_tqdm=True)
    set_seed(seed)
    SFTTrainer(model=model, args=args, train_dataset=qa_to_trl(rows), processing_class=tokenizer).train()
    return model.eval()


def evaluate(model, tokenizer, a, retain_report=None):
    return evaluate_tofu(model.eval(), tokenizer, a.data_dir, split=a.split, retain_report=retain_report,
                         prompt_format=PROMPT_TEMPLATE, batch_size=32, max_new_tokens=a.max_new_tokens,
                         max_length=256, progress=False)


def unlearn(method, target, tokenizer, forget, retain, a, out):
    trainer_cls, config_cls = METHODS[method]
    kw = {"beta": a.npo_beta} if method == "npo" else {"beta": a.simnpo_beta} if method == "simnpo" else {}
    config = config_cls(output_dir=out, num_train_epochs=a.unlearn_epochs, per_device_train_batch_size=8,
                        learning_rate=a.unlearn_lr, lr_scheduler_type="constant", use_cpu=True, bf16=False,
                        report_to=[], save_strategy="no", logging_steps=10, gradient_checkpointing=False,
                        max_length=256, seed=a.seed, disable_tqdm=True, **kw)
    trainer = trainer_cls(model=copy.deepcopy(target).train(), args=config, forget_dataset=forget,
                          retain_dataset=retain if method != "gradascent" else None, processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval()


def table(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(SHOWN) + " |", "|---|" + "---|" * len(SHOWN)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if m.get(k) is None else f"{m[k]:.3g}" for k in SHOWN) + " |")
    return "\n".join(lines)


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    forget_rows = load_tofu_split(a.data_dir, a.split)
    retain_all = load_tofu_split(a.data_dir, RETAIN_OF[a.split])
    retain_rows = retain_all[: 20 * a.retain_authors]  # TOFU: 20 QA per author, authors in order
    extra = load_tofu_split(a.data_dir, "real_authors") + load_tofu_split(a.data_dir, "world_facts")
    eval_texts = []
    for stem in [f"{a.split}_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]:
        for r in load_tofu_split(a.data_dir, stem):
            eval_texts += [r["question"], r["answer"], r.get("paraphrased_answer", "")] + list(r["perturbed_answer"])
    train_texts = [PROMPT_TEMPLATE.format(question=r["question"]) + " " + r["answer"]
                   for r in forget_rows + retain_rows + extra]
    saved = {name: os.path.join(a.out, name.lower()) for name in ("Original", "Retrain")}
    reuse = a.reuse_models and all(os.path.isfile(os.path.join(d, "config.json")) for d in saved.values())
    if reuse:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(saved["Original"])
    else:
        tokenizer = train_tokenizer(train_texts + eval_texts, vocab_size=a.vocab)
    sizes = {"forget": len(forget_rows), "retain": len(retain_rows), "real_authors+world_facts": len(extra)}
    print(f"data: {sizes}; tokenizer vocab {len(tokenizer)}", flush=True)

    models = {}
    for name, rows in [("Original", forget_rows + retain_rows + extra), ("Retrain", retain_rows + extra)]:
        if reuse:
            models[name] = AutoModelForCausalLM.from_pretrained(saved[name]).eval()
            print(f"loaded {name} from {saved[name]}", flush=True)
            continue
        t = time.time()
        model = tiny_llama(tokenizer, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                           seed=a.seed)
        models[name] = finetune(model, tokenizer, rows, a.finetune_epochs, a.finetune_lr, a.seed,
                                os.path.join(a.out, name.lower()))
        print(f"trained {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {len(rows)} QA "
              f"in {time.time() - t:.0f}s", flush=True)
        model.save_pretrained(saved[name])
        tokenizer.save_pretrained(saved[name])

    reports = {"Retrain": evaluate(models["Retrain"], tokenizer, a)}
    retain_report = reports["Retrain"]
    retain_report.reference["retain_forget_truth_ratio"] = list(retain_report.per_item["forget"]["truth_ratio"])
    retain_report.metrics = retain_report.recompute()
    reports["Original"] = evaluate(models["Original"], tokenizer, a, retain_report)
    o, r = reports["Original"].metrics, reports["Retrain"].metrics
    print(f"target knows the forget set? forget ROUGE-L recall {o['forget_rougeL_recall']:.3f} vs Retrain "
          f"{r['forget_rougeL_recall']:.3f}; forget probability {o['forget_probability']:.3f} vs "
          f"{r['forget_probability']:.3f}", flush=True)
    if not (o["forget_rougeL_recall"] > r["forget_rougeL_recall"] + 0.2 and o["forget_probability"] > 2 * r["forget_probability"]):
        raise SystemExit("The target does not clearly know the forget set: train longer (--finetune_epochs).")

    forget = qa_to_trl(forget_rows)
    retain = qa_to_trl(retain_rows)
    curves = {}
    for method in a.methods.split(","):
        t = time.time()
        model = unlearn(method, models["Original"], tokenizer, forget, retain, a, os.path.join(a.out, f"unlearn_{method}"))
        name = METHODS[method][0]._name
        reports[name] = evaluate(model, tokenizer, a, retain_report)
        reports[name].save(os.path.join(a.out, f"report_{method}.json"))
        print(f"{name}: unlearned and evaluated in {time.time() - t:.0f}s; " + ", ".join(
            f"{k} {reports[name].metrics[k]:.3g}" for k in SHOWN[:4]), flush=True)
        curves[name] = relearning_attack(
            model, tokenizer, forget_rows, fraction=a.relearn_fraction, steps=a.relearn_steps,
            eval_every=max(1, a.relearn_steps // 5), learning_rate=a.relearn_lr, batch_size=4, seed=a.seed,
            prompt_format=PROMPT_TEMPLATE, max_new_tokens=a.max_new_tokens, max_length=256, progress=False,
        )
        curves[name].save(os.path.join(a.out, f"relearn_{method}.json"))
    for name, report in reports.items():
        report.save(os.path.join(a.out, f"report_{name.lower()}.json"))

    results = table({k: v.metrics for k, v in reports.items()})
    relearn_lines = ["| method | " + " | ".join(f"step {s}" for s in next(iter(curves.values())).steps) + " |",
                     "|---|" + "---|" * len(next(iter(curves.values())).steps)]
    for name, c in curves.items():
        relearn_lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c.series("forget_probability")) + " |")
    relearn = "\n".join(relearn_lines)
    try:
        plot_relearn_curves(curves, "forget_probability", path=os.path.join(a.out, "relearn_forget_probability.png"),
                            reference=reports["Retrain"].metrics["forget_probability"])
    except ImportError:
        pass
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} threads"
    summary = (f"## TOFU-small ({a.split}, trained from scratch)\n\nmachine: {machine}; wall time "
               f"{(time.time() - t0) / 60:.1f} min\n\nsettings: {json.dumps(vars(a))}\n\n{results}\n\n"
               f"Relearning attack (forget probability of the whole forget split, fine-tuning on "
               f"{a.relearn_fraction:.0%} of it):\n\n{relearn}\n")
    print(summary, flush=True)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(summary)


if __name__ == "__main__":
    main()
