"""Credentials in URIs never reach a log line (issue 12 item 9)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.redact import redact


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("https://alice:s3cr3t@mlflow.example.org/api", "https://***@mlflow.example.org/api"),
        ("http://token@host:5000", "http://***@host:5000"),
        ("https://h/x?api_key=abc123&run=7", "https://h/x?api_key=***&run=7"),
        (
            "--mlflow_tracking_uri https://u:p@h/?X-Amz-Signature=ff&access_token=zz --x 1",
            "--mlflow_tracking_uri https://***@h/?X-Amz-Signature=***&access_token=*** --x 1",
        ),
        ("sqlite:////work/wd/segresnet_0/mlflow.db", "sqlite:////work/wd/segresnet_0/mlflow.db"),
        ("mail me at a@b.org", "mail me at a@b.org"),
    ],
)
def test_redact(text: str, expect: str) -> None:
    assert redact(text) == expect


def test_mlflow_uri_with_credentials_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking URI with a password (here an unreachable server, so MLflow fails and the
    tracker logs its error, which quotes the URL): the password is in no log record."""
    pytest.importorskip("mlflow", reason="mlflow is installed by the dev extra")
    from training.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = {"bundle_root": str(tmp_path), "mlflow_tracking_uri": "http://alice:hunter2@127.0.0.1:9/mlflow?token=t0k3n"}
    with caplog.at_level(logging.INFO):
        t = Tracker(cfg, tmp_path / "model", enabled=True)
    t.fail()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "mlflow: tracking off after an error" in text, text
    assert "hunter2" not in text and "t0k3n" not in text and "alice" not in text
