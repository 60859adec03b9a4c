#!/usr/bin/env python3
"""`python scripts/batch_predict.py` = `imgclf-batch-predict` (imgclf.cli.batch_predict), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.batch_predict import main  # noqa: E402

sys.exit(main())
