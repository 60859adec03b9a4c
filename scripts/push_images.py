#!/usr/bin/env python3
"""`python scripts/push_images.py` = `imgclf-push-images` (imgclf.cli.push_images), from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from imgclf.cli.push_images import main  # noqa: E402

sys.exit(main())
