"""WebDataset shards to patch-tensor Parquet shards on Ray: `vitpipe preprocess` and `vitpipe inspect`."""
