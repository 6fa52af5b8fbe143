"""Model cards of unlearned models: what was forgotten, from which model, with which method and settings, and the
evaluation, with the Hub metadata (`base_model`, `datasets`, `tags`, `model-index`).

`UnlearningCard` holds the facts; `write_card(card, output_dir)` renders README.md; `add_evaluation(output_dir, ...)`
records evaluation results in an existing card (`trl-unlearn eval ... --update_model_card`).
"""

import os
import textwrap
from dataclasses import dataclass, field
from enum import Enum

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .loading import is_hub_id
from .outputs import write_text_atomic

CITATIONS = {
    "SimNPO": textwrap.dedent("""\
        @article{fan2024simplicity,
            title   = {{Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning}},
            author  = {Chongyu Fan and Jiancheng Liu and Licong Lin and Jinghan Jia and Ruiqi Zhang and Song Mei and Sijia Liu},
            year    = 2024,
            journal = {arXiv preprint arXiv:2410.07163},
        }"""),
    "NPO": textwrap.dedent("""\
        @article{zhang2024negative,
            title   = {{Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning}},
            author  = {Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei},
            year    = 2024,
            journal = {arXiv preprint arXiv:2404.05868},
        }"""),
    "TOFU": textwrap.dedent("""\
        @article{maini2024tofu,
            title   = {{TOFU: A Task of Fictitious Unlearning for LLMs}},
            author  = {Pratyush Maini and Zhili Feng and Avi Schwarzschild and Zachary C. Lipton and J. Zico Kolter},
            year    = 2024,
            journal = {arXiv preprint arXiv:2401.06121},
        }"""),
    "WMDP": textwrap.dedent("""\
        @article{li2024wmdp,
            title   = {{The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning}},
            author  = {Nathaniel Li and Alexander Pan and Anjali Gopal and Summer Yue and Daniel Berrios and Alice Gatti and Justin D. Li and Ann-Kathrin Dombrowski and Shashwat Goel and Long Phan and Gabriel Mukobi and Nathan Helm-Burger and Rassin Lababidi and Lennart Justen and Andrew B. Liu and Michael Chen and Isabelle Barrass and Oliver Zhang and Xiaoyuan Zhu and Rishub Tamirisa and Bhrugu Bharathi and Adam Khoja and Zhenqi Zhao and Ariel Herbert-Voss and Cort B. Breuer and Samuel Marks and Oam Patel and Andy Zou and Mantas Mazeika and Zifan Wang and Palash Oswal and Weiran Lin and Adam A. Hunt and Justin Tienken-Harder and Kevin Y. Shih and Kemper Talley and John Guan and Russell Kaplan and Ian Steneker and David Campbell and Brad Jokubaitis and Alex Levinson and Jean Wang and William Qian and Kallol Krishna Karmakar and Steven Basart and Stephen Fitz and Mindy Levine and Ponnurangam Kumaraguru and Uday Tupakula and Vijay Varadharajan and Ruoyu Wang and Yan Shoshitaishvili and Jimmy Ba and Kevin M. Esvelt and Alexandr Wang and Dan Hendrycks},
            year    = 2024,
            journal = {arXiv preprint arXiv:2403.03218},
        }"""),
}

LIMITATIONS = (
    "Unlearning is approximate. Training lowers the model's likelihood of the forget data while regularising on the "
    "retain data; it does not provably remove the data's influence. Forgotten content can resurface under relearning "
    "(a few fine-tuning steps on related data), paraphrased or adversarial prompts, or membership-inference attacks. "
    "Judge it by the evaluation above, and re-evaluate for your own threat model before relying on it."
)
_EVAL_START, _EVAL_END = "<!-- trl-unlearn evaluation -->", "<!-- /trl-unlearn evaluation -->"


