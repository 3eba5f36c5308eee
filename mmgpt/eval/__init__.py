"""Evaluation: caption, VQA and text metrics, and generation-scored evaluation of a dataset."""
