#!/usr/bin/env python
"""Regenerate README's hyperparameter and metric tables from imgclf.config (run after changing the schema)."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

from imgclf.config import markdown_tables  # noqa: E402

readme = REPO / "README.md"
text = re.sub(r"(<!-- hyperparameters:start -->\n).*?(<!-- hyperparameters:end -->)",
              lambda m: m.group(1) + markdown_tables() + "\n" + m.group(2), readme.read_text(), flags=re.S)
readme.write_text(text)
print(f"updated {readme}")
