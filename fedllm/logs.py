"""Logging for the Flower apps: fedllm's own lines carry a marker so the CLI can pick them out of
Flower's and Ray's log stream and show them as progress."""

from __future__ import annotations

import logging
import sys

MARKER = "[fedllm]"


def configure_app_logging(level: int = logging.INFO) -> None:
    """Send the ``fedllm`` logger's records to stdout with the marker (idempotent)."""
    logger = logging.getLogger("fedllm")
    if any(getattr(h, "_fedllm", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{MARKER} %(message)s"))
    handler._fedllm = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def strip_to_marker(line: str) -> str | None:
    """The fedllm message in a streamed log line, or None if the line is not one of ours."""
    at = line.find(MARKER)
    if at < 0:
        return None
    return line[at + len(MARKER):].strip()
