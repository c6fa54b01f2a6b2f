"""Frozen-encoder feature pipeline: cache, layer selection, training-free CCA baseline."""
