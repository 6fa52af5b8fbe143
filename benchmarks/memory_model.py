"""Per-GPU memory of an unlearning step, from formulas: a 7B Llama under ZeRO-2, ZeRO-3 and QLoRA, for SimNPO, NPO
with a live reference and NPO with precomputed reference log-probs; and a check of the same formulas against the
peak RSS of small fp32 Llamas trained on this CPU.

    python benchmarks/memory_model.py                 # the 7B table (markdown)
    python benchmarks/memory_model.py --json          # the same numbers as JSON
    python benchmarks/memory_model.py --check   # predicted vs measured, small Llamas on CPU (~8 min on 2 busy cores)

Notation: P parameters, L layers, h hidden, i intermediate, V vocabulary, kv = key/value width (h without GQA),
b rows per micro-batch (b_f forget + b_r retain), s tokens per row, n = b·s tokens, N data-parallel ranks,
e bytes per activation element (2 for bf16, 4 for fp32), c rows per LM-head tile (256).

Weights, gradients, optimizer (mixed precision as in the ZeRO paper, Rajbhandari et al. 2020: bf16 weights and
gradients, fp32 master weights + Adam m + v = 12 bytes/param of optimizer state):
    ZeRO-2: weights 2P, gradients 2P/N, optimizer 12P/N      ZeRO-3: 2P/N, 2P/N, 12P/N
    QLoRA (no sharding; every rank holds the model): transformer linears in 4-bit, 0.5 bytes/param; embeddings and
    LM head kept in bf16; LoRA adapters (rank r on q, k, v, o, gate, up, down) in fp32: weights 4, gradients 4,
    AdamW 8 bytes per adapter param.
    fp32 single process (the CPU check): weights 4P, gradients 4P, AdamW 8P.
Reference model (NPO):
    live `ref_model`: a second copy of the weights: 2P under ZeRO-2 (TRL prepares the reference with ZeRO disabled,
    i.e. replicated), 2P/N under ZeRO-3; with PEFT the reference is the base with adapters off: 0. Plus the working
    set of its no-grad forward on the b_f forget rows: one layer's activations for b_f·s tokens.
    precomputed: one float per forget row.
Activations (saved for backward), per token and per layer, for a Llama with SDPA/flash attention (no s² term) and
no dropout; derived by listing the tensors autograd keeps:
    2 RMSNorms x (fp32 copy of the input 4h + normalized e·h + weighted e·h)        = 2·(4 + 2e)·h
    attention: q and k after RoPE, v, the attention output, o_proj's input          = e·(3h + 2kv)
    SwiGLU MLP: gate output, SiLU output, up output, down_proj's input              = 4e·i
    per layer a_layer = 2(4 + 2e)h + e(3h + 2kv) + 4e·i bytes per token
    (bf16: 26h + 8i with kv = h; fp32: 44h + 16i. For comparison, Korthikanti et al. 2022 give 34·h bytes per token
    per layer for a bf16 GPT block with flash attention, i.e. without the 5·a·s/h term.)
    head input: final RMSNorm (4 + 2e)h + the scored rows' copy e·h, per token
    no checkpointing:        n·(L·a_layer + (4 + 3e)h)
    checkpointing per layer: n·(L·e·h + a_layer + (4 + 3e)h)   (each layer's input, plus one layer recomputed)
LM-head logits:
    naive (full logits): the fp32 log-softmax of both forwards is saved (4 bytes per token per vocab entry), and the
    backward of one half builds its fp32 gradient pair (2 x 4 bytes over half the tokens) and its cast to the
    weight dtype: n·V·(8 + e/2 if e < 4 else 8) bytes.
    chunked (the trainers, `ops.chunked_token_logps`): one [c, V] fp32 tile (+ one in the matmul dtype when e < 4);
    when the head is trained in bf16 the backward also holds an fp32 [V, h] accumulator of the head's gradient:
    c·V·4 (+ c·V·e + 4·V·h if e < 4 and the head is trained).
Total = weights + gradients + optimizer + reference + activations + logits. This is a plain sum: in a real step the
gradients grow while the activations are freed, so it is an upper bound on the peak (see the check).
Not counted: ZeRO communication buckets and ZeRO-3's gathered-parameter working set (up to
`stage3_max_live_parameters`), the CUDA context and allocator fragmentation, LoRA dropout's copies of its inputs.
"""

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace

