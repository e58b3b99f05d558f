"""Logging: text or JSON lines, every line about a session carrying its id (SPEC 4).

`SessionLog` is the context adapter that tags records with the session id; the formatters put
it at the front of text lines and in a `session` field of JSON lines. The access line carries
its fields as structured data (`extra={"fields": ...}`), so JSON logs get them as keys.

A log that is a pipe or a socket (journald's, a terminal) takes lines only as fast as its reader
reads them, and one whose reader stops must not stop the event loop, every session of the
process with it: `LineWriter` writes those lines from a thread of its own, and past `QUEUED`
lines waiting it drops them, and a line says how many once the log takes lines again. A regular
file takes a line at once (a full disk fails the write, it does not wait), so its lines are
written where they are logged, in order with everything else the process does; a write that
fails is counted the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

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


def one_line(text: str) -> str:
    """`text` with what is not printable escaped (`\\n`, `\\x1b`, `\\u2028`): what a client
    sent (a disconnect's reason, say) can neither start a log line of its own nor hide one."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


CLIENT_TEXT = 200  # characters of a client's string that a log line quotes


def quoted(text: str | None) -> str:
    """A client's string (a command line, a subsystem's name) for a log line: quoted, and cut
    to CLIENT_TEXT characters with its length, since an SSH packet carries 256 KiB of it."""
    if text is None or len(text) <= CLIENT_TEXT:
        return repr(text)
    return f"{text[:CLIENT_TEXT]!r}... ({len(text)} characters)"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session", None)
        where = f" [{session}]" if session else ""
        message = one_line(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname} {record.name}{where} {message}"
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


QUEUED = 10_000  # lines waiting for a log that does not take them (a few MiB), then dropped
BATCH = 512  # lines written at once, when they come faster than one write each
FLUSH_WITHIN = 1.0  # seconds an exiting process waits for its last lines to be written


class LineWriter(logging.Handler):
    """Formats each line where it is logged, and writes it there (a regular file) or from a
    thread of its own (a pipe or a socket)."""

    def __init__(self, stream: IO[str], owned: bool) -> None:
        super().__init__()
        self._stream = stream
        self._owned = owned  # a file of ours, closed with the handler; not standard error
        self._lines: queue.Queue[str | threading.Event | None] = queue.Queue(QUEUED)
        self._dropped = 0
        self._counting = threading.Lock()  # `_dropped`, counted by both threads
        self._thread: threading.Thread | None = None
        self._stalled = False  # a flush found the log not taking lines
        if not _regular(stream):
            self._thread = threading.Thread(target=self._write_all, name="log writer",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._thread is None:
            self._put_out([line])  # under the handler's lock, which `handle` holds
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            with self._counting:
                self._dropped += 1

    def flush(self) -> None:
        """Wait, FLUSH_WITHIN at most, until what was logged before is written: at exit."""
        if self._thread is None or not self._thread.is_alive():
            return
        written = threading.Event()
        try:
            self._lines.put(written, timeout=FLUSH_WITHIN)
        except queue.Full:
            self._stalled = True
            return
        self._stalled = not written.wait(FLUSH_WITHIN)

    def close(self) -> None:
        """What is queued is written, the file closed. Only a log that takes no line holds
        this, FLUSH_WITHIN at most; what it still has queued then is lost."""
        if self._thread is None:
            self._close_stream()
        else:
            try:  # a flush that waited in vain (at exit) is not waited for twice
                self._lines.put(None, timeout=0 if self._stalled else FLUSH_WITHIN)
            except queue.Full:
                self._lines = queue.Queue(1)  # one for no one: the thread ends on its next
        super().close()

    def _write_all(self) -> None:
        lines = self._lines
        while True:
            batch = [lines.get()]
            while len(batch) < BATCH and not lines.empty():
                batch.append(lines.get_nowait())
            self._put_out([line for line in batch if isinstance(line, str)])
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if None in batch or lines is not self._lines:
                break
        self._close_stream()

    def _put_out(self, text: list[str]) -> None:
        """Write `text`, after a line for those dropped since the last write; if the write
        fails (a full disk), they are counted as dropped, to be said once one succeeds."""
        with self._counting:
            dropped, self._dropped = self._dropped, 0
        out = [self._dropped_line(dropped), *text] if dropped else text
        if not out:
            return
        try:
            self._stream.write("\n".join(out) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            with self._counting:
                self._dropped += dropped + len(text)

    def _close_stream(self) -> None:
        if self._owned:
            with contextlib.suppress(OSError):
                self._stream.close()

    def _dropped_line(self, count: int) -> str:
        return self.format(
            logging.LogRecord(
                "kilnproxy", logging.WARNING, __file__, 0,
                "%d log lines dropped: the log did not take them", (count,), None,
            )
        )  # fmt: skip


def _regular(stream: IO[str]) -> bool:
    """Whether `stream` is a regular file (not a pipe, socket or terminal)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):  # no descriptor of its own (a test's StringIO): written at once
        return True


def configure(fmt: str, level: str, file: Path | None) -> logging.Handler:
    """Install one handler on the root logger; return it (USR1 reopens a file handler)."""
    handler: logging.Handler
    if file is None:
        handler = LineWriter(sys.stderr, owned=False)
    else:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            handler = LineWriter(file.open("a", encoding="utf-8"), owned=True)
        except OSError as exc:
            raise OperatorError(f"[log] file {file}: cannot open it: {exc.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # asyncssh logs every channel at INFO without our session id; ours say the same with it.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return handler


def reopen(fmt: str, level: str, file: Path | None) -> bool:
    """USR1: `configure` again, so that a rotated log file is written anew. If the file cannot
    be opened now (a rotation that left the wrong owner), the log goes on where it was, with a
    line that says so: a running process does not stop for its log."""
    if file is None:  # standard error: nothing to reopen
        return True
    try:
        configure(fmt, level, file)
    except OperatorError as exc:
        log = logging.getLogger("kilnproxy")
        log.error("cannot reopen the log, still writing where it was: %s", exc)
        return False
    return True
