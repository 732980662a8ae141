"""Pretraining: DeepSpeed ZeRO workers under Ray Train, their data, checkpoints, metrics and export."""
