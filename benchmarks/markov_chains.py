"""Mixture-of-Markov-chains unlearning experiment (SimNPO paper §5; docs/method.md §7), run with the package's
`NPOTrainer` and `SimNPOTrainer`.

Data: 10 states. A retain chain on {0,1,2}, forget chain 1 on {3,4,5}, forget chain 2 on {6,7,8}. From one of its own
states a chain moves to each of its 3 states with probability 0.8/3 and to each of the 7 others with 0.2/7; from any
other state it moves uniformly (0.1). The initial state follows the same pattern. 10 000 retain and 5 000 forget-1
sequences of length 20; 5 000 forget-2 sequences of length 20 (setting A) or 5 (setting B). 80/20 train/test split.

Models: a 4-layer Llama, width 128 (4 heads, MLP 512), vocabulary = the 10 states + <pad> <s> </s> <unk>. A
sequence is the text "s1 s2 ... sL"; the tokenizer adds <s> in front and the trainers append </s>, so every state
token (the first one included, predicted from <s>) and the </s> is scored, both in pre-training and by the
trainers. Pre-training (a plain torch loop: it is not what is benchmarked): AdamW lr 5e-4 (torch defaults otherwise),
batch 128, 5 epochs, on all train data ("original" model) or on the retain train data only ("retrain" model; the
retain data are the same in both settings, so one retrain model serves both).

Unlearning: `NPOTrainer` (β = 1, reference log-probs precomputed) and `SimNPOTrainer` (β = 2.5, γ = 0 by default;
see `--simnpo_beta`), each on forget-1 ∪ forget-2 (train split) with the retain NLL regulariser (weight 1; forget
weight 1): AdamW lr 5e-4, constant schedule, no warm-up, no weight decay, no gradient clipping, fp32, no activation
checkpointing, 4 forget + 4 retain rows a step, 50 steps. A
`TrainerCallback` measures, before the first step and after every step, the token-averaged KL(retrain ‖ model) of the
next-token distributions (full vocabulary) at every position that predicts a state token, on the first `--eval_n`
sequences of the retain, forget-1 and forget-2 test sets. Each method runs once per `--unlearn_seeds` entry (the
trainer seed, i.e. which forget/retain rows are drawn) from the same pre-trained models; tables and figures show the
mean over those runs, and the summary averages each run's last `--tail` steps, because single steps are noisy (lr
5e-4 at batch 4 is a large step for this model).

    python benchmarks/markov_chains.py                       # settings A and B, figures in docs/figures
    python benchmarks/markov_chains.py --settings B --steps 20 --out_dir /tmp/figs
"""

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

NUM_STATES = 10
CHAINS = {"retain": (0, 1, 2), "forget1": (3, 4, 5), "forget2": (6, 7, 8)}
PAD, BOS, EOS, UNK = 10, 11, 12, 13
SETS = ("retain", "forget1", "forget2")
LABELS = {"retain": "retain", "forget1": "forget-1", "forget2": "forget-2"}


# ---------------------------------------------------------------------------------------------------------- data --
def chain_matrices(states, leakage=0.2):
    """(initial distribution [10], transition matrix [10, 10]) of the chain living on `states`."""
    own = np.zeros(NUM_STATES, dtype=bool)
    own[list(states)] = True
    row = np.where(own, (1 - leakage) / own.sum(), leakage / (~own).sum())
    trans = np.full((NUM_STATES, NUM_STATES), 1.0 / NUM_STATES)
    trans[own] = row
    return row, trans


def sample_chain(states, num, length, rng, leakage=0.2):
    """`num` sequences of `length` states, int64 [num, length]."""
    init, trans = chain_matrices(states, leakage)
    cum_init, cum_trans = np.cumsum(init), np.cumsum(trans, axis=1)
    seqs = np.empty((num, length), dtype=np.int64)
    u = rng.random((num, length))
    seqs[:, 0] = np.minimum(np.searchsorted(cum_init, u[:, 0], side="right"), NUM_STATES - 1)
    for t in range(1, length):
        rows = cum_trans[seqs[:, t - 1]]
        seqs[:, t] = np.minimum((rows <= u[:, t : t + 1]).sum(1), NUM_STATES - 1)
    return seqs


