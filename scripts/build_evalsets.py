#!/usr/bin/env python
"""A checkout's wrapper of ``alignkit build-evalsets`` (alignkit/tools/build_evalsets.py): same code, same options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from alignkit.tools.build_evalsets import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/build_evalsets.py"))
