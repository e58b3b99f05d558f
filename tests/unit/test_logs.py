from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kilnproxy.errors import OperatorError
from kilnproxy.logs import (
    JsonFormatter,
    LineWriter,
    SessionLog,
    TextFormatter,
    configure,
    render_fields,
    reopen,
)


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level as they were after the test (closed if new)."""
    logger = logging.getLogger()
    saved = (list(logger.handlers), logger.level)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])


def record(logger: logging.Logger, message: str, **extra: object) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None, extra=extra)


def test_render_fields_quotes_what_needs_it() -> None:
    line = render_fields({"a": 1, "b": "two words", "c": None, "d": "", "e": 'q"uote'})
    assert line == 'a=1 b="two words" c=- d=- e="q\\"uote"'


def test_session_id_on_text_and_json_lines() -> None:
    logger = logging.getLogger("kilnproxy.test")
    adapter = SessionLog(logger, "3f9c2a1b")
    _, kwargs = adapter.process("hello", {})
    rec = record(logger, "hello", **kwargs["extra"])
    assert "[3f9c2a1b] hello" in TextFormatter().format(rec)
    data = json.loads(JsonFormatter().format(rec))
    assert (data["session"], data["message"], data["level"]) == ("3f9c2a1b", "hello", "info")


def test_access_fields_become_json_keys() -> None:
    logger = logging.getLogger("kilnproxy.access")
    rec = record(logger, "access x=1", session="deadbeef", fields={"repo": "a/b", "exit": 0})
    data = json.loads(JsonFormatter().format(rec))
    assert (data["repo"], data["exit"], data["session"]) == ("a/b", 0, "deadbeef")


def test_a_log_file_that_cannot_be_opened(tmp_path: Path, root: logging.Logger) -> None:
    """At start, one line for the operator (exit 2); on USR1, the log goes on where it was."""
    (tmp_path / "not-a-directory").write_text("")
    bad = tmp_path / "not-a-directory" / "kilnproxy.log"
    with pytest.raises(OperatorError, match=r"\[log\] file .*kilnproxy.log: cannot open it"):
        configure("text", "info", bad)
    good = tmp_path / "kilnproxy.log"
    assert reopen("text", "info", good)
    assert not reopen("text", "info", bad)
    for handler in root.handlers:
        handler.flush()
    assert "cannot reopen the log, still writing where it was: [log] file" in good.read_text()


def test_what_a_client_sent_cannot_make_a_line_of_its_own() -> None:
    """A disconnect's reason is the client's text: its newline would start a forged line."""
    logger = logging.getLogger("kilnproxy.session")
    forged = "bye\n2026-01-01T00:00:00.000Z INFO kilnproxy.access [deadbeef] access outcome=ok"
    line = TextFormatter().format(record(logger, f"connection closed: {forged}\x1b[2J\u2028"))
    assert "\n" not in line
    assert line.endswith("connection closed: bye\\n2026-01-01T00:00:00.000Z INFO kilnproxy."
                         "access [deadbeef] access outcome=ok\\x1b[2J\\u2028")  # fmt: skip
    traceback = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (),
                                  (ValueError, ValueError("x"), None))  # fmt: skip
    assert TextFormatter().format(traceback).splitlines()[1:] == ["ValueError: x"]


def test_a_log_nobody_reads_holds_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log whose reader stops (journald stalled) fills its pipe: a process writing to it
    itself would stop with it, every session of its loop too. Lines past QUEUED are dropped,
    and a line says how many once the log takes lines again."""
    monkeypatch.setattr("kilnproxy.logs.QUEUED", 100)
    read, write = os.pipe()
    handler = LineWriter(os.fdopen(write, "w"), owned=True)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("kilnproxy.stalled")
    started = time.monotonic()
    for number in range(3000):  # 3000 lines of 80 bytes: more than the pipe's 64 KiB
        handler.handle(record(logger, f"line {number:05d} " + "x" * 50))
    assert time.monotonic() - started < 2
    received = bytearray()

    def read_all() -> None:
        while data := os.read(read, 1 << 20):
            received.extend(data)

    reader = threading.Thread(target=read_all)
    reader.start()  # the reader is back
    handler.handle(record(logger, "after the stall"))
    handler.close()
    reader.join(10)
    lines = received.decode().splitlines()
    notices = [line for line in lines if "log lines dropped" in line]
    assert notices and all(
        re.search(r" WARNING kilnproxy \d+ log lines dropped: the log did not take them$", line)
        for line in notices
    )
    numbers = [int(line.split()[4]) for line in lines if " line " in line]
    assert numbers == sorted(numbers) and 0 < len(numbers) < 3000
    after = sum(line.endswith("after the stall") for line in lines)
    assert sum(int(line.split()[3]) for line in notices) + len(numbers) + after == 3001
    os.close(read)


def test_a_log_on_standard_error_has_nothing_to_reopen(root: logging.Logger) -> None:
    """USR1 reopens a log file; standard error stays as it is, its writer thread too (a new
    one beside the old could write lines out of order)."""
    handler = configure("text", "info", None)
    assert reopen("text", "info", None)
    assert root.handlers == [handler]


def test_a_regular_file_takes_each_line_as_it_is_logged(tmp_path: Path) -> None:
    """No thread between a line and a file on disk: what is logged is there at once, in order
    with whatever the process does next."""
    path = tmp_path / "kilnproxy.log"
    handler = LineWriter(path.open("a", encoding="utf-8"), owned=True)
    handler.setFormatter(TextFormatter())
    handler.handle(record(logging.getLogger("kilnproxy.now"), "at once"))
    assert path.read_text().endswith(" INFO kilnproxy.now at once\n")
    handler.close()


def test_a_log_line_is_written_by_exit() -> None:
    """Written by a thread when the log is a pipe (journald's): what was logged before the
    process exits is in it all the same."""
    script = (
        "import logging\nfrom kilnproxy.logs import configure\n"
        "configure('text', 'info', None)\n"
        "for n in range(2000): logging.getLogger('kilnproxy').info('line %d', n)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, timeout=30
    )
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 2000 and lines[-1].endswith("line 1999")
