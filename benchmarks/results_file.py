"""benchmarks/RESULTS.md, a reference of current numbers: each benchmark owns one section, from its
``## `` title line to the next title, and replaces it whole when it runs again."""
from __future__ import annotations

from pathlib import Path

from data.io_utils import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(section: str, results: Path = RESULTS) -> Path:
    """Put ``section`` (its first line is its ``## `` title) into ``results`` in place of the
    section of that title, or at the end; sections are kept one blank line apart."""
    title = section.lstrip("\n").split("\n", 1)[0]
    body = section.strip("\n") + "\n"
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    start = text.find(title + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + body + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    return atomic_write_text(results, text)
