"""Scoring checkpoints with lm-eval: the job pool that eval.sh and the default run share."""
