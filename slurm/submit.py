"""Submit the whole chain to SLURM: convert -> analyze -> bundlegen -> train (one job per
algorithm and fold, in parallel) -> ensemble, linked with ``afterok`` and
``--kill-on-invalid-dep=yes``.

Two clusters (``--profile longleaf --cpu-profile sycamore``): the CPU stages go to the CPU
cluster, train and ensemble to the GPU cluster, both submitted up-front. The GPU side starts
with a small ``wait.bundlegen`` job that polls the shared work_dir for the ``bundlegen`` done
marker (and stops when a CPU-side marker failed or after a timeout; it requeues itself before
its time limit); the train jobs depend on it with ``afterok``. No person is needed in between.

Usage::

    python -m slurm.submit --work-dir W --profile longleaf [--cpu-profile sycamore]
        [--from STAGE] [--algos a,b] [--convert-shards N] [--side all|cpu|gpu] [--dry-run]
    python -m slurm.submit --work-dir W --status
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from common import pipeline
from common.cli import config_option, setup_logging, stage_command, work_dir_option
from common.config import PipelineConfig, load_config
from common.errors import ConfigError, StageFailed
from common.io import atomic_write_text, current_umask
from common.store import is_remote
from common.workdir import WorkDir, utc_now
from slurm.jobs import record_job
from slurm.profiles import STAGES, Profile, load_profile

log = logging.getLogger("cellmap.slurm")
TEMPLATES = Path(__file__).resolve().parent / "templates"
# the chain's CPU stages (the wait job's upstream on a two-cluster run), from the pipeline definition
CPU_STAGES = tuple(s.name for s in pipeline.chain() if s.device == "cpu")
JOB_PREFIX = "a3ds"


@dataclass
class Job:
    """One sbatch submission.

    Attributes:
        name: marker name of the job (``train.dints_0``); also its script and log name.
        stage: the stage it runs (``wait`` for the wait-for-marker job).
        profile: the cluster it goes to.
        after: names of the jobs it depends on (``afterok``).
        args: stage arguments after ``--work-dir``; ``$``-words are left for the shell.
        array: ``--array`` spec (convert shards).
        requeue: a train job: ``--requeue``, ``--signal=B:USR1@margin``.
    """

    name: str
    stage: str
    profile: Profile
    after: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    array: str | None = None
    requeue: bool = False

    def script_path(self, wd: WorkDir) -> Path:
        return wd.slurm_dir / f"{self.name}.sbatch"


def job_kind(job: Job) -> str:
    """The profile resources and image a job uses: its stage's image (``common.pipeline``;
    ``predict`` runs in the ensemble image, with its resources), ``wait`` for the wait job."""
    if job.stage == "wait":
        return "wait"
    return pipeline.get(job.stage).image or job.stage


def plan_predict(
    wd: WorkDir, gpu: Profile, input_path: Path, out: Path, shards: int = 1, roi: str | None = None
) -> list[Job]:
    """The ``stages.predict`` job(s) for ``input_path``: one job, or an array of ``shards`` over blocks.

    Shards write disjoint chunks and their own ledger entries; whichever finishes the last
    block writes the pyramid and metadata (docs/predict.md), so no merge job is needed.
    """
    args = ["--input", str(input_path), "--out", str(out), *(["--roi", roi] if roi else [])]
    if shards > 1:
        return [
            Job(
                "predict",
                "predict",
                gpu,
                [],
                [*args, "--shard", f"${{SLURM_ARRAY_TASK_ID}}/{shards}"],
                array=f"0-{shards - 1}",
            )
        ]
    return [Job("predict", "predict", gpu, [], args)]


# ---- planning --------------------------------------------------------------------------
def plan_jobs(
    wd: WorkDir,
    cfg: PipelineConfig,
    gpu: Profile,
    cpu: Profile | None = None,
    from_stage: str | None = None,
    algos: list[str] | None = None,
    convert_shards: int | None = None,
) -> list[Job]:
    """The jobs still to run, in submission order.

    A stage is skipped when its done marker exists and no stage before it is submitted
    (the stages skip their own finished work too, so a rerun downstream is cheap). Stages
    before ``from_stage`` are never submitted.
    """
    cpu = cpu or gpu
    two_clusters = cpu.cluster != gpu.cluster
    start = STAGES.index(from_stage) if from_stage else 0
    algos = algos or list(cfg.algos)
    jobs: list[Job] = []
    last: list[str] = []  # names the next stage waits for
    submitted_upstream = False

    def needed(name: str) -> bool:
        return submitted_upstream or not wd.marker(name).is_done()

    previous: pipeline.Stage | None = None
    for stage in pipeline.chain():  # the pipeline definition: order, device, fan-out, markers
        prof = cpu if stage.device == "cpu" else gpu
        if (
            previous is not None
            and previous.device == "cpu"
            and stage.device != "cpu"
            and two_clusters
            and submitted_upstream
        ):
            # the GPU cluster cannot see CPU-side job ids: wait for the marker on shared storage
            jobs.append(Job(f"wait.{previous.name}", "wait", gpu))
            last = [f"wait.{previous.name}"]
        previous = stage
        if start > STAGES.index(stage.name):
            continue
        name = stage.name
        if stage.fanout == "algo_fold":  # one job per algorithm and fold, in parallel
            res = prof.res(name)
            stage_gpus = res.stage_gpus if res.stage_gpus is not None else (res.gpus or None)
            parts: list[str] = []
            for algo in algos:
                for fold in range(cfg.num_folds):
                    part = str(stage.marker).format(algo=algo, fold=fold)
                    if needed(part):
                        args = ["--algo", algo, "--fold", str(fold)]
                        args += ["--gpus", str(stage_gpus)] if stage_gpus is not None else []
                        jobs.append(Job(part, name, prof, list(last), args, requeue=True))
                        parts.append(part)
            if parts:
                last, submitted_upstream = parts, True
        elif needed(name):
            shards = (convert_shards or prof.res(name).shards) if stage.fanout == "shards" else 1
            if shards > 1:  # an array of shards plus a merge job
                jobs.append(
                    Job(
                        f"{name}.shards",
                        name,
                        prof,
                        list(last),
                        ["--shard", f"${{SLURM_ARRAY_TASK_ID}}/{shards}"],
                        array=f"0-{shards - 1}",
                    )
                )
                jobs.append(Job(name, name, prof, [f"{name}.shards"], ["--merge"]))
            else:
                jobs.append(Job(name, name, prof, list(last)))
            last, submitted_upstream = [name], True
    return jobs


# ---- rendering ---------------------------------------------------------------------------
_ARRAY_SHARD = re.compile(r"\$\{SLURM_ARRAY_TASK_ID\}/\d+")
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# a path that ends up in an #SBATCH line: sbatch reads those lines itself (no shell quoting),
# so whitespace, quotes and control characters (a newline would start a new script line)
# cannot be expressed safely
_SBATCH_UNSAFE = re.compile(r"[\s\"'\\\x00-\x1f\x7f]")


def _quote(arg: str) -> str:
    # `${SLURM_ARRAY_TASK_ID}/4` (generated by plan_jobs) must expand in the job; everything
    # else, paths included, is one literal shell word whatever characters it holds
    return f'"{arg}"' if _ARRAY_SHARD.fullmatch(arg) else shlex.quote(arg)


def check_sbatch_path(what: str, path: str | Path) -> str:
    """``path`` as text for an ``#SBATCH`` line, or a one-line :class:`ConfigError`."""
    text = str(path)
    if _SBATCH_UNSAFE.search(text):
        raise ConfigError(
            f"{what} {text!r}: SLURM cannot use a path with whitespace, quotes or control "
            "characters (e.g. a newline) safely; use a plain path"
        )
    return text.replace("%", "%%")  # %j, %A... are sbatch filename patterns


