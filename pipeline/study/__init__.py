"""The study stage: transfer as a function of pretraining data size, one point per (size, model, seed)."""
