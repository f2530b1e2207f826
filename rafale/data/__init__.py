"""Data: the causal-LM pipeline (pipelines.py), its disk cache (cache.py), torch loaders (loaders.py).

Nothing is imported here, so preparing data (cache.py) never pays for importing torch.
"""
