"""Blocks between a paged cache and the store, on the host and (where there is one) on a CUDA
device: the copy-stream path must give the same bytes as the host path, and work queued on the
compute stream after a load must see the loaded blocks.

The CUDA cases skip here (no GPU) and run on the device machine:
    python -m pytest -q tests/test_store_staging.py
"""

from __future__ import annotations

import pytest
import torch

from ucm.integration.vllm.prefix_store import PrefixStoreWorker, SaveSpec, StoreIdentity
from ucm.store import StoreSpec, prefix_block_hashes
from ucm.store.staging import BlockStager

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)"),
    ),
]


def paged_cache(device: str, blocks: int, page: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (blocks, page), dtype=torch.uint8, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_then_scatter_round_trips(device: str) -> None:
    rows = paged_cache(device, 64, 4096 * 3, seed=1)
    stager = BlockStager(device)
    buf, ready = stager.gather(rows, [5, 17, 3, 40])
    if ready is not None:
        ready.synchronize()
    assert buf.device.type == "cpu" and torch.equal(buf, rows[[5, 17, 3, 40]].cpu())
    stager.scatter(rows, [60, 61, 0, 9], buf)
    # queued after the scatter on the compute stream: must see the new bytes with no explicit sync
    assert torch.equal(rows[[60, 61, 0, 9]].clone().cpu(), buf)
    stager.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pipeline", ["Cache", "Cache|Posix"])
def test_store_worker_dumps_and_loads_a_cache_on_its_device(device: str, pipeline: str, tmp_path) -> None:
    layers, blocks, page = 3, 32, 2 * 16 * 64 * 2  # K and V of 16 tokens x 64 dims in fp16, one head
    ident = StoreIdentity(
        model="t", dtype="fp16", block_size=16, page_bytes=page, num_layers=layers, layout="test", tp_size=1
    )
    spec = StoreSpec(pipeline=pipeline, storage_backends=(str(tmp_path),), max_cache_size=64 << 20)
    worker = PrefixStoreWorker(spec, ident, rank=0)
    caches = {
        layer: paged_cache(device, blocks, page, seed=10 + layer).view(torch.float16).view(blocks, 1, 16, 128)
        for layer in range(layers)
    }
    worker.register(caches)
    ids = prefix_block_hashes(list(range(4 * 16)), 16)
    src_blocks = [2, 7, 11, 30]
    expect = {layer: worker._rows(layer)[src_blocks].clone().cpu() for layer in range(layers)}
    worker.save([SaveSpec(block_ids=src_blocks, store_ids=ids)])
    worker.flush()
    for layer in range(layers):  # the offload path: one layer at a time, into other (slot) blocks
        ok = worker.load_layer(layer, ids, [20, 21, 22, 23])
        assert ok == [True] * 4
        assert torch.equal(worker._rows(layer)[[20, 21, 22, 23]].cpu(), expect[layer])
    assert worker.snapshot()["dumped_blocks"] == 4 and worker.snapshot()["offload_loaded_blocks"] == 4 * layers
    worker.close()
