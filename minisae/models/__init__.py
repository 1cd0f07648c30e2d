"""Language models whose activations SAEs are trained on (Gemma 2, Gemma 3). Never imports the pipeline.

    from minisae.models import load_model, load_tokenizer
    model = load_model("google/gemma-3-270m")     # Gemma 2 or Gemma 3, chosen by config.json's model_type
    tok = load_tokenizer("google/gemma-3-270m")
    model = load_model("gemma-3-270m-q4_k_m.gguf") # a llama.cpp GGUF file (minisae.models.gguf)
"""

import os

import numpy

# config.json model_type -> the module (minisae.models.<name>) that runs it
MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}

def model_module(path_or_repo_id, *, revision=None):
    """(module, checkpoint folder) for a checkpoint folder or Hub repo id, from its model_type."""
    import importlib

    from minisae.io.files import read_json
    from minisae.models.gemma2.config import ConfigError
    from minisae.models.gemma2.weights import checkpoint_dir

    folder = checkpoint_dir(path_or_repo_id, revision=revision)

    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a checkpoint folder needs config.json)")
    d = read_json(path, error=ConfigError)  # size and nesting limits; a JSON object
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type: expected one of {tuple(MODEL_TYPES)}, found {model_type!r}")
    return importlib.import_module(f"minisae.models.{MODEL_TYPES[model_type]}"), folder

def _gguf_file(path_or_repo_id):
    """True for a local GGUF file (named *.gguf, or a regular file starting with the GGUF magic)."""
    from minisae.io.gguf import is_gguf

    return isinstance(path_or_repo_id, (str, os.PathLike)) and is_gguf(os.path.expanduser(path_or_repo_id))

def load_model(path_or_repo_id, *, xp=numpy, revision=None, dtype="float32"):
    """A Gemma2Model or Gemma3Model, picked from config.json's model_type (gemma2, gemma3_text, gemma3),
    or from a GGUF file's general.architecture (gemma2, gemma3)."""
    if _gguf_file(path_or_repo_id):
        from minisae.models import gguf

        return gguf.load(os.path.expanduser(path_or_repo_id), xp=xp, dtype=dtype)
    module, folder = model_module(path_or_repo_id, revision=revision)
    return module.load(folder, xp=xp, dtype=dtype)

def load_tokenizer(path_or_repo_id, *, revision=None):
    """The Gemma tokenizer (tokenizer.json, BOS exactly once) of a folder, file or Hub repo, or the
    vocabulary stored in a GGUF file."""
    if _gguf_file(path_or_repo_id):
        from minisae.models import gguf

        return gguf.load_tokenizer(os.path.expanduser(path_or_repo_id))
    from minisae.models.gemma2.tokenizer import load_tokenizer as load

    return load(path_or_repo_id, revision=revision)

__all__ = ["load_model", "load_tokenizer", "model_module", "MODEL_TYPES"]
