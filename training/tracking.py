"""Optional MLflow tracking of builtin-bundle training.

Off unless the ``train:`` section sets ``mlflow: true``. The default store is a local
sqlite file in the bundle (``sqlite:///<bundle>/mlflow.db``): one file per bundle, so
concurrent train jobs on one work dir never contend for a database lock, and never a
network URI unless ``mlflow_tracking_uri`` names one explicitly. MLflow 3 refuses its
old file store, hence sqlite. The run id is kept in ``model/mlflow_run_id`` so a resumed
(requeued) job keeps logging into the same run.

A tracking failure never stops training: it is logged once and tracking is switched off.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

log = logging.getLogger(__name__)

# Deliberately a copy of ``common.redact`` (same patterns): this package is copied into every
# trained bundle and must run without this repository; a tracking URI's credentials must not
# reach a log line.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[\w.-]*(?:token|secret|password|passwd|pwd|key|signature|sig|credential|auth)[\w.-]*)=)"
    r"[^&;#\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URI credentials (userinfo, secret query values) replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", str(text)))


RUN_ID_FILE = "mlflow_run_id"
PARAM_KEYS = (
    "algo",
    "fold",
    "roi_size",
    "batch_size",
    "num_epochs",
    "num_steps_per_epoch",
    "learning_rate",
    "loss",
    "output_classes",
    "unknown_label",
    "target_gpu_mem_gb",
    "intensity_bounds",
    "seed",
    "network",
)


def default_uri(bundle_root: str | Path) -> str:
    """``sqlite:///<bundle>/mlflow.db`` (absolute path: four slashes)."""
    return f"sqlite:///{Path(bundle_root).resolve() / 'mlflow.db'}"


class Tracker:
    """Per-epoch metrics to MLflow; every method is a no-op when tracking is off."""

    def __init__(self, cfg: dict[str, Any], model_dir: Path, enabled: bool) -> None:
        self._mlflow: Any = None
        if not enabled:
            return
        try:
            import mlflow
        except ImportError:
            log.warning("train: mlflow: true, but mlflow is not installed: tracking off (it is in the train extra)")
            return
        bundle = Path(cfg.get("bundle_root") or model_dir.parent)
        uri = str(cfg.get("mlflow_tracking_uri") or default_uri(bundle))
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(str(cfg.get("mlflow_experiment") or "cellmap-auto3dseg"))
            id_file = model_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            run = mlflow.start_run(run_id=run_id, run_name=None if run_id else bundle.name)
            if run_id is None:
                atomic_write_text(id_file, run.info.run_id + "\n")
                mlflow.log_params({k: str(cfg[k])[:500] for k in PARAM_KEYS if k in cfg})
                mlflow.set_tags({"bundle": bundle.name, "class_names": ",".join(cfg.get("class_names") or [])})
            self._mlflow = mlflow
            log.info("mlflow: tracking run %s in %s", run.info.run_id, redact(uri))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a training
            log.warning("mlflow: tracking off after an error: %s", redact(str(exc)))
            self._end(failed=True)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Log one ``metrics.jsonl`` row (loss, lr, mean and per-class Dice) at step = epoch."""
        if self._mlflow is None:
            return
        metrics = {
            k: float(row[k])
            for k in ("train_loss", "lr", "mean_dice", "best_metric", "samples_per_s")
            if row.get(k) is not None
        }
        for name, v in (row.get("dice") or {}).items():
            if v is not None:
                metrics[f"dice_{name}"] = float(v)
        try:
            self._mlflow.log_metrics(metrics, step=int(row["epoch"]))
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: tracking off after an error: %s", exc)
            self._end(failed=True)

    def pause(self) -> None:
        """End the run as unfinished (a requeue resumes it through the saved run id)."""
        self._end(failed=False, status="KILLED")

    def fail(self) -> None:
        """End the run as failed (training raised)."""
        self._end(failed=True)

    def finish(self, best_metric: float) -> None:
        """Log the best metric and close the run as finished."""
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_metric("best_avg_dice_score", float(best_metric))
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: %s", exc)
        self._end(failed=False, status="FINISHED")

    def _end(self, failed: bool, status: str = "FAILED") -> None:
        self._mlflow = None
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status="FAILED" if failed else status)
        except Exception:  # noqa: BLE001 - nothing more to do
            pass
