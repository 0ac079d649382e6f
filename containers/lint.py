"""Lint every Dockerfile (hadolint) and every shell script (ShellCheck) in the repository.

Files are the ones git knows about or would add (tracked + untracked-not-ignored), so new files
from any area are linted before they are committed. Shell scripts are ``*.sh`` plus any file
whose first line is an ``sh``/``bash`` shebang (``slurm/`` templates, ``.ci/run``).

Thresholds: hadolint fails on warnings and errors (``containers/hadolint.yaml``); ShellCheck on
warnings and errors (``--severity=warning``); info/style findings are not failures.

Usage: ``python -m containers.lint`` (exit 1 on findings, printed as the tools print them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HADOLINT_CONFIG = ROOT / "containers" / "hadolint.yaml"
SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")


def repo_files(root: Path = ROOT) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (read-only git call), existing ones only."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    files = {root / p.decode() for p in out.split(b"\0") if p}
    return sorted(f for f in files if f.is_file())


def dockerfiles(root: Path = ROOT) -> list[Path]:
    """``Dockerfile``, ``*.Dockerfile`` and ``Dockerfile.*`` files."""
    return [
        f
        for f in repo_files(root)
        if f.name == "Dockerfile" or f.name.endswith(".Dockerfile") or f.name.startswith("Dockerfile.")
    ]


def shell_scripts(root: Path = ROOT) -> list[Path]:
    """``*.sh`` files plus files starting with a sh/bash shebang."""
    found = []
    for f in repo_files(root):
        if f.suffix == ".sh":
            found.append(f)
            continue
        try:
            with f.open("rb") as fh:
                first = fh.readline(200)
        except OSError:
            continue
        if SHEBANG.match(first):
            found.append(f)
    return found


def tool(name: str) -> str:
    """The linter binary: next to this interpreter (the venv's ``dev`` extra), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"lint: {name} not found; install the dev extra (pip install -e '.[dev]')")
    return found


def run_hadolint(files: list[Path]) -> subprocess.CompletedProcess[str]:
    """hadolint with the repository config; returncode 0 = clean."""
    cmd = [tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color"] + [str(f) for f in files]
    return subprocess.run(cmd, capture_output=True, text=True)


def run_shellcheck(files: list[Path]) -> subprocess.CompletedProcess[str]:
    """ShellCheck at warning severity, following sourced files where it can; 0 = clean."""
    cmd = [tool("shellcheck"), "--severity=warning", "--external-sources", "--color=never"]
    return subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True, cwd=ROOT)


def main() -> int:
    rc = 0
    dfs, scripts = dockerfiles(), shell_scripts()
    for label, files, runner in (("hadolint", dfs, run_hadolint), ("shellcheck", scripts, run_shellcheck)):
        if not files:
            continue
        res = runner(files)
        status = "ok" if res.returncode == 0 else "FAILED"
        print(f"{label}: {len(files)} files: {status}")
        if res.returncode != 0:
            print((res.stdout + res.stderr).rstrip())
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
