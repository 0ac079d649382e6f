"""The documentation a reader follows exists: cited ``docs/*.md`` files and relative links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?<![\w/.])docs/([A-Za-z0-9_-]+\.md)")
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def test_every_cited_docs_file_exists() -> None:
    """A docstring, comment or help text that says ``docs/<name>.md`` names a file of this repository."""
    missing = []
    for path in _tracked("*.py", "*.md", "*.yaml", "*.sh", "*.sbatch", "Makefile", "*Dockerfile"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            missing += [
                f"{path.relative_to(ROOT)}:{n}: docs/{name}"
                for name in CITED.findall(line)
                if not (ROOT / "docs" / name).is_file()
            ]
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def test_relative_links_in_readme_and_docs_resolve() -> None:
    broken = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(md.read_text().splitlines(), 1):
            broken += [
                f"{md.relative_to(ROOT)}:{n}: {target}"
                for target in LINK.findall(line)
                if not (md.parent / target).exists()
            ]
    assert not broken, "broken links:\n" + "\n".join(broken)
