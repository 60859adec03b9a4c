#!/usr/bin/env python3
"""`python scripts/register_model.py` = `imgclf-register-model` (imgclf.cli.register_model), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.register_model import main  # noqa: E402

sys.exit(main())
