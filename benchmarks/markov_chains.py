"""Mixture-of-Markov-chains unlearning experiment of the SimNPO paper (§5, Fig. 5a, App. H; docs/method.md §7).

Defaults = the paper's setup, as in the authors' `synthetic/` code (OPTML-Group/Unlearn-Simple):

- Data (seed 42): 10 states; retain chain on {0,1,2}, forget-1 on {3,4,5}, forget-2 on {6,7,8}. From one of its own
  states a chain moves to each of its 3 states with probability 0.8/3 and to each of the 7 others with 0.2/7; from any
  other state uniformly (0.1). Initial distribution: the same pattern. 10 000 retain and 5 000 forget-1 sequences of
  length 20, 5 000 forget-2 sequences; 80/20 train/test split per set. No begin/end tokens: inputs `s[:-1]`, labels
  `s[1:]`, padded to 19 positions (inputs with state 0, labels with -100), so |y| = 19 or 4.
- Settings (App. H): `short` (Fig. 5a): forget-2 sequences of length 5, all three sets in pre-training; `unseen`:
  forget-2 of length 20 left OUT of pre-training (the authors' `--only_forget1`), still in the forget set.
- Model (`MarkovTransformer`, the authors' shape): token + learned position embeddings (128), 4 post-LayerNorm blocks
  of one full-width causal attention head (no bias, no output projection) and a 128-128-128 ReLU MLP, output 128->10.
- Pre-training (plain torch loop): AdamW lr 5e-4, weight decay 0, eps 1e-6 (the defaults of `transformers.AdamW`,
  which the authors use), batch 128, 5 epochs, token-mean cross-entropy; "original" = all train data of the setting,
  "retrain" = retain train data only (identical in both settings, so one retrain model serves both). One pre-training
  per model, init and shuffling seed `--seed`.
- Unlearning: forget-1 ∪ forget-2 train sequences, batch 4, 50 steps, AdamW (as above), forget loss ONLY (no retain
  term): NPO β 0.2 (reference = the original model's summed log-probs, computed once), SimNPO β 4, γ 0. A plain torch
  loop (the model is a small `nn.Module`, not a Hugging Face model, so not the package's trainers), but the loss is
  the package's own: `trl_unlearn.losses.npo_loss` / `simnpo_loss` on per-sequence summed label log-probs and scored
  token counts (`sequence_logps`). Each method runs once per `--unlearn_seeds` entry (the order of forget batches).
- Metric, before step 1 and after every step, on the FULL test sets: KL(true transition ‖ model) at every labelled
  position, token-averaged (`truth_kl`). On retain: "retain distance" (lower = better); on forget-1 / forget-2:
  "forget quality" (higher = more forgotten). The retrain model's forget quality is each chain's target level;
  `first_crossing` gives the retain distance at which a chain first reaches it.

Deviations from the authors' code: the samples come from numpy streams (same distributions, other draws than their
torch.multinomial ones); 5 unlearning seeds instead of their one run (seed 42); nothing else known.

Outputs: a crossing table (per method, chain, setting, seed), the paper's figure (forget quality vs retain distance
along the path) as `<out_dir>/markov_<setting>.png`, and every trace as `<out_dir>/markov_traces.json`.

    python benchmarks/markov_chains.py                     # both settings, 5 seeds, 2 processes
    python benchmarks/markov_chains.py --settings short --unlearn_seeds 0 --out_dir /tmp/mc
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_STATES = 10
CHAINS = {"retain": (0, 1, 2), "forget1": (3, 4, 5), "forget2": (6, 7, 8)}
LABELS = {"retain": "retain", "forget1": "forget-1", "forget2": "forget-2"}
SETTINGS = {  # name: (forget-2 length, forget-2 in pre-training, title)
    "short": (5, True, "short: forget-2 sequences of length 5 (paper Fig. 5a)"),
    "unseen": (20, False, "unseen: forget-2 (length 20) left out of pre-training (paper App. H, --only_forget1)"),
}
# Retain distance at which a forget chain first reaches the retrain level, read off the authors' figures (one run,
# seed 42): short from docs/method.md §7; unseen read off synthetic/figures/...forget2_20.../...seed_42.pdf (forget-2
# starts at the retrain level there). Printed beside the measured values; approximate.
PAPER = {
    ("short", "NPO", "forget2"): 0.19,
    ("short", "SimNPO", "forget2"): 0.03,
    ("short", "NPO", "forget1"): 0.03,
    ("short", "SimNPO", "forget1"): 0.075,
    ("unseen", "NPO", "forget1"): 0.13,
    ("unseen", "SimNPO", "forget1"): 0.085,
}


# ---------------------------------------------------------------------------------------------------------- data --
def chain_matrices(states, num_states=NUM_STATES, leakage=0.2):
    """(initial distribution [S], transition matrix [S, S]) of the chain living on `states`: rows of its own states
    put (1 - leakage)/|states| on each own state and leakage/(S - |states|) on every other; other rows are uniform."""
    own = np.zeros(num_states, dtype=bool)
    own[list(states)] = True
    row = np.where(own, (1 - leakage) / own.sum(), leakage / (~own).sum())
    trans = np.full((num_states, num_states), 1.0 / num_states)
    trans[own] = row
    return row, trans


def sample_chain(init, trans, num, length, rng):
    """`num` sequences of `length` states drawn from the chain, int64 [num, length]."""
    cum_init, cum_trans = np.cumsum(init), np.cumsum(trans, axis=1)
    u = rng.random((num, length))
    seqs = np.empty((num, length), dtype=np.int64)
    seqs[:, 0] = np.minimum((cum_init[None] <= u[:, :1]).sum(1), len(init) - 1)
    for t in range(1, length):
        seqs[:, t] = np.minimum((cum_trans[seqs[:, t - 1]] <= u[:, t : t + 1]).sum(1), len(init) - 1)
    return seqs


def make_data(seed=42, lengths=(20, 20, 20), sizes=(10_000, 5_000, 5_000), leakage=0.2, test_size=0.2):
    """{set: (train [n, L], test [m, L])} for retain, forget1, forget2 (`lengths`/`sizes` in that order). Each set
    draws from its own stream `default_rng([seed, i])`, so retain and forget-1 do not depend on forget-2's length."""
    data = {}
    for i, (name, length, num) in enumerate(zip(CHAINS, lengths, sizes)):
        rng = np.random.default_rng([seed, i])
        seqs = sample_chain(*chain_matrices(CHAINS[name], leakage=leakage), num, length, rng)
        perm = rng.permutation(num)
        n_test = int(math.ceil(num * test_size))
        data[name] = (seqs[perm[n_test:]], seqs[perm[:n_test]])
    return data


