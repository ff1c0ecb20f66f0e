"""The run layer: recipes, the two training apps (fine-tuning, vision), their data, run records.

It builds on ``optim``, ``hf`` and ``models`` and never imports ``analysis``: a training process loads
no plotting code.
"""
