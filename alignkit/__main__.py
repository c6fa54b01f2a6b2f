"""``python -m alignkit COMMAND ...``: the same as the ``alignkit`` console script."""

import sys

from alignkit.cli import main

sys.exit(main())
