"""A ViLBERT-style co-attention cross-encoder that re-ranks a dual encoder's top-k (issue 29).

The dual encoder retrieves with one dot product per pair; this small model reads both towers' token
outputs for a candidate pair and scores whether they match (binary image-text matching), so it can
re-order the dual encoder's top-k in each direction at a cost of k pair scores per query.

`model.py` (the cross-encoder and its config, saved in the export's `reranker/` folder), `features.py`
(the frozen towers' token outputs of a split, cached once), `mining.py` (hard negatives from the dual
encoder's scores), `rerank.py` (re-ranking the top-k and its metrics), `train.py` (the command).
"""
