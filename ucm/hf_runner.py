"""Greedy decoding of a Hugging Face decoder over ucm's paged KV cache, with real attention.

This is the core without an inference engine: the model's own projections, RoPE and MLPs run
in transformers; its attention is replaced by ucm's (prefill dense, decode through a sparse
method's selection and the paged decode attention op). It is what the demo, tests and the
profiling tools use until a request runs inside vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ucm.ops.contract import SparseOps
from ucm.sparse.base import ModelShapes, SparseMethod

ATTN_NAME = "ucm_paged"


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    blocks_kept: int = 0  # summed over decode steps and layers
    blocks_total: int = 0
    layer_kept: list[int] = field(default_factory=list)
    layer_total: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def fraction_read(self) -> float:
        return self.blocks_kept / self.blocks_total if self.blocks_total else 1.0


class RunObserver:
    """Sees what the runner computes; subclasses override what they need (all no-ops here)."""

    def on_kv(self, layer: int, key: torch.Tensor, slots: torch.Tensor) -> None:
        """Keys [T, Hkv, D] written at slots (prefill, decode, and the prompt replayed per decode)."""

    def on_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Post-RoPE prefill queries [n, Hq, D] and keys [n, Hkv, D] of a layer."""

    def on_decode(self, step, layer, q, k_cache, v_cache, block_table, seq_lens, scale) -> None:
        """A decode layer's dense inputs, before attention."""


class _StepContext:
    """What the attention function needs during one forward: caches, slots, method, plan."""

    def __init__(
        self,
        runner: PagedHFRunner,
        slots: torch.Tensor,
        method: SparseMethod | None = None,
        observers: Sequence = (),
        step: int = -1,
    ) -> None:
        self.runner = runner
        self.slots = slots
        self.method = method
        self.observers = observers
        self.step = step
        self.plan = None


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, ucm_ctx=None, **_):
    """transformers attention interface: q [1, Hq, L, D], k/v [1, Hkv, L, D] -> [1, L, Hq, D]."""
    if ucm_ctx is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' runs only inside PagedHFRunner")
    run = ucm_ctx.runner
    layer = module.layer_idx
    k_tok = key[0].transpose(0, 1)
    v_tok = value[0].transpose(0, 1)
    run.ops.paged_write(run.k_cache[layer], k_tok, ucm_ctx.slots)
    run.ops.paged_write(run.v_cache[layer], v_tok, ucm_ctx.slots)
    method = ucm_ctx.method
    if method is not None:
        method.on_kv_written(layer, k_tok, ucm_ctx.slots)
    for ob in ucm_ctx.observers:
        ob.on_kv(layer, k_tok, ucm_ctx.slots)
    if query.shape[2] > 1:  # prefill stays dense
        for ob in ucm_ctx.observers:
            ob.on_prefill(layer, query[0].transpose(0, 1), k_tok)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    q = query[:, :, 0]  # [1, Hq, D]
    table, lens = run.block_table, run.seq_lens
    for ob in ucm_ctx.observers:
        ob.on_decode(ucm_ctx.step, layer, q, run.k_cache[layer], run.v_cache[layer], table, lens, scaling)
    if method is not None:
        sel = method.select(layer, q, ucm_ctx.plan)
        table, lens = sel.block_table, sel.seq_lens
    out, _ = run.ops.paged_decode_attention(q, run.k_cache[layer], run.v_cache[layer], table, lens, scaling)
    return out[:, None], None


@dataclass
class Prefilled:
    """A dense prefill kept in the runner's cache; any number of decodes can start from it."""

    prompt_ids: list[int]
    first_token: int
    prefill_s: float


