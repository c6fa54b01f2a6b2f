"""The bottom layer: rank helpers, config discovery, content fingerprints and the run-status contract.

Imports nothing else from alignkit, so every other package may use it (the layer order is written once, in
``tests/test_layers.py``).
"""
