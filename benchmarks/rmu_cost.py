"""What RMU's cut forward saves: step time and peak memory of RMU against SimNPO on the same model and tokens (CPU).

    python benchmarks/rmu_cost.py [--layers 32 --layer_id 7 --hidden 128 --vocab 32000 --seq 128 --batch 4]
                                  [--steps 4 --warmup 2 --repeats 2 --checkpointing on|off]

The model has Zephyr-7B's depth and vocabulary (32 layers, 32000 tokens) at a CPU-sized width, and RMU uses WMDP's
layer 7 with the MLPs of layers 5-7 trained. Rows:
- `simnpo`: SimNPO, full fine-tuning (the package's default): every layer, the (chunked) LM head, every gradient;
- `simnpo_same_params`: SimNPO training only RMU's parameters: separates the cut forward and the missing head from
  the smaller optimizer;
- `rmu`: RMU: layers 0..layer_id for the policy (forget + retain rows) and for the frozen reference (retain rows),
  no LM head.
Each step: `--batch` forget rows + `--batch` retain rows of `--seq` tokens, the same for every row of the table.

Each (row, repeat) runs in its own process, interleaved, with one torch thread. Step time: the median over the
steps after `--warmup`. Peak: the process's peak resident memory during training above its memory after setup
(Linux VmHWM, reset just before training), i.e. activations, gradients and optimizer state. The machine is shared:
the load average is printed, and only the ratios measured in one run mean anything.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = ("simnpo", "simnpo_same_params", "rmu")


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(a):
    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from trl_unlearn import RMUConfig, RMUTrainer, SimNPOConfig, SimNPOTrainer
    from trl_unlearn.toy.tiny import train_tokenizer

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]

    def texts(n):  # about `seq` tokens each once tokenized (one token per word)
        return [" ".join(rng.choice(words, a.seq)) for _ in range(n)]

    forget, retain = texts(8 * a.batch), texts(8 * a.batch)
    tokenizer = train_tokenizer(forget + retain, vocab_size=512)
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * a.seq,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    update_layers = list(range(max(0, a.layer_id - 2), a.layer_id + 1))
    common = dict(
        output_dir=a.out_dir,
        per_device_train_batch_size=a.batch,
        max_steps=a.warmup + a.steps,
        max_length=a.seq,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        activation_checkpointing=a.checkpointing == "on",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    if a.row == "rmu":
        cls, args = RMUTrainer, RMUConfig(layer_id=a.layer_id, update_layers=update_layers, **common)
    else:
        cls, args = SimNPOTrainer, SimNPOConfig(**common)
        if a.row == "simnpo_same_params":
            for name, p in model.named_parameters():
                p.requires_grad_(any(f"layers.{i}.mlp." in name for i in update_layers))
    forget, retain = Dataset.from_dict({"text": forget}), Dataset.from_dict({"text": retain})
    trainer = cls(model=model, args=args, processing_class=tokenizer, forget_dataset=forget, retain_dataset=retain)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    setup = _status_kib("VmRSS")
    trainer.train()
    peak = _status_kib("VmHWM")
    tokens = trainer.state.log_history[0]["num_tokens/forget"] + trainer.state.log_history[0]["num_tokens/retain"]
    json.dump(
        {
            "step_s": statistics.median(times[a.warmup :]),
            "peak_mib": (peak - setup) / 1024,
            "setup_mib": setup / 1024,
            "trainable": trainable,
            "tokens_per_step": tokens,
        },
        sys.stdout,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--layer_id", type=int, default=7)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="forget rows per step (and as many retain rows)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="processes per row, interleaved")
    p.add_argument(
        "--checkpointing",
        choices=("on", "off"),
        default="on",
        help="activation checkpointing (the configs' default: on)",
    )
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.row:
        return worker(a)

    load_before = os.getloadavg()
    results = {row: [] for row in ROWS}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    flags = [
        f"--{k}={getattr(a, k)}"
        for k in ("layers", "layer_id", "hidden", "vocab", "seq", "batch", "steps", "warmup", "checkpointing")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(a.repeats):
            for row in ROWS:
                cmd = [sys.executable, __file__, *flags, "--row", row, "--out_dir", os.path.join(tmp, row)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{row} failed:\n{proc.stderr[-3000:]}")
                results[row].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    print(
        f"model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; RMU layer_id {a.layer_id}; step: {a.batch} "
        f"forget + {a.batch} retain rows of {a.seq} tokens; activation checkpointing {a.checkpointing}; "
        f"1 torch thread; {a.repeats} processes per row, {a.steps} timed "
        f"steps each"
    )
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; after: "
        f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} ({os.cpu_count()} CPUs)"
    )
    base = {k: statistics.median(r[k] for r in results["simnpo"]) for k in ("step_s", "peak_mib")}
    same = {k: statistics.median(r[k] for r in results["simnpo_same_params"]) for k in ("step_s", "peak_mib")}
    print(
        "\n| row | trainable params | step (s) | peak above setup (MiB) | setup RSS (MiB) | step / simnpo | "
        "step / simnpo_same_params | peak / simnpo | peak / simnpo_same_params |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        step = statistics.median(r["step_s"] for r in results[row])
        peak = statistics.median(r["peak_mib"] for r in results[row])
        setup = statistics.median(r["setup_mib"] for r in results[row])
        print(
            f"| {row} | {results[row][0]['trainable']:,} | {step:.3f} | {peak:.0f} | {setup:.0f} | "
            f"{step / base['step_s']:.3f} | {step / same['step_s']:.3f} | {peak / base['peak_mib']:.3f} | "
            f"{peak / same['peak_mib']:.3f} |"
        )
    times = {row: ", ".join(f"{r['step_s']:.3f}" for r in results[row]) for row in ROWS}
    print("\nper-process step times (s): " + "; ".join(f"{row}: {t}" for row, t in times.items()))


if __name__ == "__main__":
    main()
