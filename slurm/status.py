"""One table of the whole pipeline: every stage and every algo/fold, from the work dir.

Run as ``python -m slurm.status --work-dir W [--json] [--no-slurm]``.

Sources, all read-only:

* ``<wd>/markers/*.json`` (:class:`common.workdir.Marker`): status, start, end, duration,
  host, pid, SLURM ids, ``details.best_metric``, ``reason``;
* ``<wd>/pipeline.yaml``: which stages and bundles are expected (missing ones are
  "not started");
* ``<wd>/slurm/jobs.json``: a JSON list of ``{"name": "<marker name>", "job_id": "123",
  "stage": "train", "cluster": "...", "submitted": "<iso8601>"}`` (written by the SLURM
  submitter; the newest entry per name wins);
* the SLURM job state (``slurm.jobs.job_state``: ``scontrol``/``squeue`` while SLURM holds
  the job, then ``sacct`` for State, ExitCode, MaxRSS, Elapsed), only when those commands exist;
* a train fold's ``<bundle>/model/metrics.jsonl``: epoch k/N and the ETA.

A marker that says ``running`` but has no live job (no live SLURM job, and its process is
gone when it ran on this host) is reported as possibly killed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from common import pipeline
from common.config import PipelineConfig, load_config
from common.errors import PipelineError
from common.lock import pid_alive
from common.workdir import MARKER_DONE, MARKER_FAILED, MARKER_RUNNING, WorkDir, slurm_job_id, utc_now
from slurm.jobs import LIVE, job_state
from slurm.jobs import read_jobs as read_job_list

NOT_STARTED = "not started"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
UNREADABLE = "unreadable"

# SLURM states in which the job still exists and may write its marker (one definition: slurm.jobs)
LIVE_JOB_STATES = LIVE
# end states in which SLURM (not the stage) ended the job
KILLED_BY_SLURM = frozenset(
    {"OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "CANCELLED", "PREEMPTED", "DEADLINE", "BOOT_FAIL"}
)


@dataclass
class StatusRow:
    """One line of the status table.

    Attributes:
        name: marker name (``convert``, ``train.dints_0``, ``ensemble``).
        stage: the stage it belongs to (the part before the first dot).
        state: ``not started`` / ``running`` / ``done`` / ``failed`` / ``unreadable``.
        start, end: ISO timestamps from the marker.
        duration_s: from the marker; for a running marker, the time since start.
        best_metric: ``details.best_metric`` when present.
        reason: failure reason.
        note: anything else worth knowing (e.g. "may have been killed").
        host, pid: where the marker was written.
        job_id, job_state, cluster: SLURM job from ``slurm/jobs.json`` (or the marker) and
            its live state (``None`` when it cannot be queried).
        job: what SLURM says of the job (``exit_code``, ``max_rss``, ``elapsed``, ``source``:
            scontrol, squeue or sacct).
        possibly_killed: running marker with no live job.
        epochs_done, num_epochs, eta_s: a train fold's progress (from its ``metrics.jsonl``).
    """

    name: str
    stage: str
    state: str = NOT_STARTED
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    best_metric: float | None = None
    reason: str | None = None
    note: str | None = None
    host: str | None = None
    pid: int | None = None
    job_id: str | None = None
    job_state: str | None = None
    cluster: str | None = None
    possibly_killed: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    job: dict[str, str] = field(default_factory=dict)
    epochs_done: int | None = None
    num_epochs: int | None = None
    eta_s: float | None = None


# ---- SLURM ---------------------------------------------------------------------------
def read_jobs(wd: WorkDir) -> dict[str, dict[str, Any]]:
    """``slurm/jobs.json`` (:func:`slurm.jobs.read_jobs`) as ``{marker name: newest job entry}``."""
    out: dict[str, dict[str, Any]] = {}
    for entry in read_job_list(wd):
        if not isinstance(entry, dict) or not entry.get("name") or entry.get("job_id") is None:
            continue
        name = str(entry["name"])
        prev = out.get(name)
        # the file is append-ordered; an explicit later 'submitted' also wins
        if prev is None or str(entry.get("submitted") or "") >= str(prev.get("submitted") or ""):
            out[name] = entry
    return out


def _slurm_query() -> Callable[..., dict[str, str] | None]:
    """The SLURM job query: :func:`slurm.jobs.job_state` (``None`` per job where no SLURM tool answers).

    It folds an array job's tasks into one state by :func:`slurm.jobs.pick_state`, the one
    array-job rule; a marker written by an array task names ``<array job>_<task>``.
    """
    return job_state


# ---- rows ----------------------------------------------------------------------------
def expected_names(cfg: PipelineConfig | None) -> list[str]:
    """Marker names a complete run of this configuration writes, in pipeline order."""
    if cfg is None:  # one placeholder row per stage of the chain
        return list(pipeline.chain_names())
    return pipeline.expected_markers(cfg.algos, cfg.num_folds)


def _parse_time(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


def _row_from_marker(name: str, data: dict[str, Any] | None, now: _dt.datetime) -> StatusRow:
    row = StatusRow(name=name, stage=name.split(".")[0])
    if data is None:
        row.state = UNREADABLE
        row.note = "marker file exists but is not valid JSON"
        return row
    status = data.get("status")
    row.start, row.end = data.get("start"), data.get("end")
    row.host, row.pid = data.get("host"), data.get("pid")
    row.details = dict(data.get("details") or {})
    bm = row.details.get("best_metric")
    row.best_metric = float(bm) if isinstance(bm, (int, float)) and not isinstance(bm, bool) else None
    row.duration_s = data.get("duration_s")
    slurm = data.get("slurm") or {}
    if isinstance(slurm, dict):
        row.job_id = slurm_job_id(slurm)
    if status == MARKER_DONE:
        row.state = DONE
    elif status == MARKER_FAILED:
        row.state = FAILED
        row.reason = data.get("reason") or "failed (no reason recorded)"
    elif status == MARKER_RUNNING:
        row.state = RUNNING
        t0 = _parse_time(row.start)
        if t0 is not None and row.end is None:
            row.duration_s = round((now - t0).total_seconds(), 1)
    else:
        row.state = UNREADABLE
        row.note = f"unknown marker status {status!r}"
    return row


def collect_status(
    work_dir: str | os.PathLike[str],
    cfg: PipelineConfig | None = None,
    query_slurm: bool = True,
) -> list[StatusRow]:
    """Status rows for every expected stage/bundle and every marker present.

    Args:
        work_dir: the pipeline work dir (only read).
        cfg: the configuration; read from ``<wd>/pipeline.yaml`` when ``None`` (an invalid
            or missing file falls back to listing the markers found plus the five stages).
        query_slurm: ask ``squeue``/``scontrol`` for live job states (when installed).

    Returns:
        Rows in pipeline order: expected names first (stage order), then any other
        marker (e.g. shards) placed after the rows of its stage.
    """
    wd = WorkDir.at(work_dir)
    if cfg is None and wd.config_file.is_file():
        try:
            cfg = load_config(wd.root, dump=False)
        except PipelineError:
            cfg = None
    now = _dt.datetime.now(_dt.UTC)
    markers = {m.name: m for m in wd.markers()}
    names = expected_names(cfg)
    if cfg is None and any(n.startswith("train.") for n in markers):
        names.remove("train")  # the placeholder row is replaced by the real bundle markers
    stage_order = {s: i for i, s in enumerate(pipeline.chain_names())}
    extra = sorted(set(markers) - set(names))
    for n in extra:  # insert after the last row of the same stage (unknown stages at the end)
        stage = n.split(".")[0]
        pos = max((i for i, x in enumerate(names) if x.split(".")[0] == stage), default=None)
        if pos is None:
            later = [
                i for i, x in enumerate(names) if stage_order.get(x.split(".")[0], 99) > stage_order.get(stage, 99)
            ]
            pos = (later[0] - 1) if later else len(names) - 1
        names.insert(pos + 1, n)

    jobs = read_jobs(wd)
    query = _slurm_query() if query_slurm else None
    state_cache: dict[str, dict[str, str] | None] = {}
    this_host = socket.gethostname()
    rows = []
    for name in names:
        marker = markers.get(name)
        if marker is None:
            row = StatusRow(name=name, stage=name.split(".")[0])
        else:
            row = _row_from_marker(name, marker.read(), now)
        job = jobs.get(name)
        if job is not None:
            # the submitted job is the newest attempt unless the marker names another one
            row.job_id = str(job["job_id"])
            row.cluster = job.get("cluster")
        if row.job_id and query is not None:
            if row.job_id not in state_cache:
                state_cache[row.job_id] = query(row.job_id, wd.slurm_logs_dir, name)
            info = state_cache[row.job_id]
            row.job = dict(info or {})
            row.job_state = info["state"] if info else None
        if row.stage == "train" and row.state in (RUNNING, FAILED, DONE) and "." in name:
            _add_progress(row, wd, cfg)
        if row.state == RUNNING and row.end is None and row.job_state in KILLED_BY_SLURM:
            row.possibly_killed = True
            row.note = f"killed by SLURM: {_job_words(row)}; rerun the stage (it resumes)"
        elif row.state == RUNNING and row.end is None:
            job_live = row.job_state in LIVE_JOB_STATES if row.job_state else None
            pid_live = pid_alive(int(row.pid)) if row.host == this_host and isinstance(row.pid, int) else None
            if job_live is False or (job_live is None and pid_live is False):
                row.possibly_killed = True
                why = (
                    f"job {row.job_id} is {row.job_state}"
                    if job_live is False
                    else f"process {row.pid} on {row.host} is gone"
                )
                row.note = f"no end recorded and {why}: it may have been killed; rerun the stage"
            elif job_live is None and pid_live is None:
                row.note = "no end recorded and no live job known: may have been killed"
        elif row.state == NOT_STARTED and row.job_state:
            row.note = f"job {row.job_state.lower()}"
        rows.append(row)
    return rows


def _add_progress(row: StatusRow, wd: WorkDir, cfg: PipelineConfig | None) -> None:
    from common.progress import fold_progress

    bundle = wd.root / row.name.split(".", 1)[1]
    prog = fold_progress(bundle, cfg.train.given() if cfg is not None else None)
    if prog is None:
        return
    row.epochs_done, row.num_epochs = prog["epochs_done"], prog["num_epochs"]
    row.eta_s = prog["eta_s"] if row.state == RUNNING else None


def _job_words(row: StatusRow) -> str:
    j = row.job
    words = [f"job {row.job_id} {row.job_state}"]
    for key, label in (("exit_code", "exit"), ("max_rss", "MaxRSS"), ("elapsed", "after")):
        if j.get(key):
            words.append(f"{label} {j[key]}")
    if row.job_state == "OUT_OF_MEMORY" and j.get("reason") and "slurmstepd" in j["reason"]:
        words.append(f"log: {j['reason'].split('error:', 1)[-1].strip()}")
    return ", ".join(words)


# ---- rendering -----------------------------------------------------------------------
def _fmt_duration(s: float | None) -> str:
    from common.progress import fmt_duration

    return fmt_duration(s)


def _fmt_when(row: StatusRow) -> str:
    t = _parse_time(row.end or row.start)
    return "-" if t is None else t.astimezone(_dt.UTC).strftime("%Y-%m-%d %H:%M")


def format_table(rows: list[StatusRow]) -> str:
    """The status rows as a fixed-width text table."""
    header = ["name", "state", "when (UTC)", "took", "epoch", "ETA", "best", "job", "reason / note"]
    lines = []
    for r in rows:
        state = r.state + ("?" if r.possibly_killed else "")
        job = "-"
        if r.job_id:
            job = r.job_id + (f" {r.job_state}" if r.job_state else "")
        best = "-" if r.best_metric is None else f"{r.best_metric:.4f}"
        epoch = f"{r.epochs_done}/{r.num_epochs}" if r.epochs_done is not None else "-"
        eta = _fmt_duration(r.eta_s) if r.eta_s is not None else "-"
        note = r.reason or r.note or ""
        if r.state == FAILED and r.job_state in KILLED_BY_SLURM:
            note = f"{note} ({_job_words(r)})" if note else _job_words(r)
        lines.append([r.name, state, _fmt_when(r), _fmt_duration(r.duration_s), epoch, eta, best, job, note])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = []
    for i, cells in enumerate([header, *lines]):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_status(work_dir: str | os.PathLike[str], query_slurm: bool = True) -> str:
    """The status table of a work dir, ready to print (what ``make demo`` shows)."""
    wd = WorkDir.at(work_dir)
    rows = collect_status(wd.root, query_slurm=query_slurm)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"pipeline status of {wd.root}: {summary}\n" + format_table(rows)


def status_json(work_dir: str | os.PathLike[str], query_slurm: bool = True) -> dict[str, Any]:
    """Machine-readable status: ``{"work_dir", "generated", "rows": [...]}``."""
    wd = WorkDir.at(work_dir)
    rows = collect_status(wd.root, query_slurm=query_slurm)
    return {
        "work_dir": str(wd.root),
        "generated": utc_now(),
        "rows": [asdict(r) for r in rows],
    }


@click.command()
@click.option("--work-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pipeline work dir.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--no-slurm", is_flag=True, help="Do not query squeue/scontrol.")
def main(work_dir: Path, as_json: bool, no_slurm: bool) -> None:
    """Show the state of every stage and every algo/fold of a work dir."""
    if not work_dir.is_dir():
        click.echo(f"error: status: {work_dir}: work dir not found", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(status_json(work_dir, query_slurm=not no_slurm), indent=2, default=str))
    else:
        click.echo(render_status(work_dir, query_slurm=not no_slurm))


if __name__ == "__main__":
    main()