@dataclass
class UnlearningCard:
    """Facts for the card. `base_model`: the path or Hub id the model was loaded from; `forget_data` /
    `retain_data`: descriptions such as `"locuslab/TOFU (forget10), 400 examples"`; `datasets`: Hub dataset ids for
    the metadata; `evaluation`: `{metric: value}`; `eval_dataset`: what the evaluation ran on (for `model-index`);
    `directions`: `{metric: what "better" means}`; `eval_reference`: the reference (retain / retrained model) report
    behind forget quality or PrivLeak; `training`: how training ended (steps done of planned, why it stopped)."""

    method: str
    base_model: str
    forget_data: str
    retain_data: str
    reference: str
    hyperparameters: dict
    paper: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    datasets: list = field(default_factory=list)
    evaluation: dict | None = None
    eval_dataset: str | None = None
    prompt_format: str | None = None
    directions: dict = field(default_factory=dict)
    eval_reference: str | None = None
    training: str | None = None


def _eval_results(evaluation: dict | None, dataset: str | None) -> list | None:
    numeric = {k: v for k, v in (evaluation or {}).items() if isinstance(v, (int, float)) and v == v}
    if not numeric:
        return None
    name = dataset or "unlearning evaluation"
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Unlearning",
            dataset_type=name,
            dataset_name=name,
            metric_type=k,
            metric_name=k,
            metric_value=float(v),
        )
        for k, v in numeric.items()
    ]


def _metric_line(name: str, value, directions: dict) -> str:
    shown = f"{value:.4g}" if isinstance(value, float) else f"{value}"
    better = directions.get(name)
    return f"- {name}: {shown}" + (f" (better: {better})" if better else "")


def _evaluation_text(
    evaluation: dict | None, dataset: str | None, directions: dict | None = None, reference: str | None = None
) -> str:
    if not evaluation:
        body = (
            "No evaluation was recorded with this checkpoint. Measure it and record it here, e.g. `trl-unlearn "
            "eval tofu --model <this folder> --data_dir <TOFU folder> --split forget10 --output report.json "
            "--update_model_card`."
        )
    else:
        where = f"On {dataset}:\n\n" if dataset else ""
        body = where + "\n".join(_metric_line(k, v, directions or {}) for k, v in evaluation.items())
        if reference:
            body += f"\n\nReference (retain / retrained model) behind forget quality / PrivLeak: {reference}"
    return f"{_EVAL_START}\n{body}\n{_EVAL_END}"


def render(card: UnlearningCard) -> ModelCard:
    """The model card (YAML metadata + text) of an unlearned model."""
    hub_base = card.base_model if is_hub_id(card.base_model) else None
    named = hub_base or os.path.exists(card.base_model)
    data = ModelCardData(
        base_model=hub_base,
        datasets=card.datasets or None,
        library_name="transformers",
        tags=sorted(set(card.tags) | {"trl", "trl-unlearn", "unlearning"}),
        pipeline_tag="text-generation",
        model_name=f"{card.method} unlearned {named and os.path.basename(card.base_model.rstrip('/')) or 'model'}",
        eval_results=_eval_results(card.evaluation, card.eval_dataset),
    )
    base = f"[{card.base_model}](https://huggingface.co/{card.base_model})" if hub_base else f"`{card.base_model}`"
    paper = card.paper
    method = f"**{card.method}**" + (
        f" ([{paper['title']}](https://huggingface.co/papers/{paper['id']}))" if paper else ""
    )
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in card.hyperparameters.items() if v is not None)
    prompt = (
        f"- Prompt format: `{card.prompt_format!r}`\n"
        if card.prompt_format
        else "- Prompt format: not recorded (pass `--prompt_format` to `trl-unlearn eval`)\n"
    )
    training = f"- Training: {card.training}\n" if card.training else ""
    citation = f"\n## Citation\n\n```bibtex\n{paper['citation']}\n```\n" if paper.get("citation") else ""
    text = f"""---
{data.to_yaml()}
---

# {data.model_name}

This model is {base} after {method} unlearning with [trl-unlearn](https://github.com/trl-unlearn/trl-unlearn), built
on [TRL](https://github.com/huggingface/trl).

## Unlearning

- Base model: {base}
- Method: {card.method}
- Forget data: {card.forget_data}
- Retain data: {card.retain_data}
- Reference model: {card.reference}
{prompt}{training}
| hyperparameter | value |
|---|---|
{rows}

### Evaluation

{_evaluation_text(card.evaluation, card.eval_dataset, card.directions, card.eval_reference)}

### Limitations

{LIMITATIONS}
{citation}"""
    return ModelCard(text)