def make_data(args, setting):
    """{set: (train [n, L], test [m, L])}. Each set has its own seed stream (keyed by name and length), so the
    retain and forget-1 data are identical in settings A and B."""
    sizes = {
        "retain": (args.n_retain, args.len_retain),
        "forget1": (args.n_forget1, args.len_forget1),
        "forget2": (args.n_forget2, args.len_forget2_A if setting == "A" else args.len_forget2_B),
    }
    data = {}
    for i, name in enumerate(SETS):
        num, length = sizes[name]
        rng = np.random.default_rng([args.seed, i, length])
        seqs = sample_chain(CHAINS[name], num, length, rng, args.leakage)
        seqs = seqs[rng.permutation(num)]
        n_train = int(round(num * (1 - args.test_frac)))
        data[name] = (seqs[:n_train], seqs[n_train:])
    return data


def to_text(seqs):
    return [" ".join(map(str, s)) for s in seqs.tolist()]


def build_tokenizer():
    """Word-level tokenizer: state i has id i; <pad> 10, <s> 11 (added in front of every text), </s> 12, <unk> 13."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(NUM_STATES)}
    vocab.update({"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # What the trainers will see: "<s> s1 ... sL </s>"
    assert tokenizer("3 4 5" + tokenizer.eos_token)["input_ids"] == [BOS, 3, 4, 5, EOS]
    return tokenizer


def to_ids(seqs):
    """[n, L] states -> [n, L + 2] ids with <s> and </s>, as the trainers tokenize the text rows."""
    n = len(seqs)
    return torch.cat([torch.full((n, 1), BOS), torch.as_tensor(seqs), torch.full((n, 1), EOS)], dim=1)


# --------------------------------------------------------------------------------------------------------- model --
def build_model(tokenizer, seed):
    from trl_unlearn.tiny import tiny_llama

    return tiny_llama(tokenizer, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=64, seed=seed)


def pretrain(tokenizer, seq_sets, args, tag):
    """Plain torch loop: AdamW lr `--pre_lr`, batch `--pre_batch`, `--pre_epochs` epochs, every token after <s> scored."""
    model = build_model(tokenizer, args.seed)
    rows = [r for seqs in seq_sets for r in to_ids(seqs)]  # variable lengths: pad per batch
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pre_lr)
    model.train()
    t0, step = time.time(), 0
    for epoch in range(args.pre_epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        total, count = 0.0, 0
        for i in range(0, len(order), args.pre_batch):
            batch = [rows[j] for j in order[i : i + args.pre_batch]]
            ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=PAD)
            attn = (ids != PAD).long()
            labels = ids.masked_fill(attn == 0, -100)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total, count, step = total + loss.item(), count + 1, step + 1
        print(f"  [{tag}] epoch {epoch + 1}/{args.pre_epochs}: mean train NLL {total / count:.4f} "
              f"({step} steps, {time.time() - t0:.0f}s)", flush=True)
    return model.eval()


def get_pretrained(tokenizer, seq_sets, args, tag):
    """`pretrain`, optionally cached on disk under `--cache_dir` (keyed by the data and the recipe)."""
    if not args.cache_dir:
        return pretrain(tokenizer, seq_sets, args, tag)
    h = hashlib.sha256()
    for s in seq_sets:
        h.update(np.ascontiguousarray(s).tobytes())
        h.update(str(s.shape).encode())
    h.update(f"{args.seed}|{args.pre_lr}|{args.pre_batch}|{args.pre_epochs}".encode())
    path = os.path.join(args.cache_dir, f"{tag.split()[0]}-{h.hexdigest()[:16]}.pt")
    model = build_model(tokenizer, args.seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        print(f"  [{tag}] loaded from cache {path}", flush=True)
        return model.eval()
    model = pretrain(tokenizer, seq_sets, args, tag)
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# ------------------------------------------------------------------------------------------------------ metrics --
class KLEvaluator:
    """Token-averaged KL(retrain ‖ model) over the positions that predict a state token, per test set."""

    def __init__(self, retrain_model, test_sets, batch_size=512):
        self.batch_size = batch_size
        self.ids, self.ref_logp, self.mask = {}, {}, {}
        for name, seqs in test_sets.items():
            ids = to_ids(seqs)
            self.ids[name] = ids
            self.mask[name] = ids[:, 1:] < NUM_STATES  # targets that are states (not </s>)
            self.ref_logp[name] = self._logprobs(retrain_model, ids)

    @torch.no_grad()
    def _logprobs(self, model, ids):
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i : i + self.batch_size]  # one length per set: no padding
            logits = model(input_ids=chunk, attention_mask=torch.ones_like(chunk)).logits[:, :-1]
            out.append(torch.log_softmax(logits.float(), dim=-1))
        model.train(was_training)
        return torch.cat(out)

    def __call__(self, model):
        """{set: KL, set_dnll: model NLL − retrain NLL of the observed next states (per token; < 0: the model still
        predicts the set better than the retrain model, i.e. remembers it; > 0: it predicts it worse)}."""
        result = {}
        for name, ids in self.ids.items():
            lp_m, lp_r, mask = self._logprobs(model, ids), self.ref_logp[name], self.mask[name]
            kl = (lp_r.exp() * (lp_r - lp_m)).sum(-1)
            result[name] = kl[mask].mean().item()
            target = ids[:, 1:, None]
            dnll = lp_r.gather(-1, target) - lp_m.gather(-1, target)
            result[f"{name}_dnll"] = dnll[..., 0][mask].mean().item()
        return result


def make_tracker(evaluator):
    from transformers import TrainerCallback

    class KLTracker(TrainerCallback):
        """Records the KLs before training (step 0) and after every optimizer step, and the trainer's logs."""

        def __init__(self):
            self.kl, self.logs = [], []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.kl.append({"step": 0, **evaluator(model)})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.kl.append({"step": state.global_step, **evaluator(model)})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append({"step": state.global_step, **logs})

    return KLTracker()


