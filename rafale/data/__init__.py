"""Data: the pipelines (causal_lm.py, mlm.py, classification.py: one module each, on the protocol and
registry in pipeline.py), the disk cache they share (cache.py), text-to-ids helpers (tokenize.py),
chat templates with loss masks (chat.py), and the torch DataLoaders (loaders.py).

Nothing is imported here, so preparing data never pays for importing torch.
"""
