"""`CudaOps`: the op contract on NVIDIA GPUs through Triton kernels.

Everything not written as a kernel here is inherited from `TorchReferenceOps` (plain torch runs
on the GPU too). Tensors on a device the kernels cannot take (CPU tensors outside interpreter
mode, float64 scores, ...) also fall back to the reference, so the class is always correct.

Interpreter mode (`CudaOps(interpret=True)`, or TRITON_INTERPRET=1 in the environment) runs
the same kernels through Triton's CPU interpreter on CPU tensors: CI machines without a GPU
check the kernels against the reference that way.
"""

from __future__ import annotations

import math
import os

import torch

from ucm.ops.contract import BlockReduce, GroupReduce, group_reduce_code, reduce_code
from ucm.ops.hash_cosine import NORM_DTYPES
from ucm.ops.reference import TorchReferenceOps

from .kernels import get_kernels
from .tuned import GroupedLaunch, TunedFile, load_tuned

_LOG2E = 1.4426950408889634
_REPS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what representations may be stored in
_SUMS_DTYPES = (*_REPS_DTYPES, torch.float8_e4m3fn)  # group sums (ESA, GSA) may also be float8
_HALF_SUMS_MAX_MERGE = 16  # bfloat16 group sums up to this many keys (at most 16 roundings of a group)
_FP8_SUMS_MAX_MERGE = 4  # float8 group sums up to this many keys (saturating at 448: keys of |k| >= 112 on average)
#: each `GroupedLaunch` field and the `CudaOps` attribute that overrides it (None: not overridden)
_GROUPED_OVERRIDES = {
    "block_m": "grouped_block_m",
    "block_r": "grouped_block_r",
    "stages": "grouped_stages",
    "warps": "scores_warps",
    "widen": "grouped_widen",
}
_REPS_SCAN_BLOCK = 256  # tokens `_reps_write_kernel` scans per vector (decode batches: in one pass)


_HALF_BOUNDS = (torch.bfloat16, torch.float16)  # Quest's bounds may be kept in the keys' own half precision


def _bounds_hold_keys(bounds: torch.dtype, keys: torch.dtype) -> bool:
    """Quest's bounds in `bounds` take keys of `keys` exactly (no outward rounding needed)."""
    return bounds == torch.float32 or (bounds == keys and bounds in _HALF_BOUNDS)


