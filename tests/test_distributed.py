"""Real multi-process runs on CPU: 2-process DDP (gloo), DeepSpeed ZeRO-2/3 and FSDP2 give the same loss traces as
one process for the same global batch; ZeRO-3 and LoRA outputs load back; a SIGTERM'd run resumes exactly."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import distributed_traces as dt  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dist"))
    model_dir, data_file = dt.prepare(folder)
    by_mode = {}
    for mode in ["single", "ddp", "zero2", "zero3", "fsdp2"]:
        by_mode[mode] = dt.launch(mode, dt.runs_for(mode), model_dir, data_file, os.path.join(folder, mode))
    print("\n" + dt.table(by_mode))
    return folder, model_dir, data_file, by_mode


def test_same_loss_trace_whatever_the_launch(traces):
    _, _, _, by_mode = traces
    single = by_mode["single"]
    for mode in ["ddp", "zero2", "zero3", "fsdp2"]:
        for name, trace in by_mode[mode].items():
            assert trace["world_size"] == 2 and trace["deepspeed"] == mode.startswith("zero")
            assert trace["losses"] == pytest.approx(single[name]["losses"], rel=1e-5, abs=1e-5), (mode, name)
    # NPO's reference: precomputed (no model), adapters disabled (no model), or a live one DeepSpeed prepared
    zero3 = by_mode["zero3"]
    assert zero3["npo_full_precomputed"]["precomputed_reference"] and zero3["npo_full_precomputed"]["ref_model"] is None
    assert zero3["npo_lora_adapters_off"]["ref_model"] is None
    assert zero3["npo_kl_live_reference"]["ref_model"] == "DeepSpeedEngine"
    assert zero3["rmu_full"]["ref_model"] == "DeepSpeedEngine"  # RMU's frozen reference, prepared by DeepSpeed
    # Unlearning moved the model: the traces are not flat
    assert single["simnpo_full"]["losses"][0] != single["simnpo_full"]["losses"][-1]


def test_zero3_output_loads_with_from_pretrained(traces):
    from transformers import AutoModelForCausalLM

    folder = traces[0]
    z3 = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "zero3", "simnpo_full"))
    single = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "single", "simnpo_full"))
    for (name, a), (_, b) in zip(z3.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_run_saves_an_adapter_that_merges(traces):
    from peft import AutoPeftModelForCausalLM

    folder, model_dir, _, _ = traces
    out = os.path.join(folder, "zero3", "simnpo_lora")
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    merged = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])  # the merged adapter changed q_proj
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged.state_dict()[k], base.state_dict()[k])  # untargeted modules are the base's


def test_sigterm_then_resume_matches_uninterrupted_run(traces, tmp_path):
    _, model_dir, data_file, _ = traces
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def cmd(run):
        return [
            sys.executable,
            dt.SCRIPT,
            "--model_dir",
            model_dir,
            "--data",
            data_file,
            "--out",
            str(tmp_path),
            "--runs",
            json.dumps([run]),
        ]

    base = {"method": "simnpo", "per_device_batch": 4, "max_steps": 8}
    subprocess.run(cmd(dict(base, name="full")), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(
        cmd(dict(base, name="cut", print_steps=True)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("STEP 2"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    checkpoints = sorted(c for c in os.listdir(tmp_path / "cut") if c.startswith("checkpoint-"))
    assert len(checkpoints) == 1 and not os.path.exists(tmp_path / "cut" / "trace.json")
    stopped = int(checkpoints[-1].split("-")[1])
    assert 2 <= stopped < 8  # stopped early, at the end of a step, with a checkpoint

    resumed = dict(base, name="cut", resume=str(tmp_path / "cut" / checkpoints[-1]))
    subprocess.run(cmd(resumed), env=env, check=True, capture_output=True, timeout=300)
    full = json.load(open(tmp_path / "full" / "trace.json"))
    cut = json.load(open(tmp_path / "cut" / "trace.json"))
    assert cut["steps"] == list(range(1, 9))
    assert cut["losses"] == pytest.approx(full["losses"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_retain_rows_differ_across_ranks():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from trl_unlearn.data.pairing import ForgetRetainSampler

    sampler = ForgetRetainSampler(num_forget=16, num_retain=40, seed=3)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 2, False), 2, rank)) for rank in (0, 1)]
    retain = [{r for batch in shard for _, r in batch} for shard in shards]
    forget = [{f for batch in shard for f, _ in batch} for shard in shards]
    assert not retain[0] & retain[1] and not forget[0] & forget[1]
    assert forget[0] | forget[1] == set(range(16))
    again = [list(BatchSamplerShard(BatchSampler(sampler, 2, False), 2, rank)) for rank in (0, 1)]
    assert again == shards  # reproducible from the seed


def test_command_line_under_zero3(tmp_path):
    """`accelerate launch ... -m trl_unlearn.cli simnpo` (the documented 7B launch of the training command) trains on
    2 ZeRO-3 processes and saves once: a model that loads, its card and its prompt format."""
    from transformers import AutoModelForCausalLM

    from trl_unlearn.data.files import write_tofu_layout

    model_dir, _ = dt.prepare(str(tmp_path))
    qa = [{"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote book {i}."} for i in range(12)]
    data = write_tofu_layout(tmp_path / "tofu", {"forget": qa[:4], "retain": qa[4:]})
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = dt.LAUNCH["zero3"] + [
        "-m",
        "trl_unlearn.cli",
        "simnpo",
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        str(data),
        "--forget_split",
        "forget",
        "--retain_split",
        "retain",
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.load(open(out / "unlearning_prompt.json"))
    assert "SimNPO" in (out / "README.md").read_text()
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [
        n for (n, a), (_, b) in zip(trained.state_dict().items(), base.state_dict().items()) if not torch.equal(a, b)
    ]
    assert changed, "the saved model equals the base model"
