"""``<work_dir>/slurm/jobs.json``: the submitted jobs, and their live SLURM state.

Contract (read by the status report): a JSON list of
``{"name": "<marker name, e.g. train.dints_0>", "job_id": "123", "stage": "train",
"cluster": "<profile cluster>", "submitted": "<iso8601>"}``; a resubmission replaces the
entry of the same name. Extra keys: ``profile``, ``script``, ``depends_on`` (names).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common.io import atomic_write_json, read_json
from common.workdir import WorkDir

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def jobs_file(wd: WorkDir) -> Path:
    """Where the submitted job ids are recorded."""
    return wd.jobs_file


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
    return {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=(\S*)", line)}


# SLURM states in which the job still exists and may write its marker.
LIVE = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
    }
)
# the one rule for an array job (or a job with several records): while any task is live the
# job is that live state; when all ended, the worst end wins
_WORST = (
    "OUT_OF_MEMORY",
    "TIMEOUT",
    "NODE_FAIL",
    "FAILED",
    "BOOT_FAIL",
    "DEADLINE",
    "CANCELLED",
    "PREEMPTED",
    "COMPLETED",
)
_MOST_ALIVE = (
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "PENDING",
)
_TIMEOUT_S = 10.0


def pick_state(states: list[str]) -> str:
    """One state for several task records, by the rule above (unknown states last)."""
    clean = [s.split()[0].rstrip("+") for s in states if s.strip()]
    if not clean:
        return "UNKNOWN"
    live = [s for s in clean if s in LIVE]
    order = _MOST_ALIVE if live else _WORST
    pool = live or clean
    return min(pool, key=lambda s: order.index(s) if s in order else len(order))


def _run(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 and out.stdout.strip() else None


def _rss_text(kib: float) -> str:
    return f"{kib / 1024**2:.2f}G" if kib >= 1024**2 else f"{kib / 1024:.0f}M"


def _parse_rss(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", text.strip())
    if not m:
        return None
    return float(m.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}[m.group(2)]


def sacct_state(job_id: str) -> dict[str, str] | None:
    """A finished job from the accounting database (``sacct``): State, ExitCode, MaxRSS, Elapsed.

    ``None`` when ``sacct`` is missing, accounting is off or the job is unknown there.
    """
    out = _run(["sacct", "-n", "-P", "-j", str(job_id), "-o", "JobID,State,ExitCode,MaxRSS,Elapsed"])
    if out is None:
        return None
    jobs, rss = [], []
    for line in out.splitlines():
        f = line.split("|")
        if len(f) < 5:
            continue
        if "." not in f[0]:  # the allocation (or array task) line; steps (.batch, .0) hold MaxRSS
            jobs.append(f)
        kib = _parse_rss(f[3]) if f[3] else None
        if kib is not None:
            rss.append(kib)
    if not jobs:
        return None
    state = pick_state([f[1] for f in jobs])
    main = next((f for f in jobs if f[1].split()[0] == state), jobs[0])
    return {
        "state": state,
        "exit_code": main[2],
        "reason": "",
        "restarts": "",
        "start_time": "",
        "end_time": "",
        "max_rss": _rss_text(max(rss)) if rss else "",
        "elapsed": main[4],
        "source": "sacct",
    }


# what slurmstepd writes into a job's output file when it kills the job for memory: cgroup
# ("oom-kill event") and jobacct_gather ("Exceeded job memory limit") enforcement
_MEMORY_KILL = re.compile(r"(exceeded (job|step) memory limit|oom[-_ ]kill|out of memory|Out Of Memory)", re.I)


def memory_kill_line(log_files: list[Path]) -> str | None:
    """The slurmstepd line saying a job was killed for memory, from the tail of its logs."""
    for f in log_files:
        try:
            with open(f, "rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - 65536))
                tail = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        for line in reversed(tail.splitlines()):
            if "slurmstepd" in line and _MEMORY_KILL.search(line):
                return line.strip()[:200]
    return None


def job_state(job_id: str, logs_dir: Path | None = None, name: str | None = None) -> dict[str, str] | None:
    """State of one job: ``squeue``/``scontrol`` while SLURM holds it, then ``sacct``.

    Returns ``{"state", "exit_code", "reason", "restarts", "start_time", "end_time",
    "max_rss", "elapsed", "source"}`` (empty strings where the source does not say), or
    ``None`` when no SLURM tool knows the job or none is installed. An array job's tasks are
    folded into one state by :func:`pick_state`. With ``logs_dir`` and ``name`` (the job's
    ``<logs_dir>/<name>-<id>*.out``), a job that ended badly and whose log holds slurmstepd's
    memory-kill line is reported as ``OUT_OF_MEMORY`` (sites that enforce memory without
    cgroups report ``FAILED``), with that line as ``reason``.
    """
    info = _job_state(job_id)
    if info is None or logs_dir is None or not name or info["state"] in LIVE or info["state"] == "COMPLETED":
        return info
    jid = str(job_id).split(";")[0].strip().split("_")[0]
    line = memory_kill_line(sorted(Path(logs_dir).glob(f"{name}-{jid}*.out")))
    if line is not None:
        info = {**info, "state": "OUT_OF_MEMORY", "reason": line}
    return info


def _job_state(job_id: str) -> dict[str, str] | None:
    jid = str(job_id).split(";")[0].strip()  # --parsable may print "id;cluster"
    if not jid:
        return None
    out = _run(["scontrol", "show", "job", "-o", jid])
    if out is not None:
        rows = [_fields(line) for line in out.splitlines() if line.strip()]
        state = pick_state([r.get("JobState", "UNKNOWN") for r in rows])
        r = next((r for r in rows if r.get("JobState") == state), rows[0])
        info = {
            "state": state,
            "exit_code": r.get("ExitCode", ""),
            "reason": r.get("Reason", ""),
            "restarts": r.get("Restarts", "0"),
            "start_time": r.get("StartTime", ""),
            "end_time": r.get("EndTime", ""),
            "max_rss": "",
            "elapsed": r.get("RunTime", ""),
            "source": "scontrol",
        }
        if state not in LIVE:  # ended: accounting knows the peak memory (and the true state)
            acct = sacct_state(jid)
            if acct is not None:
                info.update({k: v for k, v in acct.items() if v and k not in ("reason", "restarts")})
        return info
    out = _run(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%T"])
    if out is not None:
        state = pick_state(out.split())
        return {
            "state": state,
            "exit_code": "",
            "reason": "",
            "restarts": "",
            "start_time": "",
            "end_time": "",
            "max_rss": "",
            "elapsed": "",
            "source": "squeue",
        }
    return sacct_state(jid)
