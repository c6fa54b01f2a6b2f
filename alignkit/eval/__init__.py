"""Evaluation: encode eval sets (sharded across ranks), record and report metrics, the eval entry."""
