"""Hugging Face glue: optimizer-name registration, DualAdamTrainer, evaluation measures."""
