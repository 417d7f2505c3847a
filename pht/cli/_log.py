"""Logging of the command line: text or GOST-style JSON, to stderr, stdout or a file.

GOST v3 logs one JSON object a line (logrus's JSON formatter) with the fields
``level`` (``debug``, ``info``, ``warning``, ``error``, ``fatal``), ``msg``
and ``time`` (RFC 3339), plus context fields; log pipelines built for GOST
read those names. ``pht`` writes the same three fields, plus ``logger`` (the
Python logger), GOST's context fields ``service``, ``handler`` and
``remote`` (the client's address, the real one behind a trusted reverse
proxy) where a line has them, and, for a record logged with an exception,
``error``.

Tokens are secrets (whoever has one can use the tunnel): the formatters cut
anything that looks like a token in a ``token=`` parameter down to its first
eight characters, wherever it comes from.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import IO

__all__ = ["JSONFormatter", "TextFormatter", "open_output", "redact"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y/%m/%d %H:%M:%S"

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
#: GOST's context fields, taken from a record's ``extra``.
_CONTEXT_FIELDS = ("service", "handler", "remote")
_TOKEN = re.compile(r"(token=)([A-Za-z0-9_-]{8})[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """Cut tokens in ``token=...`` down to their first eight characters."""
    return _TOKEN.sub(r"\1\2…", text)


class TextFormatter(logging.Formatter):
    """``2026/11/29 06:46:36 INFO message``, as before, with tokens cut."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JSONFormatter(logging.Formatter):
    """One JSON object a line with GOST's (logrus's) field names."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        entry: dict[str, object] = {
            "level": _LEVELS.get(record.levelno, record.levelname.lower()),
            "msg": redact(record.getMessage()),
            "time": moment.isoformat(timespec="seconds"),
            "logger": record.name,
        }
        for name in _CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                entry[name] = value
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def open_output(output: str | None) -> IO[str] | None:
    """GOST's ``log.output``: ``stderr`` (default), ``stdout``, ``none``, or a file path.

    Returns the stream (a file is opened for appending), or ``None`` for ``none``.
    Raises ``OSError`` if the file cannot be opened.
    """
    if output is None or output.lower() == "stderr":
        return sys.stderr
    if output.lower() == "stdout":
        return sys.stdout
    if output.lower() == "none":
        return None
    return open(output, "a", encoding="utf-8", buffering=1)
