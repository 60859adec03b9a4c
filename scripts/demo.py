#!/usr/bin/env python3
"""`python scripts/demo.py` = `imgclf-demo` (imgclf.cli.demo), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.demo import main  # noqa: E402

sys.exit(main())
