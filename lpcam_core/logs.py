"""Logging for runs inside a host (hosts print; they configure no logging)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure_logging", "add_logger", "LOG_LEVEL_VAR", "HostRunFormatter"]

LOG_LEVEL_VAR = "LPCAM_LOG_LEVEL"
_MARK = "lpcam_handler"
_LOGGERS = ["lpcam_core"]


def add_logger(name: str) -> None:
    """Have :func:`configure_logging` show the messages of logger ``name`` too (a plugin package's)."""
    if name not in _LOGGERS:
        _LOGGERS.append(name)


class HostRunFormatter(logging.Formatter):
    """``[lpcam] message``; warnings and errors say so (``[lpcam] WARNING: ...``), so they stand out in a host's log."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[lpcam] {level}{super().format(record)}"  # the message, and a traceback when there is one


def configure_logging() -> None:
    """Show lpcam's INFO messages in a host run (or a spawned worker).

    Adds one stdout handler to the ``lpcam_core`` logger (and those of :func:`add_logger`) unless the
    application configured logging itself. Level from ``LPCAM_LOG_LEVEL`` (default INFO); a level
    logging does not know is refused with a message naming the variable.
    """
    if logging.getLogger().handlers:
        return
    level = os.environ.get(LOG_LEVEL_VAR, "INFO").strip().upper() or "INFO"
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{LOG_LEVEL_VAR}={level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    for name in _LOGGERS:
        log = logging.getLogger(name)
        if not any(getattr(h, _MARK, False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(HostRunFormatter())
            setattr(handler, _MARK, True)
            log.addHandler(handler)
        log.setLevel(level)
