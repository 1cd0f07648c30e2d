"""Files and the Hub: safetensors without torch, local-or-Hub resolution, SAE files (SAELens, Gemma Scope)."""
