"""alignkit: config-driven post-pre-training for vision-language models."""

__version__ = "0.1.0"
