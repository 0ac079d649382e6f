"""The typed config sections (issue 14, item 4): every key declared once with its type, default and
meaning; one-line errors with a did-you-mean; dump -> load round trips; the configuration reference
and the example generated from the declarations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import (
    PipelineConfig,
    Section,
    TrainOptions,
    _conforms,
    _hints,
    _sections,
    bundle_hyper_parameters,
    check_train_overrides,
    example_yaml,
    load_config,
    reference_markdown,
    settings_of,
)
from common.errors import ConfigError
from training.autoconfig import fill_hyper_parameters

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _error(tmp_path: Path, text: str) -> str:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "w", f, dump=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{f}: "), msg
    assert not (tmp_path / "w" / "pipeline.yaml").exists()
    return msg


def _keys() -> list[tuple[str, str, Any]]:
    """(section, key, annotation) of every declared key; section "" is the top level."""
    return [
        (name, f.name, _hints(cls)[f.name])
        for name, cls in _sections()
        for f in settings_of(cls)
        if not (isinstance(_hints(cls)[f.name], type) and issubclass(_hints(cls)[f.name], Section))
    ]


def _yaml(section: str, key: str, value: Any) -> str:
    return yaml.safe_dump({section: {key: value}} if section else {key: value})


@pytest.mark.parametrize(
    "text,needle",
    [
        ("resolutoin_nm: 8\n", "unknown key 'resolutoin_nm' (did you mean 'resolution_nm'? known: algos, analyze,"),
        ("split: {sead: 1}\n", "unknown key 'split.sead' (did you mean 'split.seed'? known: datasplit_csv"),
        ("convert: {compress_lvl: 3}\n", "unknown key 'convert.compress_lvl' (did you mean 'convert.compress_level'?"),
        ("analyze: {hist_bin: 3}\n", "unknown key 'analyze.hist_bin' (did you mean 'analyze.hist_bins'?"),
        ("bundlegen: {nmae: x}\n", "unknown key 'bundlegen.nmae' (did you mean 'bundlegen.name'?"),
        ("ensemble: {n_bets: 2}\n", "unknown key 'ensemble.n_bets' (did you mean 'ensemble.n_best'?"),
        ("ensemble: {zzz: 2}\n", "unknown key 'ensemble.zzz' (known: export_block, export_halo, infer_params"),
    ],
)
def test_unknown_key_names_file_key_and_closest(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


def test_unknown_train_key_is_the_bundles_rule_with_did_you_mean(tmp_path: Path) -> None:
    """train: any key loads (a new trainer key needs no change here); the bundle decides, at train time."""
    f = tmp_path / "c.yaml"
    f.write_text("train: {num_epoch: 3}\n")
    assert load_config(tmp_path / "w", f, dump=False).train.given() == {"num_epoch": 3}
    hp = {"num_epochs": 100, "batch_size": 2, "roi_size": [96, 96, 64]}
    with pytest.raises(
        ConfigError,
        match=r"^p\.yaml: unknown key 'train\.num_epoch' for this bundle "
        r"\(did you mean 'train\.num_epochs'\? known: batch_size, num_epochs",
    ):
        check_train_overrides({"num_epoch": 3}, hp, "p.yaml")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("num_folds: two\n", "'num_folds' must be int, got 'two'"),
        ("data_root: 5\n", "'data_root' must be str, got 5"),
        ("split: {seed: x}\n", "'split.seed' must be int, got 'x'"),
        ("split: {datasplit_csv: [a]}\n", "'split.datasplit_csv' must be str, got ['a']"),
        ("convert: {report_png: 1}\n", "'convert.report_png' must be bool, got 1"),
        ("convert: {remote_timeout_s: true}\n", "'convert.remote_timeout_s' must be float, got True"),
        ("analyze: {hist_range: 5}\n", "'analyze.hist_range' must be list of float, got 5"),
        ("analyze: {clip_percentiles: [1, x]}\n", "'analyze.clip_percentiles' must be list of float, got [1, 'x']"),
        ("bundlegen: {name: [a]}\n", "'bundlegen.name' must be str, got ['a']"),
        ("train: {roi_size: 32}\n", "'train.roi_size' must be list of int, got 32"),
        ("train: {amp: 'yes'}\n", "'train.amp' must be bool, got 'yes'"),
        ("ensemble: {infer_params: 3}\n", "'ensemble.infer_params' must be dict, got 3"),
        ("ensemble: {members: 3}\n", "'ensemble.members' must be list of str or str, got 3"),
        ("ensemble: {prob_dtype: float32}\n", "'ensemble.prob_dtype' must be one of float16, uint8, got 'float32'"),
        ("ensemble: {export_block: 4}\n", "'ensemble.export_block' must be in 8..65536, got 4"),
        ("split: {test_fraction: 1}\n", "'split.test_fraction' must be in [0, 1), got 1"),
        ("target_gpu_mem_gb: 0\n", "'target_gpu_mem_gb' must be positive, got 0"),
    ],
)
def test_wrong_value_names_key_expected_type_and_value(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


@pytest.mark.parametrize("section,key,tp", [pytest.param(*k, id=f"{k[0]}.{k[1]}".lstrip(".")) for k in _keys()])
def test_every_key_checks_its_type_and_takes_its_default(tmp_path: Path, section: str, key: str, tp: Any) -> None:
    """No key escapes the type check; writing a key's default out changes nothing but the given keys."""
    dotted = f"{section}.{key}" if section else key
    if "dict" not in str(tp):
        assert f"'{dotted}" in _error(tmp_path, _yaml(section, key, {"wrong": 1}))
    cls = dict(_sections())[section]
    default = getattr(cls(), key)
    f = tmp_path / "d.yaml"
    f.write_text(_yaml(section, key, default))
    cfg = load_config(tmp_path / "w", f, dump=False)
    assert cfg == PipelineConfig()
    if section and not cls.DUMP_DEFAULTS:
        assert getattr(cfg, section).given() == {key: default}


