"""Measuring SAEs: reconstruction, sparsity and ground-truth metrics (`metrics`), the evaluation
of an SAE on activations or a language model (`evaluate`), and the variant comparison behind
`minisae compare` (`compare`, its fair-recipe rules in `tuning`, its report in `report`, its plot in `plot`).
"""
