"""Running alignkit: the training entry, checkpointing, cluster/SLURM, export, loggers and rank helpers."""
