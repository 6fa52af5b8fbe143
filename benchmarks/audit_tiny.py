"""Time of the full `trl-unlearn audit` on a tiny model, on CPU: every attack, with a retain model.

    python benchmarks/audit_tiny.py [--threads 2] [--out outputs/audit_tiny]

A tiny Llama (hidden 64, 2 layers) learns a synthetic TOFU-like set (`make_tofu_like`, 20 authors x 10 facts:
forget10 = 2 authors, 20 QA; retain_perturbed = 4 authors, 40 QA); the retain model learns the same set without the
forget authors; the unlearned model is the base after gradient-difference steps. The full audit (RTN 8 / 4 bits
per channel and group-wise, bitsandbytes rows skipped without CUDA, both relearning runs, every prompt probe, the
hidden-state probe and membership, for base, unlearned and retain model) then writes `--out/audit.json` and
`audit.html`. Printed: the seconds of each part (training is not part of the audit), the load average, and the
summary. The timing is of this machine only; the attacks' numbers on a model this small say nothing about real ones.
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from audit_toy import qa_batch, train, unlearn  # noqa: E402

from trl_unlearn.data.files import write_tofu_layout  # noqa: E402
from trl_unlearn.evaluation.unlearning_audit import AuditConfig, audit, load_audit_data  # noqa: E402
from trl_unlearn.toy.synthetic import FORGET_RETAIN, iter_texts, make_tofu_like  # noqa: E402
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/audit_tiny")
    p.add_argument("--train_steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = make_tofu_like(num_authors=20, questions_per_author=10, seed=0)
    # non-members for membership: the real-author questions, which no model here trains on (TOFU's holdoutNN name)
    data["holdout10"] = [{"question": r["question"], "answer": r["answer"]} for r in data["real_authors"]]
    folder = write_tofu_layout(os.path.join(args.out, "data"), data)
    tok = train_tokenizer(iter_texts(data), vocab_size=512)
    base = tiny_llama(tok, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, seed=0)
    train(base, qa_batch(tok, data["full"]), steps=args.train_steps, lr=5e-3)
    retain_model = tiny_llama(tok, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, seed=0)
    train(retain_model, qa_batch(tok, data[FORGET_RETAIN["forget10"]]), steps=args.train_steps, lr=5e-3)
    sets = load_audit_data(folder, "forget10")
    model = copy.deepcopy(base)
    unlearn(model, qa_batch(tok, sets.forget), qa_batch(tok, sets.retain), steps=15, lr=1e-3)
    setup = time.perf_counter() - t0
    report = audit(
        model,
        tok,
        base,
        sets,
        retain_model=retain_model,
        prompt_format="plain",
        config=AuditConfig(relearn_learning_rate=1e-3, group_size=32),
        output_dir=args.out,
        progress=False,
    )
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f} (1 min), torch {torch.__version__}")
    print(f"setup (data, tokenizer, training three tiny models; not part of the audit): {setup:.1f} s")
    for part, seconds in report["timings_s"].items():
        print(f"  {part:<14} {seconds:7.1f} s")
    print(f"{report['settings']['data']}; complete: {report['complete']}")
    for r in report["summary"]:
        share = r.get("max_share")
        value = ("n/a" if share is None else f"{share:.3f}") if r["status"] == "ok" else "skipped: " + r["reason"]
        print(f"  {r['attack']:>13} {r['variant']:<18} {value}")
    print(f"written: {args.out}/audit.json, audit.html")


if __name__ == "__main__":
    main()
