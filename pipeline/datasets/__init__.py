"""Datasets vitpipe writes as standard WebDataset shards: digits, MNIST, synthetic fractals, image folders."""
