"""Human views of ``reports/convert.json``: a Markdown table and a PNG (when matplotlib is there).

Both are rewritten only when their bytes change, so a no-op rerun touches nothing.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from common.io import atomic_write_bytes
from common.ngff import fmt_vec

log = logging.getLogger("cellmap.convert")


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)


def markdown(report: dict[str, Any]) -> str:
    """One table row per crop: status, geometry, unknown share, per-class voxels, reason."""
    classes = report["classes"]
    c = report["counts"]
    lines = [
        "# convert report",
        "",
        f"target resolution (z, y, x nm): {fmt_vec(report['resolution_zyx'])}; "
        f"{c['converted']} converted, {c['skipped']} skipped, {c['failed']} failed",
        "",
    ]
    if report.get("by_dataset"):
        lines += [
            f"failed {100 * report.get('failed_fraction', 0):.1f} % of the eligible crops "
            f"(budget convert.max_failed_fraction {100 * report.get('max_failed_fraction', 0):g} %)",
            "",
            "| dataset | converted | skipped | failed |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {ds} | {c['converted']} | {c['skipped']} | {c['failed']} |" for ds, c in report["by_dataset"].items()
        ]
        lines.append("")
    if report.get("failure_reasons"):
        lines += ["| failure reason | crops | cases |", "|---|---|---|"]
        lines += [
            f"| {f['reason'].replace('|', '/')} | {f['count']} | {', '.join(f['cases'])} |"
            for f in report["failure_reasons"]
        ]
        lines.append("")
    sp = report.get("split") or {}
    if sp.get("groups") or sp.get("held_out") or sp.get("leaks"):
        lines.append(f"groups of overlapping crops (one draw each): {len(sp.get('groups', []))}")
        lines += [f"- {', '.join(g)}" for g in sp.get("groups", [])]
        if sp.get("held_out"):
            lines.append(f"held out for testing (split.test_fraction): {', '.join(sp['held_out'])}")
        if sp.get("leaks"):
            lines.append("overlapping crops on both sides: " + "; ".join(" / ".join(p) for p in sp["leaks"]))
        lines.append("")
    lines += [
        "| case | status | fold | shape (z,y,x) | spacing nm | levels | unknown % | "
        + " | ".join(classes)
        + " | reason |",
        "|" + "---|" * (7 + len(classes) + 1),
    ]
    for r in report["crops"]:
        if r["status"] == "converted":
            cv = r["class_voxels"]
            lines.append(
                f"| {r['case']} | converted | {r.get('fold')} | {tuple(r['shape'])} | {fmt_vec(r['spacing'])} | "
                f"{r['label_level']}/{'x'.join(map(str, r.get('label_factor', [1])))}→EM {r['em_level']}/"
                f"{'x'.join(map(str, r.get('em_factor', [1])))} | {100 * r['unknown_fraction']:.1f} | "
                + " | ".join(str(cv.get(k, 0)) for k in classes)
                + " |  |"
            )
        else:
            lines.append(
                f"| {r['case']} | {r['status']} |  |  |  |  |  | "
                + " | " * len(classes)
                + r["reason"].replace("|", "/")
                + " |"
            )
    return "\n".join(lines) + "\n"


def png(report: dict[str, Any]) -> bytes | None:
    """Stacked bars of each converted crop's label composition (share of voxels)."""
    from common.plots import pyplot

    plt = pyplot()
    if plt is None:  # the convert image need not carry matplotlib
        return None
    rows = [r for r in report["crops"] if r["status"] == "converted"]
    if not rows:
        return None
    classes = report["classes"]
    dsc = report.get("by_dataset") or {}
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.5 * len(rows) + 3), 8.5), gridspec_kw={"height_ratios": [3, 2]}
    )
    left = [0.0] * len(dsc)
    for status, color in (("converted", "tab:green"), ("skipped", "0.7"), ("failed", "tab:red")):
        vals = [c[status] for c in dsc.values()]
        ax2.barh(range(len(dsc)), vals, left=left, color=color, label=status)
        left = [a + b for a, b in zip(left, vals)]
    ax2.set_yticks(range(len(dsc)), list(dsc), fontsize=7)
    ax2.set_xlabel("crops")
    ax2.set_title("convert: crops per dataset")
    ax2.legend(fontsize=7)
    bottom = [0.0] * len(rows)
    parts = [("background", [r["background_voxels"] for r in rows])]
    parts += [(k, [r["class_voxels"][k] for r in rows]) for k in classes]
    parts.append(("unknown", [r["unknown_fraction"] for r in rows]))
    totals = [max(1, r["shape"][0] * r["shape"][1] * r["shape"][2]) for r in rows]
    cmap = plt.get_cmap("tab20")
    for i, (name, vals) in enumerate(parts):
        share = vals if name == "unknown" else [v / t for v, t in zip(vals, totals)]
        color = "0.6" if name == "unknown" else ("0.9" if name == "background" else cmap(i % 20))
        ax.bar(range(len(rows)), share, bottom=bottom, label=name, color=color, edgecolor="none")
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of voxels")
    ax.set_title("convert: label composition per crop")
    ax.legend(fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_views(report: dict[str, Any], reports_dir: Path, plot: bool = True) -> None:
    """``convert.md`` and (if ``plot`` and matplotlib is installed) ``convert.png`` next to the JSON."""
    _write_if_changed(reports_dir / "convert.md", markdown(report).encode())
    if not plot:
        return
    try:
        data = png(report)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail the stage
        log.warning("convert.png not written: %s", exc)
        return
    if data is not None:
        _write_if_changed(reports_dir / "convert.png", data)