def bind_spec(what: str, src: str | Path, dst: str | Path | None = None, opts: str | None = None) -> str:
    """An apptainer ``-B src:dst[:opts]``; paths holding ``,`` or ``:`` cannot be bound."""
    parts = [str(src), str(dst if dst is not None else src)]
    for part in parts:
        if "," in part or ":" in part or "\n" in part:
            raise ConfigError(
                f"{what} {part!r}: apptainer cannot bind a path containing ',' ':' or a "
                "newline (-B splits on them); rename or symlink it"
            )
    return ":".join(parts + ([opts] if opts else []))


def _profile_bind(b: str) -> str:
    fields = b.split(":")
    if len(fields) > 3 or any("," in f or "\n" in f for f in fields):
        raise ConfigError(f"profile bind {b!r}: must be PATH or SRC:DST[:OPTS] without ',' or newlines")
    return b if len(fields) > 1 else f"{b}:{b}"


def render_template(text: str, subs: dict[str, str]) -> str:
    """Replace every ``@@KEY@@`` in one pass: a value is never scanned for placeholders again."""
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(subs))
    if missing:
        raise ValueError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: subs[m.group(1)], text)


def stage_command_argv(job: Job, wd: WorkDir, cfg: PipelineConfig, config_file: Path | None = None) -> list[str]:
    """The command that runs ``job``'s stage (apptainer or native)."""
    p = job.profile
    conf = ["--config", str(config_file)] if config_file and job.stage != "predict" else []  # predict reads the bundles
    args = ["--work-dir", str(wd.root), *conf, *job.args]
    if p.runner == "native":
        return [p.python, "-m", f"stages.{job.stage}", *args]
    argv = [p.apptainer, "run", "--cleanenv", "--no-home", "-B", bind_spec("work dir", wd.root)]
    if cfg.data_root and not is_remote(cfg.data_root):  # a URL is read over the network, nothing to bind
        argv += ["-B", bind_spec("data_root", cfg.data_root, opts="ro")]
    if config_file and job.stage != "predict" and not config_file.is_relative_to(wd.root):
        argv += ["-B", bind_spec("--config folder", config_file.parent, opts="ro")]
    if job.stage == "predict":  # the input (read-only) and the output folder, unless inside the work dir
        src, out = Path(job.args[job.args.index("--input") + 1]), Path(job.args[job.args.index("--out") + 1])
        if not src.is_relative_to(wd.root):
            argv += ["-B", bind_spec("--predict input", src.parent, opts="ro")]
        if not out.is_relative_to(wd.root):
            argv += ["-B", bind_spec("--predict-out folder", out.parent)]
    for b in p.binds:
        argv += ["-B", _profile_bind(b)]
    for k, v in sorted(p.env.items()):
        argv += ["--env", f"{k}={v}"]
    if p.res(job_kind(job)).gpus:
        argv.append("--nv")
    return [*argv, f"{p.image_dir.rstrip('/')}/{job_kind(job)}.sif", *args]


