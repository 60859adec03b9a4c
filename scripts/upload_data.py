#!/usr/bin/env python3
"""`python scripts/upload_data.py` = `imgclf-upload-data` (imgclf.cli.upload_data), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.upload_data import main  # noqa: E402

sys.exit(main())
