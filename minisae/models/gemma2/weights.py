"""Find a Gemma 2 checkpoint, check every tensor name and shape against its config, read the weights.

A checkpoint is a folder with `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`), as written by
transformers' `save_pretrained` and stored on the Hub. Tensor names (those of transformers'
modeling_gemma2.py):

    model.embed_tokens.weight                          (V, D)
    model.layers.N.input_layernorm.weight              (D,)      and likewise
    model.layers.N.post_attention_layernorm.weight     (D,)      pre_feedforward_layernorm,
    model.layers.N.self_attn.q_proj.weight             (H*d, D)  post_feedforward_layernorm
    model.layers.N.self_attn.k_proj.weight             (K*d, D)
    model.layers.N.self_attn.v_proj.weight             (K*d, D)
    model.layers.N.self_attn.o_proj.weight             (D, H*d)
    model.layers.N.mlp.gate_proj.weight                (I, D)
    model.layers.N.mlp.up_proj.weight                  (I, D)
    model.layers.N.mlp.down_proj.weight                (D, I)
    model.norm.weight                                  (D,)
    lm_head.weight                                     (V, D)    absent: tied to embed_tokens

Linear weights are stored `[out, in]` (torch.nn.Linear), so a projection is `x @ W.T`; the model
uses the transposed view directly (BLAS reads it as is), never a transposed copy.

Memory: float32 tensors stay memory-mapped (the OS page cache holds them; no copy is made), so
Gemma 2 2B (10.5 GB in float32) loads in seconds and runs in 24 GiB. BF16 / F16 tensors are
converted one at a time to float32 (exact). With xp=cupy each tensor is copied to the device once.
"""

import pathlib

import numpy

from minisae.errors import FileFormatError
from minisae.io.files import read_json
from minisae.xp import asarray

from .config import Gemma2Config

# the files a Hub download needs (minisae.io.hub.resolve_dir allow_patterns)
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtypes read as weights (all converted exactly to the compute dtype)
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
COMPUTE_DTYPES = ("float32", "float64")
_MAX_LISTED = 8  # problems listed in one error message


class CheckpointError(FileFormatError):
    """A checkpoint folder that is missing files or whose tensors do not match config.json."""


def expected_shapes(config: Gemma2Config):
    """Every tensor name the config implies, with its shape (lm_head.weight only when untied)."""
    D, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Hd = config.num_attention_heads * config.head_dim
    Kd = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, D)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (Hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (Kd, D)
        shapes[p + "self_attn.v_proj.weight"] = (Kd, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, Hd)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "pre_feedforward_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (I, D)
        shapes[p + "mlp.up_proj.weight"] = (I, D)
        shapes[p + "mlp.down_proj.weight"] = (D, I)
        shapes[p + "post_feedforward_layernorm.weight"] = (D,)
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def check_shapes(found, config: Gemma2Config, source="weights", *, expected=None):
    """Compare {name: shape} with what `config` implies; raise CheckpointError listing problems.

    `expected` defaults to expected_shapes(config) (Gemma 3 passes its own, with QK-norm weights).
    Returns the set of names to ignore (a tied checkpoint's redundant lm_head.weight).
    """
    expected = expected_shapes(config) if expected is None else expected
    problems, ignored = [], set()
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name} (expected shape {shape})")
        elif tuple(found[name]) != shape:
            problems.append(f"{name}: expected shape {shape}, found {tuple(found[name])}")
    for name in found:
        if name in expected:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            # a tied checkpoint may still carry the (identical) output matrix: accept and ignore it
            want = expected["model.embed_tokens.weight"]
            if tuple(found[name]) != want:
                problems.append(f"{name}: expected shape {want} (tied to embed_tokens), "
                                f"found {tuple(found[name])}")
            ignored.add(name)
        else:
            problems.append(f"unexpected tensor {name} with shape {tuple(found[name])} "
                            f"(config: {config.num_hidden_layers} layers)")
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointError(f"{source}: tensors do not match config.json: {listed}")
    return ignored


def checkpoint_dir(path_or_repo_id, *, revision=None):
    """A local folder as given, otherwise a Hub repo id downloaded (or found in the HF cache)."""
    path = pathlib.Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (config.json + *.safetensors), "
                              "found a file")
    from minisae.io import hub  # only needed for repo ids

    return pathlib.Path(hub.resolve_dir(str(path_or_repo_id), revision=revision,
                                        allow_patterns=HUB_PATTERNS))


def weight_files(folder):
    """{tensor name: safetensors path} from the index's weight_map, or None for a single file."""
    folder = pathlib.Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f and pathlib.PurePath(f).name == f for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a 'weight_map' object mapping tensor names to file names "
                                  f"in the folder, found {weight_map!r:.120}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) not in the folder: {', '.join(missing)}")
        return {name: folder / f for name, f in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        return None
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: expected {SINGLE_FILE} or {INDEX_FILE}, found {present}")


def open_checkpoint(folder):
    """Open the safetensors file(s) (headers only); return {name: (SafetensorsFile, TensorInfo)}."""
    from minisae.io.safetensors_io import SafetensorsFile

    folder = pathlib.Path(folder)
    mapping = weight_files(folder)
    paths = [folder / SINGLE_FILE] if mapping is None else sorted(set(mapping.values()))
    tensors = {}
    for path in paths:
        f = SafetensorsFile(path)
        for name, info in f.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{name}: found in both {tensors[name][0].path} and {path}")
            if mapping is not None and mapping.get(name) != path:
                raise CheckpointError(f"{name}: in {path.name} but {INDEX_FILE} places it in "
                                      f"{mapping[name].name if name in mapping else 'no file'}")
            tensors[name] = (f, info)
    if mapping is not None:
        absent = [n for n in mapping if n not in tensors]
        if absent:
            raise CheckpointError(f"{absent[0]}: listed in {INDEX_FILE} for {mapping[absent[0]].name} "
                                  f"but not in that file ({len(absent)} such tensors)")
    return tensors


def load_weights(folder, config: Gemma2Config, *, xp=numpy, dtype="float32", expected=None, rename=None):
    """Check the checkpoint in `folder` against `config` and read it: {name: xp array of dtype}.

    float32 tensors read with dtype="float32" on NumPy are memory-mapped views (no copy).
    `expected` as in check_shapes; `rename(name)` maps a stored tensor name to the name checked
    and returned, or None to skip the tensor unread (Gemma 3's multimodal files: see gemma3.weights).
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected one of {COMPUTE_DTYPES}, found {dtype!r}")
    stored = open_checkpoint(folder)
    names = {}  # checked name -> stored name
    for n in stored:
        new = n if rename is None else rename(n)
        if new in names:
            raise CheckpointError(f"{folder}: tensors {names[new]} and {n} both hold {new}")
        if new is not None:
            names[new] = n
    tensors = {new: stored[old] for new, old in names.items()}
    ignored = check_shapes({n: info.shape for n, (_, info) in tensors.items()}, config,
                           source=str(folder), expected=expected)
    weights = {}
    for name, (f, info) in tensors.items():
        if name in ignored:
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{name}: expected a float dtype {FLOAT_DTYPES}, found {info.dtype} "
                                  f"in {f.path}")
        host = f.get(names[name])  # F32: memory-mapped view; BF16 / F16: exact float32 copy
        weights[name] = asarray(host, xp, dtype)  # a no-op for float32 on NumPy
    return weights
