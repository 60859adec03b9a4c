#!/usr/bin/env python
"""Regenerate the generated tables in README.md and docs/*.md from the code (run after changing them).

A generated table sits between two marker comments, `<!-- NAME:start -->` and `<!-- NAME:end -->`, where NAME
is one of GENERATORS: `hyperparameters` (imgclf.config's hyperparameter and metric tables), `rules` (the
debugging rules and their parameters) or `instances` (the GPU instance families of imgclf.instances).
`--check` rewrites nothing: it names the files whose tables are out of date and exits 1 (tests/integration/test_docs.py
asserts the same).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

MARKER = re.compile(r"(<!-- (?P<name>[a-z-]+):start -->\n)(?P<body>.*?)(<!-- (?P=name):end -->)", re.S)


def _rules_table() -> str:
    from imgclf.debugging.rules import markdown_table

    return markdown_table()


def _hyperparameter_tables() -> str:
    from imgclf.config import markdown_tables

    return markdown_tables()


def _instances_table() -> str:
    from imgclf.instances import markdown_table

    return markdown_table()


GENERATORS: dict[str, Callable[[], str]] = {"hyperparameters": _hyperparameter_tables, "rules": _rules_table,
                                            "instances": _instances_table}


def documents() -> list[Path]:
    """The files that may hold generated tables."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def regenerate(text: str, where: str = "") -> str:
    """`text` with every generated table replaced by what the code generates now."""
    cache: dict[str, str] = {}

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise SystemExit(f"{where}: unknown generated table {name!r}; known: {', '.join(GENERATORS)}")
        if name not in cache:
            cache[name] = GENERATORS[name]().strip()
        return match.group(1) + cache[name] + "\n" + match.group(4)

    return MARKER.sub(replace, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new = regenerate(text, str(path.relative_to(REPO)))
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    if args.check:
        for path in stale:
            print(f"{path}: generated tables are out of date; run python scripts/update_readme.py", file=sys.stderr)
        return 1 if stale else 0
    print(f"updated {len(stale)} file(s)" + "".join(f"\n  {p}" for p in stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
