#!/usr/bin/env python3
"""`python scripts/deploy.py` = `imgclf-deploy` (imgclf.cli.deploy), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.deploy import main  # noqa: E402

sys.exit(main())
