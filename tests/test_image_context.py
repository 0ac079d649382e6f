"""Each stage image copies exactly the first-party code its stage imports, and its stage's
third-party imports are in its lock.

The first-party need is computed from the code, not declared: every module of the stage package
(and of the extra entry points the image carries), then transitively every ``common``/``training``
/``stages`` module they import (AST; lazy imports inside functions count, imports guarded by
``except ImportError`` do not). The image's code is the ``COPY`` lines of ``stages/<stage>/Dockerfile``.

Granularity: a top-level package (``common/``, ``training/``) or a stage package (``stages/<x>/``)
is copied whole when any of its modules is needed. ``common/`` is shared, torch-free and
scheduler-free by rule, every stage imports its core (cli, config, workdir, io, errors, lock,
progress), and the few modules one stage does not import are small numpy-only files; listing
modules per image would turn each new ``common`` import into a five-Dockerfile edit for nothing
the image size would show. What the test forbids is a package no import reaches (the torch-free
convert image getting ``training/``, any image getting ``tools/``, ``tests/``, ``bench/`` or
``slurm/``) and a needed package that is not copied.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_containers import STAGES, _allowed_dists, _optional_imports, final_stage, parse_dockerfile

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders holding this repository's Python code: none may reach an image unless needed.
CODE_ROOTS = ("common", "training", "stages", "slurm", "tools", "bench", "tests", "containers")
# Extra entry points an image carries on purpose (their imports count like the stage's own).
EXTRA_ENTRIES = {
    "ensemble": ("stages.predict",),  # `apptainer exec ensemble.sif python -m stages.predict ...`
}
# Needs that no import shows. Each entry says why.
RUNTIME_PACKAGES = {
    # builtin templates are read from training/templates/ and copied into the bundles
    "bundlegen": {"training"},
}


def module_file(mod: str) -> Path | None:
    """The file of a first-party module name, or None when it is not one."""
    p = ROOT.joinpath(*mod.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def first_party_imports(path: Path, mod: str) -> set[str]:
    """First-party module names ``path`` (module ``mod``) imports, relative imports resolved,
    ``from pkg import sub`` counted as ``pkg.sub`` when ``sub`` is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    optional = _optional_imports(tree)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in CODE_ROOTS)
    return out


def needed_modules(stage: str) -> set[str]:
    """Every first-party module the image's entry points import, transitively (parents included:
    importing ``a.b`` runs ``a/__init__.py``)."""
    todo: list[str] = []
    for entry in (f"stages.{stage}", *EXTRA_ENTRIES.get(stage, ())):
        folder = ROOT.joinpath(*entry.split("."))
        todo += [entry if p.stem == "__init__" else f"{entry}.{p.stem}" for p in folder.glob("*.py")]
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        path = module_file(mod)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(first_party_imports(path, mod))
    return seen


def copy_unit(mod: str) -> str:
    """The repository path an image copies for ``mod``: its stage package folder, the bare
    ``stages/__init__.py``, or its whole top-level package folder."""
    parts = mod.split(".")
    if parts[0] == "stages":
        return "stages/__init__.py" if len(parts) == 1 else f"stages/{parts[1]}/"
    return f"{parts[0]}/"


def needed_units(stage: str) -> set[str]:
    return {copy_unit(m) for m in needed_modules(stage)} | {f"{p}/" for p in RUNTIME_PACKAGES.get(stage, ())}


def copied_code(stage: str) -> set[str]:
    """First-party code paths the Dockerfile's final stage copies from the build context."""
    out: set[str] = set()
    for kind, args in final_stage(parse_dockerfile(ROOT / "stages" / stage / "Dockerfile")):
        words = args.split()
        if kind != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for src in (w for w in words[:-1] if not w.startswith("--")):
            if src.split("/")[0] in CODE_ROOTS:
                out.add(src + "/" if (ROOT / src).is_dir() and not src.endswith("/") else src)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_image_copies_exactly_the_packages_its_stage_imports(stage: str) -> None:
    """Needed (from the imports) == copied (from the Dockerfile); the diff names both sides."""
    need, have = needed_units(stage), copied_code(stage)
    missing, extra = sorted(need - have), sorted(have - need)
    assert not missing and not extra, (
        f"stages/{stage}/Dockerfile: missing {missing} (imported: "
        f"{sorted(m for m in needed_modules(stage) if copy_unit(m) in missing)}); not imported: {extra}"
    )


