"""Reproductions of the anchor papers: the offline replication table and the paper-scale recipes."""
