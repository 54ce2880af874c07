"""Generated sections of README.md and docs/: text between a start and an end marker.

The tools that own a section (config_reference.py, performance_report.py) render its
body; this module puts it in place, or with ``--check`` reports a stale file.
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace(text: str, start: str, end: str, body: str, path: Path = README) -> str:
    """``text`` with everything between the ``start`` and ``end`` markers set to ``body``."""
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update(start: str, end: str, body: str, check: bool, regenerate: str, path: Path = README) -> int:
    """Write the section into ``path`` (README.md), or (``check``) return 1 when it differs."""
    text = path.read_text()
    new = replace(text, start, end, body, path)
    if check:
        if new != text:
            print(f"{path.name} section {start} is out of date: run {regenerate}")
            return 1
        return 0
    path.write_text(new)
    return 0