def test_no_image_carries_tools_tests_or_the_scheduler() -> None:
    """The generators, the tests, the benches and the SLURM code stay out of every image (and
    the build-time COPYs of the other stages never copy code: locks, wheels, templates only)."""
    for stage in STAGES:
        for kind, args in parse_dockerfile(ROOT / "stages" / stage / "Dockerfile"):
            if kind != "COPY":
                continue
            srcs = [w for w in args.split()[:-1] if not w.startswith("--")]
            bad = [s for s in srcs if s.split("/")[0] in ("tools", "tests", "bench", "slurm")]
            bad += [s for s in srcs if s.startswith("containers/") and s.endswith(".py")]
            assert not bad, f"stages/{stage}/Dockerfile copies {bad}"


def test_the_torch_free_images_stay_torch_free() -> None:
    """convert's import closure never reaches the training library (which needs torch)."""
    assert not {m for m in needed_modules("convert") if m.split(".")[0] == "training"}
    assert "training/" not in copied_code("convert")
    assert "training/" not in copied_code("analyze"), "analyze needs only common.classes.ANALYZE_STATS_KEY"


def test_closure_follows_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    """The resolver itself: a lazy import inside a function counts, ``from common import x``
    resolves to the module ``common.x``, a guarded optional import does not count."""
    src = (
        "from common import config\n"
        "def f():\n    from common.ngff import read_multiscales\n"
        "try:\n    import training.trainer\nexcept ImportError:\n    pass\n"
        "from . import convert\n"
    )
    p = tmp_path / "x.py"
    p.write_text(src)
    got = first_party_imports(p, "stages.convert.x")
    assert {"common", "common.config", "common.ngff", "stages.convert", "stages.convert.convert"} <= got
    assert not {m for m in got if m.startswith("training")}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_are_in_its_image(stage: str) -> None:
    """Third-party: every module the stage package imports comes from a distribution of its image's
    lock (e.g. convert must not import torch); no stage imports another stage's package except the
    extra entry points its image carries."""
    allowed = _allowed_dists(stage)
    top_to_dists = md.packages_distributions()
    entries = (f"stages.{stage}", *EXTRA_ENTRIES.get(stage, ()))
    problems = []
    for entry in entries:
        for py in ROOT.joinpath(*entry.split(".")).rglob("*.py"):
            tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
            optional = _optional_imports(tree)
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top == "__future__":
                        continue
                    if top in CODE_ROOTS:
                        if (
                            top == "stages"
                            and mod != "stages"
                            and not any(mod == e or mod.startswith(e + ".") for e in entries)
                        ):
                            problems.append(f"{mod} (another stage's package is not in this image)")
                        continue
                    dists = {d.lower().replace("_", "-") for d in top_to_dists.get(top, [])}
                    if not dists & allowed:
                        problems.append(f"{mod} (no distribution of it in the {stage} image)")
    assert not problems, f"stages/{stage} imports: " + "; ".join(sorted(set(problems)))


@pytest.mark.parametrize("stage", STAGES)
def test_build_context_is_what_the_dockerfile_copies(stage: str) -> None:
    """``containers/build.sh`` builds each stage from a context derived from its Dockerfile's COPY
    lines (its own ``dockerfile_sources``, run here), so a Dockerfile change cannot leave the context
    short or carrying code the image does not copy."""
    fn = re.search(r"^dockerfile_sources\(\) \{.*?^\}$", (ROOT / "containers" / "build.sh").read_text(), re.M | re.S)
    assert fn, "containers/build.sh defines dockerfile_sources"
    res = subprocess.run(
        ["bash", "-c", fn.group(0) + '\ndockerfile_sources "$1"', "_", f"stages/{stage}/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    context = set(res.stdout.split())
    want = {s.rstrip("/") for s in copied_code(stage)}
    assert want <= context, f"build.sh context lacks {sorted(want - context)}"
    assert {c for c in context if c.split("/")[0] in CODE_ROOTS and not c.startswith("containers/")} == want
