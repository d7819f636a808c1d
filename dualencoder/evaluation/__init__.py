"""Evaluation: embedding a retrieval split, the evaluate command, plots and qualitative reports."""