GiB, MiB = 2**30, 2**20
TILE_ROWS = 512  # trl_unlearn.kernels.token_logps.DEFAULT_CHUNK_SIZE


@dataclass
class Shape:
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32
    seq: int = 512
    forget_rows: int = 4
    retain_rows: int = 4

    @property
    def kv(self):
        return self.hidden // self.heads * self.kv_heads

    @property
    def rows(self):
        return self.forget_rows + self.retain_rows

    @property
    def tokens(self):
        return self.rows * self.seq


def linear_params(s: Shape) -> int:
    h, i = s.hidden, s.intermediate
    return s.layers * (2 * h * h + 2 * h * s.kv + 3 * h * i)


def num_params(s: Shape) -> int:
    """Llama with untied embeddings: linears + 2 RMSNorms per layer + final norm + embeddings + LM head."""
    return linear_params(s) + s.layers * 2 * s.hidden + s.hidden + 2 * s.vocab * s.hidden


def lora_params(s: Shape, r: int) -> int:
    """Rank-r LoRA on q, k, v, o, gate, up, down: r·(in + out) per adapted linear."""
    h, i, kv = s.hidden, s.intermediate, s.kv
    return s.layers * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))


def layer_activation_bytes(s: Shape, e: int) -> int:
    """Bytes saved for backward per token per decoder layer (see the module docstring)."""
    h = s.hidden
    return 2 * (4 + 2 * e) * h + e * (3 * h + 2 * s.kv) + 4 * e * s.intermediate


def head_input_bytes(s: Shape, e: int) -> int:
    return (4 + 3 * e) * s.hidden


def activation_bytes(s: Shape, e: int, checkpointing: bool, tokens: int | None = None) -> int:
    n = s.tokens if tokens is None else tokens
    layer = layer_activation_bytes(s, e)
    if checkpointing:
        return n * (s.layers * e * s.hidden + layer + head_input_bytes(s, e))
    return n * (s.layers * layer + head_input_bytes(s, e))


def logits_bytes(
    s: Shape, e: int, naive: bool, head_trained: bool = True, tokens: int | None = None, scored: int | None = None
) -> int:
    n = s.tokens if tokens is None else tokens
    if naive:
        return n * s.vocab * (8 + (e / 2 if e < 4 else 0))
    c = min(TILE_ROWS, n if scored is None else scored)
    out = c * s.vocab * 4
    if e < 4:
        out += c * s.vocab * e + (4 * s.vocab * s.hidden if head_trained else 0)
    return out


def ref_working_set(s: Shape, e: int, tokens_f: int | None = None) -> int:
    """A no-grad reference forward on the forget rows: one layer's activations + one LM-head tile."""
    n = s.forget_rows * s.seq if tokens_f is None else tokens_f
    return n * layer_activation_bytes(s, e) + min(TILE_ROWS, n) * s.vocab * 4


METHODS = {"simnpo": "SimNPO", "npo_live": "NPO, live reference", "npo_pre": "NPO, precomputed reference"}
SETUPS = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "qlora": "QLoRA"}


def components(s: Shape, setup: str, method: str, gpus: int = 8, lora_rank: int = 32) -> dict:
    """Per-GPU bytes of each component for `setup` in {zero2, zero3, qlora} and `method` in METHODS (bf16)."""
    e, P = 2, num_params(s)
    if setup in ("zero2", "zero3"):
        weights = 2 * P if setup == "zero2" else 2 * P / gpus
        grads, optim = 2 * P / gpus, 12 * P / gpus
        ref_weights = 2 * P if setup == "zero2" else 2 * P / gpus
        head_trained = True
    elif setup == "qlora":
        lin, lora = linear_params(s), lora_params(s, lora_rank)
        weights = 0.5 * lin + 2 * (P - lin) + 4 * lora
        grads, optim = 4 * lora, 8 * lora
        ref_weights = 0  # the base model with the adapters disabled
        head_trained = False
    else:
        raise ValueError(setup)
    if method == "simnpo":
        ref = 0
    elif method == "npo_live":
        ref = ref_weights + ref_working_set(s, e)
    elif method == "npo_pre":
        ref = 4 * s.forget_rows
    else:
        raise ValueError(method)
    out = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "reference": ref,
        "activations": activation_bytes(s, e, checkpointing=False),
        "activations_ckpt": activation_bytes(s, e, checkpointing=True),
        "logits_naive": logits_bytes(s, e, naive=True, head_trained=head_trained),
        "logits_chunked": logits_bytes(s, e, naive=False, head_trained=head_trained),
    }
    static = weights + grads + optim + ref
    out["total_naive"] = static + out["activations"] + out["logits_naive"]
    out["total_chunked"] = static + out["activations"] + out["logits_chunked"]
    out["total_chunked_ckpt"] = static + out["activations_ckpt"] + out["logits_chunked"]
    return out


