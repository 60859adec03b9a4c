"""Train a small sample run in local mode and screenshot its profiler report with headless Chromium.

    python scripts/report_screenshot.py OUT [--report FILE]   (make report-screenshot)

Writes OUT/profiler-report.png (and keeps the run in OUT/run). --report screenshots an existing report
instead of training. Needs Debian's chromium package (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

from imgclf import local, sample_data  # noqa: E402
from imgclf.ui import chromium  # noqa: E402

HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false", "image-size": "64",
       "epochs": "4", "batch-size": "16", "num-workers": "0", "collect-stats-interval": "4"}


def screenshot(report: Path, png: Path, size: str = "1280,4300") -> None:
    try:
        executable = chromium.executable()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="chromium.") as profile:
        subprocess.run([executable, *chromium.FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={png.resolve()}", report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"screenshot: {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--report", type=Path, help="an existing profiler-report.html (skips training)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.report
    if report is None:
        data = args.out / "data"
        if not data.exists():
            sample_data.generate(data, classes=5)
        code = local.train(data, args.out / "run", HPS)
        report = args.out / "run" / "reports" / "profiler-report.html"
        if code != 0 and not report.exists():
            return code
    screenshot(report, args.out / "profiler-report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
