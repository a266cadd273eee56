"""One real vLLM engine on the GPU, run in its own process by tests/test_vllm_gpu.py.

    python tests/vllm_gpu_child.py SPEC.json   -> prints one JSON line (the last line of stdout)

SPEC: {"model": dir, "setting": "dense" | "METHOD:RATIO", "graphs": bool, "max_model_len": int,
       "max_batch": int, "prompts": [[token ids]], "max_tokens": [int per prompt],
       "engine": {extra LLM kwargs}, "check_attention": bool, "tmp": dir}
Returns {"tokens": [[ids]], "logprobs": [[float]], "counters": ucm's snapshot or None,
         "attention": {"rows": n, "max_rel_err": x, "shorter_rows": n} when checked}.

With check_attention (eager engines only), every sparse layer's FlashAttention output for each
decode row is compared with a float32 torch reference computed from the engine's own KV cache
over exactly the blocks and length the rewritten metadata gives that row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def install_attention_check(stats: dict) -> None:
    import torch

    from ucm.integration.vllm import flash_attn

    made = {}
    real_rewrite = flash_attn.sparse_flash_metadata

    def recording_rewrite(md, block_table, seq_lens, *rest):
        new = real_rewrite(md, block_table, seq_lens, *rest)
        made["md"] = new
        return new

    flash_attn.sparse_flash_metadata = recording_rewrite
    real_forward = flash_attn.UCMFlashAttentionImpl.forward

    def checked_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        made.clear()
        got = real_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        md = made.get("md")
        if md is None:
            return got
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [NB, bs, Hkv, D]
        bs = key_cache.shape[1]
        qsl = md.query_start_loc.tolist()
        lens, old = md.seq_lens.tolist(), attn_metadata.seq_lens.tolist()
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        g = self.num_heads // self.num_kv_heads
        for r in range(len(lens)):
            if qsl[r + 1] - qsl[r] != 1 or lens[r] <= 0:
                continue
            n = lens[r]
            blocks = md.block_table[r, : (n + bs - 1) // bs].long()
            k = key_cache[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:n].float()
            v = value_cache[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:n].float()
            q = query[qsl[r]].view(self.num_heads, self.head_size).float()
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [n, Hq, D]
            p = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * self.scale, dim=-1)
            ref = torch.einsum("hn,nhd->hd", p, v)
            err = float((out[qsl[r]].float() - ref).norm() / ref.norm().clamp(min=1e-6))
            stats["rows"] = stats.get("rows", 0) + 1
            stats["max_rel_err"] = max(stats.get("max_rel_err", 0.0), err)
            stats["shorter_rows"] = stats.get("shorter_rows", 0) + int(n < old[r])
        return got

    flash_attn.UCMFlashAttentionImpl.forward = checked_forward


def widen_dummy_weights(low: float, high: float) -> None:
    """vLLM's dummy weights are drawn from [-1e-3, 1e-3], which leaves logits nearly flat (greedy
    tokens then hinge on rounding); the tests draw them wider."""
    from vllm.model_executor.model_loader import dummy_loader

    real = dummy_loader.initialize_dummy_weights
    dummy_loader.initialize_dummy_weights = lambda model, config, *a, **k: real(model, config, low=low, high=high)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from bench_vllm_gpu import engine_kwargs, sparse_extra, ucm_counters
    from vllm import LLM, SamplingParams

    attention: dict = {}
    if spec.get("check_attention"):
        install_attention_check(attention)
    if spec.get("dummy_range"):
        widen_dummy_weights(-spec["dummy_range"], spec["dummy_range"])
    extra = sparse_extra(
        spec["setting"], Path(spec["tmp"]), json.loads((Path(spec["model"]) / "config.json").read_text())
    )
    kw = engine_kwargs(
        Path(spec["model"]),
        extra,
        spec["max_model_len"],
        spec["max_batch"],
        graphs=spec["graphs"],
        capture_sizes=spec.get("capture_sizes"),
        mem=spec.get("mem", 0.5),
    )
    kw.update(spec.get("engine", {}))
    llm = LLM(**kw)
    params = [
        SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False, logprobs=1)
        for n in spec["max_tokens"]
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    tokens, logprobs = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs, strict=True)])
    print(
        json.dumps(
            {"tokens": tokens, "logprobs": logprobs, "counters": ucm_counters(), "attention": attention or None}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
