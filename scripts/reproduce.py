#!/usr/bin/env python
"""A checkout's wrapper of ``alignkit reproduce`` (alignkit/tools/reproduce.py): same code, same options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from alignkit.tools.reproduce import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/reproduce.py"))
