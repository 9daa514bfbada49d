"""Evaluation: the evaluation tasks and the held-out, paired and per-task comparisons."""
