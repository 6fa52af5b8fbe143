"""Markdown tables from `trl-unlearn audit` reports, one row per report (the tables of docs/results.md, "Audit").

    python benchmarks/audit_table.py OUT/gradascent/audit.json OUT/npo/audit.json ...

Printed, for each report (labelled by its folder's name): the clean forget probability and ROUGE-L of base and
unlearned, then per attack row the recovered share of the forget probability / of ROUGE-L (membership: the signal
left of its first AUC; sampling: ROUGE-L of the best sample; hidden-state probe: answer-token accuracy), "n/a"
where base and unlearned differ by < min_gap, "skip" for a skipped row; then the attacked retain probability /
ROUGE-L of each row as a ratio to the unlearned model's, to show whether the attack just broke the model.
"""

import json
import os
import sys

P, R = "forget_probability", "forget_rougeL_recall"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def share_cell(row: dict) -> str:
    if row["status"] != "ok":
        return "skip"
    shares = row["recovered_share"]
    if row["attack"] == "membership":
        return _fmt(next(iter(shares.values()), None))
    if P not in shares and R not in shares:  # the hidden-state probe
        return " / ".join(map(_fmt, shares.values()))
    return " / ".join(_fmt(shares.get(k)) for k in (P, R) if k in shares)


def retain_cell(row: dict) -> str:
    m = row.get("metrics", {})
    att, unl = m.get("attacked", {}), m.get("unlearned", {})
    parts = [
        f"{att[k] / unl[k]:.2f}"
        for k in ("retain_probability", "retain_rougeL_recall")
        if att.get(k) is not None and unl.get(k)
    ]
    return " / ".join(parts) or "–"


def main(paths: list[str]) -> int:
    reports = [(os.path.basename(os.path.dirname(os.path.abspath(p))), json.load(open(p))) for p in paths]
    variants = list(dict.fromkeys(r["variant"] for _, rep in reports for r in rep["attacks"]))
    head = "| model | forget p base → unlearned | forget ROUGE-L base → unlearned | " + " | ".join(variants) + " |"
    rule = "|---|---|---|" + "---|" * len(variants)
    print("Recovered share: forget probability / ROUGE-L (membership: signal left of the AUC)\n")
    print(head + "\n" + rule)
    for name, rep in reports:
        c = {role: rep["clean"][role]["metrics"] for role in ("base", "unlearned")}
        rows = {r["variant"]: r for r in rep["attacks"]}
        cells = [share_cell(rows[v]) if v in rows else "" for v in variants]
        print(
            f"| {name} | {c['base'][P]:.3f} → {c['unlearned'][P]:.3f} | {c['base'][R]:.3f} → {c['unlearned'][R]:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    print("\nAttacked retain probability / ROUGE-L as a ratio to the unlearned model's\n")
    print("| model | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for name, rep in reports:
        rows = {r["variant"]: r for r in rep["attacks"]}
        print(f"| {name} | " + " | ".join(retain_cell(rows[v]) if v in rows else "" for v in variants) + " |")
    times = ", ".join(f"{name} {rep['timings_s']['total']:.0f} s" for name, rep in reports)
    print(f"\nAudit time: {times}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
