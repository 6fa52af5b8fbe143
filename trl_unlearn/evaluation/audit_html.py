"""The audit report as ONE self-contained offline HTML page: inline CSS, figures embedded as base64 PNG data URIs
(matplotlib, Agg), no script, font, stylesheet or image loaded from anywhere. `render_audit_html(report)` takes the
dict `audit()` returns (or its ``audit.json``)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping

__all__ = ["render_audit_html"]

_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}
.ok{background:#e7f5e7;border:1px solid #8c8;padding:.6em}img{max-width:100%}code{background:#f4f4f4}
"""

_ROLE_COLORS = {
    "base": "#1f77b4",
    "unlearned": "#d62728",
    "attacked": "#ff7f0e",
    "attacked_base": "#9ecae1",
    "retain_model": "#2ca02c",
}


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return _e(v)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return '<img alt="figure" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii") + '">'


def _figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(111)


def _grouped_bars(results, metric: str, roles, title: str) -> str | None:
    """Bars of `metric` per variant, one bar per role present."""
    rows = [r for r in results if r["status"] == "ok" and any(metric in r["metrics"].get(x, {}) for x in roles)]
    if not rows:
        return None
    fig, ax = _figure(max(5.0, 1.2 * len(rows) + 2))
    width = 0.8 / len(roles)
    for j, role in enumerate(roles):
        xs = [i + j * width for i in range(len(rows))]
        ys = [r["metrics"].get(role, {}).get(metric) for r in rows]
        ax.bar(
            [x for x, y in zip(xs, ys) if y is not None],
            [y for y in ys if y is not None],
            width,
            label=role.replace("_", " "),
            color=_ROLE_COLORS.get(role),
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def _probe_figure(result) -> str:
    fig, ax = _figure()
    for role, reading in result["readings"].items():
        layers = list(range(1, len(reading["lens_accuracy"]) + 1))
        color = _ROLE_COLORS.get(role)
        ax.plot(layers, reading["lens_accuracy"], "--o", color=color, label=f"{role} logit lens")
        probe = [(x, y) for x, y in zip(layers, reading["probe_accuracy"]) if y is not None]
        if probe:
            ax.plot(*zip(*probe), "-s", color=color, label=f"{role} linear probe")
    ax.set_xlabel("layer")
    ax.set_ylabel("answer-token accuracy (forget)")
    ax.set_title("Hidden-state probe")
    ax.legend(fontsize=7)
    return _png(fig)


def _summary_figure(summary) -> str | None:
    rows = [r for r in summary if r["status"] == "ok" and r.get("max_share") is not None]
    if not rows:
        return None
    fig, ax = _figure(7.0, max(2.0, 0.3 * len(rows) + 1))
    labels = [
        f"{r['attack']}: {r['variant']}" + (" (signal left)" if r.get("share_kind") == "signal_left" else "")
        for r in rows
    ]
    ax.barh(range(len(rows)), [r["max_share"] for r in rows], color="#ff7f0e")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="gray")
    ax.axvline(1, color="gray", linestyle="--")
    ax.set_xlabel("largest share over the forget metrics (1 = back to the base model)")
    return _png(fig)


def _metric_table(result) -> str:
    roles = [r for r in ("base", "unlearned", "attacked", "attacked_base", "retain_model") if r in result["metrics"]]
    names = list(dict.fromkeys(k for r in roles for k in result["metrics"][r]))
    head = "<tr><th class=l>metric</th>" + "".join(f"<th>{_e(r)}</th>" for r in roles) + "<th>share</th></tr>"
    body = []
    for k in names:
        share = result["recovered_share"].get(k)
        note = result.get("share_notes", {}).get(k)
        cell = _fmt(share) if note is None else f'<span title="{_e(note)}">n/a*</span>'
        body.append(
            f"<tr><td class=l>{_e(k)}</td>"
            + "".join(f"<td>{_fmt(result['metrics'][r].get(k))}</td>" for r in roles)
            + f"<td>{cell}</td></tr>"
        )
    notes = "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in result.get("share_notes", {}).items())
    return f"<table>{head}{''.join(body)}</table>" + (f"<ul>{notes}</ul>" if notes else "")


def _detail_note(result) -> str:
    """Which items a row's ROUGE-L / truth ratio (and samples) were computed on."""
    items = result.get("detail_items")
    if not items:
        return ""
    sets = ", ".join(f"{len(v)} {k}" for k, v in items.items())
    what = "ROUGE-L / truth ratio" if "forget_truth_ratio" in result.get("recovered_share", {}) else "ROUGE-L"
    return f"<p class=note>{what} items: {_e(sets)}.</p>"


