"""The pieces of the training loop in run_contrastive.py: options, optimiser, checkpoints, cache, card."""
