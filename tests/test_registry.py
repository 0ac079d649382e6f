"""The algorithm registry and the pipeline definition: everything derives from them.

* A fourth algorithm (``tests/tiny_algo.py``: a two-layer conv net and its registry entry,
  plus a template folder made here in tmp) goes through the real analyze, bundlegen, train
  and MONAI's own predict path with no edit to any file of the repository.
* Config validation, bundlegen, submit, the demo, the container scripts and the Makefile
  list exactly what the registry / pipeline definition hold (no fifth restatement).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common import algorithms, pipeline
from common.config import ALGOS, load_config
from common.errors import ConfigError
from stages.bundlegen.bundlegen import BUILTIN_TEMPLATES, _forget_templates, template_folder
from tests.tiny_algo import NAME, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ecs", "pm", "mito_mem"]


def _repo_state() -> str:
    """Tracked changes and untracked files in the code folders (what 'no edit' means)."""
    out = subprocess.run(
        [
            "git",
            "status",
            "--porcelain",
            "--untracked-files=all",
            "--",
            "common",
            "training",
            "stages",
            "slurm",
            "tools",
            "containers",
            "mk",
            "Makefile",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return out.stdout if out.returncode == 0 else "not a git checkout"


def _tiny_template(dest: Path) -> Path:
    """The tiny algorithm's template: a copy of the builtin segresnet template with its own
    defaults and its class renamed (MONAI loads ``tiny.scripts.algo.TinyAlgo``)."""
    tpl = dest / "tiny_template"
    shutil.copytree(BUILTIN_TEMPLATES / "segresnet", tpl, ignore=shutil.ignore_patterns("__pycache__"))
    algo_py = tpl / "scripts" / "algo.py"
    code = algo_py.read_text().replace("segresnet", NAME).replace("Segresnet", NAME.capitalize())
    assert f"class {NAME.capitalize()}Algo" in code
    algo_py.write_text(code)
    (tpl / "configs" / "hyper_parameters.yaml").write_text(
        yaml.safe_dump({"algo": NAME, "learning_rate": 0.01, "network": {"channels": 4}})
    )
    return dest


@pytest.mark.slow
def test_fourth_algorithm_needs_only_registry_entry_factory_and_template(tmp_path: Path) -> None:
    """Register ``tiny`` from the test; bundlegen (next to a builtin), train 1 epoch on CPU, predict."""
    from monai.apps.auto3dseg import import_bundle_algo_history

    from stages.analyze.analyze import run_analyze_entry
    from stages.bundlegen.bundlegen import run_bundlegen_entry
    from stages.train.train import run_train_entry
    from tools.synthetic import make_blobs_dataset

    before = _repo_state()
    spec = tiny_spec(str(_tiny_template(tmp_path / "plugin_templates")))
    wd = tmp_path / "work"
    try:
        with algorithms.registered(spec):
            assert NAME in ALGOS and algorithms.names()[-1] == NAME
            make_blobs_dataset(wd, n_cases=4, shape=(32, 32, 16), n_classes=3, n_val=1, seed=1)
            train = {"num_epochs": 1, "batch_size": 2, "num_workers": 0, "val_every": 1}
            (wd / "pipeline.yaml").write_text(
                yaml.safe_dump(
                    {
                        "classes": CLASSES,
                        "unknown_label": 255,
                        "algos": ["segresnet", NAME],
                        "num_folds": 1,
                        "templates": "builtin",
                        "train": train,
                    }
                )
            )
            run_analyze_entry(wd)
            assert run_bundlegen_entry(wd, target_gpu_mem_gb=16) == 0

            # the bundle carries what its trainer needs; the registry's roi rules were applied
            hp = yaml.safe_load((wd / f"{NAME}_0" / "configs" / "hyper_parameters.yaml").read_text())
            assert hp["algo"] == NAME and hp["network"] == {"channels": 4} and hp["learning_rate"] == 0.01
            assert hp["network_factory"] == "tests.tiny_algo:tiny_net" and hp["roi_divisor"] == 8
            assert hp["roi_fit"] is None
            assert hp["roi_size"] == [16, 16, 16]  # median 32x32x16 and a big budget, capped by roi_max 16
            assert hp["tiny_dropout"] == 0.0  # its shared default ...
            seg = yaml.safe_load((wd / "segresnet_0" / "configs" / "hyper_parameters.yaml").read_text())
            assert seg["tiny_dropout"] == 0.0 and seg["network_factory"] == ".networks:segresnet"  # ... in every bundle
            assert (wd / "algorithm_templates" / NAME / "scripts" / "algo.py").is_file()
            assert (wd / "algorithm_templates" / "segresnet" / "scripts" / "algo.py").is_file()
            rec = json.loads((wd / f"{NAME}_0" / "cellmap_bundle.json").read_text())
            assert rec["templates"] == "builtin" and rec["output_classes"] == 4

            # the normal train entry (what `python -m stages.train --algo tiny` calls), CPU, 1 epoch
            res = run_train_entry(wd, None, NAME, 0, gpus=0)
            assert set(res) == {f"{NAME}_0"} and res[f"{NAME}_0"] is not None
        marker = json.loads((wd / "markers" / f"train.{NAME}_0.json").read_text())
        assert marker["status"] == "done"
        final = torch.load(wd / f"{NAME}_0" / "model" / "model_final.pt", weights_only=True)
        assert sorted(final["state_dict"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # the two convs
        assert final["config"]["num_epochs"] == 1

        # MONAI's own predict path (BundleAlgo.predict -> the template's InferClass), registry not needed
        hist = import_bundle_algo_history(str(wd), only_trained=True)
        assert [h["identifier"] for h in hist] == [f"{NAME}_0"]
        image = next((wd / "nifti_data").glob("*_image.nii.gz"))
        prob = hist[0]["algo_instance"].predict([str(image)], {"device": "cpu"})[0]
        assert tuple(prob.shape) == (4, 32, 32, 16) and prob.dtype == torch.float32
        assert torch.allclose(prob.sum(0), torch.ones(32, 32, 16), atol=1e-4)
    finally:
        _forget_templates(BUILTIN_TEMPLATES, None)
        for mod in [m for m in sys.modules if m.split(".")[0] == NAME]:  # MONAI imported tiny.scripts.*
            del sys.modules[mod]
    assert NAME not in algorithms.names()
    assert _repo_state() == before, "the fourth algorithm needed an edit of the repository"


def test_config_validation_is_the_registry(tmp_path: Path) -> None:
    """``algos`` defaults to and is checked against the registry, live (a later registration counts)."""
    assert tuple(ALGOS) == algorithms.names() == ("segresnet", "swinunetr", "dints")
    assert load_config(tmp_path / "a", dump=False).algos == list(algorithms.names())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pipeline.yaml").write_text(f"algos: [segresnet, {NAME}]\n")
    with pytest.raises(ConfigError, match=rf"unknown algorithm \['{NAME}'\]"):
        load_config(tmp_path / "b", dump=False)
    with algorithms.registered(tiny_spec(str(tmp_path))):
        assert load_config(tmp_path / "b", dump=False).algos == ["segresnet", NAME]
        assert load_config(tmp_path / "a", dump=False).algos == [*algorithms.names()]
        with pytest.raises(ValueError, match="already registered"):
            algorithms.register(tiny_spec(str(tmp_path)))
    assert NAME not in ALGOS
    with pytest.raises(KeyError, match="known: segresnet, swinunetr, dints"):
        algorithms.get("unet")
    with pytest.raises(ValueError, match="not 'module:function'"):
        algorithms.AlgorithmSpec(name="bad", network_factory="no_colon")


def test_builtin_entries_match_their_networks_and_templates() -> None:
    """Each builtin entry: a template folder, a factory that builds its network, and a divisor
    that is what its network (template defaults) accepts; no template without an entry."""
    from training.networks import build_network, fit_roi, resolve

    with_algo = {p.name for p in BUILTIN_TEMPLATES.iterdir() if (p / "scripts" / "algo.py").is_file()}
    assert with_algo == set(algorithms.names())
    for spec in algorithms.specs():
        folder = template_folder("builtin", BUILTIN_TEMPLATES, spec.name)
        assert folder == BUILTIN_TEMPLATES / spec.name
        tpl = yaml.safe_load((folder / "configs" / "hyper_parameters.yaml").read_text())
        assert tpl["algo"] == spec.name
        cfg = {"algo": spec.name, "output_classes": 3, "network": tpl["network"], **spec.bundle_keys()}
        assert callable(resolve(spec.network_factory))
        for capability in (spec.architecture_search, spec.pretrained_loader):  # what the trainer calls by path
            assert capability is None or callable(resolve(capability))
        assert fit_roi(cfg, [1, 1, 1]) == [spec.roi_divisor] * 3 or spec.roi_min > spec.roi_divisor
        assert all(r % spec.roi_divisor == 0 for r in fit_roi(cfg, [spec.roi_min] * 3))
        small = {**cfg, "network": {**tpl["network"], **spec.demo_network}}
        fitted = fit_roi(small, [1, 1, 1])  # the smallest patch the small network accepts
        model = build_network(small).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 1, *fitted))
        assert tuple(out.shape) == (1, 3, *fitted)
        # a bundle written before the registry keys existed resolves the same builtin rules
        legacy = {k: v for k, v in small.items() if k not in spec.bundle_keys()}
        assert fit_roi(legacy, [1, 1, 1]) == fitted
        assert type(build_network(legacy)) is type(model)


def test_submit_demo_and_scripts_list_the_registry_and_pipeline(tmp_path: Path) -> None:
    """submit plans the pipeline's stages and one train job per registered algorithm and fold;
    the demo runs the pipeline's stages with every registered algorithm's small network; the
    container scripts list the pipeline's images."""
    from common.workdir import WorkDir
    from slurm.profiles import STAGES, load_profile
    from slurm.submit import job_kind, plan_jobs
    from tools import demo

    assert STAGES == pipeline.chain_names() == ("convert", "analyze", "bundlegen", "train", "ensemble")
    wd = WorkDir.at(tmp_path / "w").ensure()
    with algorithms.registered(tiny_spec(str(tmp_path))):
        cfg = load_config(wd.root, dump=False)
        cfg.num_folds = 2
        jobs = plan_jobs(wd, cfg, load_profile("local"))
        trains = [j.name for j in jobs if j.stage == "train"]
        assert trains == [f"train.{a}_{f}" for a in algorithms.names() for f in (0, 1)]
        assert trains == pipeline.get("train").marker_names(algorithms.names(), 2)
        assert NAME in trains[-1]
    assert [j.stage for j in jobs if j.stage != "train"] == [s for s in pipeline.chain_names() if s != "train"]
    assert {job_kind(j) for j in jobs} == set(pipeline.images())
    assert pipeline.expected_markers(["segresnet"], 1) == [
        "convert",
        "analyze",
        "bundlegen",
        "train.segresnet_0",
        "ensemble",
    ]

    net = demo.demo_config(tmp_path)["train"]["network"]
    assert net == algorithms.demo_network() and set(demo.DEMO_ALGOS) <= set(algorithms.names())
    for spec in algorithms.specs():
        assert spec.demo_network and spec.demo_network.items() <= net.items()

    py = shutil.which("python3") or "python3"
    got = subprocess.run([py, "-m", "common.pipeline", "images"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert got.stdout.split() == list(pipeline.images()) == ["convert", "analyze", "bundlegen", "train", "ensemble"]
    assert pipeline.images("cpu") == ("convert", "analyze", "bundlegen")
    assert [pipeline.image_device(i) for i in ("train", "ensemble")] == ["cuda", "cuda"]


# files that must derive the algorithm list / stage list rather than restate it
DERIVED = [
    "common/pipeline.py",
    "common/config.py",
    "training/networks.py",
    "stages/bundlegen/bundlegen.py",
    "slurm/submit.py",
    "slurm/profiles.py",
    "slurm/status.py",
    "stages/cli.py",
    "tools/demo.py",
    "containers/build.sh",
    "containers/save.sh",
    "containers/sif.sh",
    "Makefile",
]


def test_no_restatement_creeps_back() -> None:
    """No quoted algorithm name and no spelled-out stage chain in the files that derive them
    (the registry and the pipeline definition are the only places; official-template facts in
    bundlegen are named ``OFFICIAL_*``)."""
    algo_literal = re.compile(r"""["'](""" + "|".join(map(re.escape, algorithms.names())) + r""")["']""")
    chain = re.compile(r"convert\W{1,6}analyze\W{1,6}bundlegen")
    problems = []
    for rel in DERIVED:
        for n, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if rel.endswith((".sh", ".mk")) else line
            if algo_literal.search(code) and not code.startswith("OFFICIAL_"):
                problems.append(f"{rel}:{n}: {line.strip()}")
            if chain.search(code) and rel != "common/pipeline.py" and not code.lstrip().startswith(("#", '"""')):
                problems.append(f"{rel}:{n}: {line.strip()}")
    # config.STAGE_SECTIONS is the config sections (owned by the typed-config work), not the chain
    problems = [p for p in problems if "STAGE_SECTIONS" not in p]
    assert not problems, "restated instead of derived:\n" + "\n".join(problems)


def test_plugin_module_reaches_a_stage_process(tmp_path: Path) -> None:
    """A module named in ``CELLMAP_A3DS_ALGORITHM_PLUGINS`` registers its algorithm in every new
    process: the train command then accepts it (how a plugin reaches SLURM jobs)."""
    (tmp_path / "my_plugin.py").write_text(
        "from common.algorithms import register\nfrom tests.tiny_algo import tiny_spec\n"
        f"register(tiny_spec({str(tmp_path)!r}))\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), **{algorithms.PLUGINS_ENV: "my_plugin"}
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.train", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"[{'|'.join((*algorithms.names(), NAME))}]" in out.replace("\n", "").replace(" ", "")


def test_the_trainer_names_no_algorithm() -> None:
    """What differs per algorithm at train time (architecture search, pretrained weights, network,
    patch fitting) reaches the trainer as paths in the bundle, written from the registry."""
    names = "|".join(map(re.escape, algorithms.names()))
    literal = re.compile(rf"""["']({names})["']""")
    for module in ("trainer.py", "loop.py", "data.py", "inference.py", "checkpoint.py", "validation.py"):
        text = (ROOT / "training" / module).read_text()
        assert not literal.search(text), f"training/{module} names an algorithm"
    assert algorithms.get("dints").architecture_search and algorithms.get("swinunetr").pretrained_loader
