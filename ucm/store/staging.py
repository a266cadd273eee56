"""Moving whole KV blocks between a paged cache (host or device) and the host buffers a store reads.

A store only ever sees host memory. For a cache on a CUDA device the copies run on a stream of
their own, ordered against the compute stream by events: a gather for a dump starts after
everything the compute stream has queued (the step's KV writes), and the compute stream waits
for a scatter before anything it queues later (the attention that reads the loaded blocks).
The host buffers are pinned (`host_buffer`), so both directions are DMA transfers that do not
hold the calling thread. A host cache needs none of this: one `index_select` / `index_copy_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ucm.store.api import host_buffer


class BlockStager:
    """Gathers blocks of a `[num_blocks, page_bytes]` uint8 view into host buffers and back."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._inflight: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # pinned sources of running DMAs

    def gather(self, rows: torch.Tensor, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """`rows[block_ids]` into a new host buffer; returns it and the event after which its bytes
        are there (None: already there)."""
        buf = host_buffer([len(block_ids), rows.shape[1]], torch.uint8)
        if self.stream is None:
            ids = torch.tensor(list(block_ids), dtype=torch.int64, device=rows.device)
            if rows.device.type == "cpu":
                torch.index_select(rows, 0, ids, out=buf)
            else:  # a device without a copy stream here (e.g. an NPU): a plain synchronous copy
                buf.copy_(rows.index_select(0, ids))
            return buf, None
        queued = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(queued)
            ids = torch.tensor(list(block_ids), dtype=torch.int64).to(self.device, non_blocking=True)
            buf.copy_(rows.index_select(0, ids), non_blocking=True)
            done = self.stream.record_event()
        return buf, done

    def scatter(self, rows: torch.Tensor, block_ids: Sequence[int], buf: torch.Tensor) -> None:
        """`rows[block_ids] = buf` (host buffer, one row per block); work the caller queues on the
        device after this call sees the blocks."""
        if self.stream is None:
            ids = torch.tensor(list(block_ids), dtype=torch.int64, device=rows.device)
            rows.index_copy_(0, ids, buf.to(rows.device))
            return
        compute = torch.cuda.current_stream(self.device)
        queued = compute.record_event()  # earlier kernels may still read the slot blocks being refilled
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(queued)
            ids = torch.tensor(list(block_ids), dtype=torch.int64).to(self.device, non_blocking=True)
            rows.index_copy_(0, ids, buf.to(self.device, non_blocking=True))
            done = self.stream.record_event()
        compute.wait_event(done)
        self._inflight.append((done, buf))
        self._inflight = [(e, b) for e, b in self._inflight if not e.query()]

    def synchronize(self) -> None:
        """Wait for every copy started here (tests, shutdown)."""
        if self.stream is not None:
            self.stream.synchronize()
        self._inflight.clear()
