"""The analysis layer: comparing finished runs (plots, summaries), sweeps, flatness, loss landscapes and
benchmarks. It reads what the run layer writes (``dualadam_hf.train.records``); nothing imports it back.
"""