def to_inputs_labels(seqs, width=19):
    """[n, L] states -> (inputs, labels) int64 [n, width]: inputs `s[:-1]`, labels `s[1:]`, padded at the end with
    state 0 (inputs; causal attention never lets it reach a scored position) and -100 (labels, ignored)."""
    seqs = torch.as_tensor(seqs)
    n, length = seqs.shape
    if length - 1 > width:
        raise ValueError(f"sequences of length {length} need width >= {length - 1}; got {width}")
    inputs, labels = torch.zeros(n, width, dtype=torch.long), torch.full((n, width), -100, dtype=torch.long)
    inputs[:, : length - 1], labels[:, : length - 1] = seqs[:, :-1], seqs[:, 1:]
    return inputs, labels


# --------------------------------------------------------------------------------------------------------- model --
class Block(nn.Module):
    """Post-LN block: h = LN1(h + attn(h)); h = LN2(h + MLP(h)); one causal head of full width d."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.ln1, self.ln2 = nn.Linear(d, 3 * d, bias=False), nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, h):
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, T, d] each
        h = self.ln1(h + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1))
        return self.ln2(h + self.mlp(h))


class MarkovTransformer(nn.Module):
    """ids [B, T] -> next-state logits [B, T, num_states]: the authors' synthetic/model.py shape (torch default init,
    position embeddings N(0, 0.02))."""

    def __init__(self, num_states=NUM_STATES, d=128, n_layer=4, n_positions=19):
        super().__init__()
        self.tok, self.pos = nn.Embedding(num_states, d), nn.Embedding(n_positions, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.out = nn.Linear(d, num_states)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.size(1), device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def sequence_logps(logits, labels):
    """logits [B, T, S], labels [B, T] (-100 = ignored) -> (summed label log-probs [B], scored tokens [B] float)."""
    mask = labels != -100
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token * mask).sum(-1), mask.sum(-1).float()


def truth_kl(log_q, p_true, mask):
    """Token-averaged KL(p_true ‖ q) over `mask`: log_q, p_true [N, T, S], mask [N, T] -> float."""
    kl = (torch.xlogy(p_true, p_true) - p_true * log_q).sum(-1)
    return (kl * mask).sum().item() / mask.sum().item()


class TruthKL:
    """model -> {set: KL(true transition ‖ model)} on fixed test sets; `test_sets` = {set: (inputs, labels, trans)}."""

    def __init__(self, test_sets, batch_size=500):
        self.batch_size, self.sets = batch_size, {}
        for name, (inputs, labels, trans) in test_sets.items():
            keep = int((labels != -100).any(0).nonzero().max()) + 1  # trailing all-padding columns change nothing
            inputs, labels = inputs[:, :keep], labels[:, :keep]
            self.sets[name] = (inputs, torch.as_tensor(trans, dtype=torch.float32)[inputs], labels != -100)

    @torch.no_grad()
    def __call__(self, model):
        out = {}
        for name, (inputs, p_true, mask) in self.sets.items():
            log_q = torch.cat([torch.log_softmax(model(x).float(), -1) for x in inputs.split(self.batch_size)])
            out[name] = truth_kl(log_q, p_true, mask)
        return out


# ----------------------------------------------------------------------------------------------------- crossing --
def first_crossing(trace_forget, trace_retain, level):
    """First step t with `trace_forget[t] >= level` -> (t, trace_retain[t]); None if the chain never reaches it.
    Step 0 is the model before unlearning."""
    for t, (f, r) in enumerate(zip(trace_forget, trace_retain)):
        if f >= level:
            return t, float(r)
    return None


def summarize_crossings(crossings):
    """[(step, retain) or None per seed] -> {n, crossed, and over the crossed seeds: retain mean/sd/min/max,
    step_mean}."""
    hit = [c for c in crossings if c is not None]
    r = np.array([c[1] for c in hit])
    out = {"n": len(crossings), "crossed": len(hit)}
    if hit:
        out.update(
            mean=float(r.mean()),
            sd=float(r.std(ddof=1)) if len(r) > 1 else 0.0,
            min=float(r.min()),
            max=float(r.max()),
            step_mean=float(np.mean([c[0] for c in hit])),
        )
    return out


# ------------------------------------------------------------------------------------------------------- workers --
_DATA = {}


def setting_data(args, setting):
    """(train sets, TruthKL evaluator) of a setting, built once per process."""
    if setting not in _DATA:
        len2 = SETTINGS[setting][0]
        data = make_data(
            args.seed,
            (args.length, args.length, len2),
            (args.n_retain, args.n_forget1, args.n_forget2),
            args.leakage,
            args.test_size,
        )
        width = args.length - 1
        train = {s: to_inputs_labels(data[s][0], width) for s in CHAINS}
        test = {
            s: (*to_inputs_labels(data[s][1], width), chain_matrices(CHAINS[s], leakage=args.leakage)[1])
            for s in CHAINS
        }
        _DATA[setting] = (train, TruthKL(test, args.eval_batch))
    return _DATA[setting]


def _init_worker(threads):
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def pretrain_job(job):
    """job = (tag, setting, args): tag "retrain" (retain only) or "original" (the setting's pre-training sets).
    -> (tag, setting, state_dict, {setting: KL dict of the trained model}, (wall s, CPU s))."""
    tag, setting, args = job
    t0, c0 = time.time(), time.process_time()
    train, _ = setting_data(args, setting)
    names = ["retain"] if tag == "retrain" else ["retain", "forget1"] + (["forget2"] if SETTINGS[setting][1] else [])
    inputs = torch.cat([train[s][0] for s in names])
    labels = torch.cat([train[s][1] for s in names])
    torch.manual_seed(args.seed)
    model = MarkovTransformer(n_positions=args.length - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pre_lr, weight_decay=0.0, eps=1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.pre_epochs):
        total = 0.0
        batches = torch.randperm(len(inputs), generator=gen).split(args.pre_batch)
        for idx in batches:
            loss = F.cross_entropy(model(inputs[idx]).flatten(0, 1), labels[idx].flatten(), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        print(
            f"  [{tag} {setting}] epoch {epoch + 1}/{args.pre_epochs}: train NLL {total / len(batches):.4f} "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
    settings = list(args.settings) if tag == "retrain" else [setting]
    kls = {s: setting_data(args, s)[1](model) for s in settings}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return tag, setting, state, kls, (time.time() - t0, time.process_time() - c0)


def unlearn_job(job):
    """job = (setting, method, seed, original state_dict, args) -> (setting, method, seed, trace, (wall s, CPU s)).
    trace[t] = {"step", "retain", "forget1", "forget2", and for t > 0 "loss" and the mean gradient weight of the
    batch's forget-1 / forget-2 rows (None if none)}."""
    from trl_unlearn.losses import npo_loss, npo_weight, simnpo_loss, simnpo_weight

    setting, method, seed, state, args = job
    t0, c0 = time.time(), time.process_time()
    train, evaluate = setting_data(args, setting)
    inputs = torch.cat([train["forget1"][0], train["forget2"][0]])
    labels = torch.cat([train["forget1"][1], train["forget2"][1]])
    chain = torch.cat([torch.full((len(train[s][0]),), i) for i, s in enumerate(("forget1", "forget2"))])
    model = MarkovTransformer(n_positions=args.length - 1)
    model.load_state_dict(state)
    ref_logps = None
    if method == "NPO":  # the original model's summed log-probs, computed once
        with torch.no_grad():
            ref_logps = torch.cat(
                [
                    sequence_logps(model(x), y)[0]
                    for x, y in zip(inputs.split(args.eval_batch), labels.split(args.eval_batch))
                ]
            )
    gen = torch.Generator().manual_seed(seed)
    need = args.steps * args.batch_size
    order = torch.cat([torch.randperm(len(inputs), generator=gen) for _ in range(-(-need // len(inputs)))])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, eps=1e-6)
    trace = [{"step": 0, **evaluate(model)}]
    for step in range(1, args.steps + 1):
        idx = order[(step - 1) * args.batch_size : step * args.batch_size]
        logps, num_tokens = sequence_logps(model(inputs[idx]), labels[idx])
        if method == "NPO":
            losses = npo_loss(logps, ref_logps[idx], args.npo_beta)
            weight = npo_weight(logps.detach(), ref_logps[idx], args.npo_beta)
        elif method == "SimNPO":
            losses = simnpo_loss(logps, num_tokens, args.simnpo_beta, args.simnpo_gamma)
            weight = simnpo_weight(logps.detach(), num_tokens, args.simnpo_beta, args.simnpo_gamma)
        else:
            raise ValueError(f"unknown method {method!r}: use NPO or SimNPO")
        loss = losses.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w = {
            f"w_forget{i + 1}": weight[chain[idx] == i].mean().item() if (chain[idx] == i).any() else None
            for i in range(2)
        }
        trace.append({"step": step, **evaluate(model), "loss": loss.item(), **w})
    return setting, method, seed, trace, (time.time() - t0, time.process_time() - c0)


# ----------------------------------------------------------------------------------------------------- reporting --
def crossing_rows(results, levels, args):
    """One row per (setting, method, chain) with the per-seed crossings and their summary."""
    rows = []
    for setting in args.settings:
        for method in args.methods:
            traces = [results[setting][method][s] for s in args.unlearn_seeds]
            for chain, other in (("forget1", "forget2"), ("forget2", "forget1")):
                per_seed = [
                    first_crossing([r[chain] for r in tr], [r["retain"] for r in tr], levels[setting][chain])
                    for tr in traces
                ]
                at = [tr[c[0]][other] for tr, c in zip(traces, per_seed) if c]  # the other chain at the crossing
                rows.append(
                    {
                        "setting": setting,
                        "method": method,
                        "chain": chain,
                        "level": levels[setting][chain],
                        "per_seed": per_seed,
                        **summarize_crossings(per_seed),
                        "other_at_crossing": float(np.mean(at)) if at else None,
                        "paper": PAPER.get((setting, method, chain)),
                    }
                )
    return rows


def crossing_table(rows, initial):
    lines = [
        "| setting | method | chain | original → retrain forget quality | crossed | retain distance at crossing: "
        "mean ± sd [min, max] | step (mean) | other chain there (mean) | paper (≈) |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        cell = f"{r['mean']:.3f} ± {r['sd']:.3f} [{r['min']:.3f}, {r['max']:.3f}]" if r["crossed"] else "never"
        step = f"{r['step_mean']:.1f}" if r["crossed"] else "-"
        other = f"{r['other_at_crossing']:.3f}" if r["crossed"] else "-"
        paper = f"{r['paper']:.3f}" if r["paper"] is not None else "-"
        lines.append(
            f"| {r['setting']} | {r['method']} | {LABELS[r['chain']]} | "
            f"{initial[r['setting']][r['chain']]:.3f} → {r['level']:.3f} | {r['crossed']}/{r['n']} | {cell} | "
            f"{step} | {other} | {paper} |"
        )
    return "\n".join(lines)


def seed_table(rows, seeds):
    lines = [
        "| setting | method | chain | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|" + "---|" * len(seeds),
    ]
    for r in rows:
        cells = [f"{c[1]:.3f} (step {c[0]})" if c else "never" for c in r["per_seed"]]
        lines.append(f"| {r['setting']} | {r['method']} | {LABELS[r['chain']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(setting, runs, levels, retrain_retain, rows, args, path):
    """Left: the paper's figure, forget quality vs retain distance along the unlearning path (linear axes, around the
    crossings), per method and chain: thin lines each seed, thick the mean over seeds, x each seed's first crossing;
    open black = original, filled black = retrain, gray lines = retrain levels. Middle: the whole path (log axes).
    Right: every distance per step, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors, styles = {"NPO": "tab:blue", "SimNPO": "tab:red"}, {"forget1": "-", "forget2": "--"}
    marks = {"forget1": "*", "forget2": "o"}
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.8))
    ax, lx, bx = axes
    first = next(iter(runs.values()))[0][0]
    crossed = [c[1] for r in rows for c in r["per_seed"] if c]
    for method, traces in runs.items():
        retain = np.array([[r["retain"] for r in tr] for tr in traces])
        for chain in ("forget1", "forget2"):
            forget = np.array([[r[chain] for r in tr] for tr in traces])
            label = f"{method} - {LABELS[chain]}"
            for a in (ax, lx):
                for x, y in zip(retain, forget):
                    a.plot(x, y, styles[chain], color=colors[method], lw=0.6, alpha=0.35)
                a.plot(
                    retain.mean(0),
                    forget.mean(0),
                    styles[chain],
                    color=colors[method],
                    lw=2.2,
                    label=f"{label} (mean of {len(traces)} seeds)",
                )
            bx.plot(forget.mean(0), styles[chain], color=colors[method], lw=1.8, label=label)
            row = next(r for r in rows if (r["method"], r["chain"]) == (method, chain))
            pts = [c[1] for c in row["per_seed"] if c]
            ax.plot(pts, [levels[chain]] * len(pts), "x", color=colors[method], ms=9, mew=2)
        bx.plot(retain.mean(0), ":", color=colors[method], lw=1.8, label=f"{method} - retain distance")
    for chain in ("forget1", "forget2"):
        for a in axes:
            a.axhline(levels[chain], ls=styles[chain], color="gray", lw=0.9)
        for a in (ax, lx):
            a.plot(first["retain"], first[chain], marks[chain], color="black", mfc="none", ms=14, mew=1.5)
            a.plot(retrain_retain, levels[chain], marks[chain], color="black", ms=14)
    ax.set_xlim(0, 1.3 * max(crossed + [2 * first["retain"]]))
    ax.set_ylim(0, 1.5 * max(levels.values()))
    lx.set_xscale("log")
    lx.set_yscale("log")
    for a in (ax, lx):
        a.set_xlabel("retain distance: KL(true transitions ‖ model) on retain test")
        a.set_ylabel("forget quality: KL(true transitions ‖ model) on forget test")
        a.grid(alpha=0.3, which="both")
    ax.set_title(
        f"{SETTINGS[setting][2]}\nNPO β {args.npo_beta}, SimNPO β {args.simnpo_beta}, forget loss only; "
        "x: first crossing (each seed)\nopen black: original, filled: retrain (gray: its levels)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    lx.set_title("the whole path, log axes", fontsize=9)
    bx.set_yscale("log")
    bx.set_xlabel("unlearning step")
    bx.set_ylabel("KL(true transitions ‖ model)")
    bx.set_title("per step, mean over seeds (gray: retrain forget levels)", fontsize=9)
    bx.legend(fontsize=7, ncol=2)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main --
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="short,unseen", help=f"comma-separated, from {list(SETTINGS)}")
    p.add_argument("--methods", default="NPO,SimNPO")
    p.add_argument("--unlearn_seeds", default="0,1,2,3,4", help="one unlearning run per seed (order of forget batches)")
    p.add_argument("--seed", type=int, default=42, help="data, model init and pre-training order")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out_dir", default="docs/figures", help="markov_<setting>.png and markov_traces.json go here")
    g = p.add_argument_group("data")
    g.add_argument("--n_retain", type=int, default=10_000)
    g.add_argument("--n_forget1", type=int, default=5_000)
    g.add_argument("--n_forget2", type=int, default=5_000)
    g.add_argument("--length", type=int, default=20, help="retain / forget-1 (and unseen forget-2) sequence length")
    g.add_argument("--leakage", type=float, default=0.2)
    g.add_argument("--test_size", type=float, default=0.2)
    g.add_argument("--eval_batch", type=int, default=500)
    g = p.add_argument_group("pre-training")
    g.add_argument("--pre_lr", type=float, default=5e-4)
    g.add_argument("--pre_batch", type=int, default=128)
    g.add_argument("--pre_epochs", type=int, default=5)
    g = p.add_argument_group("unlearning")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--batch_size", type=int, default=4)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--npo_beta", type=float, default=0.2)
    g.add_argument("--simnpo_beta", type=float, default=4.0)
    g.add_argument("--simnpo_gamma", type=float, default=0.0, help="margin γ, paper convention (outside β)")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.unlearn_seeds = [int(s) for s in args.unlearn_seeds.split(",") if s.strip()]
    bad = [s for s in args.settings if s not in SETTINGS] + [m for m in args.methods if m not in ("NPO", "SimNPO")]
    if bad or not args.settings or not args.methods or not args.unlearn_seeds:
        p.error(
            f"unknown or empty --settings/--methods/--unlearn_seeds ({bad}); settings: {list(SETTINGS)}, "
            "methods: NPO, SimNPO"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.jobs} processes x "
        f"{args.threads} torch thread(s); load average at start {load_start[0]:.2f}",
        flush=True,
    )
    states, kls, secs, results = {}, {}, {}, {s: {m: {} for m in args.methods} for s in args.settings}
    with mp.get_context("spawn").Pool(args.jobs, _init_worker, (args.threads,)) as pool:
        jobs = [("retrain", args.settings[0], args)] + [("original", s, args) for s in args.settings]
        pending = []
        for tag, setting, state, kl, sec in pool.imap_unordered(pretrain_job, jobs):
            states[tag, setting], secs[f"pretrain {tag} {setting}"] = state, sec
            kls.update({(tag, s): v for s, v in kl.items()})
            if tag == "original":  # its unlearning runs can start now
                pending += [
                    pool.apply_async(unlearn_job, ((setting, m, seed, state, args),))
                    for m in args.methods
                    for seed in args.unlearn_seeds
                ]
        for job in pending:
            setting, method, seed, trace, sec = job.get()
            results[setting][method][seed] = trace
            secs[f"unlearn {setting} {method} {seed}"] = sec
            last = trace[-1]
            print(
                f"  {setting} {method} seed {seed}: {sec[0]:.0f}s wall, {sec[1]:.0f}s CPU; step {last['step']}: "
                f"retain {last['retain']:.4f} forget-1 {last['forget1']:.4f} forget-2 {last['forget2']:.4f}",
                flush=True,
            )

    levels = {s: {c: kls["retrain", s][c] for c in ("forget1", "forget2")} for s in args.settings}
    initial = {s: kls["original", s] for s in args.settings}
    rows = crossing_rows(results, levels, args)
    print("\nKL(true transitions ‖ model) of the pre-trained models (full test sets):\n")
    print("| setting | model | retain | forget-1 | forget-2 |\n|---|---|---:|---:|---:|")
    for s in args.settings:
        for tag in ("original", "retrain"):
            k = kls[tag, s]
            print(f"| {s} | {tag} | {k['retain']:.4f} | {k['forget1']:.4f} | {k['forget2']:.4f} |")
    print(
        f"\nRetain distance at which each forget chain first reaches the retrain model's forget quality "
        f"(unlearning seeds {args.unlearn_seeds}; one pre-training per setting, seed {args.seed}):\n"
    )
    print(crossing_table(rows, initial))
    print("\nPer seed: retain distance at the first crossing (step):\n")
    print(seed_table(rows, args.unlearn_seeds))
    for s in args.settings:
        path = os.path.join(args.out_dir, f"markov_{s}.png")
        plot(
            s,
            {m: [results[s][m][k] for k in args.unlearn_seeds] for m in args.methods},
            levels[s],
            kls["retrain", s]["retain"],
            [r for r in rows if r["setting"] == s],
            args,
            path,
        )
        print(f"figure: {path}")
    wall, load_end = time.time() - t_start, os.getloadavg()
    print(
        f"\nwall time {wall:.0f}s ({wall / 60:.1f} min); load average at end {load_end[0]:.2f} / {load_end[1]:.2f} / "
        f"{load_end[2]:.2f} (1/5/15 min); worker CPU time {sum(c for _, c in secs.values()):.0f}s "
        f"(pre-training {sum(c for k, (_, c) in secs.items() if k.startswith('pretrain')):.0f}s)"
    )
    print(f"command: python {' '.join(sys.argv)}")
    path = os.path.join(args.out_dir, "markov_traces.json")
    with open(path, "w") as f:
        json.dump(
            {
                "args": vars(args),
                "pretrained": {f"{t} {s}": v for (t, s), v in kls.items()},
                "levels": levels,
                "crossings": rows,
                "traces": results,
                "seconds": secs,
                "wall_s": wall,
                "load_average": {"start": load_start, "end": load_end},
            },
            f,
            indent=1,
        )
    print(f"traces: {path}")
    return rows, results


if __name__ == "__main__":
    main()
