"""Datasets vitpipe writes as standard WebDataset shards: digits, synthetic fractals, image folders."""
