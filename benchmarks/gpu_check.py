"""Checks of the CUDA paths that CI (CPU only) cannot run. One short script for a lent GPU machine:

    python benchmarks/gpu_check.py            # needs a CUDA device; about 2-4 minutes on one H100

1. The chunked label log-prob op in bf16 on CUDA: values and gradients against fp32 naive full logits, peak memory
   and time against naive bf16 at (4, 512, 1024, 128256), and under `torch.compile`.
2. One SimNPO step in bf16 autocast on CUDA vs the same step in fp32: close losses, finite gradients.
3. QLoRA on CUDA (4-bit NF4, bf16 compute): the adapters train, the base does not.
4. The fused sequence loss (`trl_unlearn.kernels.sequence_loss`) in bf16 on CUDA, trainable and frozen head (this
   exercises
   `torch.addmm(..., out_dtype=torch.float32)` for the head gradient): loss, sequence log-probs and gradients against
   fp32 naive full logits; time and peak memory (excluding the gradients every variant returns) against naive bf16
   and the chunked op at (4, 512, 1024, 128256), SimNPO over the 4 sequences.
Prints PASS/FAIL per check and timing tables; exits non-zero on any FAIL.
"""

import os
import sys
import time

import torch

from trl_unlearn import losses
from trl_unlearn.kernels.sequence_loss import fused_linear_sequence_loss, naive_sequence_loss
from trl_unlearn.kernels.token_logps import chunked_token_logps, naive_token_logps

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def timed(fn, repeats=5):
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**20


def op_checks():
    torch.manual_seed(0)
    n, h, v = 4 * 511, 1024, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda")

    ref = naive_token_logps(hidden.float(), weight.float(), labels)
    ref.sum().backward()
    g_ref = hidden.grad.float().clone(), weight.grad.float().clone()
    hidden.grad = weight.grad = None
    out = chunked_token_logps(hidden, weight, labels)
    out.sum().backward()
    err = (out - ref).abs().max().item()
    gerr = max(
        (hidden.grad.float() - g_ref[0]).abs().max().item() / g_ref[0].abs().max().item(),
        (weight.grad.float() - g_ref[1]).abs().max().item() / g_ref[1].abs().max().item(),
    )
    check(
        "bf16 chunked op vs fp32 naive", err < 0.05 and gerr < 0.05, f"max |Δlogp| {err:.3g}, rel grad err {gerr:.3g}"
    )

    def naive_step():
        hidden.grad = weight.grad = None
        naive_token_logps(hidden, weight, labels).sum().backward()

    def ours_step():
        hidden.grad = weight.grad = None
        chunked_token_logps(hidden, weight, labels).sum().backward()

    compiled = torch.compile(chunked_token_logps)

    def compiled_step():
        hidden.grad = weight.grad = None
        compiled(hidden, weight, labels).sum().backward()

    rows = []
    for name, fn in [("naive bf16", naive_step), ("chunked bf16", ours_step), ("chunked bf16 compiled", compiled_step)]:
        try:
            t, mem = timed(fn)
            rows.append((name, t, mem))
        except Exception as e:  # noqa: BLE001 - report and go on
            check(f"{name} runs", False, repr(e)[:200])
    print("| variant | median ms | peak MiB above inputs |\n|---|---|---|")
    for name, t, mem in rows:
        print(f"| {name} | {t * 1e3:.1f} | {mem:.0f} |")
    if len(rows) >= 2:
        check("chunked peak memory <= 0.15x naive", rows[1][2] <= 0.15 * rows[0][2], f"{rows[1][2] / rows[0][2]:.3f}x")


