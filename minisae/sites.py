"""Site names: where in a Gemma 2 / Gemma 3 block an SAE or transcoder reads (or writes) activations.

Two naming schemes are in use, and both are accepted everywhere a site is asked for:

    SAELens / TransformerLens name    Hugging Face hook name (Gemma Scope 2 config.json)   what it is
    blocks.L.hook_resid_post          model.layers.L.output                                the block's output
    blocks.L.attn.hook_z              model.layers.L.self_attn.o_proj.input                attention heads, before o_proj (H*d wide)
    blocks.L.hook_mlp_in              model.layers.L.pre_feedforward_layernorm.output      the MLP's input, after its norm
    blocks.L.hook_mlp_out             model.layers.L.post_feedforward_layernorm.output     the MLP's output, after its norm

Gemma Scope 2 transcoders read `pre_feedforward_layernorm.output` and predict
`post_feedforward_layernorm.output`; SAELens calls these `hook_mlp_in` and `hook_mlp_out`. (In
TransformerLens proper, hook_mlp_in is the residual stream *before* the norm; minisae follows
SAELens's Gemma Scope 2 loader, which maps it to the normed MLP input.) The multimodal Gemma 3
checkpoints (4B and larger) put the language model under `model.language_model.`, so
`model.language_model.layers.L.output` etc. are accepted too.

`parse_site` turns either spelling into (layer, kind) with kind one of SITE_KINDS; models key
their captures and splices by that pair, so the same site given in both spellings is one site.
"""

import re

from minisae.errors import InputError

SITE_KINDS = ("hook_resid_post", "attn.hook_z", "hook_mlp_in", "hook_mlp_out")
# Hugging Face module hook -> SAELens kind
HF_HOOKS = {
    "output": "hook_resid_post",
    "self_attn.o_proj.input": "attn.hook_z",
    "pre_feedforward_layernorm.output": "hook_mlp_in",
    "post_feedforward_layernorm.output": "hook_mlp_out",
}
_SAELENS_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in SITE_KINDS) + r")$")
_HF_RE = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(" + "|".join(re.escape(k) for k in HF_HOOKS)
                    + r")$")


def parse_site(site):
    """'blocks.L.<kind>' or 'model.layers.L.<hook>' -> (L, kind), kind one of SITE_KINDS."""
    if isinstance(site, str):
        m = _SAELENS_RE.match(site)
        if m:
            return int(m.group(1)), m.group(2)
        m = _HF_RE.match(site)
        if m:
            return int(m.group(1)), HF_HOOKS[m.group(2)]
    raise InputError(f"site {site!r}: expected 'blocks.<layer>.<kind>' with kind one of {SITE_KINDS}, "
                     f"or a Hugging Face hook 'model.layers.<layer>.<hook>' with hook one of {tuple(HF_HOOKS)}")


def saelens_name(site):
    """The SAELens spelling of a site given in either scheme: 'model.layers.3.output' -> 'blocks.3.hook_resid_post'."""
    layer, kind = parse_site(site)
    return f"blocks.{layer}.{kind}"


def hf_name(site):
    """The Hugging Face hook spelling: 'blocks.3.hook_mlp_in' -> 'model.layers.3.pre_feedforward_layernorm.output'."""
    layer, kind = parse_site(site)
    hook = next(h for h, k in HF_HOOKS.items() if k == kind)
    return f"model.layers.{layer}.{hook}"


__all__ = ["SITE_KINDS", "HF_HOOKS", "parse_site", "saelens_name", "hf_name"]
