"""Native support for models whose published checkpoints cannot be loaded as they ship.

``openpangu`` makes transformers' Auto classes load openPangu-Embedded as a Llama with attention bias;
``openpangu_fixture`` writes a tiny checkpoint in its published on-disk format for offline tests.
"""
