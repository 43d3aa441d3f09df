"""Files in and out: atomic writes, checkpoints, corpora, models, run folders, result tables and tracking."""
