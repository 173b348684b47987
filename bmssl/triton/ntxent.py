"""Triton kernels of the fused multi-view NT-Xent (maths in csrc/ntxent.cpp).

    s_ij = u_i . u_j inv_tau;  "in": l_i = lse_A(i) - lse_P(i);  "out": l_i = lse_A(i) - mean_P(i) s
    grad_u = c (G + G^T) U,  G_ij = p_ij - q_ij,  c = g_t inv_tau / B
    double backward: d/dg = mean_i (a_i - b_i),  d/du = c [(G + G^T) V + (H + H^T) U]

A program owns BLOCK_M rows of one task and walks all columns in BLOCK_N tiles, as flash
attention does: S is never stored. Forward keeps online log-sum-exps per row. Backward forms
G_ij + G_ji from the row statistics of i and j (S is symmetric), so each program writes only its
own rows: no atomics. u [T, B, d] (BLOCK_D >= d), labels [T, B] int64, stats [T, 2, B] fp32
(lse_A, lse_P) for "in" or (lse_A, |P|) for "out". Offsets are int64. Takes fp32/fp16/bf16:
fp32 dots run in exact IEEE fp32 (no tf32); fp16/bf16 dots accumulate in fp32.
"""
import torch

from bmssl.triton import jit, triton

if triton is not None:
    import triton.language as tl

    @jit
    def _tile(u_ptr, labels_ptr, task, rows, cols, d_offs, batch, dim, inv_tau,
              PRECISION: tl.constexpr):
        """s [BLOCK_M, BLOCK_N], positive mask, valid (j != i, j < B) mask, row and col labels."""
        base = task * batch * dim
        row_ok = rows < batch
        col_ok = cols < batch
        d_ok = d_offs < dim
        u_rows = tl.load(u_ptr + base + rows[:, None] * dim + d_offs[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        u_cols = tl.load(u_ptr + base + cols[:, None] * dim + d_offs[None, :],
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(u_rows, tl.trans(u_cols), input_precision=PRECISION).to(tl.float32) * inv_tau
        label_rows = tl.load(labels_ptr + task * batch + rows, mask=row_ok, other=-1)
        label_cols = tl.load(labels_ptr + task * batch + cols, mask=col_ok, other=-2)
        valid = (rows[:, None] != cols[None, :]) & col_ok[None, :] & row_ok[:, None]
        positive = valid & (label_rows[:, None] == label_cols[None, :])
        return s, positive, valid

    @jit
    def _forward_kernel(u_ptr, labels_ptr, row_loss_ptr, stats_ptr, batch, dim, inv_tau,
                        VARIANT_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        task = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        neg_inf = float("-inf")
        max_all = tl.full([BLOCK_M], neg_inf, tl.float32)
        sum_all = tl.zeros([BLOCK_M], tl.float32)
        max_pos = tl.full([BLOCK_M], neg_inf, tl.float32)
        sum_pos = tl.zeros([BLOCK_M], tl.float32)  # "out": sum of positive s
        count_pos = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, batch, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            s, positive, valid = _tile(u_ptr, labels_ptr, task, rows, cols, d_offs, batch, dim,
                                       inv_tau, PRECISION)
            s_all = tl.where(valid, s, neg_inf)
            new_max = tl.maximum(max_all, tl.max(s_all, axis=1))
            safe_max = tl.where(new_max == neg_inf, 0.0, new_max)
            sum_all = sum_all * tl.exp(max_all - safe_max) + tl.sum(tl.exp(s_all - safe_max[:, None]), axis=1)
            max_all = new_max
            if VARIANT_IN:
                s_pos = tl.where(positive, s, neg_inf)
                new_pos = tl.maximum(max_pos, tl.max(s_pos, axis=1))
                safe_pos = tl.where(new_pos == neg_inf, 0.0, new_pos)
                sum_pos = sum_pos * tl.exp(max_pos - safe_pos) + tl.sum(tl.exp(s_pos - safe_pos[:, None]), axis=1)
                max_pos = new_pos
            else:
                sum_pos += tl.sum(tl.where(positive, s, 0.0), axis=1)
                count_pos += tl.sum(positive.to(tl.float32), axis=1)
        row_ok = rows < batch
        # rows past B (padding) have empty sums: give them harmless values, never log(0)
        lse_all = tl.where(row_ok, max_all + tl.log(tl.where(row_ok, sum_all, 1.0)), 0.0)
        if VARIANT_IN:
            second = tl.where(row_ok, max_pos + tl.log(tl.where(row_ok, sum_pos, 1.0)), 0.0)
            loss = lse_all - second
        else:
            second = tl.where(row_ok, count_pos, 1.0)
            loss = lse_all - sum_pos / second
        tl.store(row_loss_ptr + task * batch + rows, loss, mask=row_ok)
        tl.store(stats_ptr + task * 2 * batch + rows, lse_all, mask=row_ok)
        tl.store(stats_ptr + (task * 2 + 1) * batch + rows, second, mask=row_ok)

    @jit
    def _g_sum(s, positive, valid, lse_rows, second_rows, lse_cols, second_cols,
               VARIANT_IN: tl.constexpr):
        """(G + G^T) on a tile, and p_ij, p_ji, q_ij, q_ji for the double backward."""
        p_ij = tl.where(valid, tl.exp(s - lse_rows[:, None]), 0.0)
        p_ji = tl.where(valid, tl.exp(s - lse_cols[None, :]), 0.0)
        if VARIANT_IN:
            q_ij = tl.where(positive, tl.exp(s - second_rows[:, None]), 0.0)
            q_ji = tl.where(positive, tl.exp(s - second_cols[None, :]), 0.0)
        else:
            q_ij = tl.where(positive, 1.0 / second_rows[:, None], 0.0)
            q_ji = tl.where(positive, 1.0 / second_cols[None, :], 0.0)
        return p_ij - q_ij + p_ji - q_ji, p_ij, p_ji, q_ij, q_ji

    @jit
    def _load_stat(ptr, task, which, index, batch):
        return tl.load(ptr + (task * 2 + which) * batch + index, mask=index < batch, other=1.0)

    @jit
    def _backward_kernel(u_ptr, labels_ptr, stats_ptr, scale_ptr, grad_ptr, batch, dim, inv_tau,
                         VARIANT_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        task = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        lse_rows = _load_stat(stats_ptr, task, 0, rows, batch)
        second_rows = _load_stat(stats_ptr, task, 1, rows, batch)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, batch, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            s, positive, valid = _tile(u_ptr, labels_ptr, task, rows, cols, d_offs, batch, dim,
                                       inv_tau, PRECISION)
            lse_cols = _load_stat(stats_ptr, task, 0, cols, batch)
            second_cols = _load_stat(stats_ptr, task, 1, cols, batch)
            g_sum, _, _, _, _ = _g_sum(s, positive, valid, lse_rows, second_rows, lse_cols,
                                       second_cols, VARIANT_IN)
            u_cols = tl.load(u_ptr + task * batch * dim + cols[:, None] * dim + d_offs[None, :],
                             mask=(cols < batch)[:, None] & (d_offs < dim)[None, :], other=0.0)
            acc += tl.dot(g_sum.to(u_cols.dtype), u_cols, input_precision=PRECISION)
        scale = tl.load(scale_ptr + task)
        out = grad_ptr + task * batch * dim + rows[:, None] * dim + d_offs[None, :]
        tl.store(out, (acc * scale).to(grad_ptr.dtype.element_ty),
                 mask=(rows < batch)[:, None] & (d_offs < dim)[None, :])

    @jit
    def _sdot_tile(u_ptr, v_ptr, task, rows, cols, d_offs, batch, dim, inv_tau, PRECISION: tl.constexpr):
        """sdot_ij = (v_i . u_j + u_i . v_j) inv_tau on a tile."""
        base = task * batch * dim
        row_mask = (rows < batch)[:, None] & (d_offs < dim)[None, :]
        col_mask = (cols < batch)[:, None] & (d_offs < dim)[None, :]
        row_index = base + rows[:, None] * dim + d_offs[None, :]
        col_index = base + cols[:, None] * dim + d_offs[None, :]
        u_rows = tl.load(u_ptr + row_index, mask=row_mask, other=0.0)
        v_rows = tl.load(v_ptr + row_index, mask=row_mask, other=0.0)
        u_cols = tl.load(u_ptr + col_index, mask=col_mask, other=0.0)
        v_cols = tl.load(v_ptr + col_index, mask=col_mask, other=0.0)
        sdot = tl.dot(v_rows, tl.trans(u_cols), input_precision=PRECISION)
        sdot += tl.dot(u_rows, tl.trans(v_cols), input_precision=PRECISION)
        return sdot.to(tl.float32) * inv_tau, u_cols, v_cols

    @jit
    def _double_pass1_kernel(u_ptr, v_ptr, labels_ptr, stats_ptr, ab_ptr, batch, dim, inv_tau,
                             VARIANT_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        task = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        lse_rows = _load_stat(stats_ptr, task, 0, rows, batch)
        second_rows = _load_stat(stats_ptr, task, 1, rows, batch)
        a = tl.zeros([BLOCK_M], tl.float32)
        b = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, batch, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            s, positive, valid = _tile(u_ptr, labels_ptr, task, rows, cols, d_offs, batch, dim,
                                       inv_tau, PRECISION)
            sdot, _, _ = _sdot_tile(u_ptr, v_ptr, task, rows, cols, d_offs, batch, dim, inv_tau, PRECISION)
            p_ij = tl.where(valid, tl.exp(s - lse_rows[:, None]), 0.0)
            if VARIANT_IN:
                q_ij = tl.where(positive, tl.exp(s - second_rows[:, None]), 0.0)
            else:
                q_ij = tl.where(positive, 1.0 / second_rows[:, None], 0.0)
            a += tl.sum(p_ij * sdot, axis=1)
            b += tl.sum(q_ij * sdot, axis=1)
        row_ok = rows < batch
        tl.store(ab_ptr + task * 2 * batch + rows, a, mask=row_ok)
        tl.store(ab_ptr + (task * 2 + 1) * batch + rows, b, mask=row_ok)

    @jit
    def _double_pass2_kernel(u_ptr, v_ptr, labels_ptr, stats_ptr, ab_ptr, scale_ptr, grad_ptr, batch,
                             dim, inv_tau, VARIANT_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        task = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        d_offs = tl.arange(0, BLOCK_D)
        lse_rows = _load_stat(stats_ptr, task, 0, rows, batch)
        second_rows = _load_stat(stats_ptr, task, 1, rows, batch)
        a_rows = _load_stat(ab_ptr, task, 0, rows, batch)
        b_rows = _load_stat(ab_ptr, task, 1, rows, batch)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, batch, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            s, positive, valid = _tile(u_ptr, labels_ptr, task, rows, cols, d_offs, batch, dim,
                                       inv_tau, PRECISION)
            sdot, u_cols, v_cols = _sdot_tile(u_ptr, v_ptr, task, rows, cols, d_offs, batch, dim,
                                              inv_tau, PRECISION)
            lse_cols = _load_stat(stats_ptr, task, 0, cols, batch)
            second_cols = _load_stat(stats_ptr, task, 1, cols, batch)
            a_cols = _load_stat(ab_ptr, task, 0, cols, batch)
            b_cols = _load_stat(ab_ptr, task, 1, cols, batch)
            g_sum, p_ij, p_ji, q_ij, q_ji = _g_sum(s, positive, valid, lse_rows, second_rows,
                                                   lse_cols, second_cols, VARIANT_IN)
            h_sum = p_ij * (sdot - a_rows[:, None]) + p_ji * (sdot - a_cols[None, :])
            if VARIANT_IN:
                h_sum -= q_ij * (sdot - b_rows[:, None]) + q_ji * (sdot - b_cols[None, :])
            acc += tl.dot(g_sum.to(v_cols.dtype), v_cols, input_precision=PRECISION)
            acc += tl.dot(h_sum.to(u_cols.dtype), u_cols, input_precision=PRECISION)
        scale = tl.load(scale_ptr + task)
        out = grad_ptr + task * batch * dim + rows[:, None] * dim + d_offs[None, :]
        tl.store(out, (acc * scale).to(grad_ptr.dtype.element_ty),
                 mask=(rows < batch)[:, None] & (d_offs < dim)[None, :])


# GPU tiles per kernel: (BLOCK_D limit, BLOCK_M = BLOCK_N, num_warps, num_stages), the first row
# whose limit holds d. Chosen with python -m bmssl.triton.aot (ptxas for sm_80 and sm_90, no GPU
# needed): the largest tile that spills no register on either architecture and fits sm_80's
# shared memory (163 KiB). Not yet timed on a GPU. The backward kernels keep a [BLOCK_M, BLOCK_D]
# fp32 accumulator and several [BLOCK_M, BLOCK_N] fp32 tiles (p_ij, p_ji, q_ij, q_ji, G, H: the
# second double-backward pass holds them all), so they take smaller tiles than the forward;
# fp32's exact (IEEE) dots run on FMA units and need more registers than fp16/bf16's.
# On sm_90 a tile of 64 rows or more lets Triton multiply with Hopper's warpgroup MMA (wgmma);
# 32 and fewer fall back to Ampere's mma.sync. The 16-bit forward (64) and backward (64 at
# d <= 128: two pipeline stages, where three spill 80 B on sm_90) get wgmma; the double-backward
# passes spill at 64 and stay on mma.sync (the "matmul" field of bmssl.triton.aot's report).
GPU_TILES = {
    ("forward", "16bit"): ((256, 64, 8, 3),),
    ("backward", "16bit"): ((128, 64, 8, 2), (256, 16, 8, 3)),
    ("double_pass1", "16bit"): ((64, 32, 4, 3), (128, 32, 8, 3), (256, 16, 8, 3)),
    ("double_pass2", "16bit"): ((256, 16, 8, 3),),
    ("forward", "fp32"): ((128, 32, 8, 3), (256, 16, 8, 2)),
    ("backward", "fp32"): ((128, 32, 8, 3), (256, 16, 8, 2)),
    ("double_pass1", "fp32"): ((128, 32, 8, 3), (256, 16, 8, 2)),
    ("double_pass2", "fp32"): ((128, 32, 8, 3), (256, 16, 8, 2)),
}
MAX_DIM = 256  # the largest d with a spill-free tile; larger d: the CUDA C++ kernel (any d) or the twin


def _config(u, kernel):
    """(grid, launch meta) of one kernel ("forward", "backward", "double_pass1", "double_pass2"):
    block sizes and, on a GPU, num_warps and num_stages."""
    tasks, batch, dim = u.shape
    block_d = max(16, triton.next_power_of_2(dim))
    precision = "ieee" if u.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 dots
    # no fp contraction: compiled, a * inv_tau - lse fused into one fma in the backward kernels
    # while the forward rounded s = dot * inv_tau first, so p and q sat up to ulp(s) / 2 from the
    # lse they were normalised by (the interpreter never fuses; the dots keep their own fmas)
    meta = dict(BLOCK_D=block_d, PRECISION=precision, enable_fp_fusion=False)
    if u.device.type == "cpu":  # the interpreter: small tiles keep it quick
        block = 16
    else:
        tiles = GPU_TILES[(kernel, "fp32" if u.dtype == torch.float32 else "16bit")]
        limit, block, warps, stages = next((t for t in tiles if block_d <= t[0]), tiles[-1])
        if block_d > limit:
            raise ValueError(f"the Triton NT-Xent kernels take d <= {MAX_DIM}, got d = {dim}")
        meta.update(num_warps=warps, num_stages=stages)
    meta.update(BLOCK_M=block, BLOCK_N=block)
    return (tasks, triton.cdiv(batch, block)), meta


def _scale(grad_task_loss, inv_tau, batch):
    """c_t = g_t inv_tau / B as fp32 [T]."""
    return (grad_task_loss.float() * (inv_tau / batch)).contiguous()


def forward(u, labels, inv_tau, variant):
    """(task_loss [T], stats [T, 2, B]) in fp32."""
    u, labels = u.contiguous(), labels.contiguous()
    tasks, batch, dim = u.shape
    row_loss = torch.empty(tasks, batch, device=u.device, dtype=torch.float32)
    stats = torch.empty(tasks, 2, batch, device=u.device, dtype=torch.float32)
    grid, meta = _config(u, "forward")
    _forward_kernel[grid](u, labels, row_loss, stats, batch, dim, inv_tau,
                          VARIANT_IN=variant == "in", **meta)
    return row_loss.mean(1), stats


def backward(grad_task_loss, u, labels, stats, inv_tau, variant):
    u, labels = u.contiguous(), labels.contiguous()
    batch, dim = u.shape[1], u.shape[2]
    grad_u = torch.empty_like(u)
    grid, meta = _config(u, "backward")
    _backward_kernel[grid](u, labels, stats.float().contiguous(), _scale(grad_task_loss, inv_tau, batch),
                           grad_u, batch, dim, inv_tau, VARIANT_IN=variant == "in", **meta)
    return grad_u


def double_backward(grad_grad_u, grad_task_loss, u, labels, stats, inv_tau, variant):
    u, labels, v = u.contiguous(), labels.contiguous(), grad_grad_u.to(u.dtype).contiguous()
    tasks, batch, dim = u.shape
    stats = stats.float().contiguous()
    ab = torch.empty(tasks, 2, batch, device=u.device, dtype=torch.float32)
    grid, meta = _config(u, "double_pass1")
    _double_pass1_kernel[grid](u, v, labels, stats, ab, batch, dim, inv_tau,
                               VARIANT_IN=variant == "in", **meta)
    grad_grad_task = (ab[:, 0] - ab[:, 1]).mean(1).to(grad_task_loss.dtype)
    grad_u = torch.empty_like(u)
    grid, meta = _config(u, "double_pass2")
    _double_pass2_kernel[grid](u, v, labels, stats, ab, _scale(grad_task_loss, inv_tau, batch), grad_u,
                               batch, dim, inv_tau, VARIANT_IN=variant == "in", **meta)
    return grad_grad_task, grad_u
