"""GSA on device with `hash_score_method: "norm_cosine"`: keys hashed and measured around the
trained file's mean key, tokens scored by the norm-weighted SimHash estimate of q . k
(`ucm.ops.hash_cosine`), checked against torch computed here from the keys themselves."""

from __future__ import annotations

import math

import pytest
import torch

from ucm.config.errors import ConfigError
from ucm.config.loader import load_model_config
from ucm.ops.reference import TorchReferenceOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.gsa_on_device import build_from_model_config
from ucm.sparse.hashing import key_centers, save_trained_hash

REF = TorchReferenceOps()
LAYERS, HQ, HKV, D, BS, NB, BITS = 2, 4, 2, 32, 8, 12, 1024


def model_json(tmp_path, center: torch.Tensor | None, weights=None, **over) -> dict:
    g = torch.Generator().manual_seed(0)
    weights = weights if weights is not None else [torch.randn(D, BITS, generator=g) for _ in range(LAYERS)]
    save_trained_hash(tmp_path / "w.pt", weights, center)
    cfg = {
        "model_name": "test/tiny",
        "is_mla": False,
        "hash_weight_type": "trained",
        "hash_weight": str(tmp_path / "w.pt"),
        "hash_score_method": "norm_cosine",
        "num_hidden_layers": LAYERS,
        "gpu_seq_len_threshold": 0,
        "gpu_concurrency_threshold": 0,
        "npu_seq_len_threshold": 0,
        "npu_concurrency_threshold": 0,
        "chunk_size": BS,
        "chunk_repre_method": "max",
        "head_dim": D,
        "hash_bits": BITS,
        "top_k_ratio_per_layer": [0.25] * LAYERS,
        "top_k_index_reuse": [-1] * LAYERS,
        "must_select_blocks": [0, -1],
    }
    cfg.update(over)
    return cfg


def shapes() -> ModelShapes:
    return ModelShapes(LAYERS, HQ, HKV, D, BS, NB)


