"""Training data sources and the data module."""

from alignkit.data.datamodule import ImageTextDataModule

__all__ = ["ImageTextDataModule"]
