"""Config hardening (issue 12, item 8): typed stage sections, every value type-checked with one
line, YAML size/alias limits, non-UTF-8 files, train keys against the bundle, and a failing
run that leaves no pipeline.yaml behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.config import AnalyzeOptions, bundle_hyper_parameters, check_train_overrides, load_config
from common.errors import ConfigError
from common.workdir import digest
from training.autoconfig import COMMON_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

BOMB = """train:
  a: &a ["x","x","x","x","x","x","x","x","x"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""  # today: convert hangs (killed by `timeout 30`, rc 124)


def _load_error(tmp_path: Path, text: str | bytes) -> str:
    f = tmp_path / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "w", f, dump=False)
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg
    return msg


@pytest.mark.parametrize(
    "text,needles",
    [
        ("train: {num_epochs: two}\n", ["'train.num_epochs' must be int", "'two'"]),
        ("train: {learning_rate: fast}\n", ["'train.learning_rate' must be float"]),
        ("analyze: {hist_bin: 3}\n", ["unknown key 'analyze.hist_bin'", "hist_bins", "workers"]),
        ("analyze: {workers: many}\n", ["'analyze.workers' must be int"]),
        ("analyze: {hist_range: [5, 1]}\n", ["lo < hi"]),
        ("ensemble: {n_bets: 2}\n", ["unknown key 'ensemble.n_bets'", "n_best"]),
        ("ensemble: {mode: median}\n", ["'ensemble.mode' must be one of mean, vote"]),
        ("bundlegen: {nmae: x}\n", ["unknown key 'bundlegen.nmae'", "swinunetr_pretrained"]),
        ("convert: {compress_level: 12}\n", ["'convert.compress_level' must be in 0..9"]),
        ("convert: {report_png: 1}\n", ["'convert.report_png' must be bool"]),
    ],
)
def test_every_section_value_is_checked_in_one_line(tmp_path: Path, text: str, needles: list[str]) -> None:
    msg = _load_error(tmp_path, text)
    for n in needles:
        assert n in msg, msg


def test_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    msg = _load_error(tmp_path, BOMB)
    assert time.monotonic() - t0 < 5
    assert "aliases expand" in msg


def test_big_and_non_utf8_files_are_one_line(tmp_path: Path) -> None:
    assert "not UTF-8" in _load_error(tmp_path, "train: {num_epochs: 2}\n# caf\xe9\n".encode("latin-1"))
    assert "too large" in _load_error(tmp_path, "# " + "x" * (1 << 20) + "\n")


def test_cli_alias_bomb_and_bad_type_exit_2_one_line(tmp_path: Path) -> None:
    """Through a stage command: today the bomb hangs and num_epochs: two is a traceback."""
    for text, needle in ((BOMB, "aliases expand"), ("train: {num_epochs: two}\n", "train.num_epochs")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        wd = tmp_path / f"w{len(text)}"
        res = subprocess.run(
            [sys.executable, "-m", "stages.convert", "--work-dir", str(wd), "--config", str(cfg)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], res.stderr
        assert not (wd / "pipeline.yaml").exists()


def test_failing_convert_leaves_no_pipeline_yaml(tmp_path: Path) -> None:
    wd = tmp_path / "new"
    res = subprocess.run(
        [sys.executable, "-m", "stages.convert", "--work-dir", str(wd), "--data-root", str(tmp_path / "no-such-data")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert not (wd / "pipeline.yaml").exists()
    # a work dir that already had one keeps it untouched
    wd.mkdir(exist_ok=True)
    (wd / "pipeline.yaml").write_text("resolution_nm: 8\n")
    subprocess.run(
        [sys.executable, "-m", "stages.convert", "--work-dir", str(wd), "--data-root", str(tmp_path / "no-such-data")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        timeout=120,
    )
    assert (wd / "pipeline.yaml").read_text() == "resolution_nm: 8\n"


def test_sections_keep_given_keys_and_digests(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "train: {num_epochs: 2, my_new_trainer_key: [1, 2]}\nanalyze: {hist_bins: 64}\nconvert: {compress_level: 3}\n"
    )
    cfg = load_config(tmp_path / "w", f)
    assert cfg.analyze.hist_bins == 64 and cfg.analyze.top_unknown == AnalyzeOptions().top_unknown == 10
    assert cfg.convert.compress_level == 3 and cfg.convert.given() == {"compress_level": 3}
    assert cfg.train.given() == {"num_epochs": 2, "my_new_trainer_key": [1, 2]}  # only what the user set
    assert cfg.train.num_epochs == 2 and cfg.train.batch_size is None  # None: the bundle's own value
    assert digest([cfg.analyze.given()]) == digest([{"hist_bins": 64}])  # done markers of old work dirs still match
    dumped = yaml.safe_load((tmp_path / "w" / "pipeline.yaml").read_text())
    assert dumped["train"] == {"num_epochs": 2, "my_new_trainer_key": [1, 2]}
    again = load_config(tmp_path / "w", dump=False)
    assert again.train.given() == cfg.train.given() and json.dumps(again.analyze.given()) == '{"hist_bins": 64}'


def test_train_keys_checked_against_the_bundle(tmp_path: Path) -> None:
    """``train: {num_epoch: 3}`` trained the default for days; now it names the bundle's keys."""
    bundle = tmp_path / "segresnet_0"
    (bundle / "configs").mkdir(parents=True)
    tpl = yaml.safe_load((ROOT / "training/templates/segresnet/configs/hyper_parameters.yaml").read_text())
    hp = {**tpl, **COMMON_DEFAULTS, "num_epochs": 100, "roi_size": [96, 96, 64], "batch_size": 2}
    (bundle / "configs" / "hyper_parameters.yaml").write_text(yaml.safe_dump(hp))
    keys = bundle_hyper_parameters(bundle)
    check_train_overrides({"num_epochs": 3, "roi_size": [32, 32, 16], "mlflow_tracking_uri": "x"}, keys, "p.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'train.num_epoch' .*num_epochs"):
        check_train_overrides({"num_epoch": 3}, keys, "p.yaml")
    with pytest.raises(ConfigError, match=r"'train.roi_size' must be a list"):
        check_train_overrides({"roi_size": 32}, keys, "p.yaml")
    with pytest.raises(ConfigError, match=r"'train.amp' must be a bool"):
        check_train_overrides({"amp": "yes"}, keys, "p.yaml")
