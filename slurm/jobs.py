"""``<work_dir>/slurm/jobs.json``: the submitted jobs, and their live SLURM state.

Contract (read by the status report): a JSON list of
``{"name": "<marker name, e.g. train.dints_0>", "job_id": "123", "stage": "train",
"cluster": "<profile cluster>", "submitted": "<iso8601>"}``; a resubmission replaces the
entry of the same name. Extra keys: ``profile``, ``script``, ``depends_on`` (names).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from common.io import atomic_write_json, read_json
from common.workdir import WorkDir

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def jobs_file(wd: WorkDir) -> Path:
    """Where the submitted job ids are recorded."""
    return wd.slurm_dir / "jobs.json"


def read_jobs(wd: WorkDir) -> list[dict[str, Any]]:
    """The recorded jobs (``[]`` when none were submitted yet)."""
    try:
        data = read_json(jobs_file(wd))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def record_job(wd: WorkDir, entry: dict[str, Any]) -> None:
    """Add ``entry`` to jobs.json, replacing an entry of the same name (atomic write)."""
    jobs = [j for j in read_jobs(wd) if j.get("name") != entry["name"]]
    jobs.append(entry)
    atomic_write_json(jobs_file(wd), jobs)


def _fields(line: str) -> dict[str, str]:
    # `scontrol show job -o` prints Key=Value pairs separated by spaces; values without spaces
    # are all we read (JobState, ExitCode, Reason, Restarts, ArrayTaskId)
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def job_state(job_id: str) -> dict[str, str] | None:
    """Live state of one job from ``scontrol show job -o`` (array: the worst task).

    Returns ``{"state", "exit_code", "reason", "restarts", "start_time", "end_time"}``, or ``None`` when SLURM no
    longer knows the job (older than ``MinJobAge``) or cannot be reached.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    rows = [_fields(line) for line in out.stdout.splitlines() if line.strip()]
    order = ["FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "RUNNING", "PENDING", "COMPLETED"]
    rows.sort(key=lambda r: order.index(r.get("JobState")) if r.get("JobState") in order else 0)
    r = rows[0]
    return {
        "state": r.get("JobState", "UNKNOWN"),
        "exit_code": r.get("ExitCode", ""),
        "reason": r.get("Reason", ""),
        "restarts": r.get("Restarts", "0"),
        "start_time": r.get("StartTime", ""),
        "end_time": r.get("EndTime", ""),
    }


def job_table(wd: WorkDir) -> list[dict[str, Any]]:
    """Every recorded job joined with its live SLURM state and its marker status."""
    rows = []
    for j in read_jobs(wd):
        live = job_state(j["job_id"]) or {"state": "UNKNOWN", "exit_code": "", "reason": "", "restarts": ""}
        marker = wd.marker(j["name"]).read() or {}
        rows.append({**j, **live, "marker": marker.get("status", "-"), "marker_reason": marker.get("reason", "")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`job_table` rows."""
    head = ("name", "job_id", "cluster", "state", "exit_code", "restarts", "reason", "marker")
    body = [[str(r.get(k, "")) for k in head] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    for r in rows:
        if r.get("marker_reason"):
            lines.append(f"{r['name']}: {r['marker_reason']}")
    return "\n".join(lines)
