#!/usr/bin/env python
"""A checkout's wrapper of ``alignkit make-shards`` (alignkit/tools/make_shards.py): same code, same options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from alignkit.tools.make_shards import main

if __name__ == "__main__":
    raise SystemExit(main(prog="scripts/make_shards.py"))
