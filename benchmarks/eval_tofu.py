"""Time a TOFU evaluation batched (length-grouped shared batches) vs item by item (batch size 1, file order).

Both runs use the same tiny Llama and the same synthetic TOFU-layout folder (a few hundred answers), in one process,
and must give the same per-item values. Prints the machine and a table with the speed-up.

    python benchmarks/eval_tofu.py [--num_authors 20] [--questions_per_author 10] [--batch_size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.evaluation import evaluate_tofu  # noqa: E402
from trl_unlearn.toy.synthetic import iter_texts, make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}, load average {load:.1f} at start"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_authors", type=int, default=20)
    ap.add_argument("--questions_per_author", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--hidden_size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each mode (best and median are shown)")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: a tiny model's matmuls are too small to split, and on a shared "
        "machine OpenMP barriers then dominate both runs; 0 = torch's default)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    data = make_tofu_like(num_authors=args.num_authors, questions_per_author=args.questions_per_author, seed=0)
    folder = write_tofu_layout(tempfile.mkdtemp(prefix="eval_tofu_bench_"), data)
    tokenizer = train_tokenizer(list(iter_texts(data)), vocab_size=512)
    model = tiny_llama(tokenizer, hidden_size=args.hidden_size, num_hidden_layers=2).eval()
    sets = ("forget10_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
    n_items = sum(len(data[s]) for s in sets)
    n_answers = sum(1 + ("paraphrased_answer" in r) + len(r["perturbed_answer"]) for s in sets for r in data[s])

    def run(batch_size: int, grouped: bool):
        t = time.perf_counter()
        report = evaluate_tofu(
            model, tokenizer, folder, split="forget10", batch_size=batch_size, max_new_tokens=args.max_new_tokens,
            group_by_length=grouped, progress=False,
        )  # fmt: skip
        return time.perf_counter() - t, report

    run(args.batch_size, True)  # warm-up (first-call costs of torch / tokenizers)
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(args.repeat):  # interleaved, so a burst of load on a shared machine hits both
        t, batched = run(args.batch_size, True)
        times["batched"].append(t)
        t, single = run(1, False)
        times["single"].append(t)

    def col(report, s, c):
        return np.asarray(report.per_item[s][c], dtype=float)

    nll_diff = max(
        float(np.max(np.abs(col(batched, s, c) - col(single, s, c))))
        for s in batched.per_item
        for c in ("avg_nll_answer", "truth_ratio")
    )
    sets_ = list(batched.per_item)
    same_generations = all(batched.per_item[s]["generation"] == single.per_item[s]["generation"] for s in sets_)

    print(f"machine: {machine()}")
    print(
        f"data: synthetic TOFU layout, {n_items} questions, {n_answers} scored answers, {n_items} greedy "
        f"generations of {args.max_new_tokens} new tokens; tiny Llama hidden {args.hidden_size}, 2 layers, "
        f"vocab {len(tokenizer)}"
    )
    best = {k: min(v) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    rows = [
        ("item by item (batch 1, file order)", "single"),
        (f"batched (batch {args.batch_size}, length-grouped)", "batched"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"full evaluate_tofu, best / median of {args.repeat} runs each:")
    print(f"{'mode'.ljust(w)}  {'best s':>8}  {'median s':>8}  {'speed-up (best)':>15}")
    print(f"{'-' * w}  {'-' * 8}  {'-' * 8}  {'-' * 15}")
    for name, key in rows:
        ratio = best["single"] / best[key]
        print(f"{name.ljust(w)}  {best[key]:8.2f}  {median[key]:8.2f}  {ratio:14.1f}x")
    print(
        f"same results: max |diff| of per-item NLL / truth ratio {nll_diff:.1e}, "
        f"identical generations: {same_generations}"
    )


if __name__ == "__main__":
    main()
