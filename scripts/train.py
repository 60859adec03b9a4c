#!/usr/bin/env python3
"""`python scripts/train.py` = `imgclf-train` (imgclf.cli.train), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.train import main  # noqa: E402

sys.exit(main())