# --------------------------------------------------------------------------------------------------- unlearning --
def unlearn(method, original, tokenizer, data, evaluator, args, seed):
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from trl_unlearn import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer

    forget = Dataset.from_dict({"text": to_text(data["forget1"][0]) + to_text(data["forget2"][0])})
    retain = Dataset.from_dict({"text": to_text(data["retain"][0])})
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"markov-{method}-{seed}-"),
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        bf16=False, activation_checkpointing=False,  # DPOConfig defaults both to True
        forget_weight=1.0, retain_weight=1.0, retain_loss_type="nll",
        seed=seed, data_seed=seed, use_cpu=True, dataloader_num_workers=0,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_level="error",
        precompute_ref_batch_size=512, per_device_eval_batch_size=512,
    )
    if method == "NPO":
        config, trainer_cls = NPOConfig(beta=args.npo_beta, **common), NPOTrainer
    else:
        config, trainer_cls = SimNPOConfig(beta=args.simnpo_beta, gamma=args.simnpo_gamma, **common), SimNPOTrainer
        config.forget_weight = args.simnpo_forget_weight
    tracker = make_tracker(evaluator)
    model = copy.deepcopy(original).train()  # the trainer patches the model's forward: never hand it `original`
    trainer = trainer_cls(model=model, args=config, forget_dataset=forget, retain_dataset=retain,
                          processing_class=tokenizer, callbacks=[tracker])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts are kept by the tracker instead
    t0 = time.time()
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is saved (save_strategy="no")
    return tracker.kl, tracker.logs, time.time() - t0


