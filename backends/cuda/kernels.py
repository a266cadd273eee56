"""Triton kernels of the CUDA backend.

The kernels are written as plain functions and turned into Triton kernels by `get_kernels`,
once per mode: compiled for the GPU, or run by Triton's interpreter on CPU tensors. Building
them on demand (instead of decorating at import) lets a test pick the interpreter without
depending on when TRITON_INTERPRET was set, and lets both modes live in one process.

Interpreter mode needs TRITON_INTERPRET=1 set before `triton` is first imported: the standard
library's reductions (tl.sum, tl.max, tl.cumsum) are themselves jit functions built at import.

Kernels never call each other. Pieces two kernels (or two places of one) share are
`@triton.jit` helpers, decorated at import like `tl.sum`, so they are in the mode the process
imported triton in (`_order_key`, `_quest_group_bound`, `_group_query_projection`); small ones
(popcount, ...) are inline.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl


# ----------------------------------------------------------------------------------- hashing
def _sign_pack_kernel(
    x_ptr,
    out_ptr,
    slot_ptr,
    R,
    N,
    C,
    stride_xt,
    stride_xr,
    stride_ot,
    stride_or,
    HAS_SLOTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """x [T, R, N] float -> out[row, R, C] uint8 with bit i of byte j = x[.., 8j+i] >= 0.

    row = slot_mapping[t] when HAS_SLOTS (negative slots are skipped), else t. Fusing the pack
    with the scatter writes the codes straight into the paged code cache.
    """
    t = tl.program_id(0)
    rb = tl.program_id(1)
    if HAS_SLOTS:
        row = tl.load(slot_ptr + t).to(tl.int64)
    else:
        row = t.to(tl.int64)
    if row >= 0:
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        i = tl.arange(0, 8)
        col = c[None, :, None] * 8 + i[None, None, :]
        m = (r[:, None, None] < R) & (col < N)
        x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + r[:, None, None] * stride_xr + col, mask=m, other=-1.0)
        bit = ((x >= 0) & m).to(tl.int32)
        byte = tl.sum(bit << i[None, None, :], axis=2)
        om = (r[:, None] < R) & (c[None, :] < C)
        tl.store(out_ptr + row * stride_ot + r[:, None] * stride_or + c[None, :], byte.to(tl.uint8), mask=om)


def _hash_write_kernel(
    x_ptr,
    w_ptr,
    slot_ptr,
    code_ptr,
    T,
    D,
    NBITS,
    C,
    stride_xt,
    stride_xh,
    stride_wd,
    stride_cs,
    stride_ch,
    tab_ptr,
    L,
    HKV,
    BS,
    stride_xo,
    center_ptr,
    norm_ptr,
    stride_center_h,
    stride_ns,
    stride_nh,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SMALL: tl.constexpr,
    LAYERED: tl.constexpr,
    HAS_CENTER: tl.constexpr = False,
    NORMS: tl.constexpr = False,
):
    """Hash keys into the paged code cache in one launch: program (token tile, KV head, bit tile)
    projects x [BLOCK_T, D] @ weight [D, BLOCK_N of NBITS] in float32, packs the sign bits into
    bytes and stores each token's codes at its slot (slot < 0 skipped). The projection is a
    float32 dot like the query hash of `_qhash_planes_kernel`, so keys and queries are hashed
    alike. Bit tiles (BLOCK_N a multiple of 8) keep wide codes (MLA's 576 bits) in shared memory.
    SMALL (a few tokens: small decode batches): products summed over D chunks without `tl.dot`,
    whose 16-row minimum would do 16x the work for one token.
    LAYERED: every layer of a decode step in one launch, axis 1 = layer * HKV + head; layer l's key
    cache, weight and code cache come from the addresses tab[l], tab[L + l], tab[2L + l] (x_ptr,
    w_ptr, code_ptr give their dtypes) and token t's key from the cache at its slot:
    cache[slot // BS, slot % BS, h, :] at strides (stride_xt, stride_xo, stride_xh, 1).
    HAS_CENTER: keys are hashed as x - center[h] (center [Hkv, D], head stride stride_center_h; in
    LAYERED mode layer l's from the address tab[3L + l], 0 = no center for that layer). NORMS: the
    bit-tile-0 program also stores |x - center| (float32 sum of squares, rounded once to the
    norm cache's dtype) at norm_ptr + slot * stride_ns + h * stride_nh (LAYERED: tab[4L + l]);
    `hash_norm_write`."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    n0 = tl.program_id(2) * BLOCK_N
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    slot = tl.load(slot_ptr + t, mask=tm, other=-1).to(tl.int64)
    if LAYERED:
        lay = h // HKV
        h = h % HKV
        x_ptr = tl.load(tab_ptr + lay).to(tl.pointer_type(x_ptr.dtype.element_ty))
        w_ptr = tl.load(tab_ptr + L + lay).to(tl.pointer_type(w_ptr.dtype.element_ty))
        code_ptr = tl.load(tab_ptr + 2 * L + lay).to(tl.pointer_type(code_ptr.dtype.element_ty))
        if HAS_CENTER:
            c_addr = tl.load(tab_ptr + 3 * L + lay)
            has_c = c_addr != 0
            center_ptr = c_addr.to(tl.pointer_type(center_ptr.dtype.element_ty))
        if NORMS:
            norm_ptr = tl.load(tab_ptr + 4 * L + lay).to(tl.pointer_type(norm_ptr.dtype.element_ty))
        sc = tl.maximum(slot, 0)
        x_row = (sc // BS) * stride_xt + (sc % BS) * stride_xo
        tm = tm & (slot >= 0)
    else:
        x_row = t.to(tl.int64) * stride_xt
    col = n0 + tl.arange(0, BLOCK_N)
    cm = col < NBITS
    proj = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        xt = tl.load(
            x_ptr + x_row[:, None] + h * stride_xh + d[None, :],
            mask=tm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_CENTER:
            cmask = dm
            if LAYERED:
                cmask = dm & has_c
            ct = tl.load(center_ptr + h * stride_center_h + d, mask=cmask, other=0.0).to(tl.float32)
            xt = tl.where(tm[:, None], xt - ct[None, :], 0.0)
        if NORMS:
            sumsq += tl.sum(xt * xt, axis=1)
        wt = tl.load(w_ptr + d[:, None] * stride_wd + col[None, :], mask=dm[:, None] & cm[None, :], other=0.0)
        if SMALL:
            proj += tl.sum(xt[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
        else:
            proj += tl.dot(xt, wt.to(tl.float32), input_precision="ieee")
    bits = ((proj >= 0) & cm[None, :]).to(tl.int32)
    shift = tl.arange(0, 8)
    byte = tl.sum(tl.reshape(bits, [BLOCK_T, BLOCK_N // 8, 8]) << shift[None, None, :], axis=2)
    c = n0 // 8 + tl.arange(0, BLOCK_N // 8)
    om = (slot[:, None] >= 0) & (c[None, :] < C)
    tl.store(code_ptr + slot[:, None] * stride_cs + h * stride_ch + c[None, :], byte.to(tl.uint8), mask=om)
    if NORMS:
        nm = (slot >= 0) & (n0 == 0)
        norm = tl.sqrt_rn(sumsq)
        if norm_ptr.dtype.element_ty == tl.bfloat16:
            # rounded to nearest even by hand, as torch's .to(bfloat16) (the interpreter's cast truncates)
            u = norm.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(
                norm_ptr + slot * stride_ns + h * stride_nh, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=nm
            )
        else:
            tl.store(norm_ptr + slot * stride_ns + h * stride_nh, norm.to(norm_ptr.dtype.element_ty), mask=nm)


# ----------------------------------------------------------------------------------- scoring
def _qplanes_kernel(
    q_ptr,
    planes_ptr,
    G,
    W: tl.constexpr,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_pp,
    P: tl.constexpr,
    WBITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Bit planes of the GQA group's per-bit one-counts, for one (row, KV head).

    For every code bit i, cnt_i = number of the group's G query codes with bit i set. A key
    with bit i = 0 adds cnt_i to the summed Hamming distance, a key with bit i = 1 adds
    G - cnt_i. Planes p < P hold bit p of cnt (p-th binary digit, bit-sliced across the word),
    planes P + p bit p of G - cnt, so the scorer needs P popcounts per key word instead of G.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    i = tl.arange(0, WBITS)
    gm = g < G
    for w in range(W):
        words = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + w, mask=gm, other=0).to(tl.int32)
        bits = (words[:, None] >> i[None, :]) & 1
        cnt = tl.sum(bits, axis=0)  # [WBITS]
        rest = G - cnt
        base = planes_ptr + b * stride_pb + h * W + w
        for p in tl.static_range(P):
            cp = tl.sum(((cnt >> p) & 1) << i, axis=0)
            dp = tl.sum(((rest >> p) & 1) << i, axis=0)
            tl.store(base + p * stride_pp, cp)
            tl.store(base + (P + p) * stride_pp, dp)


@triton.jit
def _group_query_projection(
    q_ptr,
    w_ptr,
    b,
    h,
    g,
    gm,
    col,
    cm,
    D,
    G,
    stride_qb,
    stride_qh,
    stride_wd,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row b's queries of KV head h's group (heads h * G + g, g < G where `gm`) [BLOCK_G, D]
    projected on the weight's columns `col` (valid where `cm`) in float32 (`tl.dot`, as the key
    hash), and their squared norms [BLOCK_G]: the query side of the fused hash scorers."""
    proj = tl.zeros([BLOCK_G, 32], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_G], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        qt = tl.load(
            q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
            mask=gm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        wt = tl.load(w_ptr + d[:, None] * stride_wd + col[None, :], mask=dm[:, None] & cm[None, :], other=0.0)
        proj += tl.dot(qt, wt.to(tl.float32), input_precision="ieee")
        sumsq += tl.sum(qt * qt, axis=1)
    return proj, sumsq


def _qhash_planes_kernel(
    q_ptr,
    w_ptr,
    planes_ptr,
    G,
    D,
    NBITS,
    stride_qb,
    stride_qh,
    stride_wd,
    stride_pb,
    stride_pp,
    W: tl.constexpr,
    P: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Hash the GQA group's queries and emit the scorer's bit planes directly (one word).

    Program (row, KV head, 32-bit word): proj = q_group [G, D] @ weight[:, 32 bits] in float32,
    bit = proj >= 0, then the same planes as `_qplanes_kernel`. Replaces cast + matmul + pack +
    planes (four launches) in a decode step; the packed query codes never exist.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    w = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    i = tl.arange(0, 32)
    col = w * 32 + i
    cm = col < NBITS
    proj, _ = _group_query_projection(
        q_ptr, w_ptr, b, h, g, gm, col, cm, D, G, stride_qb, stride_qh, stride_wd, BLOCK_G, BLOCK_D
    )
    bits = ((proj >= 0) & gm[:, None] & cm[None, :]).to(tl.int32)
    cnt = tl.sum(bits, axis=0)
    rest = tl.where(cm, G - cnt, 0)
    base = planes_ptr + b * stride_pb + h * W + w
    for p in tl.static_range(P):
        tl.store(base + p * stride_pp, tl.sum(((cnt >> p) & 1) << i, axis=0))
        tl.store(base + (P + p) * stride_pp, tl.sum(((rest >> p) & 1) << i, axis=0))


def _hamming_kernel(
    kw_ptr,
    planes_ptr,
    table_ptr,
    seqlen_ptr,
    out_ptr,
    M,
    BS,
    COLS,
    stride_kb,
    stride_kt,
    stride_pb,
    stride_pp,
    stride_tb,
    stride_ob,
    P: tl.constexpr,
    REDUCE: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    """Summed-over-heads Hamming distance of every token of a block, reduced per block.

    Reads the block's codes in place through the block table as [bs, Hkv * W] words, one
    contiguous chunk per block. The GQA group is folded in through the query bit planes, so
    [B, Hq, tokens] never exists. REDUCE: a `ReduceCode` (0 min, 1 mean, 2 max). +inf past the
    row's blocks.
    """
    jb = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    n_b = (seq_len + BS - 1) // BS
    t = tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_COLS)
    cm = col < COLS
    for jj in tl.static_range(BLOCKS_PER_PROG):
        j = jb * BLOCKS_PER_PROG + jj
        in_row = j < n_b
        phys = tl.load(table_ptr + b * stride_tb + j, mask=in_row & (j < M), other=0).to(tl.int64)
        tm = (t < BS) & (j * BS + t < seq_len) & in_row
        k = tl.load(
            kw_ptr + phys * stride_kb + t[:, None] * stride_kt + col[None, :],
            mask=tm[:, None] & cm[None, :],
            other=0,
        ).to(tl.int32)
        acc = tl.zeros([BLOCK_T, BLOCK_COLS], dtype=tl.int32)
        for p in tl.static_range(P):
            cp = tl.load(planes_ptr + b * stride_pb + p * stride_pp + col, mask=cm, other=0)
            dp = tl.load(planes_ptr + b * stride_pb + (P + p) * stride_pp + col, mask=cm, other=0)
            y = (k & dp[None, :]) | (~k & cp[None, :])
            if USE_ASM:
                y = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [y], dtype=tl.int32, is_pure=True, pack=1)
            else:
                y = y - ((y >> 1) & 0x55555555)
                y = (y & 0x33333333) + ((y >> 2) & 0x33333333)
                y = (y + (y >> 4)) & 0x0F0F0F0F
                y = y + (y >> 8)
                y = (y + (y >> 16)) & 0x3F
            acc += y << p
        dist = tl.sum(acc, axis=1)  # [BLOCK_T] int32
        if REDUCE == 0:
            red = tl.min(tl.where(tm, dist, 2147483647), axis=0).to(tl.float32)
        elif REDUCE == 2:
            red = tl.max(tl.where(tm, dist, -1), axis=0).to(tl.float32)
        else:
            total = tl.sum(tl.where(tm, dist, 0), axis=0).to(tl.float32)
            count = tl.maximum(tl.sum(tm.to(tl.int32), axis=0), 1).to(tl.float32)
            red = tl.div_rn(total, count)
        red = tl.where(in_row, red, float("inf"))
        tl.store(out_ptr + b * stride_ob + j, red, mask=j < M)


def _qhash_norm_kernel(
    q_ptr,
    w_ptr,
    qw_ptr,
    qn_ptr,
    G,
    D,
    NBITS,
    stride_qb,
    stride_qh,
    stride_wd,
    stride_ob,
    stride_oh,
    stride_nb,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Hash the GQA group's queries into int32 code words and take their norms, in one launch.

    Program (row, KV head, 32-bit word): proj = q_group [G, D] @ weight[:, 32 bits] in float32
    (`tl.dot` like `_qhash_planes_kernel` and the key hash), word = the packed sign bits (bit i
    = column 32 w + i >= 0, the little-endian int32 view of `hash_encode`'s bytes), stored at
    qw[row, head, w]; the word-0 programs also store |q| (float32) at qn[row, head]. Replaces
    cast + matmul + pack + norm of `hash_cosine_block_scores`' query side.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    w = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    i = tl.arange(0, 32)
    col = w * 32 + i
    cm = col < NBITS
    proj, sumsq = _group_query_projection(
        q_ptr, w_ptr, b, h, g, gm, col, cm, D, G, stride_qb, stride_qh, stride_wd, BLOCK_G, BLOCK_D
    )
    bits = ((proj >= 0) & cm[None, :]).to(tl.int32)
    word = tl.sum(bits << i[None, :], axis=1)  # [BLOCK_G]
    head = h * G + g
    tl.store(qw_ptr + b * stride_ob + head * stride_oh + w, word, mask=gm)
    tl.store(qn_ptr + b * stride_nb + head, tl.sqrt_rn(sumsq), mask=gm & (w == 0))


def _hamming_cosine_kernel(
    kw_ptr,
    kn_ptr,
    qw_ptr,
    qn_ptr,
    table_ptr,
    seqlen_ptr,
    out_ptr,
    BS,
    HKV,
    G,
    SCALE,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_nb,
    stride_nt,
    stride_nh,
    stride_qb,
    stride_qh,
    stride_qnb,
    stride_qnh,
    stride_tb,
    stride_ob,
    W: tl.constexpr,
    REDUCE: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Norm-weighted SimHash distance of every token of a block, reduced per block
    (`hamming_cosine_block_scores`).

    Program (block column j, row b) reads the block's codes in place through the block table and
    tiles (token, KV head): for each member g of the GQA group (query head h * G + g of KV head h)
    and each code word w (W words: int32, or bytes widened, upper bits zero) the keys' word
    [BLOCK_T, BLOCK_H] and the queries' [BLOCK_H] give d[t, h] += popcount(k ^ q), one thread's
    register per (token, KV head), so cos(SCALE * d) (SCALE = pi / bits) is taken once per
    (token, query head) with no reduction across threads before it; est[t, h] += |q[b, h * G + g]|
    * cos(...). Token distance = -sum_h est[t, h] * |k[t, h]|; REDUCE (a `ReduceCode`: 0 min,
    1 mean, 2 max) over the block's valid tokens; +inf past the row's blocks. [B, Hq, tokens]
    never exists. The word loads after the first hit the block's lines in L1 (each code byte comes
    from memory once). Two-dimensional tiles only: a [token, KV head, group member] tile (the first
    version) took 246 registers a thread for Qwen3-4B's shape on sm_90 with its broadcasts
    converted through shared memory, this one 77 (ptxas -v, 4 warps).
    """
    j = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    n_b = (seq_len + BS - 1) // BS
    in_row = j < n_b
    phys = tl.load(table_ptr + b * stride_tb + j, mask=in_row, other=0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    hh = tl.arange(0, BLOCK_H)
    tm = (t < BS) & (j * BS + t < seq_len) & in_row
    hm = hh < HKV
    km = tm[:, None] & hm[None, :]
    k_at = kw_ptr + phys * stride_kb + t[:, None] * stride_kt + hh[None, :] * stride_kh  # [BLOCK_T, BLOCK_H]
    kn = tl.load(kn_ptr + phys * stride_nb + t[:, None] * stride_nt + hh[None, :] * stride_nh, mask=km, other=0.0)
    est = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for g in range(0, G):
        head = hh * G + g  # [BLOCK_H]: query head g of each KV head's group
        q_at = qw_ptr + b * stride_qb + head * stride_qh
        d = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.int32)
        for w in tl.static_range(W):
            kw = tl.load(k_at + w, mask=km, other=0).to(tl.int32)
            qw = tl.load(q_at + w, mask=hm, other=0).to(tl.int32)
            y = kw ^ qw[None, :]
            if USE_ASM:
                y = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [y], dtype=tl.int32, is_pure=True, pack=1)
            else:
                y = y - ((y >> 1) & 0x55555555)
                y = (y & 0x33333333) + ((y >> 2) & 0x33333333)
                y = (y + (y >> 4)) & 0x0F0F0F0F
                y = y + (y >> 8)
                y = (y + (y >> 16)) & 0x3F
            d += y
        qn = tl.load(qn_ptr + b * stride_qnb + head * stride_qnh, mask=hm, other=0.0).to(tl.float32)
        # cos(x) of x = d * SCALE (rounded as the torch definition rounds it) as -sin(u), u = x -
        # pi/2 in [-pi/2, pi/2] (pi/2 in two parts, the first subtraction exact: no bias near
        # cos = 0, where most heads of random codes sit), sin by its Taylor polynomial to u^13
        # (remainder < 7e-10): within 1.4e-7 of cos(x) relative, 1.2e-7 of torch.cos for every d
        # and code width. tl.cos (libdevice's cosf, range reduction for any float) took twice
        # this polynomial's time in a first version of this scorer on the H100, whose time is
        # this arithmetic and the popcounts rather than its loads
        x = d.to(tl.float32)
        if USE_ASM:  # x rounded before the subtraction (mul.rn: never contracted into an fma)
            x = tl.inline_asm_elementwise(
                "mul.rn.f32 $0, $1, $2;",
                "=f,f,f",
                [x, tl.zeros_like(x) + SCALE],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            x = x * SCALE
        u = (x - 1.5707963705062866) + 4.371138828673793e-08
        u2 = u * u
        p = 1.6059043836821613e-10 * u2 - 2.505210838544172e-08
        p = p * u2 + 2.7557319223985893e-06
        p = p * u2 - 1.984126984126984e-04
        p = p * u2 + 8.333333333333333e-03
        p = p * u2 - 1.6666666666666666e-01
        p = p * u2 + 1.0
        est -= qn[None, :] * (u * p)
    dist = -tl.sum(est * kn.to(tl.float32), axis=1)  # [BLOCK_T]
    if REDUCE == 0:
        red = tl.min(tl.where(tm, dist, float("inf")), axis=0)
    elif REDUCE == 2:
        red = tl.max(tl.where(tm, dist, float("-inf")), axis=0)
    else:
        total = tl.sum(tl.where(tm, dist, 0.0), axis=0)
        count = tl.maximum(tl.sum(tm.to(tl.int32), axis=0), 1).to(tl.float32)
        red = tl.div_rn(total, count)
    red = tl.where(in_row, red, float("inf"))
    tl.store(out_ptr + b * stride_ob + j, red)


# --------------------------------------------------------------------------------- selection
@triton.jit
def _order_key(x, forced, LARGEST: tl.constexpr):
    """The top-k's order as int64 keys of scores x (a row or one score): forced blocks (2^32)
    above every score, a score's float32 bits mapped order-preserving onto [0, 2^32) (+inf
    included), NaN as -inf, -0.0 as +0.0; with LARGEST false, -x ranked (smaller is better)."""
    x = x.to(tl.float32)
    if not LARGEST:  # raw Hamming distances: rank -x, as a caller would
        x = -x
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    x = tl.where(x != x, float("-inf"), x)
    bits = x.to(tl.int32, bitcast=True)
    skey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(forced, 4294967296, skey.to(tl.int64) + 2147483648)


def _topk_kernel(
    score_ptr,
    k_ptr,
    keep_ptr,
    keeprow_ptr,
    nblk_ptr,
    ids_ptr,
    counts_ptr,
    table_ptr,
    seqlen_ptr,
    newtab_ptr,
    newlen_ptr,
    M,
    BS,
    stride_sb,
    stride_kb,
    stride_ib,
    stride_tb,
    stride_nb,
    NB_FROM_LEN: tl.constexpr,
    REWRITE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    LARGEST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    SORT: tl.constexpr,
    EARLY_EXIT: tl.constexpr,
):
    """Exact top-k of one row by radix selection on order-preserving integer keys (or, with
    SORT, by one bitonic sort of the keys with their indices; with RADIX_BITS = 8, by 8-bit digits
    counted with `tl.histogram`: the same selection).

    Key order = reference order: forced blocks first (above any score, +inf included), then
    score descending, NaN as -inf, ties to the lower index. The count-th largest key is found
    RADIX_BITS bits per pass (9 passes of 16 counts for 4 bits; a pass is a serial reduction, so
    fewer passes is less latency), ties at the threshold are taken lowest index first through a
    prefix sum (a one-pass all-pairs rank was tried: 3-20x slower on the H100), and the selected
    ids come out ascending by compaction. With REWRITE the row's sparse block table (physical ids
    of the selection) and its token count are written too, so attention can read the selected
    blocks in place. EARLY_EXIT (histogram passes): stop once the threshold digit's bin holds
    exactly the keys still needed (often after 2 or 3 of the 4 passes on continuous scores).
    """
    b = tl.program_id(0)
    idx = tl.arange(0, BLOCK_M)
    im = idx < M
    if NB_FROM_LEN:
        seq_len = tl.load(seqlen_ptr + b).to(tl.int64)
        n_b = (seq_len + BS - 1) // BS
    else:
        n_b = tl.load(nblk_ptr + b).to(tl.int64)
    n_b = tl.minimum(n_b, M)  # a row cannot own more blocks than its table holds
    valid = (idx < n_b) & im
    x = tl.load(score_ptr + b * stride_sb + idx, mask=im, other=0.0)
    forced = (tl.load(keep_ptr + b * stride_kb + idx, mask=im, other=0) != 0) & valid
    n_forced = tl.sum(forced.to(tl.int32), axis=0).to(tl.int64)  # counts and prefix sums: 32-bit
    kb = tl.load(k_ptr + b).to(tl.int64)
    cnt = tl.minimum(n_b, tl.maximum(kb, n_forced))
    kept = n_b < 0  # (false)
    if HAS_KEEP:  # (REWRITE) a row that keeps its table in newtab: only its length, for cnt blocks
        kept = tl.load(keeprow_ptr + b) != 0  # with the last one, which the caller forces
        keep_len = cnt * BS - (n_b * BS - seq_len) * (n_b > 0)
        n_b = tl.where(kept, 0, n_b)  # then ranked as an empty row, and its table left alone
        valid = valid & ~kept
        forced = forced & ~kept
        n_forced = tl.where(kept, 0, n_forced)
        cnt = tl.where(kept, 0, cnt)
    key = _order_key(x, forced, LARGEST)
    key = tl.where(valid, key, -1)
    thr = tl.zeros([], dtype=tl.int64)
    need = tl.zeros([], dtype=tl.int64)  # keys equal to thr to take (lowest index first)
    n_eq = tl.zeros([], dtype=tl.int64)  # valid keys equal to thr (histogram path)
    if SORT:  # one bitonic sort of (key, reversed index) packed into int64 (M < 2^16)
        packed = ((key + 1) << 16) | (65535 - idx.to(tl.int64))
        srt = tl.sort(packed, dim=0, descending=True)
        cut = tl.sum(tl.where(idx == cnt - 1, srt, 0), axis=0)
        sel = (packed >= cut) & valid & (cnt > 0)
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    else:
        if RADIX_BITS == 8:
            # forced blocks are all kept (cnt >= n_forced); the other rem = cnt - n_forced come
            # from the unforced keys (< 2^32), whose rem-th largest value is found 8 bits per
            # pass: a 256-bin histogram of the pass's digit over the keys that match the
            # threshold's higher digits, its reverse prefix sum (keys at or above each digit),
            # then one max over (digit, keys above it, keys at it) packed in int64 (digits
            # dominate, so it is the largest digit with >= rem keys at or above it): 3 block-wide
            # steps a pass (4 passes), and what the selection needs comes out of the last one
            rem = cnt - n_forced
            if cnt >= n_b:  # the row keeps every valid block (a dense row): no ranking needed
                thr = thr - 1
            elif rem > 0:
                free = valid & (key < 4294967296)
                bins = tl.arange(0, 256).to(tl.int64)
                done = tl.zeros([], dtype=tl.int32)
                for it in tl.static_range(4):
                    if done == 0:
                        shift = 24 - 8 * it
                        match = free & ((key >> (shift + 8)) == (thr >> (shift + 8)))
                        hist = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
                        at_or_above = tl.cumsum(hist, axis=0, reverse=True)
                        packed = (bins << 34) | ((at_or_above - hist).to(tl.int64) << 17) | hist.to(tl.int64)
                        best = tl.max(tl.where(at_or_above >= rem, packed, 0), axis=0)
                        rem -= (best >> 17) & 131071
                        n_eq = best & 131071
                        thr = thr | ((best >> 34) << shift)
                        if EARLY_EXIT and n_eq == rem:  # the digit's bin is taken whole: no more passes
                            done = done + 1
                need = rem
                if done != 0:  # take every key >= thr (its lower digits are 0), none at thr - 1
                    thr = thr - 1
                    need = tl.zeros([], dtype=tl.int64)
            else:  # the forced blocks fill the row's budget: they are the keys at the threshold
                thr = thr + 4294967296
                need = cnt
                n_eq = n_forced
        elif cnt < n_b:
            # the largest threshold with >= cnt keys at or above it, RADIX_BITS bits per pass:
            # every candidate digit of a pass is counted at once (one [2^RADIX_BITS, BLOCK_M]
            # reduction)
            digit = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
            for it in tl.static_range((33 + RADIX_BITS - 1) // RADIX_BITS):
                shift = ((33 + RADIX_BITS - 1) // RADIX_BITS - 1 - it) * RADIX_BITS
                cand = thr | (digit << shift)
                c = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), axis=1)
                thr = thr | (tl.max(tl.where(c >= cnt, digit, 0), axis=0) << shift)
        else:  # the row keeps every valid block (a dense row): no ranking needed
            thr = thr - 1
        sel = valid
        pos = idx
        if cnt < n_b:  # a dense row keeps its valid blocks in place: no prefix sum
            above = key > thr
            eq = (key == thr) & valid
            if RADIX_BITS != 8:
                need = cnt - tl.sum(above.to(tl.int32), axis=0)
            # output slot = keys above so far + keys at the threshold taken so far: one prefix sum
            # of both counts packed in int32 (each <= BLOCK_M <= 2^14)
            if BLOCK_M <= 16384:
                both = tl.cumsum((above.to(tl.int32) << 16) | eq.to(tl.int32), axis=0)
                above_rank = both >> 16
                eq_rank = both & 65535
            else:
                above_rank = tl.cumsum(above.to(tl.int32), axis=0)
                eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
            sel = above | (eq & (eq_rank <= need))
            pos = above_rank + tl.minimum(eq_rank, need.to(tl.int32)) - 1
    tail = (idx >= cnt) & im
    if not REWRITE:  # the rewrite reads no ids: it writes the table and the length only
        tl.store(ids_ptr + b * stride_ib + pos, idx, mask=sel)
        tl.store(ids_ptr + b * stride_ib + idx, tl.full([BLOCK_M], -1, tl.int32), mask=tail)
        tl.store(counts_ptr + b, cnt.to(tl.int32))
    else:
        phys = tl.load(table_ptr + b * stride_tb + idx, mask=sel, other=0)
        tl.store(newtab_ptr + b * stride_nb + pos, phys, mask=sel)
        tl.store(newtab_ptr + b * stride_nb + idx, tl.zeros([BLOCK_M], dtype=phys.dtype), mask=tail & ~kept)
        if RADIX_BITS == 8 and not SORT:
            # whether the last valid block (the partly filled one) is kept, from its key alone:
            # above the threshold, or at it with every key at it taken (it is the last of them)
            last = tl.maximum(n_b - 1, 0)
            last_x = tl.load(score_ptr + b * stride_sb + last, mask=n_b > 0, other=0.0)
            last_forced = tl.load(keep_ptr + b * stride_kb + last, mask=n_b > 0, other=0) != 0
            last_key = _order_key(last_x, last_forced, LARGEST)
            last_sel = ((last_key > thr) | ((last_key == thr) & (n_eq <= need))) & (n_b > 0)
            last_sel = last_sel.to(tl.int64)
        else:
            last_sel = tl.sum((sel & (idx == n_b - 1)).to(tl.int64), axis=0)
        last_len = seq_len - (n_b - 1) * BS
        new_len = cnt * BS - last_sel * (BS - last_len)
        if HAS_KEEP:
            new_len = tl.where(kept, keep_len, new_len)
        tl.store(newlen_ptr + b, new_len.to(newlen_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- representations
def _reps_write_kernel(
    key_ptr,
    slot_ptr,
    srt_ptr,
    order_ptr,
    end_ptr,
    a_ptr,
    b_ptr,
    T,
    BS,
    MERGE,
    R,
    HD,
    stride_kt,
    tab_ptr,
    L,
    DH,
    stride_ko,
    stride_kh,
    KBS,
    KIND: tl.constexpr,
    HAS_B: tl.constexpr,
    SORTED: tl.constexpr,
    SCAN_ONCE: tl.constexpr,
    LAYERED: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
    FP8: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Fold the keys [T, Hkv * D] written at slots [T] into their blocks' representations, in one
    launch (no host read: inside CUDA graphs). A block whose first slot (offset 0) is written in
    the call was recycled: it restarts. KIND picks the representation:
      0: group sums a = sums [NB, R, HD] (R = BS // MERGE), HAS_B: b = sums of |K| [NB, HD];
         float32 sums take each key in turn; half-precision ones (GROUPED) the call's keys of
         each group summed in float32, added to the stored value and rounded once, as in 2;
      1: Quest's bounds a = mins, b = maxs [NB, HD] float32, or the keys' own half-precision
         dtype (a bound is one of the keys: stored exactly) (+inf / -inf on restart);
      2: KVStar's channel-major a = reps [NB, HD, R] (any float dtype), b = |K| sums [NB, HD]:
         each group's keys of the call summed in float32 in token order, added to the stored
         value and rounded once.

    Grid (T, cdiv(HD, BLOCK_C)): every block written in the call has one leader program per
    channel chunk, which reads all of the call's keys of its block and does one read-modify-
    write per representation: no two programs write one value, so there are no atomics, no
    reset launch, and the result does not depend on the order programs run in. Finding a
    block's keys:
      * SORTED == False (decode, short prefills): program i is token i; it leads if no earlier
        token of the call is in its block, found by a vectorised scan of the call's slots (a token
        whose predecessor is in its block, vLLM's order, skips it). Members: the tokens up to
        the last one in the block, in token order. SCAN_ONCE (the call fits one BLOCK_T vector:
        decode batches): every program scans at once, with no load that waits on another, so a
        decode step's write costs the key, the slots and the stored values' round trips only.
      * SORTED (long prefills): the block ids sorted stably (srt, with the token order `order`
        and each position's end of run `end`); position i leads if a run starts there.
    LAYERED (with SCAN_ONCE): every layer of a step in one launch, grid (T, chunks, L). Program
    (i, ., l) reads layer l's key cache, a and b through the addresses tab[l], tab[L + l] and
    tab[2L + l] (key_ptr, a_ptr, b_ptr give only their dtypes), and token i's key from the cache
    at its slot: cache[slot // KBS, slot % KBS, h, d] at strides (stride_kt, stride_ko, stride_kh, 1),
    channel c = h * DH + d (KBS: the cache's block size; BS may be smaller: Quest's groups of
    tokens, each its own "block" of a and b [NB * KBS / BS, HD]).
    FP8: float8 e4m3 sums, saturated at +-448 before the cast (as the GPU's and torch's casts do).
    RNE_BY_HAND (interpreter only): Triton 3.6's interpreter truncates float32 -> bfloat16 / float8
    (and wraps float8 overflow), the GPU rounds to nearest even; the value is rounded by hand first
    so both store the same bits."""
    i = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < HD
    if LAYERED:
        lay = tl.program_id(2)
        key_ptr = tl.load(tab_ptr + lay).to(tl.pointer_type(key_ptr.dtype.element_ty))
        a_ptr = tl.load(tab_ptr + L + lay).to(tl.pointer_type(a_ptr.dtype.element_ty))
        b_ptr = tl.load(tab_ptr + 2 * L + lay).to(tl.pointer_type(b_ptr.dtype.element_ty))
        c_off = (c // DH).to(tl.int64) * stride_kh + c % DH  # a channel's place in a cache token
    fresh = tl.zeros([], dtype=tl.int32)  # is the block's offset 0 among the members (restart)?
    if SORTED:
        blk = tl.load(srt_ptr + i).to(tl.int64)
        prev = tl.load(srt_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
        lead = (blk >= 0) & (prev != blk)
        last = tl.load(end_ptr + i).to(tl.int32) - 1
    else:
        # token i's key: read before anything is known about its block, so that at decode (one
        # key per block) the key, the slots and the stored representation are the only round trips
        s = tl.load(slot_ptr + i).to(tl.int64)
        if LAYERED:  # the key where the step wrote it: in the layer's cache, at its slot
            sc = tl.maximum(s, 0)
            k_i = tl.load(
                key_ptr + (sc // KBS) * stride_kt + (sc % KBS) * stride_ko + c_off, mask=cm & (s >= 0), other=0.0
            ).to(tl.float32)
        else:
            k_i = tl.load(key_ptr + i * stride_kt + c, mask=cm, other=0.0).to(tl.float32)
        blk = tl.where(s >= 0, tl.maximum(s, 0) // BS, -1)
        if SCAN_ONCE:  # the whole call in one vector (decode): one pass, no dependent load
            j = tl.arange(0, BLOCK_T)
            sv = tl.load(slot_ptr + j, mask=j < T, other=-1).to(tl.int64)
            match = (sv >= 0) & (tl.maximum(sv, 0) // BS == blk)
            lead = (blk >= 0) & (tl.min(tl.where(match, j, T), axis=0) == i)
            last = tl.max(tl.where(match, j, -1), axis=0)
            fresh = tl.max((match & (tl.maximum(sv, 0) % BS == 0)).to(tl.int32), axis=0)
        else:
            sp = tl.load(slot_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
            lead = (blk >= 0) & (tl.where(sp >= 0, tl.maximum(sp, 0) // BS, -1) != blk)
            last = tl.zeros([], dtype=tl.int32) + i
            if lead:
                first = tl.zeros([], dtype=tl.int32) + T
                last = tl.zeros([], dtype=tl.int32) - 1
                for j0 in range(0, T, BLOCK_T):
                    j = j0 + tl.arange(0, BLOCK_T)
                    sv = tl.load(slot_ptr + j, mask=j < T, other=-1).to(tl.int64)
                    match = (sv >= 0) & (tl.maximum(sv, 0) // BS == blk)
                    first = tl.minimum(first, tl.min(tl.where(match, j, T), axis=0))
                    last = tl.maximum(last, tl.max(tl.where(match, j, -1), axis=0))
                    hit = match & (tl.maximum(sv, 0) % BS == 0)
                    fresh = tl.maximum(fresh, tl.max(hit.to(tl.int32), axis=0))
                lead = first == i
    if lead:
        if SORTED:  # restart: the run's members are the sorted positions i..last
            for p0 in range(i, last + 1, BLOCK_T):
                p = p0 + tl.arange(0, BLOCK_T)
                pm = p <= last
                tok = tl.load(order_ptr + p, mask=pm, other=0).to(tl.int64)
                sv = tl.load(slot_ptr + tok, mask=pm, other=-1).to(tl.int64)
                hit = pm & (sv >= 0) & (tl.maximum(sv, 0) % BS == 0)
                fresh = tl.maximum(fresh, tl.max(hit.to(tl.int32), axis=0))
        # the stored values this program updates, read before its first store
        if HAS_B and KIND != 1:
            b_old = tl.load(b_ptr + blk * HD + c, mask=cm & (fresh == 0), other=0.0)
        if KIND == 0 and not GROUPED:
            if fresh > 0:
                for g in range(0, R):
                    tl.store(a_ptr + (blk * R + g) * HD + c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cm)
        if KIND == 1:
            mn = tl.load(a_ptr + blk * HD + c, mask=cm & (fresh == 0), other=float("inf")).to(tl.float32)
            mx = tl.load(b_ptr + blk * HD + c, mask=cm & (fresh == 0), other=float("-inf")).to(tl.float32)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)  # GROUPED / KIND 2: the call's sum per group
        occ = tl.zeros([BLOCK_R], dtype=tl.int32)  # GROUPED / KIND 2: the groups the call writes
        aacc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(i, last + 1):
            if SORTED:
                tok = tl.load(order_ptr + p).to(tl.int64)
                sj = tl.load(slot_ptr + tok).to(tl.int64)
                k = tl.load(key_ptr + tok * stride_kt + c, mask=cm, other=0.0).to(tl.float32)
            elif p == i:  # the leader's own key, already read
                sj = s
                k = k_i
            elif LAYERED:
                sj = tl.load(slot_ptr + p).to(tl.int64)
                sc = tl.maximum(sj, 0)
                k = tl.load(
                    key_ptr + (sc // KBS) * stride_kt + (sc % KBS) * stride_ko + c_off, mask=cm & (sj >= 0), other=0.0
                ).to(tl.float32)
            else:
                sj = tl.load(slot_ptr + p).to(tl.int64)
                k = tl.load(key_ptr + p * stride_kt + c, mask=cm, other=0.0).to(tl.float32)
            if (sj >= 0) & (tl.maximum(sj, 0) // BS == blk):
                if KIND == 0 and not GROUPED:
                    ap = a_ptr + (blk * R + (sj % BS) // MERGE) * HD + c
                    tl.store(ap, tl.load(ap, mask=cm, other=0.0) + k, mask=cm)
                elif KIND == 1:
                    mn = tl.minimum(mn, k)
                    mx = tl.maximum(mx, k)
                else:
                    here = r == (sj % BS) // MERGE
                    acc += tl.where(here[None, :], k[:, None], 0.0)
                    occ = occ | here.to(tl.int32)
                aacc += tl.abs(k)
        if KIND == 1:
            tl.store(a_ptr + blk * HD + c, mn, mask=cm)
            tl.store(b_ptr + blk * HD + c, mx, mask=cm)
        if KIND == 2 or GROUPED:
            if KIND == 2:  # channel-major [NB, HD, R]
                rp = a_ptr + (blk * HD + c[:, None]) * R + r[None, :]
            else:  # group-major [NB, R, HD]
                rp = a_ptr + (blk * R + r[None, :]) * HD + c[:, None]
            put = cm[:, None] & (r < R)[None, :] & ((occ > 0) | (fresh > 0))[None, :]
            new = tl.load(rp, mask=put & (fresh == 0), other=0.0).to(tl.float32) + acc
            if FP8:
                new = tl.minimum(tl.maximum(new, -448.0), 448.0)
            if RNE_BY_HAND:  # round to nearest even by hand: the interpreter's cast truncates
                bits = new.to(tl.int32, bitcast=True)
                if FP8:  # 3 mantissa bits; below 2^-6 (subnormal) a grid of 2^-9
                    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
                    mag = tl.abs(new)
                    sub = (mag + 24576.0) - 24576.0  # 24576 = 1.5 * 2^14: float32's grid there is 2^-9
                    sub = tl.where(new < 0, -sub, sub)  # keeps -0.0 where torch keeps it
                    new = tl.where(mag >= 0.015625, normal.to(tl.float32, bitcast=True), sub)
                else:
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                    new = bits.to(tl.float32, bitcast=True)
            tl.store(rp, new.to(a_ptr.dtype.element_ty), mask=put)
        if HAS_B and KIND != 1:  # |K| sums of the block, stored once
            tl.store(b_ptr + blk * HD + c, b_old + aacc, mask=cm)


# --------------------------------------------------------------------------------- attention
def _attn_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    seqlen_ptr,
    opart_ptr,
    lpart_ptr,
    out_ptr,
    lse_ptr,
    scale_log2,
    G,
    BS,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_ob,
    stride_oh,
    stride_lb,
    NUM_SPLITS: tl.constexpr,
    N_HCHUNK: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    DV: tl.constexpr,
    SHARED_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-K paged decode attention for one (KV head, head chunk, row, split).

    Tokens are read in place: each token's physical block comes from the block table, so a
    sparse step only reads its selected blocks. The GQA group shares every K/V tile (one
    matrix product per tile for all its query heads). K's head dim is split as DA + DB so a
    576-wide MLA latent runs as 512 + 64 without padding to 1024; with SHARED_KV (MLA, V = the
    first DV columns of the same cache) the V tile is the K tile already loaded.
    Splits balance on the row's real length. With NUM_SPLITS == 1 the output is final.
    UPCAST (interpreter only): Triton 3.6's interpreter computes bf16 dots wrongly, so tiles
    are widened to float32 before the products there.
    """
    pid0 = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    h = pid0 // N_HCHUNK
    hc = pid0 % N_HCHUNK
    gi = hc * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = gi < G
    heads = h * G + gi
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    per = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
    per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, seq_len)

    da = tl.arange(0, BLOCK_DA)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    qa = tl.load(q_row + da[None, :], mask=hm[:, None] & (da[None, :] < DA), other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
    if DB > 0:
        db = tl.arange(0, BLOCK_DB)
        qb = tl.load(q_row + DA + db[None, :], mask=hm[:, None] & (db[None, :] < DB), other=0.0)
        if UPCAST:
            qb = qb.to(tl.float32)
    dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + n
        tm = tok < end
        blk = tl.load(table_ptr + b * stride_tb + tok // BS, mask=tm, other=0).to(tl.int64)
        off = (tok % BS).to(tl.int64)
        k_row = k_ptr + blk * stride_kb + off * stride_kt + h * stride_kh
        ka = tl.load(k_row[:, None] + da[None, :], mask=tm[:, None] & (da[None, :] < DA), other=0.0)
        if UPCAST:
            ka = ka.to(tl.float32)
        sc = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if DB > 0:
            kb = tl.load(k_row[:, None] + DA + db[None, :], mask=tm[:, None] & (db[None, :] < DB), other=0.0)
            if UPCAST:
                kb = kb.to(tl.float32)
            sc += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        sc = tl.where(tm[None, :], sc * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SHARED_KV:
            v = ka
        else:
            v_row = v_ptr + blk * stride_vb + off * stride_vt + h * stride_vh
            v = tl.load(v_row[:, None] + dv[None, :], mask=tm[:, None] & (dv[None, :] < DV), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    om = hm[:, None] & (dv[None, :] < DV)
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=om)
        tl.store(lse_ptr + b * stride_lb + heads, lse2 * 0.6931471805599453, mask=hm)
    else:
        base = b.to(tl.int64) * stride_pb + heads * stride_ph + s * stride_ps
        tl.store(opart_ptr + base[:, None] * DV + dv[None, :], o, mask=om)
        tl.store(lpart_ptr + base, lse2, mask=hm)


def _attn_combine_kernel(
    opart_ptr,
    lpart_ptr,
    out_ptr,
    lse_ptr,
    Hq,
    stride_pb,
    stride_ph,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Merge the splits' normalised partial outputs by their log-sum-exps (log2 domain)."""
    b = tl.program_id(0)
    hh = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    sm = sp < NUM_SPLITS
    base = b.to(tl.int64) * stride_pb + hh * stride_ph + sp
    lp = tl.load(lpart_ptr + base, mask=sm, other=float("-inf"))
    mx = tl.max(lp, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lp - mx_safe)
    tot = tl.sum(w, axis=0)
    o = tl.load(opart_ptr + base[:, None] * DV + dv[None, :], mask=sm[:, None] & (dv[None, :] < DV), other=0.0)
    num = tl.sum(o * w[:, None], axis=0)
    has = tot > 0
    res = num / tl.where(has, tot, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hh * stride_oh + dv, res.to(out_ptr.dtype.element_ty), mask=dv < DV)
    lse = tl.where(has, (mx_safe + tl.log2(tl.where(has, tot, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b * Hq + hh, lse)


def _scores_dot_kernel(
    q_ptr,
    rep_ptr,
    table_ptr,
    seqlen_ptr,
    out_ptr,
    M,
    Hkv: tl.constexpr,
    G: tl.constexpr,
    D,
    BS,
    stride_qb,
    stride_qh,
    stride_rb,
    stride_rh,
    stride_tb,
    stride_ob,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Dot-product block scores (ESA mean / GSA max over the GQA group: MODE, a `GroupReduceCode`);
    -inf past n_b. A program reads its BLOCK_M blocks' representations of every KV head as one
    [BLOCK_M, Hkv, D] tile (one load: all of its bytes in flight at once, which is what a
    gather of 4 KB rows from anywhere in the cache is bound by)."""
    jb = tl.program_id(0)
    b = tl.program_id(1)
    j = jb * BLOCK_M + tl.arange(0, BLOCK_M)
    jm = j < M
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    n_b = (seq_len + BS - 1) // BS
    h = tl.arange(0, BLOCK_H)
    hm = h < Hkv
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    hd = hm[:, None] & dm[None, :]
    blk = tl.maximum(tl.load(table_ptr + b * stride_tb + j, mask=jm, other=0), 0).to(tl.int64)
    rep = tl.load(
        rep_ptr + blk[:, None, None] * stride_rb + (h * stride_rh)[None, :, None] + d[None, None, :],
        mask=jm[:, None, None] & hd[None, :, :],
        other=0.0,
    ).to(tl.float32)
    qrow = q_ptr + b * stride_qb + d[None, :]
    if MODE == 0:
        qm = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for gg in range(G):
            qm += tl.load(qrow + (h * G + gg)[:, None] * stride_qh, mask=hd, other=0.0).to(tl.float32)
        qm = qm / G
        total = tl.sum(tl.sum(rep * qm[None, :, :], axis=2), axis=1)
    else:
        best = tl.full([BLOCK_M, BLOCK_H], float("-inf"), dtype=tl.float32)
        for gg in range(G):
            qv = tl.load(qrow + (h * G + gg)[:, None] * stride_qh, mask=hd, other=0.0).to(tl.float32)
            best = tl.maximum(best, tl.sum(rep * qv[None, :, :], axis=2))
        total = tl.sum(tl.where(hm[None, :], best, 0.0), axis=1)
    total = tl.where(j < n_b, total, float("-inf"))
    tl.store(out_ptr + b * stride_ob + j, total, mask=jm)


@triton.jit
def _quest_group_bound(lo, hi, q0, hd, stride_qh, G: tl.constexpr, MODE: tl.constexpr):
    """Quest's bound of the key boxes lo / hi [N, H, D] (float32) for each KV head's G query
    heads (q0 [H, D]: pointers to each KV head's first query head, the next ones stride_qh on):
    per query head sum over D of max(q * lo, q * hi), then the mean (MODE 0) or max over the
    group: [N, H]."""
    qv = tl.load(q0, mask=hd, other=0.0).to(tl.float32)
    acc = tl.sum(tl.maximum(lo * qv[None, :, :], hi * qv[None, :, :]), axis=2)
    for gg in range(1, G):
        qv = tl.load(q0 + gg * stride_qh, mask=hd, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(lo * qv[None, :, :], hi * qv[None, :, :]), axis=2)
        if MODE == 0:
            acc += bound
        else:
            acc = tl.maximum(acc, bound)
    if MODE == 0:
        acc = acc / G
    return acc


def _scores_grouped_kernel(
    q_ptr,
    a_ptr,
    b_ptr,
    table_ptr,
    seqlen_ptr,
    keeprow_ptr,
    out_ptr,
    M,
    R,
    MERGE,
    BS,
    D,
    stride_qb,
    stride_qh,
    stride_ab,
    stride_ar,
    stride_ah,
    stride_tb,
    stride_ob,
    Hkv: tl.constexpr,
    G: tl.constexpr,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    WIDEN_F16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Block scores from per-group representations [NB, R, Hkv, D] (groups of MERGE tokens): a
    block scores as its best group, all in one kernel (no sub-block table, no [B, M * R] scores,
    no separate max). KIND 0: dot with a (ESA's mean / GSA's max over the GQA group: MODE, a
    `GroupReduceCode`); KIND 1: Quest's bound from mins a and maxs b. Program (jm, b) holds
    BLOCK_M block columns of row b and walks their groups BLOCK_R at a time ([BLOCK_R, Hkv, D]
    tiles, contiguous in memory) in one loop, so the compiler's pipeline keeps loads of the next
    tiles in flight across blocks; it reads nothing past the row's end (a group whose first token
    is at or past it is -inf) and loads the query once. USE_DOT (KIND 0, a half-precision q, a of
    its dtype or float8): each KV head's [BLOCK_R, D] tile times its query heads [D, BLOCK_G] on
    the tensor cores (exact products, float32 sums), then the mean or max over the group's
    columns, instead of reductions over D on the CUDA cores (DOT_F32: in float32, for the
    interpreter; WIDEN_F16: float8 sums and the query widened to float16, float8's native
    conversion, the query clamped to float16's range)."""
    jm = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    kept = seq_len < 0  # (false)
    if HAS_KEEP:  # a row that keeps its scores in out: nothing read, nothing written
        kept = tl.load(keeprow_ptr + b) != 0
        seq_len = tl.where(kept, 0, seq_len)
    cols = jm * BLOCK_M + tl.arange(0, BLOCK_M)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    h = tl.arange(0, BLOCK_H)
    hm = h < Hkv
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    hd = hm[:, None] & dm[None, :]
    qrow = q_ptr + b * stride_qb
    # only this program's columns inside the row (a shorter row of a batch does no work past its
    # end; a program with none, e.g. a row given length 0 to keep its last scores, loads nothing)
    n_cols = tl.minimum(tl.maximum((seq_len + BS - 1) // BS - jm * BLOCK_M, 0), BLOCK_M)
    if USE_DOT:
        gi = tl.arange(0, BLOCK_G)
        gm = gi < G
        # query heads of each KV head as [H, D, G]: the dot's right operand, loaded once
        qt = tl.load(
            qrow + (h[:, None, None] * G + gi[None, None, :]) * stride_qh + d[None, :, None],
            mask=hm[:, None, None] & dm[None, :, None] & gm[None, None, :] & (n_cols > 0),
            other=0.0,
        )
        if WIDEN_F16:
            qt = tl.minimum(tl.maximum(qt.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    elif MODE == 0 and KIND == 0:  # float32 representations: the group's mean query, once
        qm = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for gg in range(G):
            qm += tl.load(qrow + (h * G + gg)[:, None] * stride_qh + d[None, :], mask=hd & (n_cols > 0), other=0.0).to(
                tl.float32
            )
        qm = qm / G
    n_r = tl.cdiv(R, BLOCK_R)
    for it in range(0, n_cols * n_r):
        jj = it // n_r
        j = jm * BLOCK_M + jj
        r = (it % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = (r < R) & (j < M) & (j * BS + r * MERGE < seq_len)
        blk = tl.maximum(tl.load(table_ptr + b * stride_tb + j, mask=(j < M) & (j * BS < seq_len), other=0), 0)
        base = a_ptr + blk.to(tl.int64) * stride_ab
        if USE_DOT:  # [H, R, D] x [H, D, G] -> [H, R, G]
            off = (h * stride_ah)[:, None, None] + (r * stride_ar)[None, :, None] + d[None, None, :]
            tile = tl.load(base + off, mask=hm[:, None, None] & live[None, :, None] & dm[None, None, :], other=0.0)
            if DOT_F32:  # the interpreter multiplies bfloat16 as raw bits: float32 there (exact)
                s = tl.dot(tile.to(tl.float32), qt.to(tl.float32), input_precision="ieee")
            else:  # float8 sums widen exactly to the query's half precision
                s = tl.dot(tile.to(qt.dtype), qt)
            if MODE == 0:  # the mean of the group's dot products: the dot with its mean query
                per_head = tl.sum(tl.where(gm[None, None, :], s, 0.0), axis=2) / G
            else:
                per_head = tl.max(tl.where(gm[None, None, :], s, float("-inf")), axis=2)
            tot = tl.sum(tl.where(hm[:, None], per_head, 0.0), axis=0)
        else:
            off = (r * stride_ar)[:, None, None] + (h * stride_ah)[None, :, None] + d[None, None, :]
            tm = live[:, None, None] & hd[None, :, :]
            if KIND == 0:
                tile = tl.load(base + off, mask=tm, other=0.0).to(tl.float32)
                if MODE == 0:
                    tot = tl.sum(tl.sum(tile * qm[None, :, :], axis=2), axis=1)
                else:
                    acc = tl.full([BLOCK_R, BLOCK_H], float("-inf"), dtype=tl.float32)
                    for gg in range(G):
                        qv = tl.load(qrow + (h * G + gg)[:, None] * stride_qh + d[None, :], mask=hd, other=0.0).to(
                            tl.float32
                        )
                        acc = tl.maximum(acc, tl.sum(tile * qv[None, :, :], axis=2))
                    tot = tl.sum(tl.where(hm[None, :], acc, 0.0), axis=1)
            else:
                lo = tl.load(base + off, mask=tm, other=0.0).to(tl.float32)
                hi = tl.load(b_ptr + blk.to(tl.int64) * stride_ab + off, mask=tm, other=0.0).to(tl.float32)
                q0 = qrow + (h * G)[:, None] * stride_qh + d[None, :]
                acc = _quest_group_bound(lo, hi, q0, hd, stride_qh, G, MODE)
                tot = tl.sum(tl.where(hm[None, :], acc, 0.0), axis=1)
        cur = tl.max(tl.where(live, tot, float("-inf")), axis=0)
        best = tl.where(cols == j, tl.maximum(best, cur), best)
    tl.store(out_ptr + b * stride_ob + cols, best, mask=(cols < M) & ~kept)


def _scores_minmax_kernel(
    q_ptr,
    min_ptr,
    max_ptr,
    table_ptr,
    seqlen_ptr,
    out_ptr,
    M,
    Hkv: tl.constexpr,
    G: tl.constexpr,
    D,
    BS,
    stride_qb,
    stride_qh,
    stride_rb,
    stride_rh,
    stride_tb,
    stride_ob,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Quest block scores: per query head, sum over channels of max(q * min, q * max) (the most
    q . k can reach inside the block's box of keys), then mean (MODE 0) or max (MODE 1: a
    `GroupReduceCode`) over the GQA group, summed over KV heads; -inf past n_b. A program reads
    its BLOCK_M blocks' mins and maxs of every KV head as two [BLOCK_M, Hkv, D] tiles (one load
    each, all bytes in flight at once, as the dot scorer); mins and maxs share strides. The
    group's queries cannot be averaged first (the bound is not linear in q), so each query head
    of the group is bounded on its own against the loaded tiles."""
    jb = tl.program_id(0)
    b = tl.program_id(1)
    j = jb * BLOCK_M + tl.arange(0, BLOCK_M)
    jm = j < M
    seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    n_b = (seq_len + BS - 1) // BS
    h = tl.arange(0, BLOCK_H)
    hm = h < Hkv
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    hd = hm[:, None] & dm[None, :]
    blk = tl.maximum(tl.load(table_ptr + b * stride_tb + j, mask=jm, other=0), 0).to(tl.int64)
    off = blk[:, None, None] * stride_rb + (h * stride_rh)[None, :, None] + d[None, None, :]
    tm = jm[:, None, None] & hd[None, :, :]
    lo = tl.load(min_ptr + off, mask=tm, other=0.0).to(tl.float32)
    hi = tl.load(max_ptr + off, mask=tm, other=0.0).to(tl.float32)
    q0 = q_ptr + b * stride_qb + (h * G)[:, None] * stride_qh + d[None, :]
    acc = _quest_group_bound(lo, hi, q0, hd, stride_qh, G, MODE)
    total = tl.sum(tl.where(hm[None, :], acc, 0.0), axis=1)
    total = tl.where(j < n_b, total, float("-inf"))
    tl.store(out_ptr + b * stride_ob + j, total, mask=jm)


# ------------------------------------------------------------------------------------ KVStar
def _kvstar_importance_kernel(
    abs_ptr,
    table_ptr,
    seqlen_ptr,
    part_ptr,
    M,
    NB,
    BS,
    D,
    S,
    stride_ab,
    stride_ah,
    stride_tb,
    HKV: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (chunk s of BLOCK_J block-table columns, row x KV head): the sum of abs_sums over the
    chunk's full blocks (columns j < n_b = min(seq_len // BS, M)) into part [B * Hkv, S, D]
    (zeros past n_b). Many small programs instead of one per (row, head): the table gather is
    latency-bound, so the reads spread over the SMs; `_kvstar_channels_kernel` adds the S parts
    in a fixed order (deterministic, no atomics)."""
    s = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    n = tl.minimum(tl.load(seqlen_ptr + b).to(tl.int32) // BS, M)
    j = s * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < n
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    blk = tl.load(table_ptr + b * stride_tb + j, mask=jm, other=0).to(tl.int64)
    blk = tl.minimum(tl.maximum(blk, 0), NB - 1)
    m2 = jm[:, None] & dm[None, :]
    a = tl.load(abs_ptr + blk[:, None] * stride_ab + h * stride_ah + d[None, :], mask=m2, other=0.0)
    tl.store(part_ptr + (pid.to(tl.int64) * S + s) * D + d, tl.sum(a, axis=0), mask=dm)


def _kvstar_channels_kernel(
    part_ptr,
    kept_ptr,
    D,
    S,
    KEPT,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """KVStar's kept channels of one (row, KV head): the KEPT channels with the largest sum of
    |K| over the row's full blocks (the S parts of `_kvstar_importance_kernel`, added in order),
    ties to the lower channel, written ascending to kept [B, Hkv, KEPT] int32. One bitonic sort
    of (importance bits, reversed channel) packed in int64 (importances are >= 0, so their
    float bits order as integers)."""
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    sv = tl.arange(0, BLOCK_S)
    m2 = (sv < S)[:, None] & dm[None, :]
    parts = tl.load(part_ptr + (pid.to(tl.int64) * S + sv[:, None]) * D + d[None, :], mask=m2, other=0.0)
    imp = tl.sum(parts, axis=0)
    bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(dm, bits + 1, 0)  # invalid channels below every real one
    packed = (key << 16) | (65535 - d).to(tl.int64)
    srt = tl.sort(packed, dim=0, descending=True)
    cut = tl.sum(tl.where(d == KEPT - 1, srt, 0), axis=0)
    sel = packed >= cut
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(kept_ptr + pid * KEPT + pos, d, mask=sel)


def _kvstar_logits_kernel(
    q_ptr,
    reps_ptr,
    kept_ptr,
    table_ptr,
    seqlen_ptr,
    lse_ptr,
    scale_log2,
    M,
    NB,
    BS,
    R,
    G,
    WG,
    HQ,
    KEPT,
    stride_qb,
    stride_qw,
    stride_qh,
    stride_rb,
    stride_rh,
    stride_rc,
    stride_tb,
    stride_lb,
    stride_lh,
    HKV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NK: tl.constexpr,
    RC: tl.constexpr,
    NR: tl.constexpr,
    BT: tl.constexpr,
    TPP: tl.constexpr,
    PREC: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """Per (TPP tiles of BT blocks, row x KV head, chunk of BLOCK_G of the head's W * G queries):
    the log2-sum-exp of each query's scaled logits over each block's R representations, on the
    kept channels only, into lse [B, W * Hq, M] (query (w, h * G + g) at row w * Hq + h * G + g).

    A tile is [BLOCK_K kept channels, BT blocks x RC representations]: with the channel-major
    layout each (block, channel) run of R values is contiguous (128 bytes for R = 64 bfloat16), so
    the program reads exactly the kept channels of its blocks. Logits come from one `tl.dot` per
    channel chunk ([BLOCK_G, BLOCK_K] x [BLOCK_K, BT * RC], float32 accumulators: bfloat16
    operands when the queries are bfloat16 (exact, as the model's), else float32 with PREC);
    representations wider than RC are walked in NR chunks with an online max / sum per block.
    The channel and representation chunks are unrolled (NK = cdiv(KEPT, BLOCK_K), NR = cdiv(R,
    RC)), so the tile loop is the innermost loop and the compiler can pipeline its loads across
    tiles when a program walks several (TPP > 1). Tiles past the row's full blocks do nothing;
    `_kvstar_mass_kernel` only reads columns j < n_b."""
    pid = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    n = tl.minimum(tl.load(seqlen_ptr + b).to(tl.int32) // BS, M)
    lo = tl.program_id(0) * (TPP * BT)
    hi = tl.minimum(lo + TPP * BT, n)
    rows = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    rm = rows < WG
    w = rows // G
    g = rows % G
    qbase = q_ptr + b.to(tl.int64) * stride_qb + w * stride_qw + (h * G + g) * stride_qh
    kbase = kept_ptr + pid * KEPT
    col = tl.arange(0, BT * RC)
    rr = col % RC
    out_rows = lse_ptr + b.to(tl.int64) * stride_lb + (w * HQ + h * G + g) * stride_lh
    if NK == 1:  # one channel chunk (kept <= BLOCK_K): the queries' tile is loaded once
        kk = tl.arange(0, BLOCK_K)
        ch1 = tl.load(kbase + kk, mask=kk < KEPT, other=0)
        qt1 = tl.load(qbase[:, None] + ch1[None, :], mask=rm[:, None] & (kk < KEPT)[None, :], other=0.0)
    for jt0 in range(lo, hi, BT):
        jc = jt0 + col // RC
        jcm = jc < n
        blk = tl.load(table_ptr + b * stride_tb + jc, mask=jcm, other=0).to(tl.int64)
        blk = tl.minimum(tl.maximum(blk, 0), NB - 1)
        rbase = reps_ptr + blk * stride_rb + h * stride_rh
        m_blk = tl.full([BLOCK_G, BT], float("-inf"), dtype=tl.float32)
        s_blk = tl.zeros([BLOCK_G, BT], dtype=tl.float32)
        for ri in tl.static_range(NR):
            r = ri * RC + rr
            cm = jcm & (r < R)
            acc = tl.zeros([BLOCK_G, BT * RC], dtype=tl.float32)
            for ki in tl.static_range(NK):
                kk = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                km = kk < KEPT
                if NK == 1:
                    ch = ch1
                    qt = qt1
                else:
                    ch = tl.load(kbase + kk, mask=km, other=0)
                    qt = tl.load(qbase[:, None] + ch[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                rt = tl.load(
                    rbase[None, :] + ch[:, None] * stride_rc + r[None, :], mask=km[:, None] & cm[None, :], other=0.0
                )
                if DOT_BF16:  # bfloat16 queries and representations: exact products, float32 sums
                    acc += tl.dot(qt, rt)
                else:
                    acc += tl.dot(qt.to(tl.float32), rt.to(tl.float32), input_precision=PREC)
            x = tl.where(cm[None, :], acc * scale_log2, float("-inf"))
            x3 = tl.reshape(x, [BLOCK_G, BT, RC])
            m_new = tl.maximum(m_blk, tl.max(x3, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_blk = s_blk * tl.exp2(m_blk - m_safe) + tl.sum(tl.exp2(x3 - m_safe[:, :, None]), axis=2)
            m_blk = m_new
        lse = tl.where(s_blk > 0, m_blk + tl.log2(tl.where(s_blk > 0, s_blk, 1.0)), float("-inf"))
        jb = jt0 + tl.arange(0, BT)
        tl.store(out_rows[:, None] + jb[None, :], lse, mask=rm[:, None] & (jb < n)[None, :])


def _kvstar_mass_kernel(
    lse_ptr,
    seqlen_ptr,
    out_ptr,
    M,
    BS,
    WHQ,
    stride_lb,
    stride_lh,
    stride_ob,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """Per row: each query's softmax over all its blocks from their log2-sum-exps (max and sum
    over the row's n_b full blocks), then a block's score = sum over the W * Hq queries of
    2^(lse - max) / sum; -inf for columns j >= n_b. Queries go BLOCK_H at a time. ONE_TILE
    (M <= BLOCK_J: up to 64K tokens at block 128): one load per query chunk, the scores summed in
    registers; else two passes over the row per chunk, the scores accumulating in `out` (this
    program alone writes the row). Deterministic: no atomics."""
    b = tl.program_id(0)
    n = tl.minimum(tl.load(seqlen_ptr + b).to(tl.int32) // BS, M)
    row = lse_ptr + b.to(tl.int64) * stride_lb
    if ONE_TILE:
        j = tl.arange(0, BLOCK_J)
        jm = j < n
        total = tl.zeros([BLOCK_J], dtype=tl.float32)
        for h0 in range(0, WHQ, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(
                row + hh[:, None] * stride_lh + j[None, :], mask=(hh < WHQ)[:, None] & jm[None, :], other=float("-inf")
            )
            mx = tl.max(x, axis=1)
            e = tl.exp2(x - tl.where(mx == float("-inf"), 0.0, mx)[:, None])
            sm = tl.sum(e, axis=1)
            total += tl.sum(e * tl.where(sm > 0, 1.0 / tl.where(sm > 0, sm, 1.0), 0.0)[:, None], axis=0)
        tl.store(out_ptr + b * stride_ob + j, tl.where(jm, total, float("-inf")), mask=j < M)
    else:
        for h0 in range(0, WHQ, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < WHQ
            mx = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            sm = tl.zeros([BLOCK_H], dtype=tl.float32)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                x = tl.load(
                    row + hh[:, None] * stride_lh + j[None, :], mask=hm[:, None] & (j < n)[None, :], other=float("-inf")
                )
                m_new = tl.maximum(mx, tl.max(x, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                sm = sm * tl.exp2(mx - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
                mx = m_new
            m_safe = tl.where(mx == float("-inf"), 0.0, mx)
            inv = tl.where(sm > 0, 1.0 / tl.where(sm > 0, sm, 1.0), 0.0)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jm = j < n
                x = tl.load(
                    row + hh[:, None] * stride_lh + j[None, :], mask=hm[:, None] & jm[None, :], other=float("-inf")
                )
                p = tl.sum(tl.exp2(x - m_safe[:, None]) * inv[:, None], axis=0)
                prev = tl.load(out_ptr + b * stride_ob + j, mask=jm & (h0 > 0), other=0.0)
                tl.store(out_ptr + b * stride_ob + j, prev + p, mask=jm)
        for j0 in range(0, M, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            tl.store(
                out_ptr + b * stride_ob + j,
                tl.full([BLOCK_J], float("-inf"), dtype=tl.float32),
                mask=(j >= n) & (j < M),
            )


# ------------------------------------------------------------------------------- a step's plan
def _window_budgets_kernel(
    seqlen_ptr,
    elig_ptr,
    ratio_ptr,
    sel_ptr,
    k_ptr,
    must_ptr,
    lens_ptr,
    M,
    BS,
    UB,
    FIXED,
    MIN_U,
    INIT_U,
    LOCAL_U,
    N_SEL,
    stride_must,
    HAS_FIXED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`window_budgets` of row b (program b): its unit count n, budget k (ceil(n * ratio) in
    float64, read from ratio_ptr, or FIXED), its forced blocks (must_ptr [B, M] uint8: the unit
    flags, BLOCK columns at a time, counted for the length as they are written) and the tokens
    it reads (lens_ptr, in seq_lens' dtype)."""
    b = tl.program_id(0)
    seq = tl.load(seqlen_ptr + b)
    n_tok = seq.to(tl.int64)
    n = (n_tok + BS * UB - 1) // (BS * UB)
    if HAS_FIXED:
        k = n * 0 + FIXED
    else:
        x = n.to(tl.float64) * tl.load(ratio_ptr)
        k = x.to(tl.int64)
        k = tl.where(k.to(tl.float64) < x, k + 1, k)  # the ceiling of a non-negative product
    elig = tl.load(elig_ptr + b) != 0
    k = tl.minimum(tl.where(elig, tl.maximum(k, MIN_U), n), n)
    n_b = tl.minimum((n_tok + BS - 1) // BS, M)
    forced = n * 0
    for start in range(0, M, BLOCK):
        j = start + tl.arange(0, BLOCK)
        u = j // UB
        must = (u < INIT_U) | (u >= n - LOCAL_U) | (u == n - 1)
        for s in range(N_SEL):
            v = tl.load(sel_ptr + s)
            must = must | (u == tl.where(v >= 0, v, n + v))
        must = must & (u < n)
        tl.store(must_ptr + b * stride_must + j, must.to(tl.uint8), mask=j < M)
        forced += tl.sum((must & (j < n_b)).to(tl.int64), axis=0)
    kb = k * UB
    tl.store(k_ptr + b, kb)
    kept = tl.minimum(n_b, tl.maximum(kb, forced))
    lens = kept * BS - tl.where(n_b > 0, n_b * BS - n_tok, 0)
    tl.store(lens_ptr + b, lens.to(seq.dtype))


def _kept_counts_kernel(
    blocks_ptr,
    rows_ptr,
    lens_ptr,
    which_ptr,
    nblk_ptr,
    elig_ptr,
    B,
    BS,
    stride_lens,
    BLOCK_B: tl.constexpr,
):
    """`add_kept_counts` for layer l (program l): the blocks its eligible rows read (the row of
    lens its which_ptr entry names, -1: the blocks they hold, -2: none) and hold, added to
    blocks_ptr[l]; program 0 also adds the step's selecting rows to rows_ptr."""
    layer = tl.program_id(0)
    which = tl.load(which_ptr + layer)
    p = tl.maximum(which, 0)
    held = tl.zeros([BLOCK_B], dtype=tl.int64)
    read = tl.zeros([BLOCK_B], dtype=tl.int64)
    n_elig = tl.zeros([BLOCK_B], dtype=tl.int64)
    for start in range(0, B, BLOCK_B):
        i = start + tl.arange(0, BLOCK_B)
        e = (tl.load(elig_ptr + i, mask=i < B, other=0) != 0) & (i < B)
        nb = tl.load(nblk_ptr + i, mask=e, other=0).to(tl.int64)
        ln = tl.load(lens_ptr + p * stride_lens + i, mask=e & (which >= 0), other=0).to(tl.int64)
        held += nb
        read += (ln + BS - 1) // BS
        n_elig += e.to(tl.int64)
    held_sum = tl.sum(held, axis=0)
    read_sum = tl.where(which == -1, held_sum, tl.where(which >= 0, tl.sum(read, axis=0), 0))
    tl.store(blocks_ptr + layer * 2, tl.load(blocks_ptr + layer * 2) + read_sum)
    tl.store(blocks_ptr + layer * 2 + 1, tl.load(blocks_ptr + layer * 2 + 1) + held_sum)
    if layer == 0:
        count = tl.sum(n_elig, axis=0)
        tl.store(rows_ptr, tl.load(rows_ptr) + (count > 0).to(tl.int64))
        tl.store(rows_ptr + 1, tl.load(rows_ptr + 1) + count)


# ------------------------------------------------------------------------------------- build
_KERNELS = (
    _sign_pack_kernel,
    _hash_write_kernel,
    _qplanes_kernel,
    _qhash_planes_kernel,
    _hamming_kernel,
    _qhash_norm_kernel,
    _hamming_cosine_kernel,
    _topk_kernel,
    _attn_split_kernel,
    _attn_combine_kernel,
    _scores_dot_kernel,
    _reps_write_kernel,
    _scores_minmax_kernel,
    _scores_grouped_kernel,
    _kvstar_importance_kernel,
    _kvstar_channels_kernel,
    _kvstar_logits_kernel,
    _kvstar_mass_kernel,
    _window_budgets_kernel,
    _kept_counts_kernel,
)


def _fix_interpreter_index() -> None:
    """Let Triton 3.6's interpreter take run-time scalars as loop bounds under numpy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with int(array), which
    numpy 2.4 refuses for arrays that are not 0-d; `range(start, end, BLOCK)` over loaded
    lengths (the attention loop) then fails in interpreter mode only. This wraps the hook that
    installs `tensor.__index__` so it reads the single element instead. No effect on GPU runs.
    """
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ucm_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ucm_fixed = True
    interpreter._patch_lang_tensor = patched


@functools.lru_cache(maxsize=2)
def get_kernels(interpret: bool) -> SimpleNamespace:
    """The kernels, compiled for the GPU or wrapped for Triton's CPU interpreter."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.sum, InterpretedFunction):
            # tl.sum, tl.max, tl.cumsum ... are jit functions built when triton.language is
            # imported; the interpreter only works if they were built in interpreter mode too.
            raise RuntimeError(
                "Triton's interpreter needs TRITON_INTERPRET=1 in the environment before triton is "
                "first imported (triton.language builds its jit functions at import)"
            )
        _fix_interpreter_index()
        wrap = InterpretedFunction
    else:
        wrap = triton.runtime.jit.JITFunction
    return SimpleNamespace(**{fn.__name__.lstrip("_"): wrap(fn) for fn in _KERNELS})
