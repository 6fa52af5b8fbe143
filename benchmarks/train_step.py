"""Benchmark one full optimizer step (forward + backward + grad clipping + AdamW) of the unlearning trainers against
a naive implementation in the style of the reference code.

Variants (the same Llama, the same seeded TOFU-like data: prompt 15-25 tokens, answer 20-60 tokens plus EOS;
4 forget + 4 retain rows per step):
  simnpo        `SimNPOTrainer`
  npo_live      `NPOTrainer` with `ref_model=` (a second copy of the initial model, run on the forget rows each step)
  npo_pre       `NPOTrainer` default: no `ref_model`, no PEFT, so the forget-set reference log-probs are precomputed
                 once when the trainer is built (setup, not timed)
  naive_simnpo  written here: separate forget and retain forwards, every row padded to `--max-length`, full
                 `(B, T, V)` fp32 logits -> log_softmax -> gather, SimNPO on the forget rows + token-mean NLL on retain
  naive_npo     the same with NPO: a live reference forward (no grad, full logits too) on the forget rows
  naive_simnpo_dyn  (extra, for attribution) naive_simnpo with rows padded to the longest row of their own forward
                 instead of `--max-length`: what is left is the gain of the single forward + chunked LM head alone
  chunked_simnpo  written here, the trainer's loss path without the trainer: ONE forward over the 4 forget + 4
                 retain rows padded to the longest of the 8, the backbone's hidden states at the scored positions,
                 per-token log-probs from `ops.chunked_token_logps` (head recomputed in backward), SimNPO + retain
                 NLL normalised as the trainer does
  fused_simnpo   the same with `fused_loss.fused_linear_sequence_loss`: the loss and its gradients in the forward
  sft            TRL's `SFTTrainer` (completion-only loss, its fused LM head) over exactly the rows of
                 chunked_simnpo / fused_simnpo: the same 8 rows per step, in order, padded the same way

Trainer variants (simnpo, npo_*, sft) run `trainer.train()` for `--warmup + --steps` optimizer steps; a callback
times each step from `on_step_begin` to `on_step_end`, i.e. `training_step` (forward + backward) + grad clipping +
`optimizer.step()` + scheduler + `zero_grad`, not the data loading that precedes it. The naive and by-hand variants
run the same sequence with the optimizer the trainer would build (`Trainer.get_optimizer_cls_and_kwargs`: fused
AdamW) and `max_grad_norm=1.0` clipping. All run fp32, without gradient checkpointing (pass
`--gradient-checkpointing` to turn it on everywhere); the naive variants call the model without `labels` (passing
them, as Trainer-based unlearning code usually does, adds the model's own cross-entropy over the full logits: the
naive numbers here are, if anything, flattering).

Memory: each variant runs in a fresh subprocess. Before each step the process calls `gc.collect()` and glibc's
`malloc_trim(0)`, records its resident set (the step baseline: weights, reference, AdamW states, allocator and
library state) and resets the kernel's peak-RSS counter (`/proc/self/clear_refs`); "step peak" is the peak RSS during
the step minus that baseline (gradients, activations, logits, temporaries). The first (warm-up) step allocates the
AdamW states and is not reported. "static" is the step baseline minus the RSS right before the model was created, and
"total" is static + step peak. Times (wall clock and the process's CPU time) are medians over all timed steps of all
rounds; each process runs 1 torch thread by default (`--threads`), so that the CPU time measures the work even when
other jobs load the machine.

    python benchmarks/train_step.py                      # the default table (5-9 minutes on 2 busy cores)
    python benchmarks/train_step.py --rounds 2           # interleave the variants twice (noisy machines; twice as long)
    python benchmarks/train_step.py --layers 2 --hidden 256 --heads 4 --intermediate 688 --steps 2 \\
        --variants simnpo,naive_simnpo
    python benchmarks/train_step.py --json out.json      # also write the raw per-variant results
    python benchmarks/train_step.py --layers 2 --hidden 256 --heads 4 --intermediate 688 --vocab 128256 \
        --prompt-len 20,40 --answer-len 79,159 --variants simnpo,naive_simnpo_dyn,chunked_simnpo,fused_simnpo,sft
                                                         # the fused-loss table (issue 10's model and rows)

Every hand-driven variant records its loss: naive_simnpo_dyn, chunked_simnpo and fused_simnpo compute the same loss
on the same rows from the same initial model, and the driver prints the three.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TRAINER_VARIANTS = ("simnpo", "npo_live", "npo_pre", "sft")
NAIVE_VARIANTS = ("naive_simnpo", "naive_npo", "naive_simnpo_dyn")
HEAD_VARIANTS = ("chunked_simnpo", "fused_simnpo")
DEFAULT_VARIANTS = "simnpo,npo_live,npo_pre,naive_simnpo,naive_npo,naive_simnpo_dyn"
LABELS = {
    "simnpo": "SimNPOTrainer",
    "npo_live": "NPOTrainer, live ref_model",
    "npo_pre": "NPOTrainer, precomputed ref",
    "naive_simnpo": "naive SimNPO (pad to max_length)",
    "naive_npo": "naive NPO (pad to max_length, live ref)",
    "naive_simnpo_dyn": "naive SimNPO, padded to longest row",
    "chunked_simnpo": "SimNPO loss path, chunked op (by hand)",
    "fused_simnpo": "SimNPO loss path, fused loss (by hand)",
    "sft": "TRL SFTTrainer, same rows",
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ----------------------------------------------------------------------------------------------- memory probes --
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss():
    return _status_kib("VmRSS:")


def peak_rss():
    return _status_kib("VmHWM:")


_LIBC = ctypes.CDLL(None)


def settle():
    """Free what can be freed and hand glibc's free heap pages back, so RSS ~ live memory."""
    gc.collect()
    _LIBC.malloc_trim(0)