def fused_checks():
    torch.manual_seed(0)
    b, t, h, v = 4, 512, 1024, 128256
    n, lengths = b * (t - 1), [t - 1] * b
    labels = torch.randint(0, v, (n,), device="cuda")

    def seq_loss(logps):  # SimNPO, mean over the sequences
        return losses.simnpo_loss(logps, torch.tensor(float(t - 1), device="cuda"), beta=2.5) / b

    def chunked(hidden, weight):
        return seq_loss(chunked_token_logps(hidden, weight, labels).view(b, t - 1).sum(-1)).sum()

    def naive(hidden, weight):
        return naive_sequence_loss(hidden, weight, labels, lengths, seq_loss)[0]

    def fused(hidden, weight):
        return fused_linear_sequence_loss(hidden, weight, labels, lengths, seq_loss)[0]

    for frozen in (False, True):
        head = "frozen head" if frozen else "trainable head"
        hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(not frozen)
        params = (hidden,) if frozen else (hidden, weight)

        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_(not frozen)
        ref_loss, ref_seq, _ = naive_sequence_loss(h32, w32, labels, lengths, seq_loss)
        ref = torch.autograd.grad(ref_loss, (h32,) if frozen else (h32, w32))
        loss, seq_logps, _ = fused_linear_sequence_loss(hidden, weight, labels, lengths, seq_loss)
        grads = torch.autograd.grad(loss * 2.0, params)  # an incoming gradient other than 1 is scaled
        lerr = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        serr = ((seq_logps - ref_seq.detach()).abs().max() / ref_seq.detach().abs().max()).item()
        gerr = max(((g.float() - 2.0 * r).norm() / (2.0 * r).norm()).item() for g, r in zip(grads, ref))
        check(
            f"bf16 fused loss vs fp32 naive, {head}",
            lerr < 0.02 and serr < 0.02 and gerr < 0.05 and all(g.dtype == torch.bfloat16 for g in grads),
            f"rel loss err {lerr:.3g}, rel seq logp err {serr:.3g}, rel grad err {gerr:.3g}",
        )

        grad_bytes = sum(p.numel() * p.element_size() for p in params)

        def measure(fn, hidden=hidden, weight=weight, params=params, grad_bytes=grad_bytes):
            def step():
                for p in params:
                    p.grad = None
                fn(hidden, weight).backward()

            step()  # warm-up
            times, peak = [], 0
            for _ in range(5):
                for p in params:
                    p.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                fn(hidden, weight).backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated() - base - grad_bytes)
            return sorted(times)[2], peak / 2**20

        rows = {}
        for name, fn in (("naive", naive), ("chunked", chunked), ("fused", fused)):
            try:
                rows[name] = measure(fn)
            except Exception as e:  # noqa: BLE001 - report and go on
                check(f"{name} bf16 runs, {head}", False, repr(e)[:200])
        print(
            f"{head}, bf16, (4, 512, 1024, 128256), SimNPO loss\n"
            "| variant | median ms | peak MiB excl. grads | time vs naive | peak vs naive |\n|---|---|---|---|---|"
        )
        for name, (ms, mib) in rows.items():
            nt, nm = rows.get("naive", (0, 0))
            ratios = f"{ms / nt:.2f}x | {mib / nm:.3f}x" if nt > 0 and nm > 0 else "- | -"
            print(f"| {name} | {ms * 1e3:.1f} | {mib:.0f} | {ratios} |")
        if "fused" in rows:
            # the op's own buffers (module docstring): a bf16 [512, V] tile and its fp32 copy, plus the fp32 [V, H]
            # head-gradient accumulator with a trainable head (its bf16 cast is the returned gradient)
            model = (512 * v * (2 + 4) + (0 if frozen else 4 * v * h)) / 2**20
            check(
                f"fused peak excl. grads within 1.15x of its buffers, {head}",
                rows["fused"][1] <= 1.15 * model,
                f"{rows['fused'][1]:.0f} MiB measured, {model:.0f} MiB of buffers",
            )
        del hidden, weight, h32, w32, ref, grads, loss, ref_loss
        torch.cuda.empty_cache()


def trainer_checks():
    from datasets import Dataset

    from trl_unlearn import SimNPOConfig, SimNPOTrainer
    from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

    qa = [(f"Who wrote book {i}?", f"Author {i} wrote book {i} in {1900 + i}.") for i in range(32)]
    tok = train_tokenizer([f"Question: {q}\nAnswer: {a}" for q, a in qa], 512)
    ds = lambda r: Dataset.from_dict(
        {
            "prompt": [f"Question: {q}\nAnswer:" for q, _ in r],  # noqa: E731
            "completion": [" " + a for _, a in r],
        }
    )
    losses = {}
    for bf16 in (False, True):
        model = tiny_llama(tok, hidden_size=256, num_hidden_layers=4, seed=0)
        args = SimNPOConfig(
            output_dir=f"/tmp/gpu_check_{bf16}",
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-4,
            bf16=bf16,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            gradient_checkpointing=True,
            beta=2.5,
        )
        trainer = SimNPOTrainer(
            model=model, args=args, forget_dataset=ds(qa[:8]), retain_dataset=ds(qa[8:]), processing_class=tok
        )
        trainer.train()
        losses[bf16] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses[False], losses[True]))
    check("SimNPO bf16 step vs fp32 on CUDA", diff < 0.05, f"losses fp32 {losses[False]} bf16 {losses[True]}")

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    base = tiny_llama(tok, hidden_size=256, num_hidden_layers=4, seed=0)
    base.save_pretrained("/tmp/gpu_check_base")
    args = SimNPOConfig(
        output_dir="/tmp/gpu_check_qlora",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=True,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=True,
    )
    trainer = SimNPOTrainer(
        model="/tmp/gpu_check_base",
        args=args,
        forget_dataset=ds(qa[:8]),
        retain_dataset=ds(qa[8:]),
        processing_class=tok,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach().float())}
    check(
        "QLoRA on CUDA trains the adapters only",
        changed == {n for n in before if "lora_" in n},
        f"{len(changed)} tensors changed",
    )


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA device.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    op_checks()
    fused_checks()
    trainer_checks()
    sys.exit(0 if all(ok for _, ok in RESULTS) else 1)
