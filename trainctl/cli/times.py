"""The one way times are shown: ISO 8601 with its zone in JSON, wall clock and relative for
people ("2026-12-04 12:03:11 UTC (13m ago)").

The store keeps Unix times (floats); they become text only here, at output.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

TIME_KEYS = frozenset({"time", "since", "until", "start", "end"})
"""JSON keys that hold a Unix time besides those ending in ``_at`` (durations end in ``_s``)."""


def format_age(seconds: float) -> str:
    """A short human duration: 42s, 17m, 5h, 3d."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 with its zone (UTC), the one format JSON and YAML carry."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()


def wall_and_age(timestamp: float, now: float) -> str:
    """``2026-12-04 12:03:11 UTC (13m ago)``, or ``(in 5m)`` for a time still to come; the
    date is left out when it is today's (UTC): ``12:03:11 UTC (13m ago)``."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    today = datetime.fromtimestamp(now, tz=UTC).date() == when.date()
    wall = when.strftime("%H:%M:%S UTC" if today else "%Y-%m-%d %H:%M:%S UTC")
    if timestamp > now + 1:
        return f"{wall} (in {format_age(timestamp - now)})"
    return f"{wall} ({format_age(now - timestamp)} ago)"


def is_time_key(key: str) -> bool:
    return key in TIME_KEYS or key.endswith("_at")


def iso_timestamps(value: Any) -> Any:
    """`value` (a JSON-able object) with every Unix time under a time key (`is_time_key`) as
    ISO 8601 text; numbers under other keys, and times already text, are left alone."""
    if isinstance(value, dict):
        return {
            key: iso_time(item)
            if isinstance(key, str) and is_time_key(key) and _is_number(item)
            else iso_timestamps(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [iso_timestamps(item) for item in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
