"""Data: the causal-LM pipeline (pipelines.py), the masked-LM (mlm.py) and classification
(classification.py) pipelines, the disk cache they share (cache.py), torch loaders (loaders.py), the
encoder pipelines' batch collators (collators.py: MLM masking, padding), and chat templates with
loss masks for supervised fine-tuning (chat.py).

Nothing is imported here, so preparing data (cache.py) never pays for importing torch.
"""
