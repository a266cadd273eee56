"""Scratch: does the batch path's stride skip the scorer on a GPU? (not committed)"""

import math

import torch

from ucm.ops import get_ops
from ucm.sparse.base import ModelShapes
from ucm.sparse.batch_selection import BatchSelector
from ucm.sparse.factory import build_sparse_method

LAYERS, HQ, HKV, D, BS = 8, 32, 8, 128, 128
dev = torch.device("cuda")
ops = get_ops("cuda")
b, ctx = 8, 32768
m = math.ceil((ctx + 64) / BS)
nb = b * m + 8
for stride in (1, 5):
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, nb, dev, key_dtype=torch.bfloat16)
    cfg = {"ESA": {"sparse_ratio": 0.3, "retrieval_stride": stride}}
    method = build_sparse_method({"ucm_sparse_config": cfg}, shapes, ops, host_scoring=False)
    g = torch.Generator(device=dev).manual_seed(0)
    table = torch.randperm(nb, device=dev, generator=g)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), ctx + 1, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    pos = torch.arange(ctx, device=dev)
    for layer in range(LAYERS):
        for r in range(b):
            slots = table[r, pos // BS].long() * BS + pos % BS
            method.on_kv_written(layer, torch.randn(ctx, HKV, D, device=dev, dtype=torch.bfloat16, generator=g), slots)
    sel = BatchSelector(method, max_rows=16)
    query = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    holder = {}

    def step():
        plan = sel.plan(qsl, lens, table, max_query_len=1)
        holder["plan"] = plan
        for layer in range(LAYERS):
            if sel.layer_selects(layer):
                sel.select(layer, query, plan)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
            lens.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times, reuse = [], []
    for i in range(12):
        lens.add_(1)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(round(e0.elapsed_time(e1) * 1000 / LAYERS, 1))
        r = holder["plan"].reuse
        reuse.append(None if r is None else int(r.sum()))
    print(f"stride {stride}: us/layer per replay {times}; rows reusing {reuse}; anchors {sel._anchor[:, :b].tolist() if sel._anchor is not None else None}")
    # eager, no graph
    times = []
    for i in range(10):
        lens.add_(1)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        torch.cuda.synchronize()
        times.append(round(e0.elapsed_time(e1) * 1000 / LAYERS, 1))
        r = holder["plan"].reuse
        reuse.append(None if r is None else int(r.sum()))
    print(f"stride {stride} eager: us/layer {times}; rows reusing {reuse[-10:]}")