def render_audit_html(report: Mapping) -> str:
    """The page: status banner, summary table (attack -> share), the clean scores, then one section per attack with
    its figure and its numbers; skipped attacks with their reasons."""
    summary = report["summary"]
    attacks = report["attacks"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>trl-unlearn audit</title>",
        f"<style>{_CSS}</style></head><body><h1>Unlearning audit</h1>",
    ]
    st = report["settings"]
    parts.append(
        f"<p>Data: {_e(st['data'])} ({st['num_forget']} forget, {st['num_retain']} retain rows); prompt "
        f"format <code>{_e(st['prompt_format'])}</code>; models: {_e(st.get('models') or 'in memory')}; "
        f"total time {_fmt(report['timings_s'].get('total'))} s.</p>"
    )
    detail = st.get("detail_items")
    if detail and (len(detail["forget"]) < st["num_forget"] or len(detail["retain"]) < st["num_retain"]):
        parts.append(
            f"<p>Attacked rows: ROUGE-L (greedy answers) and truth ratio on {len(detail['forget'])} of "
            f"{st['num_forget']} forget and {len(detail['retain'])} of {st['num_retain']} retain items (evenly spaced; "
            "base and unlearned on the same items in those rows); probability on every item. The clean scores use "
            "every item.</p>"
        )
    skipped = [r for r in summary if r["status"] != "ok"]
    if report["complete"]:
        parts.append("<p class=ok>Complete: every requested attack ran.</p>")
    else:
        items = "".join(f"<li>{_e(r['attack'])} / {_e(r['variant'])}: {_e(r['reason'])}</li>" for r in skipped)
        parts.append(
            f"<div class=warn><b>Incomplete</b>: {len(skipped)} attack variant(s) skipped.<ul>{items}</ul></div>"
        )
    parts.append(
        "<h2>Summary: attack &rarr; share</h2><p>Recovered share = (attacked &minus; unlearned) / "
        "(base &minus; unlearned) of each forget metric; 0 = nothing back, 1 = the base model's value. "
        "Membership shows the signal left, (AUC<sub>unlearned</sub> &minus; AUC<sub>ref</sub>) / "
        "(AUC<sub>base</sub> &minus; AUC<sub>ref</sub>). n/a: the base and the unlearned model differ by "
        "less than min_gap on that metric (nothing forgotten to recover).</p>"
    )
    metrics = list(dict.fromkeys(k for r in summary if r["status"] == "ok" for k in r["shares"]))
    head = (
        "<tr><th class=l>attack</th><th class=l>variant</th>"
        + "".join(f"<th>{_e(m)}</th>" for m in metrics)
        + "<th>largest</th></tr>"
    )
    body = []
    for r in summary:
        if r["status"] == "ok":
            cells = "".join(f"<td>{_fmt(r['shares'].get(m)) if m in r['shares'] else ''}</td>" for m in metrics)
            body.append(
                f"<tr><td class=l>{_e(r['attack'])}</td><td class=l>{_e(r['variant'])}</td>{cells}"
                f"<td>{_fmt(r['max_share'])}</td></tr>"
            )
        else:
            body.append(
                f"<tr><td class=l>{_e(r['attack'])}</td><td class=l>{_e(r['variant'])}</td>"
                f"<td class=l colspan={len(metrics) + 1}>skipped: {_e(r['reason'])}</td></tr>"
            )
    parts.append(f"<table>{head}{''.join(body)}</table>")
    fig = _summary_figure(summary)
    if fig:
        parts.append(fig)

    parts.append("<h2>Clean scores (trained prompt, full precision)</h2>")
    roles = list(report["clean"])
    names = list(dict.fromkeys(k for r in roles for k in report["clean"][r]["metrics"]))
    parts.append(
        "<table><tr><th class=l>metric</th>"
        + "".join(f"<th>{_e(r)}</th>" for r in roles)
        + "</tr>"
        + "".join(
            f"<tr><td class=l>{_e(k)}</td>"
            + "".join(f"<td>{_fmt(report['clean'][r]['metrics'].get(k))}</td>" for r in roles)
            + "</tr>"
            for k in names
        )
        + "</table>"
    )

    titles = {
        "quantization": "Quantization",
        "relearn": "Relearning",
        "prompt": "Prompt-side probes",
        "hidden_probe": "Hidden-state probe",
        "membership": "Membership inference",
    }
    for name in report["attacks_requested"]:
        group = [r for r in attacks if r["attack"] == name]
        parts.append(f"<h2>{titles.get(name, _e(name))}</h2>")
        ok = [r for r in group if r["status"] == "ok"]
        if name == "hidden_probe" and ok:
            parts.append(_probe_figure(ok[0]))
        elif name == "membership" and ok:
            fig, ax = _figure()
            res = ok[0]
            keys = list(res["metrics"]["base"])
            roles_m = list(res["metrics"])
            for j, role in enumerate(roles_m):
                ax.bar(
                    [i + j * 0.8 / len(roles_m) for i in range(len(keys))],
                    [res["metrics"][role][k] for k in keys],
                    0.8 / len(roles_m),
                    label=role,
                    color=_ROLE_COLORS.get(role),
                )
            ax.set_xticks([i + 0.3 for i in range(len(keys))])
            ax.set_xticklabels(keys, fontsize=8)
            ax.axhline(0.5, color="gray", linestyle="--")
            ax.set_ylabel("AUC forget vs non-members")
            ax.legend(fontsize=7)
            parts.append(_png(fig))
        elif ok:
            metric = next(
                (
                    m
                    for m in ("forget_probability", "forget_rougeL_recall")
                    if any(m in r["metrics"]["attacked"] for r in ok)
                ),
                None,
            )
            roles_q = [
                x for x in ("base", "unlearned", "attacked", "attacked_base") if any(x in r["metrics"] for r in ok)
            ]
            fig = _grouped_bars(ok, metric, roles_q, f"{titles.get(name, name)}: {metric}") if metric else None
            if fig:
                parts.append(fig)
        for r in group:
            parts.append(f"<h3>{_e(r['variant'])}</h3>")
            if r["status"] != "ok":
                parts.append(f"<p class=warn>Skipped: {_e(r['reason'])}</p>")
                continue
            if name == "relearn":
                parts.append(
                    f"<p>Scored on the {_e(r['settings']['scored_on'])} rows; trained on "
                    f"{_e(r['settings']['train_source'])}, {r['settings']['steps']} steps.</p>"
                )
                for subset, sub in r["subsets"].items():
                    parts.append(f"<p><b>{_e(subset)}</b></p>" + _metric_table({**sub}))
            else:
                parts.append(_metric_table(r))
            parts.append(_detail_note(r))
    parts.append("</body></html>")
    return "\n".join(parts)