COLUMNS = [
    ("weights", "weights"),
    ("gradients", "grads"),
    ("optimizer", "optimizer"),
    ("reference", "reference"),
    ("activations", "activations"),
    ("activations_ckpt", "activations, ckpt"),
    ("logits_naive", "logits naive"),
    ("logits_chunked", "logits chunked"),
    ("total_naive", "total naive, no ckpt"),
    ("total_chunked", "total chunked, no ckpt"),
    ("total_chunked_ckpt", "total chunked, ckpt"),
]


def table_7b(args):
    s = Shape(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        seq=args.seq,
        forget_rows=args.forget_rows,
        retain_rows=args.retain_rows,
    )
    rows = []
    for setup in SETUPS:
        for method in METHODS:
            rows.append(
                {
                    "setup": setup,
                    "method": method,
                    **components(s, setup, method, gpus=args.gpus, lora_rank=args.lora_rank),
                }
            )
    return s, rows


def print_7b(args):
    s, rows = table_7b(args)
    if args.json:
        print(
            json.dumps(
                {
                    "shape": asdict(s),
                    "params": num_params(s),
                    "lora_params": lora_params(s, args.lora_rank),
                    "gpus": args.gpus,
                    "unit": "bytes",
                    "rows": rows,
                },
                indent=1,
            )
        )
        return
    P = num_params(s)
    print(
        f"Llama: L={s.layers}, h={s.hidden}, i={s.intermediate}, V={s.vocab}, {P / 1e9:.2f}B parameters; "
        f"micro-batch {s.forget_rows} forget + {s.retain_rows} retain rows x {s.seq} tokens; bf16 activations; "
        f"ZeRO over {args.gpus} GPUs; QLoRA r={args.lora_rank} ({lora_params(s, args.lora_rank) / 1e6:.1f}M adapter "
        f"parameters). GiB per GPU."
    )
    print(
        f"Per token per layer: {layer_activation_bytes(s, 2) / 1024:.0f} KiB of activations (Korthikanti et al.'s "
        f"34·h: {34 * s.hidden / 1024:.0f} KiB)"
    )
    print()
    print("| setup | method | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = " | ".join(f"{r[k] / GiB:.2f}" for k, _ in COLUMNS)
        print(f"| {SETUPS[r['setup']]} | {METHODS[r['method']]} | {cells} |")


# --------------------------------------------------------------------------------------------------- CPU check --
CHECK_SIZES = {
    "S": Shape(layers=2, hidden=256, intermediate=688, vocab=32000, heads=4, kv_heads=4),
    "M": Shape(layers=4, hidden=512, intermediate=1376, vocab=32000, heads=8, kv_heads=8),
    "L": Shape(layers=8, hidden=768, intermediate=2048, vocab=32000, heads=12, kv_heads=12),
}
CHECK_VARIANTS = ("simnpo", "npo_live", "npo_pre", "naive_simnpo")


def predict_fp32(s: Shape, variant: str, answer: int) -> dict:
    """fp32, single process: the static part (weights, AdamW, reference) and the step part (gradients, activations,
    logits) as `components` counts them. `answer`: scored tokens per row (the answer + EOS)."""
    e, P = 4, num_params(s)
    n = s.tokens
    static = 4 * P + 8 * P + (4 * P if variant in ("npo_live", "naive_npo") else 0)
    naive = variant.startswith("naive")
    step = {
        "gradients": 4 * P,
        "activations": activation_bytes(s, e, checkpointing=False, tokens=n),
        "logits": logits_bytes(s, e, naive=naive, tokens=n, scored=s.rows * answer),
        "reference": ref_working_set(s, e, tokens_f=s.forget_rows * s.seq) if variant == "npo_live" else 0,
    }
    return {"static": static, "step": sum(step.values()), **step}


def run_check(args):
    here = os.path.dirname(os.path.abspath(__file__))
    prompt, answer = args.check_prompt, args.check_answer
    seq = prompt + answer + 1  # + EOS
    print(
        f"fp32, 1 process, {args.threads} torch thread(s); every row {prompt} prompt + {answer} answer + EOS = {seq} "
        f"tokens, 4 forget + 4 retain rows ({8 * seq} tokens per step); naive padded to {seq} (no extra padding); "
        f"gradient checkpointing off; 1 warm-up + {args.check_steps} measured steps per process."
    )
    print(
        "measured static = RSS before a step (after gc + malloc_trim) minus RSS before the model was created; "
        "measured step = the step's peak RSS minus its start; total = the larger sum over steps."
    )
    print()
    print(
        "| size (L/h/i/V, params) | variant | predicted static MiB | measured static MiB | ratio "
        "| predicted step MiB (grads/act/logits/ref) | measured step MiB | ratio | predicted total MiB "
        "| measured total MiB | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.check_sizes.split(","):
        s = replace(CHECK_SIZES[name], seq=seq)
        for variant in args.check_variants.split(","):
            cmd = [
                sys.executable,
                os.path.join(here, "train_step.py"),
                "--worker",
                variant,
                "--layers",
                str(s.layers),
                "--hidden",
                str(s.hidden),
                "--heads",
                str(s.heads),
                "--intermediate",
                str(s.intermediate),
                "--vocab",
                str(s.vocab),
                "--batch",
                "4",
                "--max-length",
                str(seq),
                "--prompt-len",
                f"{prompt},{prompt}",
                "--answer-len",
                f"{answer},{answer}",
                "--steps",
                str(args.check_steps),
                "--warmup",
                "1",
                "--seed",
                "0",
                "--threads",
                str(args.threads),
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                print(f"| {name} | {variant} | failed |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            steps = r["steps"]
            meas = {
                "static": max(x["start"] for x in steps),
                "step": max(x["peak"] for x in steps),
                "total": max(x["start"] + x["peak"] for x in steps),
            }
            pred = predict_fp32(s, variant, answer + 1)
            pred["total"] = pred["static"] + pred["step"]
            results.append(
                {
                    "size": name,
                    "shape": asdict(s),
                    "params": num_params(s),
                    "variant": variant,
                    "predicted": pred,
                    "measured": meas,
                }
            )
            parts = "/".join(f"{pred[k] / MiB:.0f}" for k in ("gradients", "activations", "logits", "reference"))
            print(
                f"| {name}: {s.layers}/{s.hidden}/{s.intermediate}/{s.vocab}, {num_params(s) / 1e6:.0f}M | {variant} "
                f"| {pred['static'] / MiB:.0f} | {meas['static'] / MiB:.0f} | {meas['static'] / pred['static']:.2f} "
                f"| {pred['step'] / MiB:.0f} ({parts}) | {meas['step'] / MiB:.0f} "
                f"| {meas['step'] / pred['step']:.2f} "
                f"| {pred['total'] / MiB:.0f} | {meas['total'] / MiB:.0f} | {meas['total'] / pred['total']:.2f} |",
                flush=True,
            )
    if args.check_json:
        with open(args.check_json, "w") as f:
            json.dump(results, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the 7B table as JSON (bytes)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--forget-rows", type=int, default=4)
    parser.add_argument("--retain-rows", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--check", action="store_true", help="predicted vs measured on small fp32 Llamas (CPU)")
    parser.add_argument("--check-sizes", default="S,M,L", help=f"of {','.join(CHECK_SIZES)}")
    parser.add_argument("--check-variants", default=",".join(CHECK_VARIANTS))
    parser.add_argument("--check-prompt", type=int, default=40)
    parser.add_argument("--check-answer", type=int, default=87)
    parser.add_argument("--check-steps", type=int, default=2)
    parser.add_argument("--check-json", default=None, help="write the check's raw numbers here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.check:
        run_check(args)
    else:
        print_7b(args)


if __name__ == "__main__":
    main()
