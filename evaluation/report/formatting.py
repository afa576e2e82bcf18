"""Numbers as the report prints them (HTML page, command line, notebooks)."""
from __future__ import annotations

import math

import numpy as np


def format_value(v, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; ``n/a`` for None or NaN; lists joined by commas."""
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x, digits) for x in v)
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def format_ci(d: dict | None, key: str) -> str:
    """``d[key] [ci_low, ci_high]`` of a metric with its interval, ``n/a`` when missing."""
    if not d or d.get(key) is None:
        return "n/a"
    if d.get("ci_low") is None:
        return format_value(d[key])
    return f"{format_value(d[key])} [{format_value(d['ci_low'])}, {format_value(d['ci_high'])}]"
