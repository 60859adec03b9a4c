"""Print pip's package-index settings as uv arguments, one per line (make install).

uv installs the development environment several times faster than pip, but it does not read pip's
configuration (pip.conf, PIP_* variables). On a machine whose pip is pointed at a mirror or a local index,
this keeps uv on the same sources. With no such settings it prints nothing and uv uses PyPI, as pip would.

    .venv/bin/python scripts/pip_index_args.py    # run by the venv's Python, so `pip config` is its pip
"""

import argparse
import re
import subprocess
import sys

# pip's option -> uv's option; the other settings (timeouts, constraint files) do not choose where files come from.
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
# `pip config list` lines: `global.extra-index-url='a b'`, `install.find-links='...'`, `:env:.find-links='...'`.
LINE = re.compile(r"^[^.]*\.(?P<key>[a-z-]+)='(?P<value>.*)'$")


def uv_args(config_list: str) -> list[str]:
    pairs: dict[tuple[str, str], None] = {}  # in order, once each (pip.conf and PIP_* may say the same)
    for line in config_list.splitlines():
        match = LINE.match(line.strip())
        if match and match["key"] in OPTIONS:
            pairs.update({(OPTIONS[match["key"]], value): None for value in match["value"].split()})
    args = [arg for pair in pairs for arg in pair]
    if args:  # pip takes each file from the best index; uv's default takes a name from the first index having it
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    if listed.returncode != 0:
        print(f"error: pip config list failed: {listed.stderr.strip()}", file=sys.stderr)
        return 1
    print("\n".join(uv_args(listed.stdout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
