"""The served model's measured copying layers as the defaults of the windowed methods.

A per-model JSON may name the layers that copy from the context (`copy_layers`, measured by
`ucm configure` with `ucm.copy_layers`). Where the served model has such a JSON (built in, found by
the model's name, or the method's `config_file`), the engine runs what that measurement is for,
in two parts, each only where the config leaves its keys unset:

* representations (ESA, GSA: `blk_repre_inner_token_merge`, `layer_repre_inner_token_merge`
  unset): whole-block representations, groups of 2 tokens in the copying layers
  (`ucm.methods.copy_layer_keys`; docs/accuracy.md: the accuracy of groups of 4 everywhere or
  better on Qwen2.5-Coder at ratios 0.3 and 0.1, and the speed of whole blocks); elsewhere the
  config's own default runs (groups of 4 tokens in every layer);
* budgets (a method whose `copy_layer_boost` is above 1, GSA's and KVStar's default;
  `layer_sparse_ratio` unset; no `offload`, whose device-resident blocks follow the greediest
  layer): the copying layers keep `copy_layer_boost` times `sparse_ratio`, the other sparse
  layers less, the blocks read unchanged (`ucm.methods.copy_layer_ratios`, as GSA on device's
  JSONs shape `top_k_ratio_per_layer`).

A dense layer reads every block: it takes neither. Keys the user sets always win; the engine logs
what it runs (`CopyLayerDefault.note`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ucm.config.errors import ConfigError
from ucm.config.loader import SPARSE_KEY, find_model_config, is_builtin, load_model_config
from ucm.config.measure_at_start import measured_model_config
from ucm.config.sparse import MeanReprConfig, MethodConfig
from ucm.methods import COPY_GROUP_TOKENS, copy_layer_budget_keys, copy_layer_keys, spec_of

#: the keys that decide a block's representations (those `copy_layer_keys` sets): set by the user,
#: the model's layers stay out
REPRESENTATION_KEYS = frozenset(copy_layer_keys(()))


@dataclass(frozen=True)
class CopyLayerDefault:
    """The config a method runs with and the engine's one line on its representations and budgets
    ("" for a method that takes neither)."""

    config: MethodConfig
    note: str = ""


def _groups(config: MeanReprConfig) -> str:
    merge = config.blk_repre_inner_token_merge
    return "one per block" if merge is None else f"groups of {merge} tokens"


def _takes_budgets(config: MethodConfig) -> bool:
    """The engine gives it the copying layers' budgets: a boost above 1, no per-layer ratios set, and
    no offload (there a request keeps on the device what its greediest layer reads: the copying
    layers' share would raise that from `sparse_ratio` to `copy_layer_boost` times it)."""
    return (
        getattr(config, "copy_layer_boost", 1.0) > 1
        and "layer_sparse_ratio" not in config.model_fields_set
        and not getattr(config, "offload", False)
    )


def _with_keys(config: MethodConfig, keys: dict) -> MethodConfig:
    """`config` with `keys` set as if the user had set them (validated again)."""
    return type(config).model_validate({**config.model_dump(exclude_unset=True), **keys})


def _takes_groups(config: MethodConfig) -> bool:
    """The engine gives it the copying layers' representations: ESA or GSA with none set."""
    return spec_of(config).takes_copy_groups and not REPRESENTATION_KEYS & config.model_fields_set


def reads_model_json(config: MethodConfig) -> bool:
    """Whether the method reads a per-model JSON with these keys: GSA on device always, the windowed
    methods for the copying layers' representations or budgets."""
    return spec_of(config).model_json or _takes_groups(config) or _takes_budgets(config)


def with_measured_config_file(
    config: MethodConfig, model_name: str | None, block_size: int, announce: Callable[[str], None] | None = None
) -> tuple[MethodConfig, str]:
    """`config` with `config_file` set to the served model's copying layers measured at engine start
    (`ucm.config.measure_at_start`), and the engine's line on it ("" where nothing was looked for):
    only for a method that reads a per-model JSON, with no `config_file`, `measure_at_start` on,
    and no JSON built in under the model's name. GSA on device gets the JSON with projections trained
    on the model where the calibration fits (else the copying layers alone); a windowed method whose
    measurement finds no copying layers keeps `config` as it is (the defaults are what that JSON
    would run)."""
    if config.config_file is not None or not config.measure_at_start or not reads_model_json(config):
        return config, ""
    model = str(model_name or "")
    try:
        find_model_config(model.rstrip("/"))
        return config, ""  # built in: the engine runs that
    except ConfigError:
        pass
    hashing = spec_of(config).model_json  # GSA on device: its projections trained on the model too, where that fits
    notes = []
    measured = None
    if hashing:
        measured = measured_model_config(model, block_size, announce, calibrate=True)
        if measured.path is None:
            notes.append(f"hash projections of {model_name}: not trained ({measured.note})")
            measured = None
    measured = measured or measured_model_config(model, block_size, announce)
    if measured.path is None:
        return config, "; ".join([*notes, f"copying layers of {model_name}: not measured ({measured.note})"])
    loaded = load_model_config(measured.path).config
    layers = loaded.copy_layers
    notes.append(f"copying layers of {model_name}: {layers or 'none'} ({measured.note})")
    if hashing:
        notes.append(f"hash projections: {loaded.hash_weight_type}")
    if not layers and loaded.hash_weight_type != "trained":  # the defaults: nothing would run differently
        return config, "; ".join(notes)
    return _with_keys(config, {"config_file": str(measured.path)}), "; ".join(notes)


def _measured_copy_layers(
    model_name: str | None, num_layers: int, block_size: int, groups: bool, config_file: str | None = None
) -> tuple[list, str]:
    """(the measured copying layers of the config's `config_file`, else of the served model's built-in
    JSON, and that JSON's file name), or ([], why none are used): no JSON, none measured, another
    layer count, or (for groups of 2) an odd block size. A named `config_file` that does not load
    is an error (ConfigError), as for GSA on device."""
    if config_file is not None:
        loaded = load_model_config(config_file).check_layers(num_layers)
        model, path = loaded.config, loaded.path
    else:
        try:
            path = find_model_config(str(model_name or "").rstrip("/"))
        except ConfigError:
            return [], (
                f"no per-model config for {model_name or 'this model'}: `ucm configure --copy-layers-only` "
                "measures its copying layers in seconds (name its JSON in config_file)"
            )
        model = load_model_config(path).config
    name = path.name if is_builtin(path) else str(path)
    if not model.copy_layers:
        return [], f"{name} has no measured copying layers"
    if model.num_hidden_layers != num_layers or (groups and block_size % COPY_GROUP_TOKENS):
        return [], (
            f"{name} measured {model.num_hidden_layers} layers and needs blocks of an even size; the served "
            f"model has {num_layers} layers and blocks of {block_size}: its copying layers are not used"
        )
    return list(model.copy_layers), name


def with_model_copy_layers(
    config: MethodConfig, model_name: str | None, num_layers: int, block_size: int, source: str = "inline"
) -> CopyLayerDefault:
    """`config` with the served model's measured copying layers where its keys are unset (see the
    module docstring); the model's JSON is the config's `config_file`, else found by name as GSA on
    device finds its own (`find_model_config`: a HF id or a model folder, by its last path
    component). A `config_file` this method would not read (it takes neither part) is an error
    naming `source`."""
    spec = spec_of(config)
    groups = _takes_groups(config)
    budgets = _takes_budgets(config)
    if config.config_file is not None and not reads_model_json(config):
        raise ConfigError(
            source,
            f"{SPARSE_KEY}.{config.method}.config_file",
            f"has no effect: {config.method} takes no copying layers with these keys (representations "
            "set by hand, copy_layer_boost 1, layer_sparse_ratio set, or offload): remove it",
        )
    notes = []
    if spec.takes_copy_groups and not groups:
        notes.append(
            f"{config.method} representations as configured: {_groups(config)} "
            f"(per layer: {dict(config.layer_repre_inner_token_merge) or 'none'})"
        )
    if not groups and not budgets:
        return CopyLayerDefault(config, "; ".join(notes))
    measured, source = _measured_copy_layers(model_name, num_layers, block_size, groups, config.config_file)
    layers = sorted(set(measured) - set(config.dense_layers))  # a dense layer reads every block
    if not layers:
        why = source if not measured else f"{source}'s copying layers are all dense here"
        if groups:
            notes.append(f"{config.method} representations: {_groups(config)} in every layer ({why})")
        if budgets:
            notes.append(f"{config.method} budgets: {config.sparse_ratio:g} in every sparse layer ({why})")
        return CopyLayerDefault(config, "; ".join(notes))
    keys: dict = {}
    if groups:
        keys.update(copy_layer_keys(layers))
        notes.append(
            f"{config.method} representations: one per block, groups of {COPY_GROUP_TOKENS} tokens in the copying "
            f"layers {layers} measured in {source} (set blk_repre_inner_token_merge to choose otherwise)"
        )
    if budgets:
        boost = config.copy_layer_boost
        keys.update(copy_layer_budget_keys(num_layers, config.dense_layers, layers, config.sparse_ratio, boost))
        shares = sorted(set(keys["layer_sparse_ratio"].values()), reverse=True)
        notes.append(
            f"{config.method} budgets: the copying layers {layers} measured in {source} keep {shares[0]:g}, the other "
            f"sparse layers {shares[-1]:g} (copy_layer_boost {boost:.3g}; set layer_sparse_ratio "
            "to choose otherwise)"
        )
    return CopyLayerDefault(_with_keys(config, keys), "; ".join(notes))
