"""Evaluation: generation, parsing, metrics and statistics shared by train.py and evaluate.py."""
