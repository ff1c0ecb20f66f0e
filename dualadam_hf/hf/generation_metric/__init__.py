"""An ``evaluate`` module: load it with ``dualadam_hf.generation_metric()`` (``evaluate.load`` of this folder)."""
