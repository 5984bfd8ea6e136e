"""Logging for every GenServe process: text lines or JSON lines, with task, node and key ids as fields.

Each process's ``__main__`` calls `setup` once with its `--log-format` (env
GENSERVE_LOG_FORMAT). Log calls about a task pass ``extra=ids(task_id=..., node_id=...,
key_id=...)``; in JSON those become fields of the line, in text they follow the message as
``key=value``, so `grep task_id=...` or `jq 'select(.task_id == ...)'` finds every line of one
task across the broker, the nodes and the fronts.

``key_id`` in logs is `key_ref(owner)`: the first 16 hex digits of the key's owner hash
(itself a hash of the whole key), never the key or any part of it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
FIELDS = ("task_id", "node_id", "key_id")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ids(task_id: str | None = None, node_id: str | None = None, key_id: str | None = None) -> dict[str, str]:
    """The `extra` of a log call about a task: the ids that are known."""
    found = {"task_id": task_id, "node_id": node_id, "key_id": key_id}
    return {name: value for name, value in found.items() if value}


def key_ref(owner: str | None) -> str | None:
    """How logs name an API key: a prefix of its owner hash (see genserve.keyfile.owner_of)."""
    return owner[:16] if owner else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, process, logger, msg, the ids, and exc when there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {"ts": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
                                "process": self.process, "logger": record.name, "msg": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the ids appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as text."""
        text = super().format(record)
        found = [f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None)]
        if not found:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback after the ids
        return f"{head} [{' '.join(found)}]{sep}{tail}"


def setup(level: str = "INFO", fmt: str = "text", process: str = "genserve") -> None:
    """Configure the root logger once, for a process's whole life; ValueError for an unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {list(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