def reset_peak():
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class StepMeter:
    """Times and measures the steps; `begin()` before a step, `end()` after it."""

    def __init__(self, origin):
        self.origin, self.records = origin, []

    def begin(self):
        settle()
        self.start = rss()
        reset_peak()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def end(self, tokens, loss=None):
        dt, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        hwm = peak_rss()
        self.records.append(
            {
                "time": dt,
                "cpu": cpu,
                "start": self.start - self.origin,
                "peak": hwm - self.start,
                "abs_peak": hwm - self.origin,
                "tokens": tokens,
                "loss": loss,
            }
        )


# ------------------------------------------------------------------------------------------------------- data --
def make_rows(n, seed, prompt_len, answer_len, vocab):
    """`n` rows of (prompt ids, answer ids) with uniformly drawn lengths; ids index the words of `make_tokenizer`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = vocab - len(SPECIALS)
    rows = []
    for _ in range(n):
        p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        a = int(rng.integers(answer_len[0], answer_len[1] + 1))
        rows.append((rng.integers(0, words, p).tolist(), rng.integers(0, words, a).tolist()))
    return rows


def make_tokenizer(vocab):
    """A word-level tokenizer over `<pad> <s> </s> <unk> t0 t1 ... t{vocab-5}`: one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {s: i for i, s in enumerate(SPECIALS)}
    table.update({f"t{j}": j + len(SPECIALS) for j in range(vocab - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def to_dataset(rows):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [" ".join(f"t{i}" for i in p) for p, _ in rows],
            "completion": [" " + " ".join(f"t{i}" for i in a) for _, a in rows],
        }
    )


def build_model(args, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.max_length, 128),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def trainer_args(args, cls, output_dir):
    return cls(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        max_length=args.max_length,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


# ---------------------------------------------------------------------------------------------------- workers --
def run_trainer(args, variant, meter, forget, retain, tokenizer, output_dir):
    from transformers import TrainerCallback

    from trl_unlearn import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer

    class Probe(TrainerCallback):
        def __init__(self):
            self.tokens = 0

        def on_step_begin(self, a, state, control, **kw):
            meter.begin()

        def on_step_end(self, a, state, control, **kw):
            meter.end(self.tokens)

    t0 = time.perf_counter()
    model = build_model(args)
    if variant == "sft":
        trainer = sft_trainer(args, model, forget, retain, tokenizer, output_dir)
    elif variant == "simnpo":
        trainer = SimNPOTrainer(
            model=model,
            args=trainer_args(args, SimNPOConfig, output_dir),
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
        )
    else:
        ref = build_model(args) if variant == "npo_live" else None
        trainer = NPOTrainer(
            model=model,
            ref_model=ref,
            args=trainer_args(args, NPOConfig, output_dir),
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
        )
        assert trainer.precompute_forget_ref == (variant == "npo_pre")
    probe = Probe()
    # rows x T of each step's batch, read where the trainer collects it
    collect = trainer.get_batch_samples

    def counting(*a, **kw):
        batches, counts = collect(*a, **kw)
        probe.tokens = sum(int(b["input_ids"].numel()) for b in batches)
        return batches, counts

    trainer.get_batch_samples = counting
    trainer.add_callback(probe)
    setup = time.perf_counter() - t0
    trainer.train()
    return setup


def sft_trainer(args, model, forget, retain, tokenizer, output_dir):
    """`SFTTrainer` whose step k trains on forget rows k*B..(k+1)*B-1 then the same retain rows, in that order."""
    from datasets import concatenate_datasets
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    B = args.batch
    steps = len(forget) // B
    order = [d.select(range(k * B, (k + 1) * B)) for k in range(steps) for d in (forget, retain)]

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    cfg = trainer_args(args, SFTConfig, output_dir)
    cfg.per_device_train_batch_size = 2 * B
    cfg.max_length = None  # no truncation; rows are padded to the longest of the batch
    return InOrder(model=model, args=cfg, train_dataset=concatenate_datasets(order), processing_class=tokenizer)


def naive_logps(model, ids, attention_mask, labels):
    """Summed label log-probs and scored-token counts per row, from the full fp32 logits."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (token_logps * scored).sum(-1), scored.sum(-1)


def naive_batch(rows, pad_to, eos):
    """Right-pad `rows` (prompt, answer) to `pad_to` tokens (None: the longest row); labels -100 off the answer."""
    import torch

    seqs = [[i + len(SPECIALS) for i in p] + [i + len(SPECIALS) for i in a] + [eos] for p, a in rows]
    T = pad_to or max(len(s) for s in seqs)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, ((p, _), s) in enumerate(zip(rows, seqs)):
        s = s[:T]
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        labels[r, len(p) : len(s)] = ids[r, len(p) : len(s)]
    return ids, mask, labels


def run_naive(args, variant, meter, forget_rows, retain_rows, output_dir):
    import torch
    from transformers import Trainer

    from trl_unlearn import NPOConfig, SimNPOConfig, losses

    t0 = time.perf_counter()
    npo = variant == "naive_npo"
    cfg = trainer_args(args, NPOConfig if npo else SimNPOConfig, output_dir)
    model = build_model(args).train()
    ref = build_model(args).eval().requires_grad_(False) if npo else None
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(cfg, model)
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], **opt_kwargs)
    pad_to = None if variant == "naive_simnpo_dyn" else args.max_length
    setup = time.perf_counter() - t0
    B = args.batch
    for step in range(args.warmup + args.steps):
        f_rows = forget_rows[step * B : (step + 1) * B]
        r_rows = retain_rows[step * B : (step + 1) * B]
        f_batch, r_batch = naive_batch(f_rows, pad_to, eos=2), naive_batch(r_rows, pad_to, eos=2)
        tokens = f_batch[0].numel() + r_batch[0].numel()
        meter.begin()
        f_logps, f_tokens = naive_logps(model, *f_batch)
        if npo:
            with torch.no_grad():
                ref_logps, _ = naive_logps(ref, *f_batch)
            forget_loss = losses.npo_loss(f_logps, ref_logps, cfg.beta).mean()
        else:
            forget_loss = losses.simnpo_loss(f_logps, f_tokens, cfg.beta, cfg.gamma).mean()
        r_logps, r_tokens = naive_logps(model, *r_batch)
        retain_loss = -r_logps.sum() / r_tokens.sum()
        loss = cfg.forget_weight * forget_loss + cfg.retain_weight * retain_loss
        loss.backward()
        value = loss.item()
        del f_logps, r_logps, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        meter.end(tokens, value)
    return setup


def run_head(args, variant, meter, forget_rows, retain_rows, output_dir):
    """The trainer's loss without the trainer: one forward over forget + retain rows, then the chunked op or the
    fused loss on the scored positions; SimNPO (mean over forget rows) + retain NLL (mean over retain tokens)."""
    import torch
    from transformers import Trainer

    from trl_unlearn import SimNPOConfig, losses
    from trl_unlearn.kernels.sequence_loss import fused_linear_sequence_loss
    from trl_unlearn.kernels.token_logps import chunked_token_logps

    t0 = time.perf_counter()
    cfg = trainer_args(args, SimNPOConfig, output_dir)
    model = build_model(args).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(cfg, model)
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], **opt_kwargs)
    head = model.get_output_embeddings()
    setup = time.perf_counter() - t0
    B = args.batch
    for step in range(args.warmup + args.steps):
        rows = forget_rows[step * B : (step + 1) * B] + retain_rows[step * B : (step + 1) * B]
        ids, attention_mask, labels = naive_batch(rows, None, eos=2)  # right-padded to the longest of the 2B rows
        meter.begin()
        hidden = model.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        num_tokens = scored.sum(-1)
        is_forget = torch.arange(2 * B) < B
        # step-wide counts: one micro-batch per step on one process, so this batch's
        n_forget, n_retain_tokens = B, num_tokens[B:].sum().float()
        nt = num_tokens.float().clamp(min=1)

        def seq_loss(logps):
            forget = losses.simnpo_loss(logps, nt, cfg.beta, cfg.gamma) * (cfg.forget_weight / n_forget)
            return torch.where(is_forget, forget, -logps * (cfg.retain_weight / n_retain_tokens))

        if variant == "fused_simnpo":
            loss, _, _ = fused_linear_sequence_loss(
                hidden[scored], head.weight, targets[scored], num_tokens, seq_loss, head.bias
            )
        else:
            logp = chunked_token_logps(hidden[scored], head.weight, targets[scored], head.bias)
            seq_of_row = torch.arange(2 * B)[:, None].expand_as(scored)[scored]
            loss = seq_loss(logp.new_zeros(2 * B).index_add(0, seq_of_row, logp)).sum()
        del hidden
        loss.backward()
        value = loss.item()
        del loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        meter.end(ids.numel(), value)
    return setup


def worker(args):
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl  # noqa: F401

    import trl_unlearn  # noqa: F401  (every variant pays the same imports)

    transformers.logging.set_verbosity_error()
    n = (args.warmup + args.steps) * args.batch
    plen, alen = (tuple(int(x) for x in s.split(",")) for s in (args.prompt_len, args.answer_len))
    forget_rows = make_rows(n, args.seed, plen, alen, args.vocab)
    retain_rows = make_rows(n, args.seed + 1, plen, alen, args.vocab)
    tokenizer = make_tokenizer(args.vocab)
    forget, retain = to_dataset(forget_rows), to_dataset(retain_rows)
    settle()
    meter = StepMeter(origin=rss())
    with tempfile.TemporaryDirectory() as out:
        if args.worker in TRAINER_VARIANTS:
            setup = run_trainer(args, args.worker, meter, forget, retain, tokenizer, out)
        elif args.worker in HEAD_VARIANTS:
            setup = run_head(args, args.worker, meter, forget_rows, retain_rows, out)
        else:
            setup = run_naive(args, args.worker, meter, forget_rows, retain_rows, out)
    timed = meter.records[args.warmup :]
    print(
        json.dumps(
            {
                "variant": args.worker,
                "setup": setup,
                "steps": timed,
                "warmup": meter.records[: args.warmup],
                "threads": torch.get_num_threads(),
            }
        )
    )


# ------------------------------------------------------------------------------------------------------ driver --
SIZE_FLAGS = (
    "layers",
    "hidden",
    "heads",
    "intermediate",
    "vocab",
    "batch",
    "max_length",
    "steps",
    "warmup",
    "prompt_len",
    "answer_len",
    "seed",
    "threads",
)


def run_variant(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for k in SIZE_FLAGS:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(threads=0):
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    threads = threads or torch.get_num_threads()
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch thread(s) per process"


def merge(results):
    """Per variant: all timed steps of all rounds."""
    merged = {}
    for r in results:
        if r is None:
            continue
        m = merged.setdefault(r["variant"], {"steps": [], "setup": []})
        m["steps"] += r["steps"]
        m["setup"].append(r["setup"])
    for m in merged.values():
        s = m["steps"]
        m["time"] = statistics.median(x["time"] for x in s)
        m["cpu"] = statistics.median(x["cpu"] for x in s)
        m["peak"] = max(x["peak"] for x in s)
        m["static"] = statistics.median(x["start"] for x in s)
        m["total"] = max(x["start"] + x["peak"] for x in s)
        m["tokens"] = statistics.median(x["tokens"] for x in s)
    return merged


def params_of(args):
    h, i, V, L = args.hidden, args.intermediate, args.vocab, args.layers
    return L * (4 * h * h + 3 * h * i + 2 * h) + 2 * V * h + h


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="forget rows per step (and as many retain rows)")
    parser.add_argument("--max-length", type=int, default=512, help="the naive variants pad every row to this")
    parser.add_argument("--prompt-len", default="15,25", help="min,max prompt tokens (uniform)")
    parser.add_argument("--answer-len", default="20,60", help="min,max answer tokens (uniform; + EOS)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (allocate AdamW states)")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants round-robin this many times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (0: torch's default). 1 by default: on a shared, "
        "oversubscribed machine multi-threaded ops spin-wait and time becomes meaningless; one "
        "thread's CPU time measures the work. On a quiet machine try --threads 0",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    variants = args.variants.split(",")
    print(f"machine: {machine(args.threads)}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"model: Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}, fp32, {params_of(args) / 1e6:.1f}M parameters; "
        f"{args.batch} forget + {args.batch} retain rows per step, prompt {args.prompt_len} / answer "
        f"{args.answer_len} tokens, naive padding to {args.max_length}; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + {args.steps} timed steps per "
        f"process, {args.rounds} round(s)",
        flush=True,
    )
    results = []
    for rnd in range(args.rounds):
        for v in variants:
            r = run_variant(args, v)
            if r is None:
                print(f"  {v}: failed", flush=True)
            else:
                print(
                    f"  round {rnd + 1} {v}: wall {', '.join('%.2fs' % s['time'] for s in r['steps'])}, CPU "
                    f"{', '.join('%.2fs' % s['cpu'] for s in r['steps'])}, "
                    f"step peak {max(s['peak'] for s in r['steps']) / 2**20:.0f} MiB",
                    flush=True,
                )
            results.append(r)
    merged = merge(results)
    base_name = "naive_simnpo" if "naive_simnpo" in merged else "naive_simnpo_dyn"
    base = merged.get(base_name)
    base_label = "naive SimNPO" if base_name == "naive_simnpo" else "naive SimNPO dyn"

    def ratio(m, key, b=None):
        b = b or base
        return f"{m[key] / b[key]:.2f}x" if b and b[key] > 0 else "-"

    print()
    print(
        f"| variant | tokens/step (rows x T) | median wall s | median CPU s | step peak MiB | static MiB | total MiB "
        f"| CPU time vs {base_label} | wall time vs {base_label} | step peak vs {base_label} "
        f"| total vs {base_label} | setup s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = merged.get(v)
        if m is None:
            print(f"| {LABELS.get(v, v)} | failed |")
            continue
        print(
            f"| {LABELS.get(v, v)} | {m['tokens']:.0f} | {m['time']:.2f} | {m['cpu']:.2f} | {m['peak'] / 2**20:.0f} "
            f"| {m['static'] / 2**20:.0f} | {m['total'] / 2**20:.0f} | {ratio(m, 'cpu')} | {ratio(m, 'time')} "
            f"| {ratio(m, 'peak')} | {ratio(m, 'total')} | {statistics.median(m['setup']):.1f} |"
        )
    sim, pre = merged.get("simnpo"), merged.get("npo_pre")
    if sim and pre:
        print(
            f"\nNPO (precomputed ref) / SimNPO: CPU time {pre['cpu'] / sim['cpu']:.2f}x, wall time "
            f"{pre['time'] / sim['time']:.2f}x, step peak {pre['peak'] / sim['peak']:.2f}x, total "
            f"{pre['total'] / sim['total']:.2f}x"
        )
    fused = merged.get("fused_simnpo")
    for other in ("naive_simnpo_dyn", "chunked_simnpo", "sft"):
        o = merged.get(other)
        if fused and o:
            print(
                f"fused_simnpo / {other}: CPU time {ratio(fused, 'cpu', o)}, wall time {ratio(fused, 'time', o)}, "
                f"step peak {ratio(fused, 'peak', o)}, total {ratio(fused, 'total', o)}"
            )
    first = {v: m["steps"][0]["loss"] for v, m in merged.items() if m["steps"][0].get("loss") is not None}
    if first:  # the same loss on the same rows from the same model (first timed step of the first round)
        print("loss at the first timed step: " + ", ".join(f"{v} {x:.6f}" for v, x in first.items()))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine(args.threads), "results": [r for r in results if r]},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
