"""Report image sizes after ``make images``: a table on stdout and in ``images/sizes.md``, and a
bar chart ``images/sizes.png`` (when matplotlib is installed).

Usage: ``python -m containers.sizes --cli podman --prefix cellmap-a3ds --version 0.1.0 TARGET...``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def image_size_mb(cli: str, image: str) -> float | None:
    """Uncompressed size of a local image in MB, or None when it does not exist."""
    res = subprocess.run([cli, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True)
    out = res.stdout.strip()
    return int(out) / 1e6 if res.returncode == 0 and out.isdigit() else None


def table(rows: list[tuple[str, float | None]]) -> str:
    lines = ["| image | size (MB) |", "|---|---:|"]
    lines += [f"| `{name}` | {'missing' if mb is None else f'{mb:.0f}'} |" for name, mb in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[tuple[str, float | None]], path: Path) -> bool:
    """Horizontal bar chart of the sizes; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    present = [(n, mb) for n, mb in rows if mb is not None]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(present) + 1.2))
    ax.barh([n for n, _ in present][::-1], [mb for _, mb in present][::-1], color="#4c72b0")
    for i, (_, mb) in enumerate(present[::-1]):
        ax.text(mb, i, f" {mb:.0f}", va="center", fontsize=8)
    ax.set_xlabel("uncompressed image size (MB)")
    ax.set_title("cellmap-auto3dseg images")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "images")
    ap.add_argument("targets", nargs="+")
    ns = ap.parse_args(argv)
    rows = [
        (f"{ns.prefix}/{t}:{ns.version}", image_size_mb(ns.cli, f"{ns.prefix}/{t}:{ns.version}")) for t in ns.targets
    ]
    text = table(rows)
    print(text, end="")
    ns.out.mkdir(parents=True, exist_ok=True)
    tmp = ns.out / "sizes.md.tmp"
    tmp.write_text(text)
    tmp.replace(ns.out / "sizes.md")
    if plot(rows, ns.out / "sizes.png"):
        print(f"sizes: {ns.out / 'sizes.md'}, {ns.out / 'sizes.png'}")
    return 0 if all(mb is not None for _, mb in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
