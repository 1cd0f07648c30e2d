"""Activation sources: synthetic data with known features, and cached model activations."""
