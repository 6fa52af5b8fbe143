"""Benchmark the full-vocabulary unlearning losses (UNDIAL, CE-U, PDU): forward + backward from final hidden states,
fused (`trl_unlearn.kernels.vocab_loss.fused_vocab_loss`, tile by tile, gradients in the forward) against the naive
full-logits autograd version of the same loss (`naive_vocab_loss`: `[N, V]` logits, log-softmax, the target
distribution, autograd).

Every variant computes the same loss from the same inputs: N scored forget rows (hidden `[N, H]`, a trainable head
`[V, H]`; UNDIAL also a frozen teacher's hidden states `[N, H]` and head), each row weighted 1/N. Each (kind, variant)
runs in a fresh subprocess, launched by this one run, interleaved over `--rounds`: the peak is `ru_maxrss` minus the
resident set once the inputs exist (CUDA: `max_memory_allocated` minus the allocated memory then), and includes the
gradients of hidden and weight that every variant returns. Time: the median wall time of forward + backward after one
warm-up call, the process CPU time in parentheses (less disturbed by other jobs). Each worker runs `--threads` torch
threads (1 by default: the CPU time of one thread measures the work on a shared machine). The ratios compare each
fused run with the naive run of the same kind measured in the same invocation; the load average is printed at the
start and at the end.

    python benchmarks/vocab_loss.py                                   # N = 1024, H = 1024, V = 128256, fp32 CPU
    python benchmarks/vocab_loss.py --shape 2048x2048x128256 --kinds undial --device cuda --dtype bf16
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """Run one (kind, variant) in this fresh process and print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from trl_unlearn.kernels.vocab_loss import VocabTeacher, fused_vocab_loss, naive_vocab_loss

    N, H, V = (int(x) for x in args.shape.split("x"))
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, device=device, dtype=dtype).mul_(0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    row_weights = torch.full((N,), 1.0 / N, device=device)
    teacher = None
    if args.kind == "undial":
        teacher = VocabTeacher(torch.randn(N, H, device=device, dtype=dtype), weight.detach().clone())
    kw = dict(kind=args.kind, num_forget=N, beta=10.0, teacher=teacher)
    if args.variant == "naive":

        def loss():
            return naive_vocab_loss(hidden, weight, labels, row_weights, **kw)[0]
    else:

        def loss():
            return fused_vocab_loss(hidden, weight, labels, row_weights, chunk_rows=args.chunk_rows, **kw)[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, cpu_times, values = [], [], []
    for i in range(args.repeats + 1):  # the first call is a warm-up (its memory counts, its time does not)
        t0, c0 = time.perf_counter(), time.process_time()
        value = loss()
        value.backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        values.append(value.item())
        hidden.grad = weight.grad = None
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak": peak, "loss": values[0]}))


def run(args, kind, variant):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--kind",
        kind,
        "--variant",
        variant,
        "--shape",
        args.shape,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--chunk-rows",
        str(args.chunk_rows),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x1024x128256", help="NxHxV: scored rows, hidden size, vocabulary")
    parser.add_argument("--kinds", default="undial,ceu,pdu")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all processes (median, max peak)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-rows", type=int, default=512, help="rows per tile of the fused op (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(
        f"torch {torch.__version__}, {args.threads} torch thread(s) per worker, {args.device} {args.dtype}, "
        f"N x H x V = {args.shape}, chunk_rows={args.chunk_rows}, repeats={args.repeats}, rounds={args.rounds}, "
        f"load average at start {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)"
    )
    print("| kind | variant | median s (CPU s) | peak MiB | loss | peak vs naive | time vs naive (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        res = {"naive": None, "fused": None}
        for _ in range(args.rounds):
            for variant in res:
                r = run(args, kind, variant)
                if r is None or res[variant] is False:
                    res[variant] = False
                elif res[variant] is None:
                    res[variant] = r
                else:
                    res[variant]["times"] += r["times"]
                    res[variant]["cpu_times"] += r["cpu_times"]
                    res[variant]["peak"] = max(res[variant]["peak"], r["peak"])
        for variant, r in res.items():
            if not r:
                print(f"| {kind} | {variant} | failed |")
                continue
            r["time"], r["cpu"] = statistics.median(r["times"]), statistics.median(r["cpu_times"])
            naive = res["naive"]
            ratios = "| - | -"
            if naive and variant != "naive":
                ratios = (
                    f"| {r['peak'] / naive['peak']:.2f}x | {r['time'] / naive['time']:.2f}x "
                    f"({r['cpu'] / naive['cpu']:.2f}x)"
                )
            print(
                f"| {kind} | {variant} | {r['time']:.2f} ({r['cpu']:.2f}) | {r['peak'] / 2**20:.0f} "
                f"| {r['loss']:.4f} {ratios} |",
                flush=True,
            )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
