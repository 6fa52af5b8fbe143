"""Benchmark the LM head + unlearning loss: forward + backward of a SimNPO loss from final hidden states.

Every variant computes the same loss from the same inputs: B sequences of T - 1 scored rows each (labels all valid),
per-sequence summed label log-probs, SimNPO (beta 2.5) averaged over the B sequences.
  naive  full logits -> fp32 log_softmax -> gather (`trl_unlearn.kernels.token_logps.naive_token_logps`), then the loss
  trl    `trl.kernels.ChunkedLogProbFunction`, called as `trl.trainer.utils.add_fused_lm_head` calls it off-Triton
  ours   `trl_unlearn.kernels.token_logps.chunked_token_logps` (per-token log-probs; the head is recomputed in backward)
  fused  `trl_unlearn.kernels.sequence_loss.fused_linear_sequence_loss` (the loss and its gradients in the forward pass)

Each (variant, shape, dtype, device) runs in a fresh subprocess: on CPU the peak is `ru_maxrss` minus the resident set
after the inputs are allocated; on CUDA it is `max_memory_allocated` minus the allocated memory at that point. Both
include the gradients of hidden and weight (which every variant must return); the "excl. grads" column subtracts them.
Time is the median wall time of forward + backward after one warm-up call; the process CPU time is shown in
parentheses, as it is less disturbed than wall time when other jobs share the machine (each worker runs 1 torch thread
unless `--threads` says otherwise). `--dtype bf16` makes hidden
and weight bf16 tensors (no autocast). `--frozen-head` leaves the weight without gradient (the LoRA case).

    python benchmarks/loss_head.py                       # the default table (fp32 CPU; + bf16 CUDA if available)
    python benchmarks/loss_head.py --shapes 4x512x1024x128256 --variants ours,fused --chunk-size 512 --repeats 2
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_SHAPES = "4x512x1024x32000,4x512x1024x128256"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """Run one variant in this (fresh) process and print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import trl.trainer.utils  # noqa: F401  (imported before the baseline: every variant pays the same imports)
    from trl.kernels import ChunkedLogProbFunction

    from trl_unlearn import losses
    from trl_unlearn.kernels.sequence_loss import fused_linear_sequence_loss
    from trl_unlearn.kernels.tiles import DEFAULT_CHUNK_SIZE
    from trl_unlearn.kernels.token_logps import chunked_token_logps, naive_token_logps

    trl_chunk = getattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    our_chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    B, T, H, V = (int(x) for x in args.shape.split("x"))
    N = B * (T - 1)  # hidden[:, :-1] flattened: every next-token position is scored
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])

    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, device=device, dtype=dtype).mul_(0.02).requires_grad_(not args.frozen_head)
    labels = torch.randint(0, V, (N,), device=device)

    def seq_loss(seq_logps):  # SimNPO, mean over the B sequences
        return losses.simnpo_loss(seq_logps, torch.tensor(float(T - 1)), beta=2.5) / B

    def from_token_logps(logp):
        return seq_loss(logp.view(B, T - 1).sum(-1)).sum()

    if args.worker == "naive":

        def loss():
            return from_token_logps(naive_token_logps(hidden, weight, labels))
    elif args.worker == "trl":

        def loss():
            # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
            out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, trl_chunk, None, 1.0, ("log_probs",))
            return from_token_logps(out[0])
    elif args.worker == "ours":

        def loss():
            return from_token_logps(chunked_token_logps(hidden, weight, labels, chunk_size=our_chunk))
    else:

        def loss():
            return fused_linear_sequence_loss(hidden, weight, labels, [T - 1] * B, seq_loss, chunk_rows=our_chunk)[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, cpu_times = [], []
    for i in range(args.repeats + 1):  # the first call is a warm-up (its memory counts, its time does not)
        t0, c0 = time.perf_counter(), time.process_time()
        loss().backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        hidden.grad = weight.grad = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grads = (N * H + (0 if args.frozen_head else V * H)) * hidden.element_size()
    print(
        json.dumps(
            {
                "times": times,
                "cpu_times": cpu_times,
                "peak": peak,
                "grads": grads,
                "chunk": trl_chunk if args.worker == "trl" else None if args.worker == "naive" else our_chunk,
            }
        )
    )


def run_variant(args, variant, shape, dtype, device):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--shape",
        shape,
        "--dtype",
        dtype,
        "--device",
        device,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.frozen_head:
        cmd.append("--frozen-head")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxTxHxV (N = B*(T-1) rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variants' processes round-robin this many times (median over all repeats, max "
        "peak): evens out load from other processes on a shared machine",
    )
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp32,bf16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cpu,cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--variants", default="naive,trl,ours,fused")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per tile for ours and fused (default: the ops' 512)"
    )
    parser.add_argument("--frozen-head", action="store_true", help="LM head without gradient (LoRA training)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (0: torch's default). 1 by default: on a shared machine the CPU "
        "time of one thread measures the work",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    devices = args.device.split(",") if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants = args.variants.split(",")
    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} torch thread(s) per worker, repeats={args.repeats}, rounds={args.rounds}"
        f"{', frozen head' if args.frozen_head else ''}, load average at start {os.getloadavg()[0]:.2f}"
    )
    header = (
        "| device | dtype | B x T x H x V | variant | chunk | median s (CPU s) | peak MiB | excl. grads MiB "
        "| peak vs naive | excl. grads vs naive | time vs naive (CPU) | time vs TRL (CPU) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for device in devices:
        dtypes = args.dtype.split(",") if args.dtype else (["fp32"] if device == "cpu" else ["bf16"])
        for dtype in dtypes:
            for shape in args.shapes.split(","):
                res = {v: None for v in variants}
                for _ in range(args.rounds):
                    for v in variants:
                        r = run_variant(args, v, shape, dtype, device)
                        if r is None or res[v] is False:  # failed (the error went to stderr)
                            res[v] = False
                        elif res[v] is None:
                            res[v] = r
                        else:
                            res[v]["times"] += r["times"]
                            res[v]["cpu_times"] += r["cpu_times"]
                            res[v]["peak"] = max(res[v]["peak"], r["peak"])
                for r in res.values():
                    if r:
                        r["time"] = statistics.median(r["times"])
                        r["cpu"] = statistics.median(r["cpu_times"])
                        r["work"] = r["peak"] - r["grads"]
                for v, r in res.items():
                    if not r:
                        print(f"| {device} | {dtype} | {shape} | {v} | failed |")
                        continue

                    def ratio(other, key, key2=None):
                        o = res.get(other)
                        if not o or o[key] <= 0:
                            return "-"
                        return f"{r[key] / o[key]:.2f}x" + (f" ({r[key2] / o[key2]:.2f}x)" if key2 else "")

                    print(
                        f"| {device} | {dtype} | {shape.replace('x', ' x ')} | {v} | {r['chunk'] or '-'} "
                        f"| {r['time']:.2f} ({r['cpu']:.2f}) | {r['peak'] / 2**20:.0f} | {r['work'] / 2**20:.0f} "
                        f"| {ratio('naive', 'peak')} | {ratio('naive', 'work')} | {ratio('naive', 'time', 'cpu')} "
                        f"| {ratio('trl', 'time', 'cpu')} |",
                        flush=True,
                    )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
