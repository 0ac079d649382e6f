"""Site profiles: where and how each stage runs on one SLURM cluster.

A profile is a YAML file (``slurm/profiles/<name>.yaml``, or any path) naming, per stage,
the partition, account, qos, cpus, memory, time limit and GPUs, plus the command that runs a
stage: ``apptainer run ... <image_dir>/<stage>.sif <args>`` or, for sites and tests without
containers, ``native`` (``<python> -m stages.<stage> <args>``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common import pipeline
from common.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
STAGES: tuple[str, ...] = pipeline.chain_names()  # the chain, from the one pipeline definition
JOB_KINDS: tuple[str, ...] = (*STAGES, "wait")
RUNNERS: tuple[str, ...] = ("apptainer", "native")


@dataclass(frozen=True)
class Resources:
    """What one job asks SLURM for (``None`` = leave the flag out)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus: int = 1
    mem: str | None = None
    time: str = "01:00:00"
    gpus: int = 0
    shards: int = 1  # convert only: an array of this many shard tasks, then a merge job
    stage_gpus: int | None = None  # train: the stage's --gpus (default: gpus); 0 on fake-GPU test nodes


@dataclass(frozen=True)
class Profile:
    """One cluster's settings (see ``slurm/profiles/*.yaml`` for the documented keys)."""

    name: str
    cluster: str
    runner: str
    apptainer: str
    image_dir: str
    binds: tuple[str, ...]
    python: str
    setup: tuple[str, ...]
    env: dict[str, str]
    submit_via: str | None
    requeue_margin_s: int
    wait_poll_s: int
    wait_timeout_s: int
    resources: dict[str, Resources] = field(default_factory=dict)

    def res(self, kind: str) -> Resources:
        """Resources of one job kind (a stage or ``wait``)."""
        return self.resources[kind]


_TOP_KEYS = {
    "cluster",
    "runner",
    "apptainer",
    "image_dir",
    "binds",
    "python",
    "setup",
    "env",
    "submit_via",
    "requeue_margin_s",
    "wait",
    "defaults",
    "stages",
}
_RES_KEYS = {f.name for f in fields(Resources)}


def _resources(src: str, where: str, data: Any, base: dict[str, Any]) -> dict[str, Any]:
    if data is None:
        return dict(base)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: '{where}' must be a mapping, got {data!r}")
    unknown = set(data) - _RES_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown key '{where}.{sorted(unknown)[0]}' (known: {', '.join(sorted(_RES_KEYS))})")
    out = dict(base)
    out.update(data)
    for key in ("cpus", "gpus", "shards"):
        if (
            not isinstance(out.get(key), int)
            or isinstance(out.get(key), bool)
            or out[key] < (1 if key != "gpus" else 0)
        ):
            raise ConfigError(
                f"{src}: '{where}.{key}' must be a {'non-negative' if key == 'gpus' else 'positive'} integer, got {out.get(key)!r}"
            )
    sg = out.get("stage_gpus")
    if sg is not None and (not isinstance(sg, int) or isinstance(sg, bool) or sg < 0):
        raise ConfigError(f"{src}: '{where}.stage_gpus' must be a non-negative integer or null, got {sg!r}")
    for key in ("partition", "account", "qos", "mem", "time"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return out


def profile_path(name_or_path: str) -> Path:
    """``longleaf`` -> the shipped profile; anything with a ``/`` or ``.yaml`` is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path).expanduser().resolve()
    return PROFILES_DIR / f"{name_or_path}.yaml"


def shipped_profiles() -> list[str]:
    """Names of the profiles under ``slurm/profiles/``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    """Read and validate a profile.

    Raises:
        ConfigError: one line naming the file and the problem.
    """
    path = profile_path(name_or_path)
    src = str(path)
    if not path.is_file():
        raise ConfigError(f"{src}: no such profile (shipped: {', '.join(shipped_profiles())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
    runner = data.get("runner", "apptainer")
    if runner not in RUNNERS:
        raise ConfigError(f"{src}: 'runner' must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "apptainer" and not data.get("image_dir"):
        raise ConfigError(f"{src}: 'image_dir' is needed with runner apptainer")
    stages = data.get("stages") or {}
    if not isinstance(stages, dict) or set(stages) - set(JOB_KINDS):
        bad = sorted(set(stages) - set(JOB_KINDS)) if isinstance(stages, dict) else stages
        raise ConfigError(f"{src}: 'stages' has unknown entries {bad} (known: {', '.join(JOB_KINDS)})")
    base = _resources(src, "defaults", data.get("defaults") or {}, {f.name: f.default for f in fields(Resources)})
    resources = {k: Resources(**_resources(src, f"stages.{k}", stages.get(k), base)) for k in JOB_KINDS}
    wait = data.get("wait") or {}
    if not isinstance(wait, dict) or set(wait) - {"poll_s", "timeout_h"}:
        raise ConfigError(f"{src}: 'wait' takes poll_s and timeout_h, got {wait!r}")
    env = data.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{src}: 'env' must be a mapping of NAME: value")
    for key in ("binds", "setup"):
        if not isinstance(data.get(key) or [], list):
            raise ConfigError(f"{src}: '{key}' must be a list")
    try:
        margin = int(data.get("requeue_margin_s", 600))
        poll = int(wait.get("poll_s", 60))
        timeout = int(float(wait.get("timeout_h", 168)) * 3600)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: 'requeue_margin_s', 'wait.poll_s' and 'wait.timeout_h' must be numbers") from None
    return Profile(
        name=path.stem,
        cluster=str(data.get("cluster") or path.stem),
        runner=runner,
        apptainer=str(data.get("apptainer") or "apptainer"),
        image_dir=str(data.get("image_dir") or ""),
        binds=tuple(str(b) for b in data.get("binds") or []),
        python=str(data.get("python") or sys.executable),
        setup=tuple(str(s) for s in data.get("setup") or []),
        env={str(k): str(v) for k, v in env.items()},
        submit_via=data.get("submit_via") or None,
        requeue_margin_s=margin,
        wait_poll_s=poll,
        wait_timeout_s=timeout,
        resources=resources,
    )
