"""LightningModules: the shared base, CLIP-Refine (open_clip student + teacher) and STRUCTURE (heads on frozen towers)."""