def test_codes_and_norms_are_those_of_the_centred_keys(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    center = torch.randn(LAYERS, HKV, D, generator=g) * 5
    scorer = build_from_model_config(model_json(tmp_path, center), shapes(), REF).scorer
    assert scorer.cosine and torch.equal(scorer.centers[1], center[1])
    keys = torch.randn(20, HKV, D, generator=g) + center[1]
    slots = torch.arange(3 * BS, 3 * BS + 20)
    scorer.on_kv_written(1, keys, slots)
    codes = scorer.codes[1].view(NB * BS, HKV, -1)[slots]
    projection = (keys - center[1]) @ scorer.weights[1][0]
    bits = (codes[..., None].to(torch.int32) >> torch.arange(8)) & 1
    assert torch.equal(bits.flatten(-2).bool(), projection >= 0)
    norms = scorer.norms[1].view(NB * BS, HKV)[slots].float()
    torch.testing.assert_close(norms, (keys - center[1]).norm(dim=-1), rtol=8e-3, atol=0)
    assert not scorer.norms[0].any() and not scorer.norms[1].view(NB * BS, HKV)[: 3 * BS].any()


def test_wide_codes_rank_blocks_as_the_centred_dot_product(tmp_path) -> None:
    """With 1024 bits the estimate is close to sum_h q_h . (k - mean): the block holding the one
    key aligned with the query wins, and the scores track the true best-token dot products."""
    g = torch.Generator().manual_seed(2)
    center = torch.randn(LAYERS, HKV, D, generator=g) * 3
    weights = [torch.linalg.qr(torch.randn(D, D, generator=g))[0].repeat(1, BITS // D) for _ in range(LAYERS)]
    weights = [w + 0.3 * torch.randn(D, BITS, generator=g) for w in weights]  # distinct hyperplanes
    method = build_from_model_config(model_json(tmp_path, center, weights), shapes(), REF)
    n = 6 * BS
    keys = torch.randn(n, HKV, D, generator=g) + center[0]
    q = torch.randn(1, HQ, D, generator=g)
    keys[37] = center[0] + 4 * q[0].view(HKV, HQ // HKV, D).sum(1)  # block 4's token 5 points at the query
    method.scorer.on_kv_written(0, keys, torch.arange(n))
    table = torch.arange(6)[None]
    scores = method.scorer.score(0, q, table, torch.tensor([n]), ["r"])
    best = _summed_dot(q[0], keys - center[0]).view(6, BS).amax(-1)
    assert int(scores.argmax()) == 4 == int(best.argmax())
    assert torch.corrcoef(torch.stack([scores[0], best]))[0, 1] > 0.95


def _summed_dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum over query heads h of q[h] . k[t, h // G] for every token t: [T]."""
    g = q.shape[0] // k.shape[1]
    return torch.einsum("hd,thd->t", q, k.repeat_interleave(g, dim=1))


def test_without_a_key_center_keys_are_uncentred(tmp_path) -> None:
    method = build_from_model_config(model_json(tmp_path, None), shapes(), REF)
    assert method.scorer.cosine and method.scorer.centers == [None] * LAYERS
    keys = torch.randn(4, HKV, D) + 7
    method.scorer.on_kv_written(0, keys, torch.arange(4))
    torch.testing.assert_close(method.scorer.norms[0].view(-1, HKV)[:4].float(), keys.norm(dim=-1), rtol=8e-3, atol=0)


def test_hamming_stays_the_default_and_reads_no_center(tmp_path) -> None:
    cfg = model_json(tmp_path, torch.zeros(LAYERS, HKV, D))
    del cfg["hash_score_method"]
    loaded = load_model_config(cfg)
    assert loaded.config.hash_score_method == "hamming" and key_centers(loaded) is None
    scorer = build_from_model_config(loaded, shapes(), REF).scorer
    assert not scorer.cosine and scorer.norms == []


def test_a_key_center_for_other_kv_heads_is_refused(tmp_path) -> None:
    cfg = model_json(tmp_path, torch.zeros(LAYERS, HKV + 1, D))
    with pytest.raises(ConfigError, match="hash_weight.*3 KV heads, the model 2"):
        build_from_model_config(cfg, shapes(), REF)


@pytest.mark.parametrize(
    "center,message",
    [
        (torch.zeros(LAYERS + 1, HKV, D), r"key_center of \(3, 2, 32\), expected \[2, KV heads, 32\]"),
        (torch.full((LAYERS, HKV, D), math.nan), "non-finite"),
    ],
)
def test_a_bad_key_center_is_a_config_error(tmp_path, center, message) -> None:
    with pytest.raises(ConfigError, match=message):
        key_centers(load_model_config(model_json(tmp_path, center)))


def test_norm_cosine_is_refused_for_mla() -> None:
    cfg = {
        "model_name": "test/mla",
        "is_mla": True,
        "hash_weight_type": "random",
        "hash_score_method": "norm_cosine",
        "num_hidden_layers": 1,
        "gpu_seq_len_threshold": 0,
        "gpu_concurrency_threshold": 0,
        "npu_seq_len_threshold": 0,
        "npu_concurrency_threshold": 0,
        "chunk_size": BS,
        "chunk_repre_method": "max",
        "head_dim": 48,
        "hash_bits": 64,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "hash_bits_kv_lora": 48,
        "hash_bits_qk_rope": 16,
        "top_k_ratio_per_layer": [0.3],
        "top_k_index_reuse": [-1],
        "must_select_blocks": [0],
    }
    with pytest.raises(ConfigError, match="hash_score_method.*MLA"):
        load_model_config(cfg)


def test_configs_check_refuses_a_bad_key_center(tmp_path) -> None:
    """`ucm configs check` loads a norm_cosine file's mean keys as the engine would."""
    import json
    import subprocess
    import sys

    cfg = model_json(tmp_path, torch.full((LAYERS, HKV, D), math.inf))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "ucm.cli", "configs", "check", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "hash_weight" in r.stderr and "non-finite" in r.stderr, r.stderr