def readable(value):
    """A hyperparameter as the card shows it: an enum by its value (`linear`, not `SchedulerType.LINEAR`)."""
    return value.value if isinstance(value, Enum) else value


def write_card(card: UnlearningCard, output_dir: str) -> str:
    path = os.path.join(output_dir, "README.md")
    write_text_atomic(path, str(render(card)))
    return path


def add_evaluation(
    output_dir: str,
    evaluation: dict,
    dataset: str,
    eval_results: list | None = None,
    directions: dict | None = None,
    reference: str | None = None,
) -> str:
    """Record `evaluation` (`{metric: value}`) measured on `dataset` in the card of `output_dir`: the `model-index`
    metadata (`eval_results`, `huggingface_hub.EvalResult`s, when given; else one per number) and the Evaluation
    section, with each metric's direction (`directions`) and the `reference` report behind forget quality / PrivLeak.
    Returns the card's path."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model card at {path}: --update_model_card needs a folder saved by trl-unlearn.")
    card = ModelCard.load(path)
    new = eval_results if eval_results is not None else (_eval_results(evaluation, dataset) or [])
    replaced = {r.dataset_name for r in new} | {dataset}
    card.data.eval_results = [r for r in (card.data.eval_results or []) if r.dataset_name not in replaced] + new
    if not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.abspath(output_dir))
    section = _evaluation_text(evaluation, dataset, directions, reference)
    if _EVAL_START in card.text:
        start, end = card.text.index(_EVAL_START), card.text.index(_EVAL_END) + len(_EVAL_END)
        card.text = card.text[:start] + section + card.text[end:]
    else:
        card.text = card.text.rstrip() + "\n\n### Evaluation\n\n" + section + "\n"
    write_text_atomic(path, str(card))
    return path


_AUDIT_START, _AUDIT_END = "<!-- trl-unlearn audit -->", "<!-- /trl-unlearn audit -->"


def _audit_text(summary: list[dict], complete: bool, data: str) -> str:
    lines = [
        f"`trl-unlearn audit` on {data}: share of the forgotten knowledge each attack brings back (largest over "
        "the forget metrics; 0 = none, 1 = back to the original model; membership: signal left). "
        + ("Every requested attack ran." if complete else "Incomplete: some attacks were skipped (below)."),
        "",
        "| attack | variant | share |",
        "|---|---|---|",
    ]
    for r in summary:
        if r["status"] == "ok":
            v = r.get("max_share")
            lines.append(f"| {r['attack']} | {r['variant']} | {'n/a' if v is None else f'{v:.3f}'} |")
        else:
            lines.append(f"| {r['attack']} | {r['variant']} | skipped: {r['reason']} |")
    return f"{_AUDIT_START}\n" + "\n".join(lines) + f"\n{_AUDIT_END}"


def add_audit(output_dir: str, summary: list[dict], complete: bool, data: str) -> str:
    """Record an audit summary (`trl_unlearn.evaluation.unlearning_audit.summary_rows`) in the card of
    `output_dir`, in its own "Audit" section (replaced on a later audit; the Evaluation section and the metadata are
    left as they are). Returns the card's path."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model card at {path}: --update_model_card needs a folder saved by trl-unlearn.")
    card = ModelCard.load(path)
    section = _audit_text(summary, complete, data)
    if _AUDIT_START in card.text:
        start, end = card.text.index(_AUDIT_START), card.text.index(_AUDIT_END) + len(_AUDIT_END)
        card.text = card.text[:start] + section + card.text[end:]
    else:
        card.text = card.text.rstrip() + "\n\n### Audit\n\n" + section + "\n"
    card.save(path)
    return path
