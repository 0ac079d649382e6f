"""Container definitions: stage Dockerfiles match the stage CLIs, locks match the dependency
groups, lint is clean, SIF conversion picks the right source. No container engine needed here;
the real podman build is in ``test_containers_podman.py``."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from containers import lint, wheelhouse

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("convert", "analyze", "bundlegen", "train", "ensemble")
BASE_OF = {
    "convert": "base-cpu",
    "analyze": "base-cpu",
    "bundlegen": "base-cpu",
    "train": "base-cuda",
    "ensemble": "base-cuda",
}
WITH_TEMPLATES = {"bundlegen", "train"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last build stage (from its FROM on)."""
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def entrypoint_argv(stage: str) -> list[str]:
    """The exec-form ENTRYPOINT of ``stages/<stage>/Dockerfile``."""
    instrs = final_stage(parse_dockerfile(ROOT / "stages" / stage / "Dockerfile"))
    eps = [json.loads(arg) for k, arg in instrs if k == "ENTRYPOINT"]
    assert len(eps) == 1, f"{stage}: exactly one ENTRYPOINT in the final stage"
    return eps[0]


@pytest.mark.parametrize("stage", STAGES)
def test_dockerfile_structure(stage: str) -> None:
    """FROM the right base, deps before code, the stage's code copied, labels and templates."""
    path = ROOT / "stages" / stage / "Dockerfile"
    instrs = parse_dockerfile(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instrs if k == "ARG" and "=" in a}
    assert args["BASE_IMAGE"].split(":")[0].endswith(f"/{BASE_OF[stage]}")
    froms = [a for k, a in instrs if k == "FROM"]
    assert froms and all(f.startswith("${BASE_IMAGE}") for f in froms)
    assert entrypoint_argv(stage) == ["python", "-m", f"stages.{stage}"]
    final = final_stage(instrs)
    copies = [a for k, a in final if k == "COPY"]
    assert copies[0] == "--from=deps /opt/venv /opt/venv", "dependency layer first"
    assert f"stages/{stage}/ /opt/cellmap/stages/{stage}/" in copies
    assert "common/ /opt/cellmap/common/" in copies
    labels = " ".join(a for k, a in final if k == "LABEL")
    for key in ("version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels
    deps = instrs[: instrs.index(final[0])]
    assert f"containers/locks/{stage}.txt /tmp/lock.txt" in [a for k, a in deps if k == "COPY"]
    assert any("--no-index" in a for k, a in deps if k == "RUN"), "installs offline from the wheelhouse"
    assert any("--require-hashes" in a for k, a in deps if k == "RUN"), "every wheel checked against the lock"
    text = path.read_text()
    assert ("/opt/monai-algo-templates" in text) == (stage in WITH_TEMPLATES)
    if stage in WITH_TEMPLATES:
        assert "CELLMAP_A3DS_OFFICIAL_TEMPLATES=/opt/monai-algo-templates/21ed8e5" in text
        assert "ALGO_TEMPLATES_URL=" in text and "21ed8e5.tar.gz" in text


@pytest.mark.parametrize("base", ["base-cpu", "base-cuda"])
def test_base_dockerfiles(base: str) -> None:
    """Date-pinned Debian, venv, non-root numeric USER, thread and user-site defaults."""
    instrs = parse_dockerfile(ROOT / "containers" / base / "Dockerfile")
    tag = [a.split("=", 1)[1] for k, a in instrs if k == "ARG" and a.startswith("DEBIAN_TAG=")][0]
    assert re.fullmatch(r"bookworm-\d{8}-slim", tag), tag
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instrs if k == "ARG" and "=" in a}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["DEBIAN_DIGEST"]), "base pinned by its registry digest"
    assert args["DEBIAN_REF"] == "debian:${DEBIAN_TAG}@${DEBIAN_DIGEST}"
    assert [a for k, a in instrs if k == "FROM"] == ["${DEBIAN_REF}"]
    labels = " ".join(a for k, a in instrs if k == "LABEL")
    assert 'org.opencontainers.image.base.digest="${BASE_DIGEST}"' in labels
    env = " ".join(a for k, a in instrs if k == "ENV")
    for var in ("PYTHONNOUSERSITE=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "PATH=/opt/venv/bin"):
        assert var in env
    users = [a for k, a in instrs if k == "USER"]
    assert users[-1] == "10001:10001"
    if base == "base-cuda":
        assert [a for k, a in instrs if k == "RUN"][-1] == "ldconfig", "ldconfig is the last RUN"


def _stage_cli_present(stage: str) -> bool:
    return (ROOT / "stages" / stage / "__main__.py").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_entrypoint_help_runs_natively(stage: str) -> None:
    """The image's argv (python -m stages.<name>) is the bare command: ``--help`` works."""
    if not _stage_cli_present(stage):
        pytest.skip(f"stages/{stage}/__main__.py has not landed yet")
    argv = entrypoint_argv(stage)
    assert argv[0] == "python"
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    res = subprocess.run(
        [sys.executable, *argv[1:], "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Usage:" in res.stdout and "--work-dir" in res.stdout


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``try: ... except ImportError`` (deliberately optional)."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for h in node.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & {"ImportError", "ModuleNotFoundError"}:
            for stmt in node.body:
                optional |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return optional


def _allowed_dists(stage: str) -> set[str]:
    """Distributions in the image: its lock, else the dependency group and what it requires."""
    lock = ROOT / "containers" / "locks" / f"{stage}.txt"
    if lock.exists():
        return set(wheelhouse.read_lock(lock))
    todo = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in wheelhouse.stage_requirements(stage)]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=!~\[; (]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    return seen


# Which code and which distributions each image needs (computed from the imports) is checked in
# tests/test_image_context.py, which uses _allowed_dists/_optional_imports from here.


def test_locks_follow_constraints() -> None:
    """Every lock pins what constraints.txt pins to the same version, with a sha256 per wheel, and
    the right torch: none for convert, ``+cpu`` for analyze/bundlegen, PyPI's plain 2.13.0 (the
    CUDA 13.0 build, with its nvidia-*-cu13 wheels) for train/ensemble."""
    pins = {}
    for ln in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in ln and not ln.startswith("#"):
            name, ver = ln.split("==")
            pins[name.strip().lower().replace("_", "-")] = ver.strip()
    locks = sorted((ROOT / "containers" / "locks").glob("*.txt"))
    assert {p.stem for p in locks} >= set(STAGES)
    for lock in locks:
        stage, _, flavour = lock.stem.partition("-")
        flavour = flavour or wheelhouse.TORCH_FLAVOUR[stage]
        got = wheelhouse.read_lock(lock)
        lines = [ln for ln in lock.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(lines) == len(got)
        for name, (ver, hashes) in got.items():
            assert len(hashes) >= 1 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{lock.name}: {name}"
            if name in pins:
                assert ver.split("+")[0] == pins[name], f"{lock.name}: {name}=={ver} vs constraints {pins[name]}"
        wanted = {
            re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in wheelhouse.stage_requirements(stage)
        }
        stale = sorted(wanted - set(got))
        assert not stale, (
            f"{lock.name} lacks {stale} from pyproject [{stage}]: rerun "
            f"python -m containers.wheelhouse {stage} --relock"
        )
        if not flavour:
            assert "torch" not in got and "monai" not in got, f"{lock.name} must not carry torch/MONAI"
        else:
            assert "torch==" + got["torch"][0] == wheelhouse.TORCH_PIN[flavour], f"{lock.name}: torch {got['torch']}"
        if flavour == "cu130":
            assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13", "cuda-toolkit"} <= set(got), lock.name
        if flavour == "cpu":
            assert not [n for n in got if n.startswith("nvidia-")], f"{lock.name}: CUDA wheels in a CPU image"
    assert "torch" not in wheelhouse.stage_requirements("convert")
    train, ens = (
        wheelhouse.read_lock(ROOT / "containers" / "locks" / "train.txt"),
        wheelhouse.read_lock(ROOT / "containers" / "locks" / "ensemble.txt"),
    )
    assert not {"mlflow", "tensorboard", "pandas", "pyarrow"} & set(ens), "training-only packages in ensemble"
    assert train["torch"] == ens["torch"], "train and ensemble share one torch wheel"


def test_torch_flavour_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_FLAVOUR picks the GPU stages' torch (cu130 default, cu126 untested) and its lock name;
    CPU stages ignore it; anything else is refused."""
    monkeypatch.delenv("TORCH_FLAVOUR", raising=False)
    assert wheelhouse.flavour_of("train") == "cu130" and wheelhouse.lock_name("train") == "train"
    monkeypatch.setenv("TORCH_FLAVOUR", "cu126")
    assert wheelhouse.lock_name("ensemble") == "ensemble-cu126" and wheelhouse.lock_name("analyze") == "analyze"
    assert wheelhouse.TORCH_INDEX["cu126"].startswith("https://download.pytorch.org/")
    monkeypatch.setenv("TORCH_FLAVOUR", "cu999")
    with pytest.raises(SystemExit, match="TORCH_FLAVOUR"):
        wheelhouse.flavour_of("train")


def test_lint_clean() -> None:
    """hadolint on every Dockerfile and ShellCheck on every shell script: no findings."""
    dfs, scripts = lint.dockerfiles(), lint.shell_scripts()
    assert {ROOT / "stages" / s / "Dockerfile" for s in STAGES} <= set(dfs)
    assert ROOT / "containers" / "build.sh" in scripts and ROOT / ".ci" / "run" in scripts
    h = lint.run_hadolint(dfs)
    assert h.returncode == 0, h.stdout + h.stderr
    s = lint.run_shellcheck(scripts)
    assert s.returncode == 0, s.stdout + s.stderr


def test_lint_catches_problems(tmp_path: Path) -> None:
    """The linters really fail on bad input (so a clean run means something)."""
    bad_df = tmp_path / "Dockerfile"
    bad_df.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\n")
    h = lint.run_hadolint([bad_df])
    assert h.returncode != 0 and "DL3007" in h.stdout  # 'latest' tag
    bad_sh = tmp_path / "bad.sh"
    bad_sh.write_text("#!/bin/bash\nif [ $x = done ]; then echo $y; fi\n")
    s = lint.run_shellcheck([bad_sh])
    assert s.returncode != 0 and "SC1010" in s.stdout
    assert lint.SHEBANG.match(b"#!/usr/bin/env bash\n") and lint.SHEBANG.match(b"#!/bin/sh -e\n")
    assert not lint.SHEBANG.match(b"#!/usr/bin/env python3\n")


def _stand_in_apptainer(bin_dir: Path, log: Path) -> None:
    """An ``apptainer`` that records its argv and writes the SIF it is asked for."""
    bin_dir.mkdir()
    exe = bin_dir / "apptainer"
    exe.write_text(
        f'#!/bin/bash\necho "$*" >> {shlex.quote(str(log))}\n'
        'for a; do last2=$last1; last1=$a; done\necho SIF > "$last2"\n'
    )
    exe.chmod(0o755)


@pytest.mark.parametrize("cli", ["docker", "none"])
def test_sif_source(tmp_path: Path, cli: str) -> None:
    """``make sif``: from the docker daemon when docker is the engine, else from the saved archive;
    the SIF appears under its final name only when the build succeeded."""
    log = tmp_path / "argv.log"
    _stand_in_apptainer(tmp_path / "bin", log)
    images = tmp_path / "images"
    images.mkdir()
    (images / "convert.tar").write_bytes(b"archive")
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        CONTAINER_CLI=cli,
        IMAGES_DIR=str(images),
        VERSION="9.9.9",
    )
    res = subprocess.run(
        [str(ROOT / "containers" / "sif.sh"), "convert"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    argv = log.read_text().split()
    source = "docker-daemon:cellmap-a3ds/convert:9.9.9" if cli == "docker" else f"docker-archive:{images}/convert.tar"
    assert argv == ["build", "--force", f"{images}/convert.sif.tmp", source]
    assert (images / "convert.sif").read_text() == "SIF\n"
    assert not (images / "convert.sif.tmp").exists()
    # No archive and no engine: one clear error, exit 2, nothing written.
    res = subprocess.run(
        [str(ROOT / "containers" / "sif.sh"), "train"],
        env=dict(env, CONTAINER_CLI="none"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "no " in res.stderr and not (images / "train.sif").exists()


def _templates_tarball(path: Path, with_algo: bool = True) -> Path:
    """A release-shaped archive ``algorithm_templates/<algo>/scripts/algo.py`` (from our own
    builtin templates, so no download is needed)."""
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        src = ROOT / "training" / "templates" / "segresnet"
        tar.add(src if with_algo else src / "configs", arcname="algorithm_templates/segresnet")
    return path


def test_fetch_templates_offline(tmp_path: Path) -> None:
    """The image-build helper unpacks a local copy into <dest>/<hash>, checks its sha256 (required
    unless `unverified` is said) and refuses an archive without algorithms (an offline build never
    downloads)."""
    import hashlib

    script = ROOT / "containers" / "fetch-templates.sh"
    local = tmp_path / "local"
    local.mkdir()
    tarball = _templates_tarball(local / "21ed8e5.tar.gz")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    dest = tmp_path / "opt"
    url = "http://127.0.0.1:9/unreachable.tar.gz"  # must not be used
    res = subprocess.run(
        ["bash", str(script), "21ed8e5", url, str(local), str(dest), sha], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert (dest / "21ed8e5" / "segresnet" / "scripts" / "algo.py").is_file()
    res = subprocess.run(
        ["bash", str(script), "21ed8e5", url, str(local), str(dest), "0" * 64],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0, "a wrong sha256 must fail the build"
    _templates_tarball(local / "21ed8e5.tar.gz", with_algo=False)
    res = subprocess.run(
        ["bash", str(script), "21ed8e5", url, str(local), str(tmp_path / "opt2"), "unverified"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "no <algo>/scripts/algo.py" in res.stderr
    assert "NOT verified" in res.stderr
    # The checksum is required by default: no sha256 is a one-line refusal, before any download.
    for bad in ([], ["not-a-sha"]):
        res = subprocess.run(
            ["bash", str(script), "21ed8e5", url, str(local), str(tmp_path / "opt3"), *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "ALGO_TEMPLATES_SHA256" in res.stderr and not (tmp_path / "opt3").exists()


def test_optional_imports_are_recognised() -> None:
    """Imports guarded by ``except ImportError`` are optional; plain and lazy ones are not."""
    tree = ast.parse(
        "try:\n    import matplotlib\nexcept ImportError:\n    pass\nimport torch\ndef f():\n    import scipy\n"
    )
    optional = _optional_imports(tree)
    required = sorted(n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.Import) and id(n) not in optional)
    assert required == ["scipy", "torch"]


def test_wheelhouse_completeness_check(tmp_path: Path) -> None:
    """A complete wheelhouse is used as is (offline rebuilds); gaps are named."""
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\nPyYAML==6.0.3 --hash=sha256:"
        + "a" * 64
        + "\ntorch==2.13.0+cpu --hash=sha256:"
        + "b" * 64
        + "\nzarr==2.18.7 --hash=sha256:"
        + "c" * 64
        + "\n"
    )
    (tmp_path / "pyyaml-6.0.3-cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"")
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (tmp_path / "zarr-2.18.6-py3-none-any.whl").write_bytes(b"")  # wrong version
    assert wheelhouse.missing_wheels(lock, tmp_path) == ["zarr==2.18.7"]
    assert wheelhouse.missing_wheels(ROOT / "containers" / "locks" / "convert.txt", tmp_path)
