"""Measuring SAEs: reconstruction, sparsity and ground-truth metrics (`metrics`), the evaluation
of an SAE on activations or a language model (`evaluate`), and the variant comparison behind
`minisae compare` (`compare`, with its report and plot in `report`).
"""
