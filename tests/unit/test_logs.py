from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kilnproxy.errors import OperatorError
from kilnproxy.logs import (
    JsonFormatter,
    SessionLog,
    TextFormatter,
    configure,
    render_fields,
    reopen,
)


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


def test_a_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    """At start, one line for the operator (exit 2); on USR1, the log goes on where it was."""
    (tmp_path / "not-a-directory").write_text("")
    bad = tmp_path / "not-a-directory" / "kilnproxy.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        with pytest.raises(OperatorError, match=r"\[log\] file .*kilnproxy.log: cannot open it"):
            configure("text", "info", bad)
        good = tmp_path / "kilnproxy.log"
        assert reopen("text", "info", good)
        assert not reopen("text", "info", bad)
        for handler in root.handlers:
            handler.flush()
        assert "cannot reopen the log, still writing where it was: [log] file" in good.read_text()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
