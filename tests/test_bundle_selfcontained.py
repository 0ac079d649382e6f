"""A trained builtin bundle carries, and runs, its own copy of the training library.

* the run-time modules import nothing outside themselves and torch/MONAI/numpy/PyYAML (AST);
* a bundle trained before a deliberate change to the trainer predicts identically after it;
* a bundle copied outside the repository predicts through MONAI's own ``algo_from_json`` in a
  process that cannot import this repository;
* a bundle generated before bundles were self-contained is refused with one line (exit 2).

Real bundlegen, real training (one tiny epoch), real MONAI ``get_inferer`` in subprocesses.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import ROOT, TINY_NET, _env, analysed, make_work, run_train  # noqa: F401 (fixture)
from training import vendor

TRAINING = ROOT / "training"
ALLOWED = {"torch", "monai", "numpy", "yaml"}
OPTIONAL = {"tensorboard", "mlflow", "matplotlib", "psutil", "einops", "tqdm"}  # imported inside try/except or lazily
TINY_ONE_EPOCH = {
    "num_epochs": 1,
    "roi_size": [32, 32, 16],
    "batch_size": 2,
    "num_workers": 0,
    "network": TINY_NET,
    "num_steps_per_epoch": 2,
}
IMAGE = "synth_crop1_image.nii.gz"

# predicts one image through MONAI's own path (algo_from_json -> get_inferer -> InferClass.infer)
PREDICT = r"""
import sys, json, importlib, importlib.util
args = json.loads(sys.argv[1])
if args.get("isolate"):
    # no way to this repository: drop the editable install's finders and any repo path
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                        and "__editable__" not in getattr(type(f), "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    # the venv may live inside the checkout (.venv): its site-packages (MONAI, torch) stay
    sys.path[:] = [p for p in sys.path if p and (p.startswith(sys.prefix) or not any(p.startswith(r) for r in args["repos"]))]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    for name in ("common", "training", "stages"):
        assert importlib.util.find_spec(name) is None, (name, importlib.util.find_spec(name))
import numpy as np
from monai.auto3dseg.utils import algo_from_json
algo, _ = algo_from_json(args["algo_json"], template_path=args["templates"])
prob = algo.get_inferer(device="cpu").infer(args["image"])
np.save(args["out"], np.asarray(prob.as_tensor().numpy() if hasattr(prob, "as_tensor") else prob, dtype=np.float32))
lib = [m for m in sys.modules if m.startswith("cellmap_training_")]
direct = None
if args.get("direct"):
    # the (changed) package found on sys.path, imported directly
    import training.inference
    assert training.inference.__file__.startswith(args["direct"]), training.inference.__file__
    direct = training.inference.predict_probabilities(args["bundle"], args["image"], device="cpu")
    np.save(args["out"] + ".direct.npy", direct)
print(json.dumps({"library_modules": sorted(lib), "training_loaded": "training" in sys.modules}))
"""


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (any depth, lazy ones too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_runtime_modules_import_only_themselves_and_torch_monai() -> None:
    files = vendor.runtime_files()
    names = {p.name for p in files}
    assert {
        "trainer.py",
        "data.py",
        "checkpoint.py",
        "loop.py",
        "inference.py",
        "signals.py",
        "networks.py",
        "losses.py",
        "sampling.py",
        "tracking.py",
        "dints_search.py",
        "errors.py",
    } <= names
    assert not names & {"autoconfig.py", "vendor.py"}
    allowed = set(sys.stdlib_module_names) | ALLOWED | OPTIONAL | {"__future__"}
    bad = {p.name: sorted(_imports(p) - allowed) for p in files if _imports(p) - allowed}
    assert not bad, f"run-time modules import outside themselves/torch/monai/numpy/yaml: {bad}"


def test_template_scripts_import_with_monai_alone() -> None:
    """algo.py imports autoconfig only inside fill_template_config; the bundle scripts (one source,
    training/bundle_scripts/) and the loader import nothing of this repository."""
    for algo in ("segresnet", "swinunetr", "dints"):
        scripts = TRAINING / "templates" / algo / "scripts"
        tree = ast.parse((scripts / "algo.py").read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not any(m and m.split(".")[0] in ("training", "common") for m in top), top
        # a template holds only what differs per algorithm: train.py / infer.py come from one source
        assert not (scripts / "train.py").exists() and not (scripts / "infer.py").exists()
    for path in (
        TRAINING / "bundle_scripts" / "train.py",
        TRAINING / "bundle_scripts" / "infer.py",
        TRAINING / "loader.py",
    ):
        assert _imports(path) <= set(sys.stdlib_module_names) | {"__future__"}, path


def test_vendor_copies_the_runtime_with_a_manifest(tmp_path: Path) -> None:
    rec = vendor.vendor_into(tmp_path / "b")
    lib = tmp_path / "b" / "scripts" / vendor.VENDOR_DIR
    assert sorted(p.name for p in lib.iterdir()) == sorted([*rec["files"], "MANIFEST", "VERSION"])
    assert "loader.py" in rec["files"]
    for script in ("train.py", "infer.py"):  # the bundle's scripts, from their one source
        assert (tmp_path / "b" / "scripts" / script).read_bytes() == (TRAINING / "bundle_scripts" / script).read_bytes()
    assert not (lib / "autoconfig.py").exists() and not (lib / "templates").exists()
    assert not (lib / "__pycache__").exists()
    assert (lib / "VERSION").read_text().strip() == rec["version"] != ""
    for line in (lib / "MANIFEST").read_text().splitlines():
        sha, name = line.split("  ")
        assert vendor._sha256(lib / name) == sha == rec["files"][name]
    assert rec["alias"] == vendor.library_alias((lib / "MANIFEST").read_bytes())
    # the loader imports the copy under its alias, not the repo's package
    mod = vendor.load_bundle_library(tmp_path / "b", "inference")
    assert mod.__name__ == f"{rec['alias']}.inference" and Path(mod.__file__).parent == lib


def test_two_library_versions_live_in_one_process(tmp_path: Path) -> None:
    """Bundles vendored from different trainer versions each get their own modules (the ensemble)."""
    old = vendor.vendor_into(tmp_path / "old")
    vendor.vendor_into(tmp_path / "new")
    lib = tmp_path / "new" / "scripts" / vendor.VENDOR_DIR
    (lib / "errors.py").write_text((lib / "errors.py").read_text() + "\nLIBRARY_GENERATION = 2\n")
    (lib / "MANIFEST").write_text("".join(f"{vendor._sha256(lib / n)}  {n}\n" for n in sorted(old["files"])))
    a = vendor.load_bundle_library(tmp_path / "old", "errors")
    b = vendor.load_bundle_library(tmp_path / "new", "errors")
    assert a.__name__ != b.__name__ and a.__name__ in sys.modules and b.__name__ in sys.modules
    assert not hasattr(a, "LIBRARY_GENERATION") and b.LIBRARY_GENERATION == 2
    ta, tb = vendor.load_bundle_library(tmp_path / "old"), vendor.load_bundle_library(tmp_path / "new")
    assert ta.RequeueRequested is not tb.RequeueRequested and ta.RequeueRequested.exit_code == 75


@pytest.fixture(scope="module")
def trained(analysed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A segresnet bundle trained by the train stage (one tiny epoch); first refused without its library."""
    wd = make_work(analysed, tmp_path_factory.mktemp("selfcontained") / "work", ["segresnet"], TINY_ONE_EPOCH)
    bundle = wd / "segresnet_0"
    rec = json.loads((bundle / "cellmap_bundle.json").read_text())
    assert rec["library"]["alias"].startswith("cellmap_training_")
    lib = bundle / "scripts" / vendor.VENDOR_DIR
    # a bundle generated before bundles carried their library: one line, exit 2, nothing trained
    lib.rename(lib.with_name("away"))
    r = run_train(wd, "segresnet", "--gpus", "0")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if "rerun bundlegen" in ln]
    assert len(err) == 1 and "scripts/cellmap_training" in err[0], r.stderr[-2000:]
    assert not (bundle / "model" / "model_final.pt").exists()
    lib.with_name("away").rename(lib)
    r = run_train(wd, "segresnet", "--gpus", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (bundle / "model" / "progress.yaml").is_file()
    return wd


def _predict(args: dict, env: dict[str, str], cwd: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PREDICT, json.dumps(args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_old_bundle_predicts_identically_after_a_trainer_change(trained: Path, tmp_path: Path) -> None:
    wd = trained
    bundle = wd / "segresnet_0"
    alias = json.loads((bundle / "cellmap_bundle.json").read_text())["library"]["alias"]
    base = {
        "algo_json": str(bundle / "algo_object.json"),
        "templates": str(wd / "algorithm_templates"),
        "image": str(wd / "nifti_data" / IMAGE),
        "bundle": str(bundle),
    }
    env = _env()
    info = _predict({**base, "out": str(tmp_path / "p1.npy")}, env, ROOT)
    assert info["library_modules"][0] == alias  # MONAI's get_inferer ran the bundle's copy ...
    assert not info["training_loaded"]  # ... and never imported the repository's package
    p1 = np.load(tmp_path / "p1.npy")
    assert p1.shape[0] == 4 and np.allclose(p1.sum(0), 1, atol=1e-4)

    # a deliberate change to the trainer: the inference negates the logits
    changed = tmp_path / "changed"
    shutil.copytree(TRAINING, changed / "training", ignore=shutil.ignore_patterns("__pycache__", "templates"))
    inf = changed / "training" / "inference.py"
    text = inf.read_text()
    assert "torch.softmax(logits.float(), dim=1)" in text
    inf.write_text(text.replace("torch.softmax(logits.float(), dim=1)", "torch.softmax(-logits.float(), dim=1)"))
    env2 = dict(env, PYTHONPATH=os.pathsep.join([str(changed), env["PYTHONPATH"]]))
    info = _predict({**base, "out": str(tmp_path / "p2.npy"), "direct": str(changed)}, env2, tmp_path)
    direct = np.load(tmp_path / "p2.npy.direct.npy")
    assert not np.allclose(direct, p1, atol=1e-3)  # (i) the changed package predicts differently: not vacuous
    assert np.array_equal(np.load(tmp_path / "p2.npy"), p1)  # (ii) the old bundle predicts exactly P1


@pytest.mark.slow
def test_copied_bundle_predicts_through_monai_without_the_repository(trained: Path, tmp_path: Path) -> None:
    wd = trained
    ref = tmp_path / "ref.npy"
    _predict(
        {
            "algo_json": str(wd / "segresnet_0" / "algo_object.json"),
            "templates": str(wd / "algorithm_templates"),
            "image": str(wd / "nifti_data" / IMAGE),
            "out": str(ref),
        },
        _env(),
        ROOT,
    )
    # MONAI's layout: the bundle beside algorithm_templates, in a directory outside the repository
    out = tmp_path / "elsewhere"
    shutil.copytree(wd / "segresnet_0", out / "segresnet_0")
    shutil.copytree(wd / "algorithm_templates", out / "algorithm_templates")
    shutil.copy(wd / "nifti_data" / IMAGE, out / IMAGE)
    assert not str(out).startswith(str(ROOT))
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    original = wd / "segresnet_0" / "model"
    original.rename(original.with_name("model.away"))  # the copy must use its own model, not the original's
    try:
        info = _predict(
            {
                "algo_json": str(out / "segresnet_0" / "algo_object.json"),
                "templates": str(out / "algorithm_templates"),
                "image": str(out / IMAGE),
                "out": str(tmp_path / "copy.npy"),
                "isolate": True,
                "repos": sorted({str(ROOT), str(Path(vendor.__file__).resolve().parents[1])}),
            },
            env,
            tmp_path,
        )
    finally:
        original.with_name("model.away").rename(original)
    assert info["library_modules"] and not info["training_loaded"]
    assert np.array_equal(np.load(tmp_path / "copy.npy"), np.load(ref))
