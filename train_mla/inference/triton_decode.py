"""Triton kernels of `decode_attention` (train_mla/inference/decode_attention.py): attention of one new token per
sequence over a cache whose sequences have different lengths, reading each cache entry once.

split_kv_decode (flash-decoding): one program per (sequence, key head, split) serves all query heads of that key head;
each split keeps a running max and sum, and the splits are merged by merge_splits, or by the last split of each
sequence to finish (fused merge), or not at all when there is one. balanced_decode does the same work on a fixed grid
whose programs take equal shares of all the batch's tiles, across sequence boundaries (as FlashMLA's tile scheduler
does). On Hopper, the MLA cache's whole tiles can come by the copy engine (TMA: tma_descriptors); MLA's query heads
can be split into groups with programs of their own (DeepSeek's 128). TILE holds these choices and the tile sizes per
cache layout; decode_attention_triton launches them.

Import this module only when the kernels are needed: Triton reads TRITON_INTERPRET (the CPU interpreter the tests use)
when the kernels below are defined, at import.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):  # fp32 inputs in full precision (the tests' float32), else the tensor cores
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def attend_tile(
    qa,
    qb,
    acc,
    m_i,
    l_i,
    Kc,
    Vc,
    KA_desc,
    KB_desc,
    k_row0,
    k_base,
    v_base,
    t0,
    end,
    sk_t,
    sv_t,
    DA,
    DB,
    DV,
    qk_scale,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_B: tl.constexpr,
    V_IS_KA: tl.constexpr,
    IEEE: tl.constexpr,
    MASK_T: tl.constexpr,
    EVEN_DA: tl.constexpr,
    EVEN_DB: tl.constexpr,
    EVEN_DV: tl.constexpr,
    TRANS: tl.constexpr,
    TMA: tl.constexpr,
):
    # one tile of BLOCK_T cached tokens for all BLOCK_G query heads; MASK_T only for a split's last, partial tile.
    # TRANS: everything transposed (qa [DA, G], qb [DB, G], acc [DV, G]): scores [BLOCK_T, BLOCK_G], so that the
    # tokens, not the few query heads, fill the rows of the matrix units
    tt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
    da, db, dv = tl.arange(0, BLOCK_DA), tl.arange(0, BLOCK_DB), tl.arange(0, BLOCK_DV)
    live = tt < end  # masks only where a tile is partial or a width is not a power of 2: plain loads elsewhere
    k_row = Kc + k_base + tt[:, None] * sk_t
    if TMA and not MASK_T:  # a whole tile by the copy engine (Hopper's TMA); columns past DA or DB come as zeros
        ka = KA_desc.load([(k_row0 + t0).to(tl.int32), 0])  # [BLOCK_T, BLOCK_DA]
    elif MASK_T or not EVEN_DA:
        ka = tl.load(k_row + da[None, :], mask=live[:, None] & (da[None, :] < DA), other=0.0)  # [BLOCK_T, BLOCK_DA]
    else:
        ka = tl.load(k_row + da[None, :])
    if HAS_B:
        if TMA and not MASK_T:
            kb = KB_desc.load([(k_row0 + t0).to(tl.int32), 0])  # [BLOCK_T, BLOCK_DB]
        elif MASK_T or not EVEN_DB:
            kb = tl.load(k_row + DA + db[None, :], mask=live[:, None] & (db[None, :] < DB), other=0.0)
        else:
            kb = tl.load(k_row + DA + db[None, :])
    if V_IS_KA:
        v = ka  # MLA: the values are the latent columns just loaded for the scores
    else:
        v_row = Vc + v_base + tt[:, None] * sv_t + dv[None, :]
        if MASK_T or not EVEN_DV:
            v = tl.load(v_row, mask=live[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_T, BLOCK_DV]
        else:
            v = tl.load(v_row)
    if TRANS:
        qk = dot(ka, qa, IEEE)  # [BLOCK_T, BLOCK_G]
        if HAS_B:
            qk += dot(kb, qb, IEEE)
        qk = qk.to(tl.float32) * qk_scale  # log2 units: exp2 below
        if MASK_T:
            qk = tl.where(live[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        p = tl.exp2(qk - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        pv = dot(tl.trans(v), p.to(v.dtype), IEEE)  # [BLOCK_DV, BLOCK_G]
        acc = acc * alpha[None, :] + pv
        l_i = l_i * alpha + tl.sum(p, 0)
    else:  # (no early return: compiled Triton would still build the code after it)
        qk = dot(qa, tl.trans(ka), IEEE)  # [BLOCK_G, BLOCK_T]
        if HAS_B:
            qk += dot(qb, tl.trans(kb), IEEE)
        qk = qk.to(tl.float32) * qk_scale  # log2 units: exp2 below
        if MASK_T:
            qk = tl.where(live[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        pv = dot(p.to(v.dtype), v, IEEE)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def attend_range(
    Q,
    Kc,
    Vc,
    KA_desc,
    KB_desc,
    seq_rows,
    b64,
    kh,
    start,
    end,
    sq_b,
    sq_k,
    sq_g,
    sk_b,
    sk_t,
    sk_k,
    sv_b,
    sv_t,
    sv_k,
    G,
    DA,
    DB,
    DV,
    qk_scale,
    BLOCK_G: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_B: tl.constexpr,
    V_IS_KA: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_DA: tl.constexpr,
    EVEN_DB: tl.constexpr,
    EVEN_DV: tl.constexpr,
    TRANS: tl.constexpr,
    TMA: tl.constexpr,
):
    # cached tokens [start, end) of one (sequence, key head), start on a tile boundary, for all its query heads:
    # -> (acc [BLOCK_G, BLOCK_DV], running max, running sum). Key columns = part A [0, DA) + part B [DA, DA + DB);
    # MLA: A = latent (also the values), B = RoPE key
    full_end = start + tl.maximum(end - start, 0) // BLOCK_T * BLOCK_T  # whole tiles: no mask on the tokens
    g = tl.arange(0, BLOCK_G)
    da, db = tl.arange(0, BLOCK_DA), tl.arange(0, BLOCK_DB)
    q_row = Q + b64 * sq_b + kh * sq_k + g[:, None] * sq_g
    qa = tl.load(q_row + da[None, :], mask=(g[:, None] < G) & (da[None, :] < DA), other=0.0)  # [BLOCK_G, BLOCK_DA]
    qb = tl.load(q_row + DA + db[None, :], mask=(g[:, None] < G) & (db[None, :] < DB), other=0.0)  # [BLOCK_G, BLOCK_DB]
    k_base, v_base = b64 * sk_b + kh * sk_k, b64 * sv_b + kh * sv_k
    k_row0 = b64 * seq_rows  # TMA: the sequence's first row in the [sequences x seq_rows, DA + DB] view of the cache
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - max)
    if TRANS:
        qx, qy = tl.trans(qa), tl.trans(qb)  # [BLOCK_DA, BLOCK_G], [BLOCK_DB, BLOCK_G]
        acc = tl.zeros([BLOCK_DV, BLOCK_G], tl.float32)  # running sum of exp2(score - max) * v, transposed
    else:
        qx, qy = qa, qb
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)  # running sum of exp2(score - max) * v
    for t0 in range(start, full_end, BLOCK_T):
        acc, m_i, l_i = attend_tile(
            qx,
            qy,
            acc,
            m_i,
            l_i,
            Kc,
            Vc,
            KA_desc,
            KB_desc,
            k_row0,
            k_base,
            v_base,
            t0,
            end,
            sk_t,
            sv_t,
            DA,
            DB,
            DV,
            qk_scale,
            BLOCK_DA,
            BLOCK_DB,
            BLOCK_DV,
            BLOCK_T,
            HAS_B,
            V_IS_KA,
            IEEE,
            False,
            EVEN_DA,
            EVEN_DB,
            EVEN_DV,
            TRANS,
            TMA,
        )
    if full_end < end:
        acc, m_i, l_i = attend_tile(
            qx,
            qy,
            acc,
            m_i,
            l_i,
            Kc,
            Vc,
            KA_desc,
            KB_desc,
            k_row0,
            k_base,
            v_base,
            full_end,
            end,
            sk_t,
            sv_t,
            DA,
            DB,
            DV,
            qk_scale,
            BLOCK_DA,
            BLOCK_DB,
            BLOCK_DV,
            BLOCK_T,
            HAS_B,
            V_IS_KA,
            IEEE,
            True,
            EVEN_DA,
            EVEN_DB,
            EVEN_DV,
            TRANS,
            TMA,
        )
    if TRANS:
        acc = tl.trans(acc)  # [BLOCK_G, BLOCK_DV]
    return acc, m_i, l_i


@triton.jit
def store_output(Out, o_off, acc, l_i, G, DV, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, so_g):
    g, dv = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_DV)
    o = Out + o_off + g[:, None] * so_g + dv[None, :]
    tl.store(o, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=(g[:, None] < G) & (dv[None, :] < DV))


@triton.jit
def merge_partials(
    Out, Acc, Max, Sum, slot0, n_slots, o_off, so_g, G, DV, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr
):
    # partials in slots slot0 .. slot0 + n_slots - 1 (rows (slot) * BLOCK_G + g): weight each by exp2(its max - the
    # overall max); empty ones (max -inf) weigh 0. Loads bypass L1 (.cg): other programs of the launch wrote them
    g, dv = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_DV)
    base = slot0.to(tl.int64) * BLOCK_G
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(n_slots):
        m = tl.maximum(m, tl.load(Max + base + s * BLOCK_G + g, cache_modifier=".cg"))
    num = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    for s in range(n_slots):
        row = base + s * BLOCK_G + g
        w = tl.exp2(tl.load(Max + row, cache_modifier=".cg") - m)
        den += w * tl.load(Sum + row, cache_modifier=".cg")
        num += w[:, None] * tl.load(Acc + row[:, None] * BLOCK_DV + dv[None, :], cache_modifier=".cg")
    store_output(Out, o_off, num, den, G, DV, BLOCK_G, BLOCK_DV, so_g)


@triton.jit
def store_partial(
    Out,
    Acc,
    Max,
    Sum,
    Count,
    acc,
    m_i,
    l_i,
    slot,
    counter,
    slot0,
    n_slots,
    o_off,
    so_g,
    G,
    DV,
    BLOCK_G: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
):
    # one piece of a (sequence, key head) into its slot; with FUSED_MERGE the last of its n_slots pieces to finish
    # merges them all (no second launch) and puts the counter back to 0 for the next call
    g, dv = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_DV)
    row = slot.to(tl.int64) * BLOCK_G + g
    tl.store(Max + row, m_i)
    tl.store(Sum + row, l_i)
    tl.store(Acc + row[:, None] * BLOCK_DV + dv[None, :], acc)
    if FUSED_MERGE:
        tl.debug_barrier()  # every thread's partials are written before the counter's (release) increment
        done = tl.atomic_add(Count + counter, 1, sem="acq_rel", scope="gpu")
        if done == n_slots - 1:
            merge_partials(Out, Acc, Max, Sum, slot0, n_slots, o_off, so_g, G, DV, BLOCK_G, BLOCK_DV)
            tl.atomic_xchg(Count + counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def split_kv_decode(
    Q,
    Kc,
    Vc,
    KA_desc,
    KB_desc,
    seq_rows,
    Lens,
    Out,
    Acc,
    Max,
    Sum,
    Count,
    sq_b,
    sq_k,
    sq_g,
    sk_b,
    sk_t,
    sk_k,
    sv_b,
    sv_t,
    sv_k,
    so_b,
    so_k,
    so_g,
    G,
    DA,
    DB,
    DV,
    num_splits,
    qk_scale,
    BLOCK_G: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_B: tl.constexpr,
    V_IS_KA: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_DA: tl.constexpr,
    EVEN_DB: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SINGLE: tl.constexpr,
    TRANS: tl.constexpr,
    TMA: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
):
    # one program per (sequence, key head, split): every sequence is cut into num_splits equal runs of tiles
    b, kh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_kh, n_s = tl.num_programs(1), tl.num_programs(2)
    length = tl.load(Lens + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T  # tokens per split, whole tiles
    start = s * chunk
    b64 = b.to(tl.int64)
    acc, m_i, l_i = attend_range(
        Q,
        Kc,
        Vc,
        KA_desc,
        KB_desc,
        seq_rows,
        b64,
        kh,
        start,
        tl.minimum(start + chunk, length),
        sq_b,
        sq_k,
        sq_g,
        sk_b,
        sk_t,
        sk_k,
        sv_b,
        sv_t,
        sv_k,
        G,
        DA,
        DB,
        DV,
        qk_scale,
        BLOCK_G,
        BLOCK_DA,
        BLOCK_DB,
        BLOCK_DV,
        BLOCK_T,
        HAS_B,
        V_IS_KA,
        IEEE,
        EVEN_DA,
        EVEN_DB,
        EVEN_DV,
        TRANS,
        TMA,
    )
    o_off = b64 * so_b + kh * so_k
    if SINGLE:  # one split: the normalised output directly, no merge pass
        store_output(Out, o_off, acc, l_i, G, DV, BLOCK_G, BLOCK_DV, so_g)
    else:  # partials laid out [B, K, S, BLOCK_G, ...]
        pair = b64 * n_kh + kh
        store_partial(
            Out,
            Acc,
            Max,
            Sum,
            Count,
            acc,
            m_i,
            l_i,
            pair * n_s + s,
            pair,
            pair * n_s,
            n_s,
            o_off,
            so_g,
            G,
            DV,
            BLOCK_G,
            BLOCK_DV,
            FUSED_MERGE,
        )


@triton.jit
def balanced_decode(
    Q,
    Kc,
    Vc,
    KA_desc,
    KB_desc,
    seq_rows,
    Lens,
    Out,
    Acc,
    Max,
    Sum,
    Count,
    sq_b,
    sq_k,
    sq_g,
    sk_b,
    sk_t,
    sk_k,
    sv_b,
    sv_t,
    sv_k,
    so_b,
    so_k,
    so_g,
    R,
    K,
    G,
    DA,
    DB,
    DV,
    qk_scale,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_B: tl.constexpr,
    V_IS_KA: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_DA: tl.constexpr,
    EVEN_DB: tl.constexpr,
    EVEN_DV: tl.constexpr,
    TRANS: tl.constexpr,
    TMA: tl.constexpr,
):
    # a fixed number P of programs (enough for every multiprocessor) shares all tiles of all R = B x K (sequence,
    # key head) rows equally, in row order: program p takes tiles [p W / P, (p + 1) W / P) of the W in all, which
    # may end one row and start the next. A row's pieces go to slots p + r (distinct for every (program, row)
    # pair: at most P + R of them) and the last piece to finish merges them; a row in one piece is written
    # directly. Every program derives the whole schedule from the lengths, so nothing is planned on the host
    rows = tl.arange(0, BLOCK_R)
    n = tl.cdiv(tl.load(Lens + rows // K, mask=rows < R, other=0).to(tl.int32), BLOCK_T)  # tiles per row
    cum = tl.cumsum(n, 0)  # tiles up to and including each row
    W = tl.sum(n, 0).to(tl.int64)
    p = tl.program_id(0)
    P = tl.minimum(tl.num_programs(0), W)  # at least one tile per program, so that every slot gets written
    t = ((p * W) // P).to(tl.int32)
    t_hi = tl.where(p < P, ((p + 1) * W) // P, t).to(tl.int32)  # programs past P have nothing to do
    while t < t_hi:
        r = tl.sum((cum <= t).to(tl.int32), 0)  # the row that holds tile t
        r_end = tl.sum(tl.where(rows == r, cum, 0), 0)  # its last tile + 1
        r_start = r_end - tl.sum(tl.where(rows == r, n, 0), 0)  # its first tile
        piece_end = tl.minimum(t_hi, r_end)
        b = r // K
        kh = r - b * K
        b64 = b.to(tl.int64)
        length = tl.load(Lens + b).to(tl.int32)
        acc, m_i, l_i = attend_range(
            Q,
            Kc,
            Vc,
            KA_desc,
            KB_desc,
            seq_rows,
            b64,
            kh,
            (t - r_start) * BLOCK_T,
            tl.minimum((piece_end - r_start) * BLOCK_T, length),
            sq_b,
            sq_k,
            sq_g,
            sk_b,
            sk_t,
            sk_k,
            sv_b,
            sv_t,
            sv_k,
            G,
            DA,
            DB,
            DV,
            qk_scale,
            BLOCK_G,
            BLOCK_DA,
            BLOCK_DB,
            BLOCK_DV,
            BLOCK_T,
            HAS_B,
            V_IS_KA,
            IEEE,
            EVEN_DA,
            EVEN_DB,
            EVEN_DV,
            TRANS,
            TMA,
        )
        # the programs holding the row's first and last tiles: the largest q with q W / P <= tile
        first_p = (((r_start + 1).to(tl.int64) * P + W - 1) // W - 1).to(tl.int32)
        last_p = ((r_end.to(tl.int64) * P + W - 1) // W - 1).to(tl.int32)
        o_off = b64 * so_b + kh * so_k
        if first_p == last_p:
            store_output(Out, o_off, acc, l_i, G, DV, BLOCK_G, BLOCK_DV, so_g)
        else:
            store_partial(
                Out,
                Acc,
                Max,
                Sum,
                Count,
                acc,
                m_i,
                l_i,
                p + r,
                r,
                first_p + r,
                last_p - first_p + 1,
                o_off,
                so_g,
                G,
                DV,
                BLOCK_G,
                BLOCK_DV,
                True,
            )
        t = piece_end


@triton.jit
def merge_splits(
    Out, Acc, Max, Sum, so_b, so_k, so_g, G, DV, num_splits, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr
):
    # the separate merge pass of split_kv_decode: one program per (sequence, key head)
    b, kh, n_kh = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    pair = b.to(tl.int64) * n_kh + kh
    merge_partials(
        Out,
        Acc,
        Max,
        Sum,
        pair * num_splits,
        num_splits,
        b.to(tl.int64) * so_b + kh * so_k,
        so_g,
        G,
        DV,
        BLOCK_G,
        BLOCK_DV,
    )


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


# per cache layout: tile sizes, and (sequence, key head, split) programs per multiprocessor that set the number of
# splits; balanced: a fixed grid of programs_per_sm x SMs programs sharing all tiles of the batch equally
# (balanced_decode) instead of equal splits of every sequence; tma: the MLA cache's whole tiles by Hopper's copy engine
# (tensor descriptors, where tma_descriptors allows), a piece's partial last tile by masked loads; heads_per_program:
# MLA's query heads in groups of that many per program (None: all in one); maxnreg: a cap on registers per thread
# (None: the compiler's choice, which is 170-255 for every MLA tile and so holds 8 warps per multiprocessor:
# benchmarks/kernel_resources.py). The fastest of
# benchmarks/decode_kernel_sweep.py's grid (its measurements: docs/benchmarks.md); "mla_wide" serves latent + RoPE rows
# wider than WIDE_ROW columns (DeepSeek's 512 + 64), whose "mla" tile would need more shared memory than Hopper has
# (317 KB of its 227 KB at 576 columns), as tile_layout chooses
TILE = {
    "mla": {
        "block_t": 128,
        "num_warps": 4,
        "num_stages": 3,
        "programs_per_sm": 2,
        "transposed": False,
        "fused_merge": True,
        "balanced": True,
        "tma": True,  # H100: kernel -4 % (29 of 30 alternating rounds), engine at 64 x 8k +1 %
        "heads_per_program": None,
        "maxnreg": None,
    },
    "mla_wide": {
        "block_t": 64,
        "num_warps": 4,
        "num_stages": 3,
        "programs_per_sm": 1,
        "transposed": False,
        "fused_merge": True,
        "balanced": True,
        "tma": False,
        "heads_per_program": 16,  # the measured tile's 16 heads: more (DeepSeek's 128) go in groups of 16
        "maxnreg": None,
    },
    "gqa": {
        "block_t": 64,
        "num_warps": 4,
        "num_stages": 3,
        "programs_per_sm": 2,
        "transposed": False,
        "fused_merge": False,
        "balanced": False,
        "tma": False,
        "heads_per_program": None,
        "maxnreg": None,
    },
}
WIDE_ROW = 320  # the "mla" tile's 3-stage pipeline of 128-token tiles fits Hopper's shared memory up to here
LOG2E = 1.4426950408889634
_COUNTERS: dict = {}  # per device: int32 zeros, one per (sequence, key head), for the fused merge; reset by the kernel


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed counters of finished splits. Kept across calls (and CUDA graph replays): the merging program puts its
    counter back to 0, so a buffer is zeroed once, when it is allocated."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return buf


def tma_descriptors(k_cache: torch.Tensor, DA: int, DB: int, block: tuple[int, int, int]):
    """Tensor descriptors of the MLA cache k_cache [B, T, 1, DA + DB] (or its head groups: [B, T, n, DA + DB] of head
    stride 0) seen as rows [B x seq_rows, DA + DB]: one for
    the latent columns [0, DA), one for the RoPE key's [DA, DA + DB), tiles of block = (BLOCK_T, BLOCK_DA,
    BLOCK_DB); returns (latent, rope, seq_rows), or None where the copy engine cannot serve: no Hopper GPU (AMD
    GPUs included), a Triton without host descriptors, or strides and offsets not on 16-byte boundaries."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if k_cache.is_cuda and (torch.version.hip or torch.cuda.get_device_capability(k_cache.device)[0] < 9):
        return None  # ROCm reports MI300 as capability 9.4: the copy-engine path is Hopper's only
    B, T, K, DK = k_cache.shape
    sk_b, sk_t = k_cache.stride(0), k_cache.stride(1)
    size = k_cache.element_size()
    if (K != 1 and k_cache.stride(2)) or sk_b % sk_t or k_cache.data_ptr() % 16 or sk_t * size % 16 or DA * size % 16:
        return None
    seq_rows, (bt, bda, bdb) = sk_b // sk_t, block
    view = k_cache.as_strided((B * seq_rows, DK), (sk_t, 1))  # [rows, DA + DB]
    latent = TensorDescriptor(view, shape=[B * seq_rows, DA], strides=[sk_t, 1], block_shape=[bt, bda])
    rope = (
        TensorDescriptor(view[:, DA:], shape=[B * seq_rows, DB], strides=[sk_t, 1], block_shape=[bt, bdb])
        if DB
        else None
    )
    return latent, rope, seq_rows


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, num_splits: int | None = None):
    """TILE[layout]["balanced"]: balanced_decode over a fixed grid of programs_per_sm x SMs programs (num_splits x
    rows of them when num_splits is given). Otherwise the split-KV kernel, then one merge kernel for the splits (none
    when there is one split, or with fused_merge: the last split to finish merges); num_splits None = enough programs
    for every multiprocessor (default_num_splits).

    When v_cache is the first columns of k_cache (MLA's latent), each tile is loaded once for scores and values."""
    B, K, G, DK = q.shape
    DV = v_cache.shape[-1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention_triton needs a contiguous last dimension in q, k_cache and v_cache.")
    v_is_prefix = v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and DV <= DK
    DA = DV if v_is_prefix else DK
    DB = DK - DA
    BG, BDA, BDB = _next_pow2(G), _next_pow2(DA), _next_pow2(max(DB, 1))
    BDV = BDA if v_is_prefix else _next_pow2(DV)
    layout = tile_layout(v_is_prefix, DA, DB)
    tile = TILE[layout]
    heads = tile.get("heads_per_program")
    if heads and K == 1 and G > heads and G % heads == 0:
        # many query heads on the one latent head (DeepSeek's 128): groups of `heads`, each group in programs of its
        # own, as if it had a key head of its own (stride 0: the same cache, read once per group; the groups of
        # a tile run together and share it in L2), so that a program's accumulator stays in registers
        n = G // heads
        grouped = decode_attention_triton(
            q.reshape(B, n, heads, DK),
            k_cache.expand(-1, -1, n, -1),
            v_cache.expand(-1, -1, n, -1),
            lengths,
            scale,
            num_splits,
        )  # [B, n, heads, DV]
        return grouped.reshape(B, 1, G, DV)
    out = torch.empty(B, K, G, DV, device=q.device, dtype=q.dtype)
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    shapes = dict(
        BLOCK_G=BG,
        BLOCK_DA=BDA,
        BLOCK_DB=BDB,
        BLOCK_DV=BDV,
        BLOCK_T=tile["block_t"],
        HAS_B=DB > 0,
        V_IS_KA=v_is_prefix,
        IEEE=q.dtype == torch.float32,
        EVEN_DA=DA == BDA,
        EVEN_DB=DB == BDB,
        EVEN_DV=DV == BDV,
        TRANS=tile["transposed"],
        num_warps=tile["num_warps"],
        num_stages=tile["num_stages"],
    )
    tma = tile.get("tma") and v_is_prefix and tma_descriptors(k_cache, DA, DB, (tile["block_t"], BDA, BDB))
    descriptors = tma if tma else (None, None, 0)  # (latent, rope, rows per sequence)
    shapes["TMA"] = bool(tma)
    if tile.get("maxnreg"):
        shapes["maxnreg"] = tile["maxnreg"]
    if tile["balanced"]:
        P = num_splits * B * K if num_splits else tile["programs_per_sm"] * multiprocessors(q.device)
        acc = torch.empty(P + B * K, BG, BDV, device=q.device, dtype=torch.float32)  # slots p + r
        mx = torch.empty(P + B * K, BG, device=q.device, dtype=torch.float32)
        balanced_decode[(P,)](
            q,
            k_cache,
            v_cache,
            *descriptors,
            lengths,
            out,
            acc,
            mx,
            torch.empty_like(mx),
            split_counters(q.device, B * K),
            *strides,
            B * K,
            K,
            G,
            DA,
            DB,
            DV,
            scale * LOG2E,
            BLOCK_R=_next_pow2(B * K),
            **shapes,
        )
        return out
    num_splits = num_splits or default_num_splits(B, K, multiprocessors(q.device), layout)
    acc = torch.empty(B, K, num_splits, BG, BDV, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, K, num_splits, BG, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    fused_merge = num_splits > 1 and tile["fused_merge"]
    count = split_counters(q.device, B * K) if fused_merge else mx
    split_kv_decode[(B, K, num_splits)](
        q,
        k_cache,
        v_cache,
        *descriptors,
        lengths,
        out,
        acc,
        mx,
        sm,
        count,
        *strides,
        G,
        DA,
        DB,
        DV,
        num_splits,
        scale * LOG2E,
        SINGLE=num_splits == 1,
        FUSED_MERGE=fused_merge,
        **shapes,
    )
    if num_splits > 1 and not fused_merge:
        merge_splits[(B, K)](
            out,
            acc,
            mx,
            sm,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            G,
            DV,
            num_splits,
            BLOCK_G=BG,
            BLOCK_DV=BDV,
            num_warps=4,
        )
    return out


def tile_layout(latent_cache: bool, latent: int, rope: int) -> str:
    """The TILE entry for a cache: "gqa" for separate keys and values; for MLA's latent cache (values = the first
    `latent` columns of the keys, then `rope` RoPE columns), "mla", or "mla_wide" when a row as the kernel loads it
    (each part padded to a power of 2) is wider than WIDE_ROW columns."""
    if not latent_cache:
        return "gqa"
    return "mla_wide" if _next_pow2(latent) + _next_pow2(max(rope, 1)) > WIDE_ROW else "mla"


def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def default_num_splits(batch: int, kv_heads: int, sms: int, layout: str = "gqa") -> int:
    """Enough (sequence, key head, split) programs to give every multiprocessor TILE[layout]["programs_per_sm"]."""
    return max(1, min(64, math.ceil(TILE[layout]["programs_per_sm"] * sms / (batch * kv_heads))))