def sbatch_directives(job: Job, wd: WorkDir) -> list[str]:
    """The ``#SBATCH`` options of ``job`` (dependencies go on the sbatch command line)."""
    r = job.profile.res(job_kind(job))
    log_name = f"{job.name}-%A_%a.out" if job.array else f"{job.name}-%j.out"
    opts = [f"--job-name={JOB_PREFIX}-{job.name}"]
    opts += [f"--{k}={v}" for k, v in (("partition", r.partition), ("account", r.account), ("qos", r.qos)) if v]
    opts += ["--nodes=1", "--ntasks=1", f"--cpus-per-task={r.cpus}"]
    if r.mem:
        opts.append(f"--mem={r.mem}")
    opts.append(f"--time={r.time}")
    if r.gpus:
        opts.append(f"--gres=gpu:{r.gpus}")
    if job.array:
        opts.append(f"--array={job.array}")
    opts += [f"--output={check_sbatch_path('work dir', wd.logs_dir / 'slurm')}/{log_name}", "--open-mode=append"]
    if job.requeue or job.stage == "wait":
        opts += [f"--signal=B:USR1@{job.profile.requeue_margin_s}", "--requeue"]
    else:
        opts.append("--no-requeue")
    return opts


def render_script(
    job: Job, wd: WorkDir, cfg: PipelineConfig, submitted_epoch: int, config_file: Path | None = None
) -> str:
    """The sbatch script of ``job`` (``config_file``: passed on to the stage as ``--config``)."""
    if not _JOB_NAME.fullmatch(job.name):
        raise ConfigError(f"job name {job.name!r}: only letters, digits, '_', '.', '-' are allowed")
    sbatch = "\n".join(f"#SBATCH {o}" for o in sbatch_directives(job, wd))
    if job.stage == "wait":
        text = (TEMPLATES / "wait.sbatch").read_text(encoding="utf-8")
        subs = {
            "MARKERS_DIR": shlex.quote(str(wd.markers_dir)),
            "MARKER": job.name.split(".", 1)[1],  # wait.<stage>: that stage's done marker
            "UPSTREAM": " ".join(map(shlex.quote, CPU_STAGES)),
            "SUBMITTED": str(submitted_epoch),
            "TIMEOUT_S": str(job.profile.wait_timeout_s),
            "POLL_S": str(job.profile.wait_poll_s),
        }
    else:
        text = (TEMPLATES / "stage.sbatch").read_text(encoding="utf-8")
        setup = [f"cd {shlex.quote(str(wd.root))} || exit 2", *job.profile.setup]
        if job.profile.runner == "native":
            setup += [f"export {k}={shlex.quote(v)}" for k, v in sorted(job.profile.env.items())]
        subs = {
            "SETUP": "\n".join(setup),
            "REQUEUE": "1" if job.requeue else "0",
            "CMD": " ".join(_quote(a) for a in stage_command_argv(job, wd, cfg, config_file)),
        }
    subs.update(SBATCH=sbatch, NAME=job.name)
    return render_template(text, subs)


