"""Hide credentials in URIs before they reach a log line.

A tracking URI such as ``https://user:token@mlflow.example.org/?api_key=...`` must not end up in a
SLURM log readable by the whole group. :func:`redact` rewrites every URI inside a text (a URI, an
argv line, an exception message): the ``user:password@`` part and the values of secret-looking
query parameters become ``***``.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[\w.-]*(?:token|secret|password|passwd|pwd|key|signature|sig|credential|auth)[\w.-]*)=)"
    r"[^&;#\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URI credentials (userinfo, secret query values) replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", str(text)))
