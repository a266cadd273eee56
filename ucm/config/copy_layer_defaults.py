"""The served model's measured copying layers as the representation default of ESA and GSA.

A per-model JSON may name the layers that copy from the context (`copy_layers`, measured by
`ucm configure` with `ucm.copy_layers`). Where ESA's or GSA's config leaves its representation
keys (`blk_repre_inner_token_merge`, `layer_repre_inner_token_merge`) unset and the served model
has such a JSON, the engine runs what that measurement is for: whole-block representations,
groups of 2 tokens in the copying layers (`ucm.methods.copy_layer_keys`; docs/accuracy.md: the
accuracy of groups of 4 everywhere or better on Qwen2.5-Coder at ratios 0.3 and 0.1, and the
speed of whole blocks). Everywhere else the config's own default runs (groups of 4 tokens in
every layer). Keys the user sets always win; the engine logs which of these it runs
(`CopyLayerDefault.note`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ucm.config.errors import ConfigError
from ucm.config.loader import find_model_config, load_model_config
from ucm.config.sparse import MeanReprConfig, MethodConfig
from ucm.methods import COPY_GROUP_TOKENS, copy_layer_keys, spec_of

#: the keys that decide a block's representations (those `copy_layer_keys` sets): set by the user,
#: the model's layers stay out
REPRESENTATION_KEYS = frozenset(copy_layer_keys(()))


@dataclass(frozen=True)
class CopyLayerDefault:
    """The config a method runs with and the engine's one line on its representations ("" for a
    method without per-layer groups)."""

    config: MethodConfig
    note: str = ""


def _groups(config: MeanReprConfig) -> str:
    merge = config.blk_repre_inner_token_merge
    return "one per block" if merge is None else f"groups of {merge} tokens"


def with_model_copy_layers(
    config: MethodConfig, model_name: str | None, num_layers: int, block_size: int
) -> CopyLayerDefault:
    """`config` with the served model's measured copying layers where its representation keys are
    unset (see the module docstring); the model's JSON is found by name as GSA on device finds its
    own (`find_model_config`: a HF id or a model folder, by its last path component)."""
    if not spec_of(config).takes_copy_layers:
        return CopyLayerDefault(config)
    layout = _groups(config)
    if REPRESENTATION_KEYS & config.model_fields_set:
        return CopyLayerDefault(
            config,
            f"{config.method} representations as configured: {layout} "
            f"(per layer: {dict(config.layer_repre_inner_token_merge) or 'none'})",
        )
    default = f"{config.method} representations: {layout} in every layer"
    try:
        path = find_model_config(str(model_name or "").rstrip("/"))
    except ConfigError:
        return CopyLayerDefault(
            config,
            f"{default} (no per-model config for {model_name or 'this model'}: `ucm configure` measures its "
            "copying layers)",
        )
    model = load_model_config(path).config
    if not model.copy_layers:
        return CopyLayerDefault(config, f"{default} ({path.name} has no measured copying layers)")
    if model.num_hidden_layers != num_layers or block_size % COPY_GROUP_TOKENS:
        return CopyLayerDefault(
            config,
            f"{default} ({path.name} measured {model.num_hidden_layers} layers and needs blocks of an even size; "
            f"the served model has {num_layers} layers and blocks of {block_size}: its copying layers are not used)",
        )
    layers = sorted(set(model.copy_layers) - set(config.dense_layers))  # a dense layer reads every block
    if not layers:
        return CopyLayerDefault(config, f"{default} ({path.name}'s copying layers are all dense here)")
    keys = copy_layer_keys(layers)
    applied = type(config).model_validate({**config.model_dump(exclude_unset=True), **keys})
    return CopyLayerDefault(
        applied,
        f"{config.method} representations: one per block, groups of {COPY_GROUP_TOKENS} tokens in the copying "
        f"layers {layers} measured in {path.name} (set blk_repre_inner_token_merge to choose otherwise)",
    )
