"""Seconds of the audit's three per-item costs on one model: the answer's probability, the truth ratio's paraphrased
and perturbed answers, and a greedy answer (what every clean and attacked row of `trl-unlearn audit` computes).

    python benchmarks/audit_unit_costs.py --model ~/.cache/trl_unlearn/smollm2-135m-instruct \\
        --data_dir data/tofu [--forget_split forget01] [--items 16] [--max_new_tokens 64] [--threads 1]

Printed: the seconds of each on the first `--items` forget rows (one batch of `--batch_size`), and the load average.
"""

import argparse
import os
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--forget_split", default="forget01")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from trl_unlearn.data.formats import resolve_prompt_format
    from trl_unlearn.evaluation.scoring import generate_answers, score_answers
    from trl_unlearn.evaluation.unlearning_audit import load_audit_data
    from trl_unlearn.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model, "float32", "cpu")
    rows = load_audit_data(args.data_dir, args.forget_split).forget[: args.items]
    fmt = resolve_prompt_format(tok, "auto")
    questions = [r["question"] for r in rows]
    kw = dict(prompt_format=fmt, batch_size=args.batch_size, progress=False)
    t = time.perf_counter()
    score_answers(model, tok, questions, [r["answer"] for r in rows], **kw)
    answer = time.perf_counter() - t
    qs, answers = [], []
    for r in rows:
        for a in [r["paraphrased_answer"], *r["perturbed_answer"]]:
            qs.append(r["question"])
            answers.append(a)
    t = time.perf_counter()
    score_answers(model, tok, qs, answers, **kw)
    truth_ratio = time.perf_counter() - t
    t = time.perf_counter()
    generate_answers(model, tok, questions, max_new_tokens=args.max_new_tokens, **kw)
    greedy = time.perf_counter() - t
    print(f"{len(rows)} items, {args.threads} thread(s), prompt format {fmt.name}")
    print(f"  answer probability                        {answer:6.1f} s")
    print(f"  paraphrased + perturbed ({len(qs)} sequences) {truth_ratio:6.1f} s")
    print(f"  greedy answers ({args.max_new_tokens} new tokens)            {greedy:6.1f} s")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
