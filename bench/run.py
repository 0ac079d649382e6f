"""Run every benchmark module ``bench/bench_<name>.py`` and write ``bench/results/<name>.json``.

Each module defines ``run(work: pathlib.Path) -> dict`` returning JSON-serialisable results
(ratios against a baseline measured in the same run). ``--only NAME`` runs one.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=HERE / "results")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=HERE / "work")
@click.option("--only", multiple=True, help="Benchmark name(s) to run (default: all).")
def main(out: Path, work: Path, only: tuple[str, ...]) -> None:
    """Run the benchmarks."""
    names = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    if only:
        names = [n for n in names if n in only]
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        click.echo(f"== bench {name}")
        mod = importlib.import_module(f"bench.bench_{name}")
        t0 = time.perf_counter()
        try:
            result = mod.run(work / name)
        except Exception as exc:  # noqa: BLE001 - report and continue with the others
            click.echo(f"bench {name} failed: {exc!r}", err=True)
            failed.append(name)
            continue
        result.setdefault("host", {"machine": platform.machine(), "python": platform.python_version()})
        result["bench_wall_s"] = round(time.perf_counter() - t0, 2)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