def sbatch_argv(job: Job, ids: dict[str, str], wd: WorkDir) -> list[str]:
    """``sbatch --parsable [--dependency=afterok:...] --kill-on-invalid-dep=yes SCRIPT``."""
    argv = ["sbatch", "--parsable"]
    deps = [ids[n] for n in job.after if n in ids]
    if deps:
        argv += [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
    return [*argv, str(job.script_path(wd))]


def _run_sbatch(job: Job, argv: list[str]) -> str:
    """Submit and return the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    if job.profile.submit_via:
        full = [*shlex.split(job.profile.submit_via), shlex.join(argv)]
    else:
        full = argv
    try:
        out = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageFailed(f"{job.name}: cannot run sbatch ({exc})") from None
    if out.returncode != 0:
        msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise StageFailed(f"{job.name}: sbatch failed (rc {out.returncode}): {msg[-1] if msg else ''}")
    return out.stdout.strip().splitlines()[-1].split(";")[0]


def submit_chain(
    work_dir: str | Path,
    profile: str,
    cpu_profile: str | None = None,
    from_stage: str | None = None,
    algos: list[str] | None = None,
    convert_shards: int | None = None,
    side: str = "all",
    dry_run: bool = False,
    config_file: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
    preflight: bool = True,
    predict: str | Path | None = None,
    predict_out: str | Path | None = None,
    predict_shards: int = 1,
    predict_roi: str | None = None,
) -> dict[str, str]:
    """Write the scripts and submit the chain (or print it with ``dry_run``).

    Returns:
        ``{job name: job id}`` of the submitted jobs (placeholders ``{name}`` on dry runs).

    Raises:
        ConfigError: a bad profile, config or argument, or a failed preflight check
            (``preflight=False`` skips those; a dry run prints them instead).
        StageFailed: sbatch refused a job (the jobs already submitted stay recorded).
    """
    wd = WorkDir.at(work_dir)
    if not dry_run:
        wd.ensure()
    cfg = load_config(wd.root, config_file, dump=not dry_run)
    # every job gets the same --config (an absolute path: jobs start in the work dir)
    config_path = Path(config_file).expanduser().resolve() if config_file else None
    gpu = load_profile(profile)
    cpu = load_profile(cpu_profile) if cpu_profile else None
    if algos:
        bad = [a for a in algos if a not in cfg.algos]
        if bad:
            raise ConfigError(f"--algos: {bad} not in the configured algos {cfg.algos}")
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from must be one of {', '.join(STAGES)}, got {from_stage!r}")
    if predict is not None:  # only the predict job(s), on the GPU profile (the chain is not submitted)
        src = Path(predict).expanduser().resolve()
        dest = (
            Path(predict_out).expanduser().resolve()
            if predict_out
            else wd.root / "predictions" / src.name.split(".")[0]
        )
        jobs = plan_predict(wd, gpu, src, dest, predict_shards, predict_roi)
    else:
        jobs = plan_jobs(wd, cfg, gpu, cpu, from_stage, algos, convert_shards)
    if side != "all":
        if cpu is None or cpu.cluster == gpu.cluster:
            raise ConfigError("--side cpu|gpu needs --cpu-profile naming another cluster")
        keep = cpu if side == "cpu" else gpu
        jobs = [j for j in jobs if j.profile is keep]
    out = echo or click.echo
    if not jobs:
        out("nothing to submit: every stage is done")
        return {}
    problems = preflight_problems(wd, cfg, jobs, from_stage) if preflight else []
    if problems and not dry_run:
        raise ConfigError(
            f"preflight: {problems[0]}"
            + (f" (and {len(problems) - 1} more: run with --dry-run)" if len(problems) > 1 else "")
            + "; --no-preflight submits anyway"
        )
    epoch = int(time.time())
    # render every script first: a value that cannot be used safely stops before any sbatch
    scripts = [render_script(job, wd, cfg, epoch, config_path) for job in jobs]
    ids: dict[str, str] = {}
    if not dry_run:
        (wd.logs_dir / "slurm").mkdir(parents=True, exist_ok=True)
    for job, script in zip(jobs, scripts):
        path = job.script_path(wd)
        argv = sbatch_argv(job, ids if not dry_run else {n: f"{{{n}}}" for n in job.after}, wd)
        if dry_run:
            out(f"# ==== {job.name} ({job.profile.cluster}): {path}")
            out(script.rstrip("\n"))
            out(f"# ---- submit on {job.profile.cluster}:")
            prefix = f"{job.profile.submit_via} " if job.profile.submit_via else ""
            out(prefix + shlex.join(argv))
            ids[job.name] = f"{{{job.name}}}"
            continue
        atomic_write_text(path, script)
        path.chmod(0o777 & ~current_umask())  # executable, and group-readable as the umask allows
        job_id = _run_sbatch(job, argv)
        ids[job.name] = job_id
        record_job(
            wd,
            {
                "name": job.name,
                "job_id": job_id,
                "stage": job.stage,
                "cluster": job.profile.cluster,
                "submitted": utc_now(),
                "profile": job.profile.name,
                "script": str(path),
                "depends_on": job.after,
            },
        )
        dep = f" after {', '.join(job.after)}" if job.after else ""
        out(f"{job.name}: job {job_id} on {job.profile.cluster}{dep}")
    if dry_run:
        out("")
        out(summary_table(jobs))
        for p in problems:
            out(f"# preflight: {p}")
        out(f"# {len(jobs)} jobs; nothing was submitted or written (dry run)")
    return ids


def summary_table(jobs: list[Job]) -> str:
    """One line per job: where it runs, what it asks for, what it waits for."""
    head = ("job", "cluster", "partition", "account", "cpus", "mem", "gpus", "time", "array", "after")
    rows = []
    for j in jobs:
        r = j.profile.res(job_kind(j))
        rows.append(
            (
                j.name,
                j.profile.cluster,
                r.partition or "-",
                r.account or "-",
                str(r.cpus),
                r.mem or "-",
                str(r.gpus),
                r.time,
                j.array or "-",
                ",".join(j.after) or "-",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    return "# " + "\n# ".join(lines)


def preflight_problems(wd: WorkDir, cfg: PipelineConfig, jobs: list[Job], from_stage: str | None) -> list[str]:
    """What would make the queued chain fail at once: missing images, an unset account, an
    unreadable data_root, stages before ``--from`` not done. Checks that need the other
    cluster's file system (``submit_via``) are skipped."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for j in jobs:
        p = j.profile
        if p.runner == "apptainer" and j.stage != "wait" and not p.submit_via:
            sif = Path(p.image_dir) / f"{job_kind(j)}.sif"
            if (p.name, str(sif)) not in seen and not sif.is_file():
                problems.append(f"image {sif} not found (build it: make sif; or set image_dir in profile {p.name})")
            seen.add((p.name, str(sif)))
        if p.runner == "apptainer" and not p.res(job_kind(j)).account and (p.name, "account") not in seen:
            problems.append(f"profile {p.name}: 'account' is not set (edit the profile's defaults.account)")
            seen.add((p.name, "account"))
    for j in jobs:
        if j.stage == "predict":
            src = Path(j.args[j.args.index("--input") + 1])
            if not src.exists():
                problems.append(f"--predict input {src} not found")
            if not any(wd.marker(m.stem).is_done() for m in wd.markers_dir.glob("train.*.json")):
                problems.append("no trained bundles in the work dir yet (train first)")
    if any(j.stage == "convert" for j in jobs) and not any(j.profile.submit_via for j in jobs if j.stage == "convert"):
        root = cfg.data_root
        if not root:
            problems.append("data_root is not set (pipeline.yaml or --config)")
        elif not is_remote(root) and not (Path(root).is_dir() and os.access(root, os.R_OK | os.X_OK)):
            problems.append(f"data_root {root} is not a readable folder")
    if from_stage is not None:
        before = STAGES[: STAGES.index(from_stage)]
        for stage in before:
            if pipeline.get(stage).fanout == "algo_fold":
                names = pipeline.get(stage).marker_names(cfg.algos, cfg.num_folds)
                if not any(wd.marker(n).is_done() for n in names):
                    problems.append(f"--from {from_stage}: no {stage} marker is done")
            elif not wd.marker(stage).is_done():
                problems.append(f"--from {from_stage}: stage {stage} is not done (markers/{stage}.json)")
    return problems


@click.command()
@work_dir_option
@config_option
@click.option(
    "--profile",
    default=None,
    help="Site profile (sycamore, longleaf, local, or a YAML path): train, ensemble, and all stages unless --cpu-profile.",
)
@click.option("--cpu-profile", default=None, help=f"Profile of the CPU cluster for {', '.join(CPU_STAGES)}.")
@click.option("--from", "from_stage", type=click.Choice(STAGES), default=None, help="Start the chain at this stage.")
@click.option("--algos", default=None, help="Comma-separated subset of the configured algorithms.")
@click.option(
    "--convert-shards",
    type=click.IntRange(min=1),
    default=None,
    help="Run convert as an array of N shards + a merge job.",
)
@click.option(
    "--side",
    type=click.Choice(["all", "cpu", "gpu"]),
    default="all",
    show_default=True,
    help="Two clusters: submit only this side (from its login node).",
)
@click.option(
    "--predict",
    "predict_input",
    default=None,
    type=click.Path(path_type=Path),
    help="Submit only stages.predict on this zarr group or NIfTI file (ensemble image and resources).",
)
@click.option(
    "--predict-out",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="With --predict: output folder (default <work_dir>/predictions/<input name>).",
)
@click.option(
    "--predict-shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --predict: an array of N jobs over the blocks.",
)
@click.option("--predict-roi", default=None, help="With --predict: region in world nm, z0:z1,y0:y1,x0:x1.")
@click.option(
    "--dry-run", is_flag=True, help="Print the scripts, sbatch lines and a summary table; submit and write nothing."
)
@click.option(
    "--no-preflight", is_flag=True, help="Submit even when images, account, data_root or earlier stages look wrong."
)
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Print the recorded jobs with their SLURM state and marker, then exit.",
)
@stage_command("slurm", lock=False)
def main(
    work_dir: Path,
    config_file: Path | None,
    profile: str,
    cpu_profile: str | None,
    from_stage: str | None,
    algos: str | None,
    convert_shards: int | None,
    predict_input: Path | None,
    predict_out: Path | None,
    predict_shards: int,
    predict_roi: str | None,
    side: str,
    dry_run: bool,
    no_preflight: bool,
    show_status: bool,
) -> int:
    """Submit the cellmap-auto3dseg chain to SLURM (see docs/cluster.md)."""
    if show_status:  # the one status report (slurm.status), which asks slurm.jobs for job states
        from slurm.status import render_status

        if not Path(work_dir).is_dir():
            raise ConfigError(f"{work_dir}: work dir not found")
        click.echo(render_status(work_dir))
        return 0
    if not profile:
        raise ConfigError("--profile is required to submit (sycamore, longleaf, local, or a YAML path)")
    if not dry_run:
        setup_logging("slurm", WorkDir.at(work_dir).logs_dir)
    names = [a.strip() for a in algos.split(",") if a.strip()] if algos else None
    submit_chain(
        work_dir,
        profile,
        cpu_profile,
        from_stage,
        names,
        convert_shards,
        side,
        dry_run,
        config_file,
        preflight=not no_preflight,
        predict=predict_input,
        predict_out=predict_out,
        predict_shards=predict_shards,
        predict_roi=predict_roi,
    )
    return 0


if __name__ == "__main__":
    main()
