#!/usr/bin/env python3
"""`python scripts/tune.py` = `imgclf-tune` (imgclf.cli.tune), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.tune import main  # noqa: E402

sys.exit(main())
