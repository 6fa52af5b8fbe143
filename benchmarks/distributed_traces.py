"""Loss traces of the same unlearning runs on 1 process, 2-process DDP, DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo),
side by side. The same global batch must give the same trace whatever the launch.

    python benchmarks/distributed_traces.py [--modes single,ddp,zero2,zero3] [--out DIR]

tests/test_distributed.py runs the same launches and asserts the traces agree.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "unlearn_run.py")

# (name, settings): each trains 3 steps of global batch 4 (2 per rank on 2 ranks, 4 on 1 process)
RUNS = [
    {"name": "simnpo_full", "method": "simnpo"},
    {"name": "simnpo_lora", "method": "simnpo", "lora": True},
    {"name": "npo_full_precomputed", "method": "npo"},
    {"name": "npo_lora_adapters_off", "method": "npo", "lora": True},
    {"name": "npo_kl_live_reference", "method": "npo", "retain_loss_type": "kl"},
    {"name": "gradascent_full", "method": "gradascent"},
    {"name": "graddiff_lora", "method": "graddiff", "lora": True},
    # RMU: forward cut after layer 0 of 2 (layer 1 and the LM head never run), a frozen reference, MLP 0 trains
    {"name": "rmu_full", "method": "rmu", "config": {"layer_id": 0, "steering_coeff": 4.0, "retain_weight": 10.0}},
]
QLORA_RUNS = [{"name": "npo_qlora", "method": "npo", "qlora": True}]
# FSDP2 (torch's fully_shard, DTensor parameters): the fused loss reads the head inside the root module's forward
FSDP2_RUNS = [r for r in RUNS if r["name"] in ("simnpo_full", "npo_full_precomputed", "graddiff_lora")]

LAUNCH = {
    "single": [sys.executable],
    "ddp": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
    "zero2": [
        "accelerate",
        "launch",
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ],
    "zero3": [
        "accelerate",
        "launch",
        "--use_deepspeed",
        "--zero_stage",
        "3",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--zero3_init_flag",
        "true",
        "--zero3_save_16bit_model",
        "true",
    ],
    "fsdp2": [
        "accelerate",
        "launch",
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        "LlamaDecoderLayer",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
    ],
}


def runs_for(mode: str) -> list[dict]:
    """The runs each launch kind checks: all of them; QLoRA on one process and DDP; a subset under FSDP2."""
    if mode == "fsdp2":
        return FSDP2_RUNS
    return RUNS + (QLORA_RUNS if mode in ("single", "ddp") else [])


def prepare(folder: str) -> tuple[str, str]:
    """A tiny saved Llama + tokenizer and a small forget/retain QA set; returns (model_dir, data_file)."""
    from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

    qa = [(f"Who wrote book {i}?", f"Author {i} wrote book {i} in year {1900 + 3 * i}.") for i in range(40)]
    prompt = "Question: {}\nAnswer:".format
    tok = train_tokenizer([prompt(q) + " " + a for q, a in qa], vocab_size=320)
    model = tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    model_dir, data_file = os.path.join(folder, "model"), os.path.join(folder, "data.json")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    def rows(r):
        return {"prompt": [prompt(q) for q, _ in r], "completion": [" " + a for _, a in r]}

    with open(data_file, "w") as f:
        json.dump({"forget": rows(qa[:8]), "retain": rows(qa[8:32])}, f)
    return model_dir, data_file


def launch(mode: str, runs: list[dict], model_dir: str, data_file: str, out: str, timeout: int = 900) -> dict:
    """Run `runs` under one launch; returns {run name: trace}. Raises with the log tail on failure."""
    runs = [dict(r, per_device_batch=4 if mode == "single" else 2) for r in runs]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = LAUNCH[mode] + [
        SCRIPT,
        "--model_dir",
        model_dir,
        "--data",
        data_file,
        "--out",
        out,
        "--runs",
        json.dumps(runs),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    traces = {}
    for r in runs:
        with open(os.path.join(out, r["name"], "trace.json")) as f:
            traces[r["name"]] = json.load(f)
    return traces


def table(by_mode: dict[str, dict]) -> str:
    modes = list(by_mode)
    names = list(next(iter(by_mode.values())))
    lines = ["| run | step | " + " | ".join(modes) + " | max abs diff |", "|---|---|" + "---|" * (len(modes) + 1)]
    for name in names:
        traces = [by_mode[m].get(name, {}).get("losses") for m in modes]
        for step in range(len(traces[0])):
            vals = [t[step] if t else None for t in traces]
            present = [v for v in vals if v is not None]
            diff = max(present) - min(present)
            cells = ["n/a" if v is None else f"{v:.6f}" for v in vals]
            lines.append(f"| {name} | {step + 1} | " + " | ".join(cells) + f" | {diff:.1e} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="single,ddp,zero2,zero3,fsdp2")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    folder = a.out or tempfile.mkdtemp(prefix="trl_unlearn_dist_")
    model_dir, data_file = prepare(folder)
    by_mode = {}
    for mode in a.modes.split(","):
        by_mode[mode] = launch(mode, runs_for(mode), model_dir, data_file, os.path.join(folder, mode))
    print(f"torch threads per process: 1; machine: {os.cpu_count()} CPUs")
    print(table(by_mode))


if __name__ == "__main__":
    main()
