"""Finding and checking the ImageFolder splits (train/valid/test): pathlib and PIL, no torch, so that the local
CLI, the upload script and the demo check data without loading torch."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError
from imgclf.preprocessing import load_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "valid", "test")
# Other names users give the validation split.
SPLIT_ALIASES = {"valid": ("valid", "validation", "val")}
MAX_LISTED = 10  # problems listed per kind in an error message


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, at any depth (linked folders too, each real folder once), sorted."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or a folder linked twice
            dirs.clear()
            continue
        seen.add(real)
        found += [path for name in files if is_image_file(path := Path(root) / name) and path.is_file()]
    return sorted(found)


@dataclass
class Split:
    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]


def scan_split(name: str, root: Path) -> tuple[Split, list[str]]:
    """List classes (sub-folders, sorted) and images; return the split and the problems found."""
    problems = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        problems.append(f"{name} split {root}: no class folders (expected {root}/<class>/<image files>)")
    samples: list[tuple[Path, int]] = []
    for index, class_dir in enumerate(class_dirs):
        files = image_files(class_dir)
        if not files:
            problems.append(f"empty class folder {class_dir} (no {'/'.join(IMAGE_EXTENSIONS[:3])}... files)")
        samples.extend((f, index) for f in files)
    if class_dirs and not samples:
        problems.append(f"{name} split {root}: no images")
    if len(class_dirs) == 1 and name == "valid":  # valid holds every class (a train shard of one host may not)
        problems.append(f"{name} split {root}: one class folder ({class_dirs[0].name}); a classifier needs at least "
                        "two, one folder per class")
    return Split(name, root, [p.name for p in class_dirs], samples), problems


def _check_decodes(path: Path) -> str | None:
    try:
        load_rgb(path, draft_size=32)  # reduced-scale decode still reads every byte: truncation shows
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{path}: cannot decode ({type(e).__name__}: {e})"


def _listing(kind: str, items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {kind}: " + "; ".join(items[:MAX_LISTED]) + more


def find_split_dirs(channels: dict[str, str]) -> dict[str, Path]:
    """Map split name -> folder from SageMaker channels: train/valid/test, or one `training` channel with them."""
    roots = [Path(channels[c]) for c in ("training",) if c in channels]
    found: dict[str, Path] = {}
    for split in SPLITS:
        for alias in SPLIT_ALIASES.get(split, (split,)):
            if alias in channels:
                found[split] = Path(channels[alias])
                break
            for root in roots:
                if (root / alias).is_dir():
                    found[split] = root / alias
                    break
            if split in found:
                break
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        raise DataError(
            f"missing data split(s) {', '.join(missing)}: give channels train, valid (and optionally test), "
            f"or one channel 'training' holding train/, valid/ and test/ folders; got channels "
            f"{', '.join(f'{k}={v}' for k, v in sorted(channels.items())) or 'none'}"
        )
    return found


def validate_splits(split_dirs: dict[str, Path], check_decode: bool = True, workers: int = 8) -> dict[str, Split]:
    """Scan and check every split before training; raise one DataError that lists every problem by path."""
    problems: list[str] = []
    splits = {}
    for name, root in split_dirs.items():
        if not root.is_dir():
            problems.append(f"{name} split {root}: not a folder")
            continue
        split, found = scan_split(name, root)
        splits[name] = split
        problems.extend(found)
    if "train" in splits:
        reference = set(splits["train"].classes)
        for name, split in splits.items():
            if name == "train" or not split.classes:
                continue
            extra, absent = set(split.classes) - reference, reference - set(split.classes)
            if extra or absent:
                problems.append(
                    f"class folders differ between train ({splits['train'].root}) and {name} ({split.root}): "
                    + (f"only in {name}: {', '.join(sorted(extra)[:MAX_LISTED])}; " if extra else "")
                    + (f"missing from {name}: {', '.join(sorted(absent)[:MAX_LISTED])}" if absent else "")
                    + ". Every split needs the same class folders."
                )
    if check_decode:  # with the other problems: every one is reported at once
        paths = [p for s in splits.values() for p, _ in s.samples]
        pool = ThreadPoolExecutor(max_workers=workers)  # PIL decodes without the GIL
        try:
            bad = [msg for msg in pool.map(_check_decodes, paths) if msg]
        finally:  # a stop signal (an exception here) must not wait for the rest of the files
            pool.shutdown(cancel_futures=True)
        if bad:
            problems.append(_listing("files that do not decode (delete or replace them)", bad))
    if problems:
        raise DataError(f"dataset is not usable: {len(problems)} problem(s): " + " | ".join(problems))
    for split in splits.values():
        log.info("%s: %d images in %d classes (%s)", split.name, len(split.samples), len(split.classes), split.root)
    return splits


def split_channels(data_dir: Path) -> dict[str, Path]:
    """A dataset folder's train/valid/test sub-folders as channels, found by the training code's own lookup
    (aliases too); a folder without them is a DataError that shows the layout."""
    try:
        return find_split_dirs({"training": str(data_dir)})
    except DataError:
        raise DataError(f"--data {data_dir}: expected sub-folders train/ and valid/ (and test/), each with one "
                        "folder per class, e.g. train/001.Affenpinscher/*.jpg") from None
