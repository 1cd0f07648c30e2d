"""Language models whose activations SAEs are trained on (Gemma 2). Never imports the pipeline."""
