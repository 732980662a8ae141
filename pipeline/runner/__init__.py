"""The stage runner: `vitpipe run JOB.yaml` (datasets, preprocess, pretrain, finetune, report, cached by
stage), and `vitpipe submit` / `vitpipe jobs` for running it on a Ray cluster through the Jobs API."""
