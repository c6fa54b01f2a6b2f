"""The data and reproduction tools behind ``alignkit make-shards``, ``alignkit build-evalsets`` and
``alignkit reproduce`` (``scripts/`` holds thin wrappers of the same ``main`` functions for a checkout)."""
