"""The analysis insights report: ``reports/analysis.{md,json}`` and PNG plots.

Everything per class is computed **by class id** from our own per-case voxel counts
(MONAI pools per-label lists by position). Stable keys other stages may read from
``analysis.json``:

* ``recommended.intensity_clip``: ``[lo, hi]``, the pooled foreground (class voxels,
  unknown excluded) intensity percentiles ``analyze.clip_percentiles`` (default 0.5, 99.5);
* ``recommended.class_weights``: ``{name: max share / share}`` over background and the
  classes (the commonest label gets 1; ``null`` for a class that never occurs);
* ``recommended.class_weights_by_label``: the same as a list indexed by label id, with 1.0
  for absent classes (no voxels to weigh);
* ``class_voxels`` / ``class_shares``: known-voxel counts and shares by label id (unknown
  voxels excluded), what the bundles' ``class_shares`` are;
* ``foreground_empty_cases``: cases without a single class voxel (they add nothing to the
  pooled clip; MONAI's mean of per-case percentiles would count them as 0..0);
* ``warnings``: one line per thing a person should look at.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import PipelineConfig
from common.io import atomic_write_json, atomic_write_text
from common.workdir import utc_now

if TYPE_CHECKING:
    from stages.analyze.analyze import AnalyzeSettings


def hist_percentile(counts: np.ndarray, lo: float, hi: float, q: float) -> float | None:
    """The ``q``-th percentile (0..100) of values binned into ``counts`` over ``[lo, hi)``.

    Linear inside the bin that holds the quantile; ``None`` for an empty histogram.
    """
    total = float(counts.sum())
    if total <= 0:
        return None
    width = (hi - lo) / len(counts)
    target = q / 100.0 * total
    cum = np.cumsum(counts, dtype=np.float64)
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, len(counts) - 1)
    before = cum[k - 1] if k > 0 else 0.0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return float(lo + (k + frac) * width)


def _intensity(counts: np.ndarray, s: AnalyzeSettings, pcts: tuple[float, float]) -> dict[str, Any]:
    lo, hi = s.hist_range
    centres = lo + (np.arange(len(counts)) + 0.5) * (hi - lo) / len(counts)
    n = int(counts.sum())
    return {
        "voxels": n,
        "mean": float((counts * centres).sum() / n) if n else None,
        f"p{pcts[0]:g}": hist_percentile(counts, lo, hi, pcts[0]),
        f"p{pcts[1]:g}": hist_percentile(counts, lo, hi, pcts[1]),
        "p50": hist_percentile(counts, lo, hi, 50.0),
    }


def build_report(
    cfg: PipelineConfig, own: list[dict[str, Any]], summary: dict[str, Any], s: AnalyzeSettings
) -> dict[str, Any]:
    """The report as plain data (what ``analysis.json`` holds)."""
    pcts = tuple(float(p) for p in cfg.analyze.clip_percentiles)
    names = ["background", *cfg.classes]
    vox = np.array([o["class_voxels"] for o in own], dtype=np.int64)  # cases x labels
    isum = np.array([o["class_intensity_sum"] for o in own], dtype=np.float64)
    total = vox.sum(axis=0)
    known = int(total.sum())
    fg_total = int(total[1:].sum())
    classes: list[dict[str, Any]] = []
    for cid, name in enumerate(names):
        present = [o["case"] for o, row in zip(own, vox) if row[cid] > 0]
        classes.append(
            {
                "id": cid,
                "name": name,
                "voxels": int(total[cid]),
                "share": float(total[cid] / known) if known else 0.0,
                "foreground_share": (float(total[cid] / fg_total) if fg_total else 0.0) if cid else None,
                "mean_intensity": float(isum[:, cid].sum() / total[cid]) if total[cid] else None,
                "cases_present": len(present),
                "cases_absent": [o["case"] for o in own if o["case"] not in set(present)],
            }
        )
    absent = [c["name"] for c in classes[1:] if c["voxels"] == 0]
    present_fg = [c for c in classes[1:] if c["voxels"] > 0]
    max_share = max(c["share"] for c in classes) if known else 0.0
    weights = {c["name"]: (round(max_share / c["share"], 6) if c["share"] > 0 else None) for c in classes}
    by_label = [w if w is not None else 1.0 for w in weights.values()]

    img_hist = np.array([o["image_hist"] for o in own], dtype=np.int64).sum(axis=0)
    fg_hist = np.array([o["fg_hist"] for o in own], dtype=np.int64).sum(axis=0)
    image_i = _intensity(img_hist, s, pcts)  # type: ignore[arg-type]
    fg_i = _intensity(fg_hist, s, pcts)  # type: ignore[arg-type]
    image_i.update(min=min(o["image_min"] for o in own), max=max(o["image_max"] for o in own))
    clip = [fg_i[f"p{pcts[0]:g}"], fg_i[f"p{pcts[1]:g}"]]
    if clip[0] is None:  # no foreground at all: fall back to the whole image
        clip = [image_i[f"p{pcts[0]:g}"], image_i[f"p{pcts[1]:g}"]]
    empty = [o["case"] for o, row in zip(own, vox) if int(row[1:].sum()) == 0]
    warnings = []
    if empty:
        warnings.append(
            f"{len(empty)} case(s) hold no class voxel: {', '.join(empty)}. They do not move the pooled "
            "intensity clip (MONAI's mean of per-case percentiles would count each as 0..0)."
        )
    if absent:
        warnings.append(f"classes never present in the training cases: {', '.join(absent)}")

    shapes = np.array([o["shape"] for o in own])
    spacings = Counter(tuple(round(v, 4) for v in o["spacing"]) for o in own)
    n_vox = sum(o["voxels"] for o in own)
    unknown_total = sum(o["unknown_voxels"] for o in own)
    top_n = int(cfg.analyze.top_unknown)
    top = sorted(own, key=lambda o: (-o["unknown_voxels"] / max(1, o["voxels"]), o["case"]))[:top_n]
    fg_monai = summary.get("image_foreground_stats", {}).get("intensity", {})

    return {
        "generated_at": utc_now(),
        "n_cases": len(own),
        "cases": [o["case"] for o in own],
        "output_classes": cfg.output_classes,
        "unknown_label": cfg.unknown_label,
        "classes": classes,
        "absent_classes": absent,
        "class_voxels": [int(v) for v in total],
        "class_shares": [float(v / known) if known else 0.0 for v in total],
        "foreground_empty_cases": empty,
        "warnings": warnings,
        "imbalance": {
            "max_over_min_foreground_share": (
                max(c["voxels"] for c in present_fg) / min(c["voxels"] for c in present_fg) if present_fg else None
            ),
            "foreground_share_of_known": float(fg_total / known) if known else 0.0,
        },
        "unknown": {
            "voxels": unknown_total,
            "share_of_all": float(unknown_total / n_vox) if n_vox else 0.0,
            "top_cases": [
                {
                    "case": o["case"],
                    "voxels": o["unknown_voxels"],
                    "fraction": o["unknown_voxels"] / max(1, o["voxels"]),
                }
                for o in top
                if o["unknown_voxels"]
            ],
        },
        "intensity": {
            "histogram": {
                "range": list(s.hist_range),
                "bins": s.hist_bins,
                "image": img_hist.tolist(),
                "foreground": fg_hist.tolist(),
            },
            "image": image_i,
            "foreground": fg_i,
            "percentiles": list(pcts),
            "monai_foreground_mean_of_case_percentiles": {
                "p0.5": fg_monai.get("percentile_00_5"),
                "p99.5": fg_monai.get("percentile_99_5"),
            },
        },
        "geometry": {
            "shape_min": shapes.min(axis=0).tolist(),
            "shape_median": np.median(shapes, axis=0).tolist(),
            "shape_max": shapes.max(axis=0).tolist(),
            "shapes": {o["case"]: o["shape"] for o in own},
            "spacing_counts": [{"spacing": list(k), "cases": v} for k, v in spacings.most_common()],
        },
        "monai_labels": [int(v) for v in summary.get("label_stats", {}).get("labels", [])],
        "recommended": {
            "intensity_clip": clip,
            "class_weights": weights,
            "class_weights_by_label": by_label,
        },
    }


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """``analysis.md``: the report's tables for people."""
    rec = r["recommended"]
    lines = [
        "# Data analysis",
        "",
        f"{r['n_cases']} training cases; {r['output_classes']} output classes "
        f"(background + {r['output_classes'] - 1}); unknown label {r['unknown_label']} excluded from class statistics.",
        "",
        *([f"**Warning:** {w}" for w in r.get("warnings", [])] + [""] if r.get("warnings") else []),
        "## Recommendations",
        "",
        f"- intensity clip range (foreground p{r['intensity']['percentiles'][0]:g}–p{r['intensity']['percentiles'][1]:g}, "
        f"pooled): **[{_fmt(rec['intensity_clip'][0])}, {_fmt(rec['intensity_clip'][1])}]**",
        "- class weights (max share / class share):",
        "",
        "| label | class | weight |",
        "|---:|---|---:|",
    ]
    for c in r["classes"]:
        lines.append(f"| {c['id']} | {c['name']} | {_fmt(rec['class_weights'][c['name']])} |")
    lines += [
        "",
        "## Classes (by class id)",
        "",
        "| label | class | voxels | share | share of foreground | mean intensity | cases present | absent in |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in r["classes"]:
        absent = ", ".join(c["cases_absent"][:5]) + (" …" if len(c["cases_absent"]) > 5 else "")
        lines.append(
            f"| {c['id']} | {c['name']} | {c['voxels']} | {_fmt(c['share'])} | "
            f"{_fmt(c['foreground_share'])} | {_fmt(c['mean_intensity'])} | {c['cases_present']} | {absent} |"
        )
    lines += [
        "",
        f"Classes absent from the data: {', '.join(r['absent_classes']) or 'none'}.",
        "",
        f"Imbalance (largest / smallest present class): "
        f"{_fmt(r['imbalance']['max_over_min_foreground_share'])}; foreground is "
        f"{_fmt(r['imbalance']['foreground_share_of_known'])} of the known voxels.",
        "",
        "## Intensity",
        "",
        "| region | voxels | mean | p50 | " + " | ".join(f"p{p:g}" for p in r["intensity"]["percentiles"]) + " |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    p0, p1 = (f"p{p:g}" for p in r["intensity"]["percentiles"])
    for region in ("image", "foreground"):
        d = r["intensity"][region]
        lines.append(
            f"| {region} | {d['voxels']} | {_fmt(d['mean'])} | {_fmt(d['p50'])} | {_fmt(d[p0])} | {_fmt(d[p1])} |"
        )
    m = r["intensity"]["monai_foreground_mean_of_case_percentiles"]
    lines += [
        "",
        f"MONAI's own summary is the mean of per-case foreground percentiles: "
        f"[{_fmt(m['p0.5'])}, {_fmt(m['p99.5'])}]; `datastats.yaml` carries the pooled clip above "
        "instead, so every template and the report use the same numbers.",
        "",
        "## Geometry",
        "",
        f"Shape (x, y, z) min {r['geometry']['shape_min']}, median {r['geometry']['shape_median']}, "
        f"max {r['geometry']['shape_max']}.",
        "",
        "| spacing (x, y, z) nm | cases |",
        "|---|---:|",
    ]
    for sp in r["geometry"]["spacing_counts"]:
        lines.append(f"| {sp['spacing']} | {sp['cases']} |")
    lines += [
        "",
        "## Unknown voxels",
        "",
        f"{r['unknown']['voxels']} voxels ({_fmt(r['unknown']['share_of_all'])} of all).",
        "",
        "| case | unknown voxels | fraction |",
        "|---|---:|---:|",
    ]
    for t in r["unknown"]["top_cases"]:
        lines.append(f"| {t['case']} | {t['voxels']} | {_fmt(t['fraction'])} |")
    lines += ["", "Plots: `analysis_classes.png`, `analysis_intensity.png`, `analysis_geometry.png`.", ""]
    return "\n".join(lines)


def write_plots(reports: Path, r: dict[str, Any]) -> list[Path]:
    """Class shares, intensity distributions, geometry: three PNGs (Agg backend)."""
    from common.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:  # no matplotlib: the report's tables still hold every number
        return []
    out = []
    names = [c["name"] for c in r["classes"]]
    shares = [c["share"] for c in r["classes"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    colors = ["tab:gray"] + ["tab:red" if c["voxels"] == 0 else "tab:blue" for c in r["classes"][1:]]
    ax.bar(names, [max(v, 1e-9) for v in shares], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("share of known voxels")
    ax.set_title("Voxel share by class id (red: absent)")
    ax.tick_params(axis="x", rotation=60)
    p = reports / "analysis_classes.png"
    save_figure(fig, p, dpi=100, bbox_inches="tight")
    out.append(p)

    h = r["intensity"]["histogram"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if h.get("image"):
        edges = np.linspace(float(h["range"][0]), float(h["range"][1]), len(h["image"]) + 1)
        for key, col in (("image", "tab:gray"), ("foreground", "tab:blue")):
            counts = np.asarray(h[key], dtype=np.float64)
            if counts.sum():
                ax.stairs(counts / counts.sum(), edges, label=key, color=col)
    for v in r["recommended"]["intensity_clip"]:
        if v is not None:
            ax.axvline(v, color="tab:red", ls="--")
    ax.set_xlabel("intensity")
    ax.set_ylabel("fraction of voxels")
    ax.set_title("Intensity distribution; dashed: recommended clip range")
    ax.legend()
    p = reports / "analysis_intensity.png"
    save_figure(fig, p, dpi=100, bbox_inches="tight")
    out.append(p)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    shapes = np.array(list(r["geometry"]["shapes"].values()))
    for k, axis in enumerate("xyz"):
        a1.hist(shapes[:, k], bins=min(20, max(3, len(shapes))), alpha=0.5, label=axis)
    a1.set_xlabel("voxels")
    a1.set_title("Crop shape per axis")
    a1.legend()
    sp = r["geometry"]["spacing_counts"]
    a2.bar([str(x["spacing"]) for x in sp], [x["cases"] for x in sp])
    a2.set_title("Spacing (nm) distribution")
    a2.tick_params(axis="x", rotation=30)
    p = reports / "analysis_geometry.png"
    save_figure(fig, p, dpi=100, bbox_inches="tight")
    out.append(p)
    return out


def write_report(reports: Path, r: dict[str, Any]) -> None:
    """Write ``analysis.json``, ``analysis.md`` and the PNGs into ``reports``."""
    reports.mkdir(parents=True, exist_ok=True)
    write_plots(reports, r)
    atomic_write_json(reports / "analysis.json", r)
    atomic_write_text(reports / "analysis.md", render_markdown(r))
