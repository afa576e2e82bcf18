"""Robustness suite helpers: the corpus outcome summary (printed and in the terminal summary)."""
from __future__ import annotations

import re
from collections import Counter

import pytest

_OUTCOMES = pytest.StashKey[dict]()

# Short names for refusal reasons, most specific first (reason text -> category).
_CATEGORIES = [
    ("DICOMDIR", "DICOMDIR"),
    ("no pixel data", "no pixel data"),
    ("not a greyscale radiograph", "not greyscale"),
    ("cannot decode pixel data", "cannot decode pixel data"),
    ("no installed codec", "no codec"),
    ("no decoder for transfer syntax", "no codec"),
    ("truncated or corrupt", "truncated or corrupt"),
    ("invalid ", "invalid header value"),
    ("Rows / Columns", "no Rows / Columns"),
    ("unsupported image format", "unsupported format"),
    ("not a DICOM or image file", "not an image file"),
    ("exceeds the limit", "too large"),
    ("empty file", "empty file"),
    ("permission denied", "permission denied"),
]


def reason_category(reason: str) -> str:
    for needle, name in _CATEGORIES:
        if needle in reason:
            return name
    return re.sub(r"\s+", " ", reason)[:40]


def summary_line(outcomes: dict[str, str]) -> str:
    """``robustness: N inputs, R read, F refused: reason counts`` from {input: outcome}."""
    n_read = sum(1 for o in outcomes.values() if o == "read")
    refused = Counter(reason_category(o) for o in outcomes.values() if o != "read")
    reasons = ", ".join(f"{name} {count}" for name, count in refused.most_common())
    line = f"robustness: {len(outcomes)} inputs, {n_read} read, {sum(refused.values())} refused"
    return line + (f": {reasons}" if reasons else "")


@pytest.fixture(scope="module")
def corpus_outcomes(request):
    """A dict to fill with ``{input id: "read" | refusal reason}``; the summary is printed at
    module teardown (visible with ``pytest -s``) and added to the terminal summary."""
    outcomes: dict[str, str] = {}
    yield outcomes
    if outcomes:
        request.config.stash.setdefault(_OUTCOMES, {}).update(outcomes)
        print("\n" + summary_line(outcomes))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    outcomes = config.stash.get(_OUTCOMES, None)
    if outcomes:
        terminalreporter.write_sep("-", "robustness corpus")
        terminalreporter.write_line(summary_line(outcomes))
