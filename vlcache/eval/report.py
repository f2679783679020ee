"""Aggregate per-sample records and present them: table, results.json / results.csv, accuracy.png.

Contract:
* :func:`aggregate` returns one row per config, in config order (``full`` at 1.0 first): ``method``,
  ``budget``, ``n``, ``accuracy`` (mean score), ``relative`` (accuracy / the ``full`` accuracy on the
  same samples; None when that is 0), ``kv_kept`` (mean ``stats.kept_fraction``), ``per_kind``
  (accuracy per question kind), mean ``kv_bytes_before`` / ``kv_bytes_after`` / ``seconds``, and in
  follow-up mode ``followup_accuracy``, ``followup_relative`` and ``followup_per_kind`` (relative
  to ``full`` under the same protocol).
* :func:`format_table` prints accuracy, relative and kv_kept with 3 decimals (``-`` for None).
* :func:`write_outputs` writes everything into a fresh temporary folder beside ``out`` and renames it
  into place at the end, so a failure leaves nothing half-written; an existing non-empty ``out`` is
  refused unless ``force`` (then it is replaced only once the new results are complete):
  :func:`vlcache.atomic.atomic_dir`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.atomic import atomic_dir
from vlcache.errors import UserError
from vlcache.eval.runner import REFERENCE, Record


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _per_kind(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    kinds: dict[str, list[float]] = {}
    for kind, s in pairs:
        kinds.setdefault(kind, []).append(s)
    return {k: _mean(v) for k, v in sorted(kinds.items())}


def _relative(acc: float, ref: float | None) -> float | None:
    return None if not ref else acc / ref


def aggregate(
    records: Sequence[Record], configs: Sequence[tuple[str, float]], followup: bool = False
) -> list[dict[str, Any]]:
    """One summary row per ``(method, budget)`` in ``configs`` (see the module docstring)."""
    groups: dict[tuple[str, float], list[Record]] = {(m, float(b)): [] for m, b in configs}
    for r in records:
        groups[(r.method, float(r.budget))].append(r)
    ref = groups.get((REFERENCE, 1.0))
    if not ref:
        raise ValueError("the records hold no 'full' reference at budget 1.0")
    ref_acc = _mean([r.score for r in ref])
    ref_follow = _mean([r.followup_score or 0.0 for r in ref]) if followup else None
    rows = []
    for (method, budget), rs in groups.items():
        acc = _mean([r.score for r in rs])
        row: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "n": len(rs),
            "accuracy": acc,
            "relative": _relative(acc, ref_acc),
            "kv_kept": _mean([r.kv_kept for r in rs]),
            "per_kind": _per_kind([(r.kind, r.score) for r in rs]),
        }
        if followup:
            f_acc = _mean([r.followup_score or 0.0 for r in rs])
            row["followup_accuracy"] = f_acc
            row["followup_relative"] = _relative(f_acc, ref_follow)
            row["followup_per_kind"] = _per_kind([(r.followup_kind or "all", r.followup_score or 0.0) for r in rs])
        row["kv_bytes_before"] = _mean([r.kv_bytes_before for r in rs])
        row["kv_bytes_after"] = _mean([r.kv_bytes_after for r in rs])
        row["seconds"] = _mean([r.seconds for r in rs])
        rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A plain-text table: method, budget, accuracy, relative, kv_kept (+ follow-up columns)."""
    followup = any("followup_accuracy" in r for r in rows)
    header = ["method", "budget", "accuracy", "relative", "kv_kept"]
    if followup:
        header += ["followup", "f_relative"]
    lines = []
    for r in rows:
        cells = [r["method"], str(r["budget"]), _fmt(r["accuracy"]), _fmt(r["relative"]), _fmt(r["kv_kept"])]
        if followup:
            cells += [_fmt(r["followup_accuracy"]), _fmt(r["followup_relative"])]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]

    def join(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [title] if title else []
    out += [join(header), join(["-" * w for w in widths])]
    out += [join(c) for c in lines]
    return "\n".join(out)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row; per-kind accuracies as ``accuracy_<kind>`` columns."""
    kinds = sorted({k for r in rows for k in r["per_kind"]})
    f_kinds = sorted({k for r in rows for k in r.get("followup_per_kind", {})})
    scalar = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
    columns = scalar + [f"accuracy_{k}" for k in kinds] + [f"followup_accuracy_{k}" for k in f_kinds]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            values = [r[k] for k in scalar]
            values += [r["per_kind"].get(k) for k in kinds]
            values += [r.get("followup_per_kind", {}).get(k) for k in f_kinds]
            writer.writerow(["" if v is None else v for v in values])


def plot_accuracy(path: Path, rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """Accuracy vs budget (log x), one line per method, ``full`` as a horizontal reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("accuracy.png needs matplotlib: pip install 'vlcache[eval]'") from None
    followup = any("followup_accuracy" in r for r in rows)
    panels = [("accuracy", "accuracy")] + ([("followup_accuracy", "follow-up accuracy")] if followup else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != REFERENCE))
    budgets = sorted({r["budget"] for r in rows})
    for ax, (key, label) in zip(axes[0], panels):
        for method in methods:
            pts = sorted((r["budget"], r[key]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for r in rows:
            if r["method"] == REFERENCE:
                ax.axhline(r[key], color="black", linestyle="--", linewidth=1, label="full (budget 1.0)")
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("KV budget α (fraction of prompt KV kept)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, results: dict[str, Any], title: str = "", force: bool = False) -> None:
    """results.json (``results`` as given), results.csv and accuracy.png into ``out``, atomically."""
    with atomic_dir(out, force=force, name="--out") as folder:
        (folder / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        write_csv(folder / "results.csv", results["results"])
        plot_accuracy(folder / "accuracy.png", results["results"], title)