def test_defaults_round_trip(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg == PipelineConfig() and cfg.to_dict() == PipelineConfig().to_dict()
    dumped = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    assert dumped == cfg.to_dict() and dumped["convert"] == {} and dumped["split"]["validation_fraction"] == 0.15
    again = load_config(tmp_path, dump=False)
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_set_values_round_trip(tmp_path: Path) -> None:
    """Non-default values in every section (from the file, --config and flags) survive dump -> load."""
    (tmp_path / "pipeline.yaml").write_text(
        "resolution_nm: [2.62, 4, 4]\nclasses: [ecs, pm]\ncrops: [crop12, 7]\nsplit: {test_crops: [crop3]}\n"
        "analyze: {hist_range: [0, 128]}\ntrain: {num_epochs: 2, network: {init_filters: 8}}\n"
    )
    extra = tmp_path / "extra.yaml"
    extra.write_text("ensemble: {members: [segresnet_0], export_block: 32}\nbundlegen: {name: t}\n")
    wd = tmp_path / "w"
    wd.mkdir()
    cfg = load_config(tmp_path, extra, overrides={"convert": {"compress_level": 9}, "num_folds": 2}, dump=False)
    (wd / "pipeline.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(wd, dump=False)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.crops == ["12", "7"] and again.split.test_crops == ["3"] and again.resolution_zyx == (2.62, 4.0, 4.0)
    assert again.train.given() == {"num_epochs": 2, "network": {"init_filters": 8}}
    assert again.ensemble.export_block == 32 and again.ensemble.export_halo == 16 and again.convert.compress_level == 9


def test_example_is_complete_and_loads_to_the_defaults(tmp_path: Path) -> None:
    text = example_yaml()
    for section, key, _ in _keys():
        assert f"  # {key}: " in text if section and section != "split" else f"{key}: " in text, key
    (tmp_path / "pipeline.yaml").write_text(text)
    cfg = load_config(tmp_path, dump=False)
    assert cfg == PipelineConfig() and cfg.to_dict() == PipelineConfig().to_dict()


def test_train_section_agrees_with_filled_bundles(tmp_path: Path) -> None:
    """The early type check and the bundle rule agree: every typed ``train:`` key is a key of every
    builtin bundle as bundlegen fills it, and the bundle's own value has the declared type."""
    (tmp_path / "dl.json").write_text(
        json.dumps({"training": [{"image": "a.nii.gz", "label": "a_l.nii.gz", "fold": 0}]})
    )
    (tmp_path / "input.yaml").write_text(
        yaml.safe_dump(
            {"dataroot": str(tmp_path), "datalist": "dl.json", "class_names": ["ecs", "pm"], "unknown_label": 255}
        )
    )
    shape = {"median": [[96, 80, 41]], "mean": [[96, 80, 41]]}
    (tmp_path / "datastats.yaml").write_text(
        yaml.safe_dump(
            {
                "stats_summary": {
                    "n_cases": 1,
                    "image_stats": {"shape": shape},
                    "image_foreground_stats": {"intensity": {"percentile_00_5": 3.0, "percentile_99_5": 250.0}},
                }
            }
        )
    )
    typed = [f.name for f in settings_of(TrainOptions)]
    for tpl in sorted(p for p in (ROOT / "training" / "templates").iterdir() if p.is_dir()):
        bundle = tmp_path / tpl.name
        (bundle / "configs").mkdir(parents=True)
        defaults = yaml.safe_load((tpl / "configs" / "hyper_parameters.yaml").read_text())
        fill_hyper_parameters(tpl.name, defaults, tmp_path / "input.yaml", tmp_path / "datastats.yaml", bundle)
        hp = bundle_hyper_parameters(bundle)
        assert not [k for k in typed if k not in hp], tpl.name
        wrong = {k: hp[k] for k in typed if not _conforms(hp[k], _hints(TrainOptions)[k])}
        assert not wrong, (tpl.name, wrong)
        check_train_overrides({k: hp[k] for k in typed}, hp, "p.yaml")


def test_reference_is_up_to_date(tmp_path: Path) -> None:
    """docs/configuration.md is what the generator writes (through the documented command)."""
    out = tmp_path / "configuration.md"
    res = subprocess.run(
        [sys.executable, "-m", "common.config", "--reference", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert out.read_text() == reference_markdown()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == out.read_text(), (
        "docs/configuration.md is out of date; regenerate it with `python -m common.config --reference`"
    )
    for section, key, _ in _keys():
        assert f"| `{key}` |" in committed, (section, key)
