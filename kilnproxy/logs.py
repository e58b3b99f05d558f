"""Logging: text or JSON lines, every line about a session carrying its id (SPEC 4).

`SessionLog` is the context adapter that tags records with the session id; the formatters put
it at the front of text lines and in a `session` field of JSON lines. The access line carries
its fields as structured data (`extra={"fields": ...}`), so JSON logs get them as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from kilnproxy.errors import OperatorError

ACCESS = logging.getLogger("kilnproxy.access")


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose every record names the session it is about."""

    def __init__(self, logger: logging.Logger, session_id: str) -> None:
        super().__init__(logger, {"session": session_id})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "session": self.extra["session"]}  # type: ignore[index]
        return msg, kwargs


class QuietSessionLog(SessionLog):
    """The log of a session nobody needs to read about (a load balancer's health check, every
    second): below warnings, its lines go out at debug level."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level < logging.WARNING else level, msg, *args, **kwargs)


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session", None)
        where = f" [{session}]" if session else ""
        line = f"{_timestamp(record)} {record.levelname} {record.name}{where} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        session = getattr(record, "session", None)
        if session:
            out["session"] = session
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def render_fields(fields: Mapping[str, object]) -> str:
    """`key=value` pairs for text logs; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None or value == "" else str(value)
        if any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def access_line(session_id: str, fields: Mapping[str, object], level: int = logging.INFO) -> None:
    if not ACCESS.isEnabledFor(level):  # a health check's, at debug: not even rendered
        return
    ACCESS.log(
        level, "access %s", render_fields(fields), extra={"session": session_id, "fields": fields}
    )


def configure(fmt: str, level: str, file: Path | None) -> logging.Handler:
    """Install one handler on the root logger; return it (USR1 reopens a file handler)."""
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(file)
        except OSError as exc:
            raise OperatorError(f"[log] file {file}: cannot open it: {exc.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # asyncssh logs every channel at INFO without our session id; ours say the same with it.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return handler


def reopen(fmt: str, level: str, file: Path | None) -> bool:
    """USR1: `configure` again, so that a rotated log file is written anew. If the file cannot
    be opened now (a rotation that left the wrong owner), the log goes on where it was, with a
    line that says so: a running process does not stop for its log."""
    try:
        configure(fmt, level, file)
    except OperatorError as exc:
        log = logging.getLogger("kilnproxy")
        log.error("cannot reopen the log, still writing where it was: %s", exc)
        return False
    return True
