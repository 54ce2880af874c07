"""Regenerate the README's config reference from the config dataclasses' docstrings.

    python tools/config_reference.py          # rewrite README.md in place
    python tools/config_reference.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys

import readme_sections
from carp_fast.config import field_docs

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def table() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, doc in field_docs():
        escaped = doc.replace("|", "\\|")
        rows.append(f"| `{key}` | {type_name} | `{_default(default)}` | {escaped} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    return readme_sections.update(START, END, table(), args.check, "python tools/config_reference.py")


if __name__ == "__main__":
    sys.exit(main())
