"""Lay out an /opt/ml tree for `docker run -v TREE:/opt/ml IMAGE train` (make local-train).

    python containers/local_tree.py TREE [--data DIR] [--hp NAME=VALUE ...] [--clean]

The layout is the one `python -m imgclf.local` gives the `train` entrypoint (imgclf.local.write_tree), but the
channels are copies, not symlinks: a link to a host path means nothing inside the container. Without --data,
a small generated sample dataset is used. After training, TREE/model is what `serve` loads
(`docker run -v TREE:/opt/ml SERVE_IMAGE serve`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from imgclf import local, sample_data, splits
from imgclf.errors import DataError

MARKER = Path("input") / "config" / "hyperparameters.json"


def make_tree(tree: Path, data: Path | None, hps: dict[str, str], clean: bool = False) -> Path:
    if tree.exists() and any(tree.iterdir()):
        if not clean:
            raise SystemExit(f"{tree} is not empty: pass --clean to replace it, or choose another folder")
        if not (tree / MARKER).is_file():  # never delete a folder this script did not make
            raise SystemExit(f"{tree} is not empty and holds no {MARKER}: not an /opt/ml tree, not deleting it")
        try:
            shutil.rmtree(tree)
        except PermissionError as e:  # what a container wrote belongs to root
            raise SystemExit(f"cannot remove {e.filename}: files the container wrote belong to root; "
                             f"run `sudo rm -rf {tree}` once") from None
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = sample_data.generate(Path(tmp) / "sample", classes=5)
        try:
            channels = splits.split_channels(data)
        except DataError as e:
            raise SystemExit(str(e)) from None
        local.write_tree(tree, hps, channels)
        for name, source in channels.items():
            link = tree / "input" / "data" / name
            link.unlink()
            shutil.copytree(source, link)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="the folder to mount as /opt/ml")
    parser.add_argument("--data", type=Path, help="ImageFolder with train/, valid/ (and test/) (default: sample data)")
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter (repeat)")
    parser.add_argument("--clean", action="store_true", help="replace an existing tree made by this script")
    args = parser.parse_args(argv)
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder")
    tree = make_tree(args.tree, args.data, local.parse_hp(args.hp), args.clean)
    channels = sorted(p.name for p in (tree / "input" / "data").iterdir())
    print(f"/opt/ml tree ready: {tree} (channels: {', '.join(channels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
