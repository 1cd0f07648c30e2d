"""Measuring SAEs: reconstruction, sparsity and ground-truth metrics (`metrics`), and the
evaluation of an SAE on activations or a language model (`evaluate`). The variant comparison
behind `minisae compare` that reads these is minisae.experiment.
"""
