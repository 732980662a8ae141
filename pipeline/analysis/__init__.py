"""The analysis stage: the paper's looks inside every ViT a run trained, one Ray task per model."""
