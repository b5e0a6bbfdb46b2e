"""Training: one shared loop (loop.py); each stage (dpo.py, ...) only supplies a step function."""