# ------------------------------------------------------------------------------------------------------ reports --
def mean_trace(runs):
    """Per-step mean over unlearning seeds of every tracked quantity."""
    keys = [k for k in runs[0][0] if k != "step"]
    return [{"step": rows[0]["step"], **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
            for rows in zip(*runs)]


def tail_mean(trace, key, tail):
    return float(np.mean([r[key] for r in trace[-tail:]]))


def kl_table(mean_traces, every):
    methods = list(mean_traces)
    head = "| step | " + " | ".join(f"{m} {LABELS[s]}" for m in methods for s in SETS) + " |"
    lines = [head, "|---:|" + "---:|" * (len(methods) * len(SETS))]
    n = len(mean_traces[methods[0]])
    for i in range(n):
        step = mean_traces[methods[0]][i]["step"]
        if step % every and i != n - 1:
            continue
        cells = [f"{mean_traces[m][i][s]:.4f}" for m in methods for s in SETS]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(setting, runs_by_method, tail):
    """One row per method: over seeds, mean ± sd of the last-`tail`-step mean of each quantity."""
    rows = []
    for m, runs in runs_by_method.items():
        per_seed = {k: [tail_mean(tr, k, tail) for tr in runs]
                    for k in ("retain", "forget1", "forget2", "forget1_dnll", "forget2_dnll")}
        per_seed["ratio"] = [b / a for a, b in zip(per_seed["forget1"], per_seed["forget2"])]
        per_seed["final_forget1"] = [tr[-1]["forget1"] for tr in runs]
        per_seed["final_forget2"] = [tr[-1]["forget2"] for tr in runs]
        per_seed["final_retain"] = [tr[-1]["retain"] for tr in runs]
        rows.append({"setting": setting, "method": m, "per_seed": per_seed,
                     **{k: (float(np.mean(v)), float(np.std(v))) for k, v in per_seed.items()}})
    return rows


def _pm(value, digits=3):
    mean, sd = value
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def summary_table(rows, initial):
    lines = [
        "| setting | method | retain KL | forget-1 KL | forget-2 KL | forget-2 / forget-1 | forget-1 ΔNLL | "
        "forget-2 ΔNLL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, kl0 in initial.items():
        lines.append(f"| {setting} | original (step 0) | {kl0['retain']:.3f} | {kl0['forget1']:.3f} | "
                     f"{kl0['forget2']:.3f} | {kl0['forget2'] / kl0['forget1']:.2f} | {kl0['forget1_dnll']:+.3f} | "
                     f"{kl0['forget2_dnll']:+.3f} |")
        for r in rows:
            if r["setting"] == setting:
                lines.append(
                    f"| {setting} | {r['method']} | {_pm(r['retain'])} | {_pm(r['forget1'])} | {_pm(r['forget2'])} | "
                    f"{_pm(r['ratio'], 2)} | {r['forget1_dnll'][0]:+.3f} | {r['forget2_dnll'][0]:+.3f} |"
                )
    return "\n".join(lines)


def seed_table(rows, seeds):
    lines = [f"| setting | method | seed | retain KL | forget-1 KL | forget-2 KL | forget-2 / forget-1 | "
             "final-step forget-1 / forget-2 KL |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["per_seed"]
        for i, seed in enumerate(seeds):
            lines.append(f"| {r['setting']} | {r['method']} | {seed} | {p['retain'][i]:.3f} | {p['forget1'][i]:.3f} | "
                         f"{p['forget2'][i]:.3f} | {p['ratio'][i]:.2f} | "
                         f"{p['final_forget1'][i]:.3f} / {p['final_forget2'][i]:.3f} |")
    return "\n".join(lines)


def _running_mean(values, window):
    """Trailing running mean (the first points average what is there): smooths the trajectories of the plot."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(setting, runs_by_method, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"NPO": "tab:blue", "SimNPO": "tab:orange"}
    styles = {"retain": (":", None), "forget1": ("-", "o"), "forget2": ("--", "s")}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    w = args.smooth
    for m, runs in runs_by_method.items():
        tr = mean_trace(runs)
        x = _running_mean([r["retain"] for r in tr], w)
        for s in ("forget1", "forget2"):
            y = _running_mean([r[s] for r in tr], w)
            ls, mk = styles[s]
            ax.plot(x, y, ls, color=colors.get(m), lw=1.5, label=f"{m}, {LABELS[s]}")
            ax.plot(x[-1:], y[-1:], mk, color=colors.get(m), ms=8)
            ax.plot([r["retain"] for r in tr], [r[s] for r in tr], mk, color=colors.get(m), ms=2, alpha=0.3)
        steps = [r["step"] for r in tr]
        for s in SETS:
            bx.plot(steps, [r[s] for r in tr], styles[s][0], color=colors.get(m), lw=1.8, label=f"{m}, {LABELS[s]}")
            for run in runs if len(runs) > 1 else []:
                bx.plot(steps, [r[s] for r in run], styles[s][0], color=colors.get(m), lw=0.6, alpha=0.25)
    start = mean_trace(runs_by_method[next(iter(runs_by_method))])[0]
    for s in ("forget1", "forget2"):
        ax.plot([start["retain"]], [start[s]], marker=styles[s][1], color="black", mfc="none", ms=10, ls="none")
    len2 = args.len_forget2_A if setting == "A" else args.len_forget2_B
    n = len(next(iter(runs_by_method.values())))
    ax.set_xlabel("retain distance: KL(retrain ‖ model) on retain test")
    ax.set_ylabel("forget distance: KL(retrain ‖ model) on forget test")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"Setting {setting}: forget-1 length {args.len_forget1}, forget-2 length {len2}; mean of {n} "
                 f"unlearning seed(s)\nlines: trailing {w}-step running mean (dots: raw steps); open black = "
                 f"original model, filled = step {args.steps}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    bx.set_xlabel("unlearning step")
    bx.set_ylabel("KL(retrain ‖ model)")
    bx.set_yscale("log")
    bx.set_title("per-step distances (thick: mean over seeds, thin: each seed)", fontsize=10)
    bx.legend(fontsize=7, ncol=2)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine():
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()}"


# ---------------------------------------------------------------------------------------------------------- main --
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="A,B", help="comma-separated settings: A (forget-2 length 20), B (length 5)")
    p.add_argument("--steps", type=int, default=50, help="unlearning steps (optimizer steps)")
    p.add_argument("--out_dir", default="docs/figures", help="where markov_setting_<S>.png are written")
    p.add_argument("--json", default=None, help="also write all traces and tables to this JSON file")
    p.add_argument("--seed", type=int, default=42, help="seeds the data, the model init and pre-training")
    p.add_argument("--unlearn_seeds", default="0,1,2",
                   help="comma-separated trainer seeds (order of the forget/retain rows); one unlearning run each")
    p.add_argument("--tail", type=int, default=10, help="summaries average the KLs over the last TAIL steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: robust on a shared machine; 2 is ~1.6x faster on 2 idle cores)")
    p.add_argument("--cache_dir", default=None, help="cache the pre-trained models here (off by default)")
    g = p.add_argument_group("data")
    g.add_argument("--n_retain", type=int, default=10_000)
    g.add_argument("--n_forget1", type=int, default=5_000)
    g.add_argument("--n_forget2", type=int, default=5_000)
    g.add_argument("--len_retain", type=int, default=20)
    g.add_argument("--len_forget1", type=int, default=20)
    g.add_argument("--len_forget2_A", type=int, default=20)
    g.add_argument("--len_forget2_B", type=int, default=5)
    g.add_argument("--leakage", type=float, default=0.2)
    g.add_argument("--test_frac", type=float, default=0.2)
    g.add_argument("--eval_n", type=int, default=128, help="test sequences per set used for the per-step KL")
    g = p.add_argument_group("pre-training (plain torch loop)")
    g.add_argument("--pre_lr", type=float, default=5e-4)
    g.add_argument("--pre_batch", type=int, default=128)
    g.add_argument("--pre_epochs", type=int, default=5)
    g = p.add_argument_group("unlearning (trl_unlearn trainers)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--batch_size", type=int, default=4, help="forget rows per step (as many retain rows are added)")
    g.add_argument("--methods", default="NPO,SimNPO")
    g.add_argument("--npo_beta", type=float, default=1.0)
    g.add_argument("--simnpo_beta", type=float, default=2.5,
                   help="SimNPO β (2.5: the package default and the paper's TOFU forget05 value; it was also the best "
                        "of a small (β, γ) grid run on setting A, see docs/results.md)")
    g.add_argument("--simnpo_gamma", type=float, default=0.0, help="SimNPO margin γ (paper convention, outside β)")
    g.add_argument("--simnpo_forget_weight", type=float, default=1.0)
    g.add_argument("--table_every", type=int, default=5, help="rows of the printed per-step tables")
    g.add_argument("--smooth", type=int, default=5, help="running-mean window of the forget-vs-retain plot (1: raw)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    t_start = time.time()
    settings = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(x) for x in args.unlearn_seeds.split(",") if x.strip()]
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    print(f"machine: {machine()}; torch threads: {torch.get_num_threads()}", flush=True)

    retrain, results, initial, timings, rows = None, {}, {}, {}, []
    for setting in settings:
        print(f"\n=== Setting {setting} ===", flush=True)
        data = make_data(args, setting)
        print("  sizes (train/test): " + ", ".join(
            f"{s} {len(data[s][0])}/{len(data[s][1])} x len {data[s][0].shape[1]}" for s in SETS), flush=True)
        t0 = time.time()
        if retrain is None:  # retain data are identical across settings
            retrain = get_pretrained(tokenizer, [data["retain"][0]], args, "retrain model")
        original = get_pretrained(tokenizer, [data[s][0] for s in SETS], args, f"original model {setting}")
        timings[f"pretrain {setting}"] = time.time() - t0
        evaluator = KLEvaluator(retrain, {s: data[s][1][: args.eval_n] for s in SETS})
        runs, logs = {m: [] for m in methods}, {m: [] for m in methods}
        t0 = time.time()
        for method in methods:
            for seed in seeds:
                kl, log, secs = unlearn(method, original, tokenizer, data, evaluator, args, seed)
                runs[method].append(kl)
                logs[method].append(log)
                last = kl[-1]
                print(f"  {method} seed {seed}: {secs:.0f}s; last-step KL retain {last['retain']:.4f} "
                      f"forget-1 {last['forget1']:.4f} forget-2 {last['forget2']:.4f}", flush=True)
        timings[f"unlearn {setting}"] = time.time() - t0
        initial[setting] = runs[methods[0]][0][0]
        path = os.path.join(args.out_dir, f"markov_setting_{setting}.png")
        plot(setting, runs, args, path)
        mean_traces = {m: mean_trace(r) for m, r in runs.items()}
        print(f"\n### Setting {setting}: KL(retrain ‖ model), mean over unlearning seeds {seeds} "
              f"(every {args.table_every} steps)\n", flush=True)
        print(kl_table(mean_traces, args.table_every), flush=True)
        print(f"\nfigure: {path}", flush=True)
        results[setting] = {"runs": runs, "logs": logs}
        rows += summarize(setting, runs, args.tail)

    wall = time.time() - t_start
    print(f"\n### Summary: mean over the last {args.tail} steps, mean ± sd over unlearning seeds {seeds}\n")
    print(summary_table(rows, initial))
    print("\nΔNLL = model NLL − retrain NLL of the forget test sequences, per token (last-steps mean, mean over seeds):"
          " < 0 still remembered, > 0 pushed below the retrain model (over-unlearned).")
    print(f"\n### Per seed (last-{args.tail}-step means)\n")
    print(seed_table(rows, seeds))
    print(f"\nwall time {wall:.0f}s; " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"command: python {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": rows, "initial": initial, "wall_s": wall,
                       "timings": timings, "machine": machine(), "threads": torch.get_num_threads()}, f, indent=1)
    return results, rows


if __name__ == "__main__":
    main()
