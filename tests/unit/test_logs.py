from __future__ import annotations

import json
import logging

from kilnproxy.logs import JsonFormatter, SessionLog, TextFormatter, render_fields


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
