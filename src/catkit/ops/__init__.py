"""Pure functions on tensors, one folder per op family; each has a ``naive.py`` ground truth."""
