"""Generated sections of README.md: text between a start and an end marker.

The tools that own a section (config_reference.py, performance_report.py) render its
body; this module puts it in place, or with ``--check`` reports a stale README.
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace(text: str, start: str, end: str, body: str) -> str:
    """``text`` with everything between the ``start`` and ``end`` markers set to ``body``."""
    if start not in text or end not in text:
        raise SystemExit(f"{README} lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update(start: str, end: str, body: str, check: bool, regenerate: str) -> int:
    """Write the section into README.md, or (``check``) return 1 when it differs."""
    text = README.read_text()
    new = replace(text, start, end, body)
    if check:
        if new != text:
            print(f"README.md section {start} is out of date: run {regenerate}")
            return 1
        return 0
    README.write_text(new)
    return 0
