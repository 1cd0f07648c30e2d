"""minisae.models.gemma3 config layouts, checkpoint layouts and errors; load_model; site names.

Parity with transformers is tests/test_gemma3_parity.py; this file needs no goldens.
"""

import json
import shutil

import numpy
import pytest

from minisae.models import load_model
from minisae.models.gemma2 import Gemma2Model
from minisae.models.gemma3 import CheckpointError, ConfigError, Gemma3Config
from minisae.models.gemma3.weights import text_name
from minisae.sites import hf_name, parse_site, saelens_name
from test_gemma3_parity import DATA, golden

GEMMA3_270M = {  # google/gemma-3-270m config.json (2025, transformers 4.55), abridged to what minisae reads
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "_sliding_window_pattern": 6, "torch_dtype": "bfloat16", "hidden_activation": "gelu_pytorch_tanh",
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
}
GEMMA3_4B = {  # google/gemma-3-4b-pt: only what differs from Gemma3TextConfig's defaults is spelled out
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16",
    "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}


def test_released_270m_and_4b_configs():
    c = Gemma3Config.from_dict(GEMMA3_270M)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert c.rope(0) == (10000.0, 1.0) and c.rope(5) == (1e6, 1.0) and not c.multimodal
    c = Gemma3Config.from_dict(GEMMA3_4B)
    assert c.multimodal and (c.hidden_size, c.num_hidden_layers, c.sliding_window) == (2560, 34, 1024)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 4, 256, 262208)
    assert c.rope(5) == (1e6, 8.0) and c.rope(4) == (1e4, 1.0)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]


def test_layouts_agree():
    old = dict(GEMMA3_270M)
    del old["layer_types"], old["_sliding_window_pattern"]
    old["sliding_window_pattern"] = 6
    new = dict(GEMMA3_270M, layer_types=GEMMA3_270M["layer_types"], dtype="bfloat16", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling", "torch_dtype"):
        del new[k]
    a, b = Gemma3Config.from_dict(old), Gemma3Config.from_dict(new)
    assert a == b == Gemma3Config.from_dict(a.to_dict())
    scaled = Gemma3Config.from_dict(GEMMA3_4B)
    assert Gemma3Config.from_dict(scaled.to_dict()) == dataclasses_replace(scaled, multimodal=False)


def dataclasses_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


@pytest.mark.parametrize("change, needle", [
    (dict(model_type="gemma2"), "model_type: expected 'gemma3_text' or 'gemma3'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type: expected one of"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "factor: expected a positive number"),
    (dict(rope_local_base_freq="big"), "rope_local_base_freq: rope_theta: expected a positive number"),
    (dict(sliding_window_pattern=0, layer_types=None), "sliding_window_pattern: expected a positive integer"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=None), "hidden_size: expected a positive integer"),
    (dict(num_hidden_layers=10**9), "num_hidden_layers: expected a positive integer <="),
])
def test_config_errors_name_the_key(change, needle):
    with pytest.raises(ConfigError, match=needle):
        Gemma3Config.from_dict(dict(GEMMA3_270M, **change))


def test_multimodal_config_errors():
    with pytest.raises(ConfigError, match="needs a 'text_config' object"):
        Gemma3Config.from_dict({"model_type": "gemma3"})
    with pytest.raises(ConfigError, match="text_config: missing required key 'num_hidden_layers'"):
        Gemma3Config.from_dict({"model_type": "gemma3", "text_config": {"hidden_size": 8, "intermediate_size": 8}})


def test_softcaps_follow_transformers():
    """transformers never applies attn_logit_softcapping to Gemma 3, nor a final cap to the multimodal class."""
    c = Gemma3Config.from_dict(dict(GEMMA3_270M, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping == 30.0
    text = dict(GEMMA3_4B["text_config"], final_logit_softcapping=30.0)
    assert Gemma3Config.from_dict(dict(GEMMA3_4B, text_config=text)).final_logit_softcapping is None


def test_load_model_picks_the_generation(tmp_path):
    assert type(load_model(DATA.parent / "gemma2" / "tiny_f32")) is Gemma2Model
    assert type(load_model(DATA / "tiny_f32")).__name__ == "Gemma3Model"
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type: expected one of .*found 'llama'"):
        load_model(bad)
    (bad / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(bad)


def test_multimodal_prefixes():
    assert text_name("language_model.model.layers.3.self_attn.q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert text_name("model.language_model.norm.weight") == "model.norm.weight"
    assert text_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias") is None
    assert text_name("model.multi_modal_projector.mm_input_projection_weight") is None


def test_transformers_452_prefix_loads_alike(tmp_path):
    """A multimodal checkpoint saved with model.language_model. names reads like the Hub's layout."""
    from minisae.io.safetensors_io import SafetensorsFile, save_file

    src = DATA / "tiny_4b_mm"
    with SafetensorsFile(src / "model.safetensors") as f:
        tensors = {n.replace("language_model.model.", "model.language_model.")
                   .replace("vision_tower.", "model.vision_tower."): numpy.array(f.get(n)) for n in f.keys()}
    dst = tmp_path / "mm"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, dst / "model.safetensors")
    g = golden("tiny_4b_mm")
    numpy.testing.assert_array_equal(load_model(dst).forward(g["ids"]), load_model(src).forward(g["ids"]))
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(src / "config.json", both / "config.json")
    tensors["language_model.model.norm.weight"] = tensors["model.language_model.norm.weight"]
    save_file(tensors, both / "model.safetensors")
    with pytest.raises(CheckpointError, match="both hold model.norm.weight"):
        load_model(both)


def test_missing_qk_norm_is_named(tmp_path):
    from minisae.io.safetensors_io import SafetensorsFile, save_file

    src = DATA / "tiny_f32"
    with SafetensorsFile(src / "model.safetensors") as f:
        tensors = {n: numpy.array(f.get(n)) for n in f.keys() if n != "model.layers.2.self_attn.k_norm.weight"}
    dst = tmp_path / "t"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.2.self_attn.k_norm.weight \(expected shape \(6,\)\)"):
        load_model(dst)


def test_site_names():
    assert parse_site("model.layers.7.output") == (7, "hook_resid_post")
    assert parse_site("model.layers.7.self_attn.o_proj.input") == (7, "attn.hook_z")
    assert parse_site("model.layers.7.pre_feedforward_layernorm.output") == (7, "hook_mlp_in")
    assert parse_site("model.language_model.layers.7.post_feedforward_layernorm.output") == (7, "hook_mlp_out")
    assert saelens_name("model.layers.2.output") == "blocks.2.hook_resid_post"
    assert hf_name("blocks.2.hook_mlp_in") == "model.layers.2.pre_feedforward_layernorm.output"
    for bad in ("model.layers.2.mlp.output", "layers.2.output", "blocks.2.hook_mlp", None):
        with pytest.raises(ValueError, match="expected 'blocks.<layer>.<kind>'"):
            parse_site(bad)


def test_same_site_in_both_spellings():
    m = load_model(DATA / "tiny_f32")
    ids = golden("tiny_f32")["ids"]
    acts = m.capture(ids, ["blocks.3.hook_mlp_in", "model.layers.3.pre_feedforward_layernorm.output"])
    assert len(acts) == 2
    numpy.testing.assert_array_equal(acts["blocks.3.hook_mlp_in"], acts["model.layers.3.pre_feedforward_layernorm.output"])
    with pytest.raises(ValueError, match="name the same site"):
        m.forward(ids, splice={"blocks.3.hook_mlp_in": abs, "model.layers.3.pre_feedforward_layernorm.output": abs})
