"""Structured logs: one event per line, JSON by default, on the root logger.

Any module attaches fields with plain logging, without importing this module:

    log.info("update accepted", extra={"fields": {"agent": agent_id, "round": 3}})
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from strata.config import ConfigError

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_RESERVED = ("ts", "level", "logger", "event")


def parse_level(text: str | int) -> int:
    """A `--log-level` value ("debug", "INFO", "warning", ...) as a logging level number."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    level = _LEVELS.get(str(text).strip().lower())
    if level is None:
        valid = ", ".join(k for k in _LEVELS if k != "warn")
        raise ConfigError(f"unknown log level {text!r}; valid levels: {valid}", reason="bad_log_level")
    return level


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "event", **fields[, "exc"]} as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _fields(record).items():
            # a field may never overwrite the envelope
            out[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`ts level logger event key=value ...` for humans, still one line per event."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), record.name, _one_line(record.getMessage())]
        for key, value in _fields(record).items():
            parts.append(f"{key}={_text_value(value)}")
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def setup_logging(
    level: str | int = "info",
    *,
    stream: TextIO | None = None,
    fmt: Literal["json", "text"] = "json",
) -> None:
    """Send every log record (ours and libraries') to `stream`, one event per line.

    Calling it again replaces the handler it installed before rather than adding one.
    """
    if fmt not in ("json", "text"):
        raise ConfigError(f"unknown log format {fmt!r}; valid formats: json, text", reason="bad_log_format")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_strata", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._strata = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