def _pow2(n: int, lo: int = 1) -> int:
    """Next power of two >= max(n, lo) (Triton block shapes must be powers of two)."""
    n = max(int(n), lo)
    return 1 << (n - 1).bit_length()


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class CudaOps(TorchReferenceOps):
    """Triton kernels for the hot ops; reference torch for the rest."""

    name = "cuda"

    def __init__(self, interpret: bool | None = None) -> None:
        """interpret=True runs the kernels through Triton's interpreter on CPU tensors (tests)."""
        self.interpret = _env_interpret() if interpret is None else bool(interpret)
        self._k = get_kernels(self.interpret)
        self._num_sms: int | None = None
        # launch overrides (benchmarks/tune_selection_gpu.py sweeps them); None = the heuristics
        self.topk_warps: int | None = None
        self.topk_radix_bits: int | None = None
        self.topk_sort: bool | None = None
        #: the histogram passes stop once the threshold digit's bin is taken whole: on an H100, 128K
        #: x 4 (1025 columns) at 0.3 7.96 us a layer against 11.26 without it and 14.90 for session
        #: 28's kernel (gpu_runs/2026-12-07_s29/, default launches)
        self.topk_early_exit: bool = True
        self.scores_block_m: int | None = None
        self.cosine_warps: int | None = None  # `_hamming_cosine_kernel`'s warps (None: by its tile)
        self.scores_warps: int | None = None
        self.grouped_dot: bool = True  # GSA's per-group scores on the tensor cores where they can run
        self.grouped_block_r: int | None = None
        self.grouped_stages: int | None = None
        self.grouped_block_m: int | None = None
        self.grouped_widen: str | None = None  # "query" | "float16" (float8 sums)
        #: per-GPU-model launch settings of the grouped scorer (`tuned.py`), None = heuristics;
        #: False: do not read them (the tuning sweep times its own settings)
        self.use_tuned: bool = True
        self._tuned: dict[int, TunedFile | None] = {}
        self._launches: dict[tuple, GroupedLaunch] = {}
        self.kvstar_block_n: int | None = None
        self.kvstar_block_k: int | None = None
        self.kvstar_warps: int | None = None
        self.kvstar_tiles_per_prog: int | None = None
        self.kvstar_stages: int | None = None
        #: representation writes of up to this many tokens find each block's keys by an in-kernel
        #: scan (T^2 / BLOCK_T vector compares), longer ones (prefills) by a sort
        self.write_scan_max = 4096
        #: calls of up to `_REPS_SCAN_BLOCK` tokens (decode batches) scan in one vector, every
        #: program at once (False: the chunked scan of longer calls, for tests)
        self.write_scan_once = True
        self._tables: dict[tuple[int, ...], torch.Tensor] = {}  # `reps_write_layers`' address tables
        self.layered_writes = 0  # `reps_write_layers` calls done in one launch (tests, diagnostics)
        # `window_budgets`' float64 ratios and must_select lists on each device, made on first use
        # (a warm-up step before any graph captures the call)
        self._plan_consts: dict[tuple, torch.Tensor] = {}

    def topk_launch(self, block_m: int) -> tuple[int, int, bool]:
        """(num_warps, radix bits per pass, sort instead) of the top-k kernel for a row of
        block_m slots; 8 radix bits = 4 passes of a 256-bin `tl.histogram`. On the H200,
        36 calls in a graph (benchmarks/results/gpu_runs/2026-12-04_s15/tune_selection_gpu.json):
        512 slots, the bitonic sort on 16 warps 5.24 us (histogram 7.41 on 8 warps, 2-bit compare
        radix 9.26); 2048 slots, the histogram on 8 warps 13.89 us (2-bit radix 15.54 on 8, the
        sort 32.24 on 16)."""
        if self.topk_sort is None and self.topk_radix_bits is None:
            sort = block_m <= 512
            return self.topk_warps or (16 if sort else 8), 8, sort
        sort = bool(self.topk_sort) and block_m <= 65536
        bits = self.topk_radix_bits or 8
        warps = 16 if sort or (bits != 8 and block_m > 1024) else 8
        return self.topk_warps or warps, bits, sort

    # ---------------------------------------------------------------- helpers
    def _can_run(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels can take these tensors (GPU, or CPU under the interpreter)."""
        want = "cpu" if self.interpret else "cuda"
        return all(t.device.type == want for t in tensors)

    def _sm_count(self, device: torch.device) -> int:
        if self.interpret:
            return 4
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms

    @staticmethod
    def _as_words(codes: torch.Tensor) -> torch.Tensor:
        """View uint8 codes [..., C] as int32 words [..., C/4] when possible, else keep bytes.

        Wider words mean fewer loads and popcounts; bytes still work (upper bits stay zero).
        """
        codes = codes.contiguous()
        if codes.shape[-1] % 4 == 0:
            try:
                return codes.view(torch.int32)
            except RuntimeError:  # misaligned storage offset
                pass
        return codes

    # ---------------------------------------------------------------- hashing
    def sign_bits_pack(self, x: torch.Tensor) -> torch.Tensor:
        if not self._can_run(x) or not x.is_floating_point() or x.numel() == 0:
            return super().sign_bits_pack(x)
        n = x.shape[-1]
        c = (n + 7) // 8
        rows = x.reshape(1, -1, n).contiguous()
        r = rows.shape[1]
        out = torch.empty(r, c, dtype=torch.uint8, device=x.device)
        block_c = _pow2(c)
        block_r = max(1, min(64, 4096 // (block_c * 8)))
        block_r = 1 << (block_r.bit_length() - 1)
        grid = (1, triton_cdiv(r, block_r))
        self._k.sign_pack_kernel[grid](
            rows,
            out,
            out,
            r,
            n,
            c,
            rows.stride(0),
            rows.stride(1),
            0,
            out.stride(0),
            HAS_SLOTS=False,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
        return out.view(*x.shape[:-1], c)

    def hash_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        proj = torch.matmul(x.to(torch.float32), weight.to(device=x.device, dtype=torch.float32))
        return self.sign_bits_pack(proj)

    def hash_write(
        self, code_cache: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Hash new keys and write their codes into the paged code cache in one launch.

        code_cache [NB, bs, Hkv, C] uint8, x [T, Hkv, D], weight [D, nbits], slot_mapping [T]
        (negative = padding). Projection, sign test, packing and scatter are one kernel
        (`_hash_write_kernel`, float32 dot like the fused query hash): a projection within
        rounding of 0 may give the other bit than `hash_encode`'s torch.matmul. Layouts the
        kernel cannot address (a view of part of each code, MLA) take `paged_write(hash_encode)`.
        """
        if not self._hash_write_fits(code_cache, x, weight, slot_mapping):
            self.paged_write(code_cache, self.hash_encode(x, weight), slot_mapping)
            return
        t = x.shape[0]
        if t == 0:
            return
        wt = weight.to(device=x.device, dtype=torch.float32)
        wt = wt if wt.stride(-1) == 1 else wt.contiguous()
        self._hash_write(x, wt, slot_mapping, code_cache, t)

    def _hash_write_fits(self, code_cache, x, weight, slot_mapping) -> bool:
        """Whether `_hash_write_kernel` can address these tensors (`hash_write`'s layouts)."""
        c = code_cache.shape[-1]
        nbits = weight.shape[1] if weight.dim() == 2 else 0
        return (
            self._can_run(code_cache, x, weight, slot_mapping)
            and code_cache.dtype == torch.uint8
            and x.dim() == 3
            and code_cache.dim() == 4
            and code_cache.shape[2] == x.shape[1]
            and weight.shape[0] == x.shape[-1]
            and c == (nbits + 7) // 8
            and nbits % 8 == 0
            and code_cache.stride(-1) == 1
            and code_cache.stride(2) == c
            and code_cache.stride(1) == code_cache.shape[2] * c
            and code_cache.stride(0) == code_cache.shape[1] * code_cache.stride(1)
            and x.stride(-1) == 1
        )

    def _hash_write(self, x, wt, slot_mapping, code_cache, t, layers=None, center=None, norms=None) -> None:
        """Launch `_hash_write_kernel`; `layers` = (address table, number of layers, block size):
        every layer at once, x a layer's key cache [NB, bs, Hkv, D]. `center` [Hkv, D]: hash
        x - center (layered: the table's centers, `center` one of them for its dtype and strides);
        `norms` [NB, bs, Hkv]: also write |x - center| there (`hash_norm_write`)."""
        nbits, hkv = wt.shape[1], x.shape[-2]
        small = t <= 4  # decode of a few rows: no 16-row dot tile
        block_t = _pow2(t) if small else 16
        block_n = min(_pow2(nbits, 16), 128)  # wider codes take several bit tiles (shared memory)
        tab, n_layers, bs = layers if layers is not None else (slot_mapping, 1, 1)
        self._k.hash_write_kernel[(triton_cdiv(t, block_t), n_layers * hkv, triton_cdiv(nbits, block_n))](
            x,
            wt,
            slot_mapping.contiguous(),
            code_cache,
            t,
            x.shape[-1],
            nbits,
            code_cache.shape[-1],
            x.stride(0),
            x.stride(-2),
            wt.stride(0),
            code_cache.stride(1),
            code_cache.stride(2),
            tab,
            n_layers,
            hkv,
            bs,
            x.stride(1) if layers is not None else 0,
            center if center is not None else x,
            norms if norms is not None else code_cache,
            center.stride(0) if center is not None else 0,
            norms.stride(1) if norms is not None else 0,
            norms.stride(2) if norms is not None else 0,
            BLOCK_T=block_t,
            BLOCK_D=min(16 if small else 64, _pow2(x.shape[-1], 16)),
            BLOCK_N=block_n,
            SMALL=small,
            LAYERED=layers is not None,
            HAS_CENTER=center is not None,
            NORMS=norms is not None,
        )

    def hash_write_layers(self, code_caches, k_caches, weights, slot_mapping) -> None:
        """Every layer in one launch (`_hash_write_kernel` with LAYERED, through a table of the
        key caches', weights' and code caches' addresses made once per set of tensors) for calls
        of up to `_REPS_SCAN_BLOCK` tokens; the contract's loop otherwise. A call with no tokens
        only makes the table (outside a capture)."""
        t = int(slot_mapping.shape[0])
        if not code_caches or t > _REPS_SCAN_BLOCK:
            return super().hash_write_layers(code_caches, k_caches, weights, slot_mapping)
        c0, k0, w0 = code_caches[0], k_caches[0], weights[0]
        nb, bs, h, d = k0.shape if k0.dim() == 4 else (0, 0, 0, 0)
        nbits = w0.shape[1] if w0.dim() == 2 else 0
        usable = (
            self._can_run(slot_mapping, *code_caches, *k_caches, *weights)
            and nbits % 8 == 0
            and w0.shape == (d, nbits)
            and c0.shape == (nb, bs, h, nbits // 8)
            and k0.stride(-1) == 1
            and all(w.shape == w0.shape and w.dtype == torch.float32 and w.is_contiguous() for w in weights)
            and all(c.shape == c0.shape and c.dtype == torch.uint8 and c.is_contiguous() for c in code_caches)
            and all(k.shape == k0.shape and k.stride() == k0.stride() and k.dtype == k0.dtype for k in k_caches)
        )
        tab = self._address_table(k_caches, weights, code_caches) if usable else None
        if tab is None:
            return super().hash_write_layers(code_caches, k_caches, weights, slot_mapping)
        if t:
            self._hash_write(k0, w0, slot_mapping, c0, t, layers=(tab, len(k_caches), bs))
            self.layered_writes += 1

    # ------------------------------------------------ hashing, norm-weighted (`ucm.ops.hash_cosine`)
    def _norms_fit(self, norm_cache: torch.Tensor, code_cache: torch.Tensor) -> bool:
        return (
            norm_cache.dtype in NORM_DTYPES
            and norm_cache.shape == code_cache.shape[:3]
            and norm_cache.is_contiguous()
            and self._can_run(norm_cache)
        )

    def _center_fits(self, center: torch.Tensor | None, hkv: int, d: int) -> bool:
        return center is None or (
            center.shape == (hkv, d) and center.is_floating_point() and center.stride(-1) == 1 and self._can_run(center)
        )

    def hash_norm_write(self, code_cache, norm_cache, x, weight, center, slot_mapping) -> None:
        """Codes of x - center and |x - center| in one launch: `_hash_write_kernel` with the center
        subtracted from each key tile as it is loaded (float32, as `centred`) and the sum of
        squares over D kept beside the projection (NORMS), the norm stored by the bit-tile-0
        program. Layouts `hash_write` cannot fuse take the contract's composition."""
        fusable = (
            self._hash_write_fits(code_cache, x, weight, slot_mapping)
            and self._norms_fit(norm_cache, code_cache)
            and self._center_fits(center, x.shape[1], x.shape[2])
        )
        if not fusable:
            return super().hash_norm_write(code_cache, norm_cache, x, weight, center, slot_mapping)
        t = x.shape[0]
        if t == 0:
            return
        wt = weight.to(device=x.device, dtype=torch.float32)
        wt = wt if wt.stride(-1) == 1 else wt.contiguous()
        self._hash_write(x, wt, slot_mapping, code_cache, t, center=center, norms=norm_cache)

    def hash_norm_write_layers(self, code_caches, norm_caches, k_caches, weights, centers, slot_mapping) -> None:
        """Every layer in one launch (`_hash_write_kernel` with LAYERED, HAS_CENTER and NORMS,
        through a [5L] table of the key caches', weights', code caches', centers' (0 for a layer
        without one) and norm caches' addresses, made once per set of tensors) for calls of up
        to `_REPS_SCAN_BLOCK` tokens; the contract's loop otherwise (each layer still one fused
        launch). A call with no tokens only makes the table (outside a capture)."""
        t = int(slot_mapping.shape[0])
        if not code_caches or t > _REPS_SCAN_BLOCK:
            return super().hash_norm_write_layers(code_caches, norm_caches, k_caches, weights, centers, slot_mapping)
        c0, n0, k0, w0 = code_caches[0], norm_caches[0], k_caches[0], weights[0]
        nb, bs, h, d = k0.shape if k0.dim() == 4 else (0, 0, 0, 0)
        nbits = w0.shape[1] if w0.dim() == 2 else 0
        given = [c for c in centers if c is not None]
        usable = (
            len(norm_caches) == len(centers) == len(code_caches) == len(k_caches) == len(weights)
            and self._can_run(slot_mapping, *code_caches, *norm_caches, *k_caches, *weights, *given)
            and nbits % 8 == 0
            and w0.shape == (d, nbits)
            and c0.shape == (nb, bs, h, nbits // 8)
            and k0.stride(-1) == 1
            and n0.dtype in NORM_DTYPES
            and all(w.shape == w0.shape and w.dtype == torch.float32 and w.is_contiguous() for w in weights)
            and all(c.shape == c0.shape and c.dtype == torch.uint8 and c.is_contiguous() for c in code_caches)
            and all(n.shape == (nb, bs, h) and n.dtype == n0.dtype and n.is_contiguous() for n in norm_caches)
            and all(k.shape == k0.shape and k.stride() == k0.stride() and k.dtype == k0.dtype for k in k_caches)
            and all(
                c.shape == (h, d) and c.dtype == given[0].dtype and c.is_floating_point() and c.is_contiguous()
                for c in given
            )
        )
        tab = self._pointer_table(k_caches, weights, code_caches, centers, norm_caches) if usable else None
        if tab is None:
            return super().hash_norm_write_layers(code_caches, norm_caches, k_caches, weights, centers, slot_mapping)
        if t:
            center = given[0] if given else None
            self._hash_write(k0, w0, slot_mapping, c0, t, layers=(tab, len(k_caches), bs), center=center, norms=n0)
            self.layered_writes += 1

    def _pointer_table(self, *groups) -> torch.Tensor | None:
        """[len(groups) * L] int64 on the tensors' device: the addresses of each group's tensors
        in turn (0 for None), made once per set of tensors; None while a CUDA graph is being
        captured (as `_address_table`)."""
        ptrs = tuple(0 if x is None else x.data_ptr() for group in groups for x in group)
        tab = self._tables.get(ptrs)
        if tab is None:
            dev = groups[0][0].device
            if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            tab = self._tables[ptrs] = torch.tensor(ptrs, dtype=torch.int64).to(dev)
        return tab

    # ---------------------------------------------------------------- scoring
    def hamming_query_planes(self, q_codes: torch.Tensor, hkv: int) -> tuple[torch.Tensor, int]:
        """Per (row, KV head) bit planes of the group's one-counts: ([B, 2P, Hkv * W] int32, P).

        q_codes are uint8 bytes or int32 words [B, Hq, W] (see `_as_words`).
        """
        b, hq, _ = q_codes.shape
        g = hq // hkv
        qw = q_codes.contiguous()
        w = qw.shape[-1]
        wbits = 32 if qw.dtype == torch.int32 else 8
        p = g.bit_length()
        planes = torch.empty(b, 2 * p, hkv * w, dtype=torch.int32, device=q_codes.device)
        self._k.qplanes_kernel[(b, hkv)](
            qw,
            planes,
            g,
            w,
            qw.stride(0),
            qw.stride(1),
            planes.stride(0),
            planes.stride(1),
            P=p,
            WBITS=wbits,
            BLOCK_G=_pow2(g),
        )
        return planes, p

    def hash_hamming_block_scores(
        self,
        q: torch.Tensor,
        weight: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """`hamming_block_scores(hash_encode(q, weight), ...)` with the query hash fused in.

        One kernel hashes the queries and writes the scorer's bit planes, saving four launches
        per decode step. Its float32 projection sums in another order than torch.matmul, so a
        projection within rounding of 0 may flip a query bit against `hash_encode` (keys are
        unaffected: they are hashed by `hash_write`). Needs codes of a multiple of 32 bits.
        """
        b, hq, d = q.shape
        nb, bs, hkv, c = k_codes.shape
        nbits = weight.shape[1]
        if not self._can_run(q, weight, k_codes, block_table, seq_lens) or c % 4 or (nbits + 7) // 8 != c:
            return self.hamming_block_scores(self.hash_encode(q, weight), k_codes, block_table, seq_lens, reduce)
        kw = self._as_words(k_codes)
        if kw.dtype != torch.int32:
            return self.hamming_block_scores(self.hash_encode(q, weight), k_codes, block_table, seq_lens, reduce)
        g = hq // hkv
        w = c // 4
        p = g.bit_length()
        planes = torch.empty(b, 2 * p, hkv * w, dtype=torch.int32, device=q.device)
        qc = q if q.stride(-1) == 1 else q.contiguous()
        wt = weight if weight.stride(-1) == 1 else weight.contiguous()
        if b > 0:
            self._k.qhash_planes_kernel[(b, hkv, w)](
                qc,
                wt,
                planes,
                g,
                d,
                nbits,
                qc.stride(0),
                qc.stride(1),
                wt.stride(0),
                planes.stride(0),
                planes.stride(1),
                W=w,
                P=p,
                BLOCK_G=_pow2(g, 16),
                BLOCK_D=64,
            )
        return self._hamming_from_planes(planes, p, kw, block_table, seq_lens, reduce)

    def hamming_block_scores(
        self,
        q_codes: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        reduce_code(reduce)  # ValueError for an unknown name, before any fallback
        if not self._can_run(q_codes, k_codes, block_table, seq_lens):
            return super().hamming_block_scores(q_codes, k_codes, block_table, seq_lens, reduce)
        hkv = k_codes.shape[2]
        kw, qw = self._as_words(k_codes), self._as_words(q_codes)
        if kw.dtype != qw.dtype:  # one of them could not be viewed as words: use bytes for both
            kw, qw = k_codes.contiguous(), q_codes.contiguous()
        planes, p = self.hamming_query_planes(qw, hkv)
        return self._hamming_from_planes(planes, p, kw, block_table, seq_lens, reduce)

    def _hamming_from_planes(
        self,
        planes: torch.Tensor,
        p: int,
        kw: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: str,
    ) -> torch.Tensor:
        """Launch the scorer on query planes and key codes viewed as words [NB, bs, Hkv, W]."""
        code = reduce_code(reduce)
        nb, bs, hkv = kw.shape[:3]
        b, m = block_table.shape
        out = torch.empty(b, m, dtype=torch.float32, device=kw.device)
        if b == 0 or m == 0:
            return out
        cols = kw.shape[-1] * hkv
        kw = kw.view(nb, bs, cols)
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        block_t = _pow2(bs)
        block_cols = _pow2(cols)
        tile = block_t * block_cols
        bpp = 1
        warps = 4 if tile <= 4096 else 8
        grid = (triton_cdiv(m, bpp), b)
        self._k.hamming_kernel[grid](
            kw,
            planes,
            tbl,
            seq_lens,
            out,
            m,
            bs,
            cols,
            kw.stride(0),
            kw.stride(1),
            planes.stride(0),
            planes.stride(1),
            tbl.stride(0),
            out.stride(0),
            P=p,
            REDUCE=int(code),
            USE_ASM=not self.interpret,
            BLOCK_T=block_t,
            BLOCK_COLS=block_cols,
            BLOCKS_PER_PROG=bpp,
            num_warps=warps,
        )
        return out

    def hamming_cosine_block_scores(
        self,
        q_codes: torch.Tensor,
        q_norms: torch.Tensor,
        k_codes: torch.Tensor,
        k_norms: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """`_hamming_cosine_kernel`: one program per (block column, row), the block's codes read
        in place as int32 words (codes of C % 4 == 0) or bytes, the GQA group walked per KV head;
        [B, M, bs, Hkv, G, C] never exists. No host sync (graph-safe)."""
        code = reduce_code(reduce)  # ValueError for an unknown name, before any fallback
        fits = (
            q_codes.dim() == 3
            and q_codes.dtype == torch.uint8
            and q_norms.shape == q_codes.shape[:2]
            and q_norms.is_floating_point()
            and self._can_run(q_codes, q_norms)
            and self._cosine_fits(q_codes.shape, k_codes, k_norms, block_table, seq_lens)
        )
        if not fits:
            ref = super().hamming_cosine_block_scores
            return ref(q_codes, q_norms, k_codes, k_norms, block_table, seq_lens, reduce)
        kw, qw = self._words_in_place(k_codes), self._words_in_place(q_codes)
        if kw.dtype != qw.dtype:  # one of them could not be viewed as words: use bytes for both
            kw, qw = self._words_in_place(k_codes, False), self._words_in_place(q_codes, False)
        return self._cosine_scores(qw, q_norms, kw, k_norms, block_table, seq_lens, code, 8 * k_codes.shape[-1])

    def hash_cosine_block_scores(
        self,
        q: torch.Tensor,
        weight: torch.Tensor,
        k_codes: torch.Tensor,
        k_norms: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """`_qhash_norm_kernel` (the query hash as int32 words and |q|, one launch) and
        `_hamming_cosine_kernel`. Its float32 projection sums in another order than torch.matmul,
        so a projection within rounding of 0 may flip a query bit against `hash_encode`. Codes
        of C % 4 != 0 (or unaligned key codes) take `hash_encode` and the scorer on bytes."""
        code = reduce_code(reduce)
        nbits = weight.shape[1] if weight.dim() == 2 else -1
        c = k_codes.shape[-1]
        fused = (
            q.dim() == 3
            and q.is_floating_point()
            and q.stride(-1) == 1
            and weight.shape[0] == q.shape[-1]
            and c % 4 == 0
            and (nbits + 7) // 8 == c
            and self._can_run(q, weight)
            and self._cosine_fits((*q.shape[:2], c), k_codes, k_norms, block_table, seq_lens)
        )
        kw = self._words_in_place(k_codes) if fused else k_codes
        if kw.dtype != torch.int32:
            return super().hash_cosine_block_scores(q, weight, k_codes, k_norms, block_table, seq_lens, reduce)
        b, hq, d = q.shape
        hkv = k_codes.shape[2]
        g, w = hq // hkv, c // 4
        qw = torch.empty(b, hq, w, dtype=torch.int32, device=q.device)
        qn = torch.empty(b, hq, dtype=torch.float32, device=q.device)
        wt = weight if weight.stride(-1) == 1 else weight.contiguous()
        if b > 0 and hq > 0:
            self._k.qhash_norm_kernel[(b, hkv, w)](
                q,
                wt,
                qw,
                qn,
                g,
                d,
                nbits,
                q.stride(0),
                q.stride(1),
                wt.stride(0),
                qw.stride(0),
                qw.stride(1),
                qn.stride(0),
                BLOCK_G=_pow2(g, 16),
                BLOCK_D=64,
            )
        return self._cosine_scores(qw, qn, kw, k_norms, block_table, seq_lens, code, 8 * c)

    @staticmethod
    def _words_in_place(codes: torch.Tensor, words: bool = True) -> torch.Tensor:
        """uint8 codes [..., C] as int32 words [..., C/4] where C % 4 == 0 and the layout allows
        (strides and offset whole words), else as bytes; in place (a view of any strides with
        the last one 1: a code cache's view is read where it lies), a copy only otherwise."""
        codes = codes if codes.stride(-1) == 1 else codes.contiguous()
        if words and codes.shape[-1] % 4 == 0:
            try:
                return codes.view(torch.int32)
            except RuntimeError:  # strides or storage offset not whole words
                pass
        return codes

    def _cosine_fits(self, q_shape, k_codes, k_norms, block_table, seq_lens) -> bool:
        """Whether `_hamming_cosine_kernel` takes these key codes, key norms and table for query
        codes of shape q_shape = (B, Hq, C) (the query's own tensors are the caller's to check)."""
        if len(q_shape) != 3 or k_codes.dim() != 4 or k_norms.dim() != 3 or block_table.dim() != 2:
            return False
        b, hq, c = q_shape
        nb, bs, hkv, ck = k_codes.shape
        return (
            hkv > 0
            and hq % hkv == 0
            and c == ck
            and k_codes.dtype == torch.uint8
            and k_norms.shape == (nb, bs, hkv)
            and k_norms.is_floating_point()
            and block_table.shape[0] == b
            and seq_lens.shape == (b,)
            and not block_table.is_floating_point()
            and not seq_lens.is_floating_point()
            and self._can_run(k_codes, k_norms, block_table, seq_lens)
        )

    def _cosine_scores(self, qw, qn, kw, k_norms, block_table, seq_lens, code, bits: int) -> torch.Tensor:
        """Launch `_hamming_cosine_kernel` on query and key codes as words (both int32 or both
        uint8) [B, Hq, W], [NB, bs, Hkv, W], query norms [B, Hq], key norms [NB, bs, Hkv]."""
        nb, bs, hkv, w = kw.shape
        b, m = block_table.shape
        hq = qw.shape[1]
        out = torch.empty(b, m, dtype=torch.float32, device=kw.device)
        if b == 0 or m == 0:
            return out
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        seq_lens = seq_lens.contiguous()
        g = hq // hkv
        block_t, block_h = _pow2(bs), _pow2(hkv)
        # (token, KV head) tiles, the group's query heads in turn: Qwen3-4B's 128 x 8 is 8
        # distances a thread on 4 warps
        tile = block_t * block_h
        warps = self.cosine_warps or (4 if tile <= 2048 else 8 if tile <= 4096 else 16)
        self._k.hamming_cosine_kernel[(m, b)](
            kw,
            k_norms,
            qw,
            qn,
            tbl,
            seq_lens,
            out,
            bs,
            hkv,
            g,
            math.pi / bits,
            kw.stride(0),
            kw.stride(1),
            kw.stride(2),
            k_norms.stride(0),
            k_norms.stride(1),
            k_norms.stride(2),
            qw.stride(0),
            qw.stride(1),
            qn.stride(0),
            qn.stride(1),
            tbl.stride(0),
            out.stride(0),
            W=w,
            REDUCE=int(code),
            USE_ASM=not self.interpret,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            num_warps=warps,
        )
        return out

    def block_scores_dot(
        self,
        q: torch.Tensor,
        repr_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "mean",
        out: torch.Tensor | None = None,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        code = group_reduce_code(group_reduce)
        runs = self._can_run(q, repr_cache, block_table, seq_lens)
        shape = (q.shape[0], block_table.shape[1])
        if runs and repr_cache.dim() == 4 and q.dim() == 3 and self._can_write(out, keep_rows, torch.float32, shape):
            # the kernel leaves `keep_rows` as they are in `out`, reading none of their groups
            return self._grouped_scores(
                0, code, q, repr_cache, repr_cache, block_table, seq_lens, block_size, out, keep_rows
            )
        if out is not None:  # the reference's: every row scored (by this backend), then the kept ones restored
            return super().block_scores_dot(
                q, repr_cache, block_table, seq_lens, block_size, group_reduce, out, keep_rows
            )
        if not runs or repr_cache.dim() != 3:
            return super().block_scores_dot(q, repr_cache, block_table, seq_lens, block_size, group_reduce)
        b, hq, d = q.shape
        hkv = repr_cache.shape[1]
        m = block_table.shape[1]
        out = torch.empty(b, m, dtype=torch.float32, device=q.device)
        if b == 0 or m == 0:
            return out
        qc = q if q.stride(-1) == 1 else q.contiguous()
        rc = repr_cache if repr_cache.stride(-1) == 1 else repr_cache.contiguous()
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        block_d = _pow2(d)
        block_h = _pow2(hkv)
        # a [blocks, Hkv, D] tile per program of ~4096 values (4 blocks at the Qwen3-4B shape)
        block_m = self.scores_block_m or max(1, min(4, 4096 // (block_h * block_d)))
        self._k.scores_dot_kernel[(triton_cdiv(m, block_m), b)](
            qc,
            rc,
            tbl,
            seq_lens,
            out,
            m,
            hkv,
            hq // hkv,
            d,
            block_size,
            qc.stride(0),
            qc.stride(1),
            rc.stride(0),
            rc.stride(1),
            tbl.stride(0),
            out.stride(0),
            MODE=int(code),
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            BLOCK_G=_pow2(hq // hkv),
            num_warps=self.scores_warps or 4,
        )
        return out

    # -------------------------------------------------------------- selection
    def block_topk(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        n_blocks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._can_run(scores, k, must_keep, n_blocks) or scores.dtype == torch.float64:
            return super().block_topk(scores, k, must_keep, n_blocks)
        return self._topk(scores, k, must_keep, n_blocks, None, None, 0, True)[:2]

    def select_and_rewrite(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        largest: bool = True,
        out: torch.Tensor | None = None,
        keep_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One kernel: the radix top-k of each row and its rewritten block table and length
        (no host read: safe inside a CUDA graph). largest=False ranks raw Hamming distances
        without a negation pass. `keep_rows` (with `out`): those rows rank nothing and write no
        table, only their length."""
        runs = self._can_run(scores, k, must_keep, block_table, seq_lens) and scores.dtype != torch.float64
        if not runs or not self._can_write(out, keep_rows, block_table.dtype, tuple(scores.shape)):
            return super().select_and_rewrite(
                scores, k, must_keep, block_table, seq_lens, block_size, largest, out, keep_rows
            )
        return self._topk(scores, k, must_keep, None, block_table, seq_lens, block_size, largest, out, keep_rows)[2:]

    # ------------------------------------------------------------ a step's plan
    def window_budgets(
        self,
        seq_lens,
        eligible,
        width,
        block_size,
        unit_blocks=1,
        ratio=1.0,
        fixed_units=None,
        min_units=0,
        init_units=0,
        local_units=0,
        must_select=(),
    ):
        """One launch, a program per row (`_window_budgets_kernel`)."""
        b = seq_lens.shape[0]
        if not self._can_run(seq_lens, eligible) or seq_lens.dim() != 1 or b == 0 or width == 0:
            return super().window_budgets(
                seq_lens,
                eligible,
                width,
                block_size,
                unit_blocks,
                ratio,
                fixed_units,
                min_units,
                init_units,
                local_units,
                must_select,
            )
        dev = seq_lens.device
        k = torch.empty(b, dtype=torch.int64, device=dev)
        must = torch.empty(b, width, dtype=torch.bool, device=dev)
        lens = torch.empty(b, dtype=seq_lens.dtype, device=dev)
        sel = tuple(int(s) for s in must_select)
        ratio_t = self._plan_const(("ratio", float(ratio), dev), [float(ratio)], torch.float64)
        sel_t = self._plan_const(("select", sel, dev), list(sel) or [0], torch.int64)
        self._k.window_budgets_kernel[(b,)](
            seq_lens if seq_lens.is_contiguous() else seq_lens.contiguous(),
            eligible.to(torch.bool).contiguous().view(torch.uint8),
            ratio_t,
            sel_t,
            k,
            must.view(torch.uint8),
            lens,
            width,
            block_size,
            unit_blocks,
            0 if fixed_units is None else int(fixed_units),
            int(min_units),
            int(init_units),
            int(local_units),
            len(sel),
            must.stride(0),
            HAS_FIXED=fixed_units is not None,
            BLOCK=min(_pow2(width, 16), 1024),
        )
        return k, must, lens

    def _plan_const(self, key: tuple, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A constant of `window_budgets` on the device named last in `key`, made once."""
        t = self._plan_consts.get(key)
        if t is None:
            t = self._plan_consts[key] = torch.tensor(values, dtype=dtype, device=key[-1])
        return t

    def add_kept_counts(self, blocks, rows, lens, layer_lens, n_blocks, eligible, block_size) -> None:
        """One launch, a program per layer (`_kept_counts_kernel`)."""
        args = (blocks, rows, lens, layer_lens, n_blocks, eligible, block_size)
        tensors = (blocks, rows, lens, layer_lens, n_blocks, eligible)
        shaped = (
            blocks.dtype == rows.dtype == layer_lens.dtype == torch.int64
            and blocks.dim() == 2
            and blocks.is_contiguous()
            and rows.is_contiguous()
            and lens.dim() == 2
            and lens.stride(-1) == 1
            and eligible.dtype == torch.bool
            and layer_lens.shape[0] == blocks.shape[0]
        )
        if not self._can_run(*tensors) or not shaped or blocks.shape[0] == 0 or lens.shape[0] == 0:
            return super().add_kept_counts(*args)
        b = eligible.shape[0]
        self._k.kept_counts_kernel[(blocks.shape[0],)](
            blocks,
            rows,
            lens,
            layer_lens.contiguous(),
            n_blocks.contiguous(),
            eligible.contiguous().view(torch.uint8),
            b,
            block_size,
            lens.stride(0),
            BLOCK_B=min(_pow2(max(b, 1), 16), 1024),
        )

    def _can_write(self, out: torch.Tensor | None, keep_rows: torch.Tensor | None, dtype: torch.dtype, shape) -> bool:
        """Whether a kernel can write `out` ([B, M] of `shape`) in place and read `keep_rows` [B]
        (or neither is given)."""
        if out is None:
            return keep_rows is None
        ok = self._can_run(out) and out.dtype == dtype and tuple(out.shape) == shape and out.stride(-1) == 1
        rows_ok = self._can_run(keep_rows) and keep_rows.dtype == torch.bool and tuple(keep_rows.shape) == shape[:1]
        return ok and (keep_rows is None or (rows_ok and keep_rows.is_contiguous()))

    def group_sums_dtype(self, device: torch.device, merge: int) -> torch.dtype:
        """Where the kernels run, float8 e4m3 for groups of at most `_FP8_SUMS_MAX_MERGE` keys and
        bfloat16 for groups of at most `_HALF_SUMS_MAX_MERGE`: the scorer reads them every step
        (float32 sums of 4 keys are half the bytes of the keys, float8 ones 1/8). Measured (session
        19): float8 sums of 4 keys decode 32K x 8 at 1.57x / 1.59x of plain vLLM for ESA / GSA
        against 1.50x / 1.49x in bf16, and score what float32 sums score on the Qwen RULER set
        (docs/accuracy.md)."""
        here = torch.device(device).type == ("cpu" if self.interpret else "cuda")
        if not here or merge > _HALF_SUMS_MAX_MERGE:
            return torch.float32
        return torch.float8_e4m3fn if merge <= _FP8_SUMS_MAX_MERGE else torch.bfloat16

    def block_sums_add(self, sums, abs_sums, key, slot_mapping, block_size, merge) -> None:
        """One launch, no host read (safe inside a CUDA graph): `_reps_write_kernel`, one leader
        program per written block and channel chunk (restart + sums in registers, no atomics)."""
        usable = (
            self._can_run(sums, key, slot_mapping)
            and sums.dtype in _SUMS_DTYPES
            and sums.is_contiguous()
            and (abs_sums is None or (abs_sums.is_contiguous() and self._can_run(abs_sums)))
            and key.dim() == 3
            and key.stride(-1) == 1
            and key.stride(1) == key.shape[2]
        )
        if not usable:
            return super().block_sums_add(sums, abs_sums, key, slot_mapping, block_size, merge)
        nb, r, h, d = sums.shape
        self._reps_write(0, sums, abs_sums, key, slot_mapping, block_size, merge, r, h * d)

    def group_bounds_dtype(self, device: torch.device, key_dtype: torch.dtype | None) -> torch.dtype:
        """Where the kernels run, half-precision keys' own dtype: Quest's bounds of bf16 keys in
        bf16 are exact (every bound is one of the keys) at half the bytes of float32 ones, which
        its scorer reads every step (groups of 4 keys: a quarter of the KV cache's bytes instead
        of half)."""
        here = torch.device(device).type == ("cpu" if self.interpret else "cuda")
        return key_dtype if here and key_dtype in _HALF_BOUNDS else torch.float32

    def block_minmax_update(self, mins, maxs, key, slot_mapping, block_size) -> None:
        """One launch, no host read (safe inside a CUDA graph): `_reps_write_kernel`, one leader
        program per written block and channel chunk folds the call's keys of its block in
        registers and stores each bound once. Exact, whatever the order of the keys: float32
        bounds, or bounds in the keys' own half-precision dtype (other keys take the
        reference's outward rounding)."""
        usable = (
            self._can_run(mins, maxs, key, slot_mapping)
            and _bounds_hold_keys(mins.dtype, key.dtype)
            and maxs.dtype == mins.dtype
            and mins.dim() == 3
            and maxs.shape == mins.shape
            and mins.is_contiguous()
            and maxs.is_contiguous()
            and key.dim() == 3
            and key.shape[1:] == mins.shape[1:]
            and key.stride(-1) == 1
            and key.stride(1) == key.shape[2]
        )
        if not usable:
            return super().block_minmax_update(mins, maxs, key, slot_mapping, block_size)
        self._reps_write(1, mins, maxs, key, slot_mapping, block_size, block_size, 1, mins.shape[1] * mins.shape[2])

    def reps_write_layers(self, kind, a, b, k_caches, slot_mapping, block_size, merge) -> None:
        """Every layer in one launch (`_reps_write_kernel` with LAYERED: grid (T, chunks, layers),
        each program reading its layer's tensors through a table of addresses) for calls of up to
        `_REPS_SCAN_BLOCK` tokens (decode steps); longer calls, mixed shapes or dtypes, and a
        table first needed while a CUDA graph is being captured go layer by layer (the contract's
        loop). The address table is made once per set of tensors and kept (a captured graph
        reads it at replay); a call with no tokens only makes the table (outside a capture,
        ahead of the steps a graph captures)."""
        code = {"sums": 0, "minmax": 1, "kvstar": 2}.get(kind)
        t = int(slot_mapping.shape[0])
        if code is None or not a or t > _REPS_SCAN_BLOCK or not self.write_scan_once:
            return super().reps_write_layers(kind, a, b, k_caches, slot_mapping, block_size, merge)
        a0, b0, k0 = a[0], b[0], k_caches[0]
        nb, bs, h, d = k0.shape if k0.dim() == 4 else (0, 0, 0, 0)
        if code == 0:
            r = a0.shape[1] if a0.dim() == 4 else 0
            a_ok = a0.dtype in _SUMS_DTYPES and a0.shape == (nb, r, h, d) and r * merge == block_size
        elif code == 1:  # per group of `merge` tokens: [NB * bs / merge, Hkv, D]
            r = 1
            groups = block_size // merge if merge > 0 and block_size % merge == 0 else 0
            a_ok = _bounds_hold_keys(a0.dtype, k0.dtype) and a0.shape == (nb * groups, h, d) and b0 is not None
            a_ok = a_ok and b0.dtype == a0.dtype
        else:
            r = a0.shape[3] if a0.dim() == 4 else 0
            a_ok = a0.dtype in _REPS_DTYPES and a0.shape == (nb, h, d, r) and r * merge == block_size
            a_ok = a_ok and b0 is not None
        b_ok = b0 is None or (
            b0.shape == a0.shape and b0.dtype == a0.dtype
            if code == 1
            else b0.dtype == torch.float32 and b0.shape[0] == nb and b0.numel() == nb * h * d
        )
        usable = (
            a_ok
            and b_ok
            and bs == block_size
            and k0.stride(-1) == 1
            and self._can_run(slot_mapping, *a, *k_caches)
            and all(x.shape == a0.shape and x.dtype == a0.dtype and x.is_contiguous() for x in a)
            and all((y is None) == (b0 is None) for y in b)
            and all(y.shape == b0.shape and y.is_contiguous() and self._can_run(y) for y in b if y is not None)
            and all(c.shape == k0.shape and c.stride() == k0.stride() and c.dtype == k0.dtype for c in k_caches)
        )
        tab = self._address_table(k_caches, a, b) if usable else None
        if tab is None:
            return super().reps_write_layers(kind, a, b, k_caches, slot_mapping, block_size, merge)
        # Quest's groups are blocks of `merge` tokens to the kernel; the cache keeps its block size
        write_bs = merge if code == 1 else block_size
        self._reps_write(code, a0, b0, k0, slot_mapping, write_bs, merge, r, h * d, layers=(tab, len(a), d, block_size))
        self.layered_writes += t > 0

    def _address_table(self, first, a, b) -> torch.Tensor | None:
        """[3L] `_pointer_table` of `first`, `a` and `b` (b = a's where b is None)."""
        return self._pointer_table(first, a, [y if y is not None else x for x, y in zip(a, b, strict=True)])

    def _reps_write(self, kind, a, b, key, slot_mapping, block_size, merge, r, hd, layers=None) -> None:
        """Launch `_reps_write_kernel` (kind 0 sums, 1 min / max, 2 KVStar's channel-major reps).
        Calls longer than `write_scan_max` tokens (prefills) find each block's keys by a stable
        sort of the block ids (3 torch ops) instead of the in-kernel scan. `layers` = (address
        table, number of layers, head dim, the cache's block size): every layer at once, `key` a
        layer's key cache [NB, cache bs, Hkv, D] (the caller checked that the call fits one scan
        vector)."""
        t = int(slot_mapping.shape[0])
        if t == 0:
            return
        slots = slot_mapping.contiguous()
        sort = t > self.write_scan_max and layers is None
        if sort:
            blocks = torch.where(slots >= 0, slots.clamp(min=0) // block_size, -1)
            srt, order = torch.sort(blocks, stable=True)
            end = torch.searchsorted(srt, srt, right=True)
        else:
            srt = order = end = slots  # unused
        grouped = kind == 0 and a.dtype != torch.float32  # half-precision sums: one rounding per call
        block_r = _pow2(r) if kind == 2 or grouped else 1
        block_c = min(_pow2(hd), 128, max(16, 4096 // block_r))
        tab, n_layers, dh, cache_bs = layers if layers is not None else (slots, 1, hd, block_size)
        self._k.reps_write_kernel[(t, triton_cdiv(hd, block_c), n_layers)](
            key,
            slots,
            srt,
            order,
            end,
            a,
            b if b is not None else a,
            t,
            block_size,
            merge,
            r,
            hd,
            key.stride(0),
            tab,
            n_layers,
            dh,
            key.stride(1) if layers is not None else 0,
            key.stride(2) if layers is not None else 0,
            cache_bs,
            KIND=kind,
            HAS_B=b is not None,
            SORTED=sort,
            SCAN_ONCE=not sort and self.write_scan_once and t <= _REPS_SCAN_BLOCK,
            LAYERED=layers is not None,
            RNE_BY_HAND=self.interpret and a.dtype in (torch.bfloat16, torch.float8_e4m3fn),
            FP8=a.dtype == torch.float8_e4m3fn,
            GROUPED=grouped,
            BLOCK_T=_REPS_SCAN_BLOCK,  # fixed: two compiled variants whatever the call's length
            BLOCK_C=block_c,
            BLOCK_R=block_r,
        )

    def block_scores_minmax(
        self,
        q: torch.Tensor,
        mins: torch.Tensor,
        maxs: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "max",
    ) -> torch.Tensor:
        """Quest scores in one launch (`_scores_minmax_kernel`; per group: `_scores_grouped_kernel`),
        no host read."""
        code = group_reduce_code(group_reduce)
        if (
            self._can_run(q, mins, maxs, block_table, seq_lens)
            and mins.dim() == 4
            and q.dim() == 3
            and maxs.shape == mins.shape
            and maxs.stride() == mins.stride()
        ):
            return self._grouped_scores(1, code, q, mins, maxs, block_table, seq_lens, block_size)
        if (
            not self._can_run(q, mins, maxs, block_table, seq_lens)
            or mins.dim() != 3
            or maxs.shape != mins.shape
            or mins.stride() != maxs.stride()
            or mins.stride(-1) != 1
            or q.dim() != 3
        ):
            return super().block_scores_minmax(q, mins, maxs, block_table, seq_lens, block_size, group_reduce)
        b, hq, d = q.shape
        hkv = mins.shape[1]
        m = block_table.shape[1]
        out = torch.empty(b, m, dtype=torch.float32, device=q.device)
        if b == 0 or m == 0:
            return out
        qc = q if q.stride(-1) == 1 else q.contiguous()
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        # the dot scorer's launch: [blocks, Hkv, D] tiles of ~4096 values (two of them: mins and
        # maxs, 2 blocks at the Qwen3-4B shape) on 4 warps
        block_h, block_d = _pow2(hkv), _pow2(d)
        block_m = self.scores_block_m or max(1, min(4, 4096 // (2 * block_h * block_d)))
        self._k.scores_minmax_kernel[(triton_cdiv(m, block_m), b)](
            qc,
            mins,
            maxs,
            tbl,
            seq_lens,
            out,
            m,
            hkv,
            hq // hkv,
            d,
            block_size,
            qc.stride(0),
            qc.stride(1),
            mins.stride(0),
            mins.stride(1),
            tbl.stride(0),
            out.stride(0),
            MODE=int(code),
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=self.scores_warps or 4,
        )
        return out

    def _grouped_scores(
        self, kind, code, q, a, b, block_table, seq_lens, block_size, out=None, keep_rows=None
    ) -> torch.Tensor:
        """`_scores_grouped_kernel`: block scores [B, M] from per-group representations a (and b)
        [NB, R, Hkv, D], `block_m` block columns a program (`_grouped_launch`); into `out` if
        given, leaving `keep_rows` as they are."""
        bsz, hq, d = q.shape
        groups, hkv = a.shape[1], a.shape[2]
        if block_size % groups:
            raise ValueError(f"{groups} representations per block do not divide the block size {block_size}")
        m = block_table.shape[1]
        if out is None:
            out = torch.empty(bsz, m, dtype=torch.float32, device=q.device)
        if bsz == 0 or m == 0:
            return out
        qc = q if q.stride(-1) == 1 else q.contiguous()
        if a.stride(-1) != 1 or b.stride(-1) != 1:
            a, b = a.contiguous(), b.contiguous()
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        g = hq // hkv
        block_h, block_d = _pow2(hkv), _pow2(d)
        # half-precision sums against every query head of a group on the tensor cores: exact
        # products, float32 sums (the dot needs 16 rows and 16 columns)
        half = (torch.float16, torch.bfloat16)
        use_dot = (
            self.grouped_dot
            and kind == 0
            and qc.dtype in half
            and (a.dtype == qc.dtype or a.dtype == torch.float8_e4m3fn)  # float8 widens exactly to q's dtype
        )
        launch = self._grouped_launch(kind, code, a, use_dot, groups, block_h * block_d)
        widen_f16 = use_dot and a.dtype == torch.float8_e4m3fn and launch.widen == "float16"
        block_m = launch.block_m
        self._k.scores_grouped_kernel[(triton_cdiv(m, block_m), bsz)](
            qc,
            a,
            b,
            tbl,
            seq_lens,
            keep_rows.view(torch.uint8) if keep_rows is not None else seq_lens,  # unused pointer without
            out,
            m,
            groups,
            block_size // groups,
            block_size,
            d,
            qc.stride(0),
            qc.stride(1),
            a.stride(0),
            a.stride(1),
            a.stride(2),
            tbl.stride(0),
            out.stride(0),
            hkv,
            g,
            KIND=kind,
            MODE=int(code),
            HAS_KEEP=keep_rows is not None,
            USE_DOT=use_dot,
            DOT_F32=self.interpret,
            WIDEN_F16=widen_f16,
            BLOCK_M=block_m,
            BLOCK_R=launch.block_r,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            BLOCK_G=max(16, _pow2(g)),
            num_warps=launch.warps,
            num_stages=launch.stages,
        )
        return out

    def _grouped_launch(self, kind, code, a: torch.Tensor, use_dot: bool, groups: int, tile: int) -> GroupedLaunch:
        """The grouped scorer's launch: the overrides set on this object (the tuning sweep's), else
        the setting measured for this GPU model and these sums (`tuned.py`; the tensor-core path
        only, what the search times), else the built-in heuristics: H200, 32K x 8, groups of 4,
        bf16 sums (tune_selection_gpu.py --grouped-only, session 19): 36 us a layer for ESA's mean
        and GSA's max against a bound of 31 us with 16 groups a tile and 2 stages; float8 sums: the
        H100's best (session 22: widened to float16, 4 block columns a program; 48.5 us a layer
        against 56.7 widened to bf16, one column); float32 ESA: 2 groups a tile on 8 warps. Kept
        per call shape (eager decode asks every layer and step)."""
        over = tuple(getattr(self, attr) for attr in _GROUPED_OVERRIDES.values())
        key = (kind, int(code), a.dtype, a.device, use_dot, groups, tile, self.use_tuned, over)
        launch = self._launches.get(key)
        if launch is not None:
            return launch
        if use_dot and a.dtype == torch.float8_e4m3fn:
            base = GroupedLaunch(block_m=4, block_r=16, stages=2, warps=4, widen="float16")
        elif use_dot:
            base = GroupedLaunch(block_m=1, block_r=16, stages=2, warps=4)
        elif kind == 0 and int(code) == 0:
            base = GroupedLaunch(block_m=1, block_r=min(_pow2(groups), 2), stages=3, warps=8)
        else:  # [groups, Hkv, D] tiles of ~4096 values (float32 GSA; Quest's two tiles of mins and maxs)
            width = tile * (2 if kind == 1 else 1)
            base = GroupedLaunch(block_m=1, block_r=max(1, min(_pow2(groups), 4096 // width)), stages=3, warps=4)
        tuned = self._tuned_for(a.device) if self.use_tuned and use_dot and not self.interpret else None
        if tuned is not None:
            base = tuned.grouped(a.dtype, "mean" if int(code) == 0 else "max") or base
        launch = base.model_copy(update={k: v for k, v in zip(_GROUPED_OVERRIDES, over, strict=True) if v is not None})
        if use_dot and launch.block_r < 16:  # the tensor cores' smallest tile
            launch = launch.model_copy(update={"block_r": 16})
        self._launches[key] = launch
        return launch

    def override_grouped(self, launch: GroupedLaunch | None) -> None:
        """Run the grouped scorer with `launch` (None: the tuned or built-in one again)."""
        for field, attr in _GROUPED_OVERRIDES.items():
            setattr(self, attr, None if launch is None else getattr(launch, field))

    def _tuned_for(self, device: torch.device) -> TunedFile | None:
        """This GPU model's tuned settings, read once per device (a host query, never inside a
        captured graph's replay)."""
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._tuned:
            self._tuned[idx] = load_tuned(torch.cuda.get_device_name(idx))
        return self._tuned[idx]

    # ---------------------------------------------------------------- KVStar
    def kvstar_reps_dtype(self, device: torch.device) -> torch.dtype | None:
        """bfloat16 channel-major representations where the kernels run: the scorer reads 2 bytes
        per kept channel and representation (half of float32 sums, and only the kept channels)."""
        return torch.bfloat16 if torch.device(device).type == ("cpu" if self.interpret else "cuda") else None

    def kvstar_reps_add(self, reps, abs_sums, key, slot_mapping, block_size, merge) -> None:
        """One launch, no host read (safe inside a CUDA graph): `_reps_write_kernel` with one
        leader program per written block and channel chunk: each group's keys of the call summed
        in float32, one rounding into the stored representation (no atomics on the bfloat16
        storage), the block's |K| sums stored once."""
        usable = (
            self._can_run(reps, abs_sums, key, slot_mapping)
            and reps.dim() == 4
            and reps.is_contiguous()
            and reps.dtype in _REPS_DTYPES
            and abs_sums.dtype == torch.float32
            and abs_sums.is_contiguous()
            and abs_sums.shape == reps.shape[:3]
            and key.dim() == 3
            and key.shape[1:] == reps.shape[1:3]
            and key.stride(-1) == 1
            and key.stride(1) == key.shape[2]
            and merge >= 1
            and block_size % merge == 0
            and block_size // merge == reps.shape[3]
        )
        if not usable:
            return super().kvstar_reps_add(reps, abs_sums, key, slot_mapping, block_size, merge)
        _, h, d, r = reps.shape
        self._reps_write(2, reps, abs_sums, key, slot_mapping, block_size, merge, r, h * d)

    def kvstar_block_mass(self, q, reps, abs_sums, block_table, seq_lens, block_size, kept_dims, scale):
        """Four launches, no host read: kept channels per (row, KV head) (`_kvstar_importance_kernel`
        partial |K| sums, `_kvstar_channels_kernel`),
        per-block log2-sum-exps over the kept channels of the representations
        (`_kvstar_logits_kernel`), the softmax mass per block (`_kvstar_mass_kernel`). Logits are
        float32-accumulated dots: bf16 operands for bf16 queries; with half-precision reps, tf32 for
        float32 / fp16 queries on the GPU (exact for the values of a bf16 / fp16 model, as
        `KVStarScorer`'s float32 windows hold); IEEE float32 with float32 reps."""
        d = q.shape[-1]
        if not 1 <= int(kept_dims) <= d:
            raise ValueError(f"kvstar_block_mass: kept_dims must be in [1, {d}], got {kept_dims}")
        usable = (
            self._can_run(q, reps, abs_sums, block_table, seq_lens)
            and q.dim() == 4
            and reps.dim() == 4
            and reps.dtype in _REPS_DTYPES
            and q.dtype in _REPS_DTYPES
            and abs_sums.dtype == torch.float32
            and abs_sums.shape == reps.shape[:3]
            and reps.shape[2] == d
            and q.shape[2] % reps.shape[1] == 0
            and q.stride(-1) == 1
            and reps.stride(-1) == 1
            and abs_sums.stride(-1) == 1
            and block_table.dim() == 2
            and not block_table.is_floating_point()
        )
        if not usable:
            return super().kvstar_block_mass(q, reps, abs_sums, block_table, seq_lens, block_size, kept_dims, scale)
        b, w, hq, _ = q.shape
        nb, hkv, _, r = reps.shape
        m = block_table.shape[1]
        kept_dims = int(kept_dims)
        out = torch.empty(b, m, dtype=torch.float32, device=q.device)
        if b == 0 or m == 0:
            return out
        g = hq // hkv
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        kept = torch.empty(b, hkv, kept_dims, dtype=torch.int32, device=q.device)
        lse = torch.empty(b, w * hq, m, dtype=torch.float32, device=q.device)
        block_d = _pow2(d)
        # channel importance in two launches: partial sums over chunks of the table (spread over
        # the SMs), then per (row, head) the parts added in order and the top kept channels
        block_j = max(16, _pow2(triton_cdiv(m, 64)))
        parts = triton_cdiv(m, block_j)
        part = torch.empty(b * hkv, parts, d, dtype=torch.float32, device=q.device)
        self._k.kvstar_importance_kernel[(parts, b * hkv)](
            abs_sums,
            tbl,
            seq_lens,
            part,
            m,
            nb,
            block_size,
            d,
            parts,
            abs_sums.stride(0),
            abs_sums.stride(1),
            tbl.stride(0),
            HKV=hkv,
            BLOCK_J=block_j,
            BLOCK_D=block_d,
            num_warps=4,
        )
        self._k.kvstar_channels_kernel[(b * hkv,)](
            part, kept, d, parts, kept_dims, BLOCK_S=_pow2(parts), BLOCK_D=block_d, num_warps=4
        )
        # a [kept-channel chunk, BT blocks x RC representations] tile per step: 128 columns = 2 blocks
        # of R = 64 (block 128, merge 2); at least two blocks per tile, wide R walked in chunks
        block_n = self.kvstar_block_n or 128  # the H200 sweep: 51 us vs 57 at 256 (32K x 8)
        rc = min(_pow2(r), block_n // 2)
        wg = w * g
        block_g = min(_pow2(wg, 16), 64)
        block_k = self.kvstar_block_k or min(32, _pow2(kept_dims, 16))
        bt = block_n // rc
        # tiles per program: several let the loads of the next tile pipeline under this one's math
        # (two stages: one tile in flight while one is scored). H200, 32K x 8, 36 calls in a graph
        # (gpu_runs/2026-12-05_s16/kvstar_grid.json): 8 tiles x 2 stages 43.1 us, 4 x 2 44.7, the
        # former 7 x 3 52.2; 8 warps 60-94, 16-32 tiles 52-82
        tiles = triton_cdiv(m, bt) * b * hkv
        tpp = self.kvstar_tiles_per_prog or max(1, min(8, tiles // (6 * self._sm_count(q.device))))
        grid = (triton_cdiv(triton_cdiv(m, bt), tpp), b * hkv, triton_cdiv(wg, block_g))
        self._k.kvstar_logits_kernel[grid](
            q,
            reps,
            kept,
            tbl,
            seq_lens,
            lse,
            float(scale) * _LOG2E,
            m,
            nb,
            block_size,
            r,
            g,
            wg,
            hq,
            kept_dims,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            reps.stride(0),
            reps.stride(1),
            reps.stride(2),
            tbl.stride(0),
            lse.stride(0),
            lse.stride(1),
            HKV=hkv,
            BLOCK_G=block_g,
            BLOCK_K=block_k,
            NK=triton_cdiv(kept_dims, block_k),
            RC=rc,
            NR=triton_cdiv(r, rc),
            BT=bt,
            TPP=tpp,
            PREC="ieee" if self.interpret or reps.dtype == torch.float32 else "tf32",
            num_warps=self.kvstar_warps or 4,
            num_stages=self.kvstar_stages or 2,
            DOT_BF16=not self.interpret and q.dtype == torch.bfloat16 and reps.dtype == torch.bfloat16,
        )
        block_j = min(_pow2(m, 16), 512)
        self._k.kvstar_mass_kernel[(b,)](
            lse,
            seq_lens,
            out,
            m,
            block_size,
            w * hq,
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            BLOCK_H=min(_pow2(w * hq), 8192 // block_j),
            BLOCK_J=block_j,
            ONE_TILE=m <= block_j,
            num_warps=8,
        )
        return out

    def _topk(
        self, scores, k, must_keep, n_blocks, block_table, seq_lens, block_size, largest, out=None, keep_rows=None
    ):
        b, m = scores.shape
        dev = scores.device
        rewrite = block_table is not None
        if rewrite:  # the kernel writes no ids / counts when it rewrites the table
            ids = counts = None
        else:
            ids = torch.empty(b, m, dtype=torch.int32, device=dev)
            counts = torch.empty(b, dtype=torch.int32, device=dev)
        if b == 0:
            extra = (torch.empty_like(block_table), torch.empty_like(seq_lens)) if rewrite else ()
            return (ids, counts, *extra)
        sc = scores if scores.stride(-1) == 1 else scores.contiguous()
        if sc.dtype != torch.float32:
            sc = sc.to(torch.float32)  # order-preserving for half / bfloat16
        keep = must_keep if must_keep.stride(-1) == 1 else must_keep.contiguous()
        if keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)
        kk = k.to(dev)
        if rewrite:
            tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
            new_table = out if out is not None else torch.empty(b, m, dtype=tbl.dtype, device=dev)
            new_lens = torch.empty(b, dtype=seq_lens.dtype, device=dev)
            nblk = seq_lens
            strides = (tbl.stride(0), new_table.stride(0))
            ids_arg, counts_arg, ids_stride = new_table, new_lens, 0  # unused pointers
        else:
            tbl = new_table = new_lens = ids  # unused pointers
            nblk = n_blocks.to(dev)
            strides = (0, 0)
            ids_arg, counts_arg, ids_stride = ids, counts, ids.stride(0)
        keep_rows_arg = keep_rows.view(torch.uint8) if keep_rows is not None else kk  # an unused pointer without
        block_m = _pow2(m, 16)
        warps, radix, sort = self.topk_launch(block_m)
        self._k.topk_kernel[(b,)](
            sc,
            kk,
            keep,
            keep_rows_arg,
            nblk,
            ids_arg,
            counts_arg,
            tbl,
            seq_lens if rewrite else nblk,
            new_table,
            new_lens,
            m,
            max(block_size, 1),
            sc.stride(0),
            keep.stride(0),
            ids_stride,
            *strides,
            NB_FROM_LEN=rewrite,
            REWRITE=rewrite,
            HAS_KEEP=keep_rows is not None,
            LARGEST=largest,
            BLOCK_M=block_m,
            num_warps=warps,
            RADIX_BITS=radix,
            SORT=sort,
            EARLY_EXIT=self.topk_early_exit,
        )
        if rewrite:
            return ids, counts, new_table, new_lens
        return ids, counts

    # -------------------------------------------------------------- attention
    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        num_splits: int | None = None,
        block_h: int | None = None,
        block_n: int | None = None,
        num_stages: int = 2,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-K paged decode (see `_attn_split_kernel`); num_splits / block_h (query heads
        per program, a power of two >= 16) override the heuristics."""
        supported = q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        if (
            not self._can_run(q, k_cache, v_cache, block_table, seq_lens)
            or not supported
            or k_cache.dtype != q.dtype
            or v_cache.dtype != q.dtype
            or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1
        ):
            return super().paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
        b, hq, d = q.shape
        _, bs, hkv, _ = k_cache.shape
        dv = v_cache.shape[-1]
        m = block_table.shape[1]
        g = hq // hkv
        dev = q.device
        out = torch.empty(b, hq, dv, dtype=q.dtype, device=dev)
        lse = torch.empty(b, hq, dtype=torch.float32, device=dev)
        if b == 0:
            return out, lse
        qc = q if q.stride(-1) == 1 else q.contiguous()
        tbl = block_table if block_table.stride(-1) == 1 else block_table.contiguous()

        shared = (
            v_cache.data_ptr() == k_cache.data_ptr()
            and v_cache.stride()[:3] == k_cache.stride()[:3]
            and dv < d
            and dv == _pow2(dv)
        )
        if shared:
            da, db = dv, d - dv
        elif d == _pow2(d):
            da, db = d, 0
        else:
            da = 1 << (d.bit_length() - 1)
            db = d - da
        wide = max(d, dv) > 256
        fp32 = q.dtype == torch.float32
        if block_n is None:  # measured on the H100: 128-token tiles ~3% faster for 128-dim bf16 heads
            block_n = 16 if (wide and fp32) else (32 if (wide or fp32) else 128)
        cap = 32 if (wide and fp32) else 64  # MLA h128: 64 heads per program ran 2x faster than 32
        block_h = min(_pow2(g, 16), cap) if block_h is None else _pow2(block_h, 16)
        n_hchunk = triton_cdiv(g, block_h)
        if num_splits is None:
            base = b * hkv * n_hchunk
            target = 3 * self._sm_count(dev)
            by_len = max(1, (m * bs) // 512)
            num_splits = max(1, min(triton_cdiv(target, base), by_len, 128))
        num_splits = int(num_splits)
        if num_splits > 1:
            opart = torch.empty(b, hq, num_splits, dv, dtype=torch.float32, device=dev)
            lpart = torch.empty(b, hq, num_splits, dtype=torch.float32, device=dev)
        else:
            opart = lpart = lse  # unused
        warps = 8 if wide else 4
        prec = "ieee" if fp32 else None
        self._k.attn_split_kernel[(hkv * n_hchunk, b, num_splits)](
            qc,
            k_cache,
            v_cache,
            tbl,
            seq_lens,
            opart,
            lpart,
            out,
            lse,
            float(scale) * _LOG2E,
            g,
            bs,
            qc.stride(0),
            qc.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            tbl.stride(0),
            hq * num_splits,
            num_splits,
            1,
            out.stride(0),
            out.stride(1),
            hq,
            NUM_SPLITS=num_splits,
            N_HCHUNK=n_hchunk,
            DA=da,
            DB=db,
            DV=dv,
            SHARED_KV=shared,
            BLOCK_H=block_h,
            BLOCK_N=block_n,
            BLOCK_DA=_pow2(da, 16),
            BLOCK_DB=_pow2(db, 16),
            BLOCK_DV=_pow2(dv, 16),
            PREC=prec,
            UPCAST=self.interpret and q.dtype == torch.bfloat16,
            num_warps=warps,
            num_stages=num_stages,
        )
        if num_splits > 1:
            self._k.attn_combine_kernel[(b, hq)](
                opart,
                lpart,
                out,
                lse,
                hq,
                hq * num_splits,
                num_splits,
                out.stride(0),
                out.stride(1),
                NUM_SPLITS=num_splits,
                DV=dv,
                BLOCK_S=_pow2(num_splits),
                BLOCK_DV=_pow2(dv),
            )
        return out, lse


def triton_cdiv(a: int, b: int) -> int:
    """Ceil division for grid sizes."""
    return -(-int(a) // int(b))