class PagedHFRunner:
    """One request at a time through a HF causal LM, its KV in ucm's paged layout.

    Decoding only writes slots past the prompt, so several methods can decode from one
    prefill, each overwriting the previous one's generated tokens before reading them.
    """

    def __init__(self, model, tokenizer, ops: SparseOps, block_size: int = 32, max_tokens: int = 8192) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, _paged_attention)
        model.config._attn_implementation = ATTN_NAME
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ops = ops
        cfg = model.config
        self.block_size = block_size
        num_blocks = -(-max_tokens // block_size)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.shapes = ModelShapes(
            num_layers=cfg.num_hidden_layers,
            num_q_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            block_size=block_size,
            num_blocks=num_blocks,
        )
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, cfg.num_key_value_heads, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_tokens = max_tokens
        # the request owns the blocks in a shuffled order, so nothing relies on contiguity
        gen = torch.Generator().manual_seed(0)
        self.block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32)[None]
        self.seq_lens = torch.zeros(1, dtype=torch.int32)

    def _slots(self, start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        return self.block_table[0, pos // self.block_size].to(torch.int64) * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int], observers: Sequence = ()) -> Prefilled:
        """Dense prefill; observers with `on_prefill(layer, q [n, Hq, D], k [n, Hkv, D])` see
        every layer's post-RoPE queries and keys (calibration data)."""
        n = len(prompt_ids)
        if n >= self.max_tokens:
            raise ValueError(f"{n} prompt tokens do not fit max_tokens={self.max_tokens}")
        t0 = time.perf_counter()
        self.seq_lens[0] = n
        ctx = _StepContext(self, self._slots(0, n), observers=observers)
        logits = self.model(
            input_ids=torch.tensor([list(prompt_ids)]), position_ids=torch.arange(n)[None], use_cache=False, ucm_ctx=ctx
        ).logits
        return Prefilled(list(prompt_ids), int(logits[0, -1].argmax()), time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(
        self,
        state: Prefilled,
        method: SparseMethod | None = None,
        max_new_tokens: int = 32,
        stop_ids: Sequence[int] = (),
        observers: Sequence = (),
    ) -> GenerationResult:
        """Greedy decode from a prefill, dense or through `method` (built for `self.shapes`).

        `observers` see every K write (`on_kv(layer, key, slots)`, the prompt's replayed first)
        and every decode layer's dense inputs (`on_decode(step, layer, q, k_cache, v_cache,
        block_table, seq_lens, scale)`): the profiler judges selections with them.
        """
        n = len(state.prompt_ids)
        if n + max_new_tokens > self.max_tokens:
            raise ValueError(f"{n} prompt + {max_new_tokens} new tokens exceed max_tokens={self.max_tokens}")
        rid = f"req-{time.monotonic_ns()}"
        if method is not None:
            method.stats.reset()
        if method is not None or observers:  # the prompt's keys, as the prefill wrote them
            slots = self._slots(0, n)
            for layer in range(self.shapes.num_layers):
                keys = self.k_cache[layer].view(-1, *self.k_cache[layer].shape[2:])[slots]
                if method is not None:
                    method.on_kv_written(layer, keys, slots)
                for ob in observers:
                    ob.on_kv(layer, keys, slots)
        token, out = state.first_token, [state.first_token]
        t0 = time.perf_counter()
        for step in range(max_new_tokens - 1):
            if token in stop_ids:
                break
            pos = n + step
            self.seq_lens[0] = pos + 1
            ctx = _StepContext(self, self._slots(pos, 1), method, observers, step)
            if method is not None:
                ctx.plan = method.begin_step([rid], self.seq_lens, self.block_table)
            logits = self.model(
                input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), use_cache=False, ucm_ctx=ctx
            ).logits
            if method is not None:
                method.end_step(ctx.plan)
            token = int(logits[0, -1].argmax())
            out.append(token)
        result = GenerationResult(
            tokens=out,
            text=self.tokenizer.decode([t for t in out if t not in stop_ids], skip_special_tokens=True),
            prompt_tokens=n,
            prefill_s=state.prefill_s,
            decode_s=time.perf_counter() - t0,
        )
        if method is not None:
            st = method.stats
            result.blocks_kept, result.blocks_total = sum(st.kept), sum(st.total)
            result.layer_kept, result.layer_total = list(st.kept), list(st.total)
            method.finish(rid)
        return result

    def generate(
        self,
        prompt_ids: Sequence[int],
        method: SparseMethod | None = None,
        max_new_tokens: int = 32,
        stop_ids: Sequence[int] = (),
    ) -> GenerationResult:
        return self.decode(self.prefill(prompt_ids), method, max_new_tokens, stop_ids)
