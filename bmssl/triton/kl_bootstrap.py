"""Triton kernels of bmssl::kl_bootstrap_rows (maths in csrc/kl_bootstrap.cpp).

    a = student/T, b = target/T;  row_kl = sum_j softmax(b)_j (b_j - a_j) - lse(b) + lse(a)
    grad_student_rj = grad_row_kl_r (softmax(a)_j - softmax(b)_j) / T

One program per row walks its C classes in BLOCK chunks. Each lane keeps an online
(max, sum) for a and b and the cross term sum e^{b - max_b} (b - a); lanes merge at the end.
student, target: [R, C] contiguous; row_kl [R], row_lse [R, 2] in ACC (fp32, fp64 for fp64).
A target entry of -inf has probability 0 and adds nothing.
"""
import torch

from bmssl.triton import jit, triton

if triton is not None:
    import triton.language as tl

    @jit
    def _exp_minus(x, top):
        # exp(x - top), with top = -inf read as 0: then x is -inf too and the result is 0,
        # never exp(-inf + inf) = NaN.
        return tl.exp(x - tl.where(top == float("-inf"), 0.0, top))

    @jit
    def _forward_kernel(student_ptr, target_ptr, row_kl_ptr, row_lse_ptr, classes, inv_t,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * classes
        max_a = tl.full([BLOCK], float("-inf"), ACC)
        max_b = tl.full([BLOCK], float("-inf"), ACC)
        sum_a = tl.zeros([BLOCK], ACC)
        sum_b = tl.zeros([BLOCK], ACC)
        cross = tl.zeros([BLOCK], ACC)
        for start in range(0, classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            a = tl.load(student_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            b = tl.load(target_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            new_a = tl.maximum(max_a, a)
            sum_a = sum_a * _exp_minus(max_a, new_a) + _exp_minus(a, new_a)
            max_a = new_a
            new_b = tl.maximum(max_b, b)
            scale_b = _exp_minus(max_b, new_b)
            weight_b = _exp_minus(b, new_b)
            # where q_j = 0 the term is 0; zeroing a and b there keeps 0 * inf out
            live = weight_b > 0
            b_live = tl.where(live, b, 0.0)
            a_live = tl.where(live, a, 0.0)
            sum_b = sum_b * scale_b + weight_b
            cross = cross * scale_b + weight_b * (b_live - a_live)
            max_b = new_b
        top_a = tl.max(max_a, axis=0)
        top_b = tl.max(max_b, axis=0)
        total_a = tl.sum(sum_a * _exp_minus(max_a, top_a), axis=0)
        lane_b = _exp_minus(max_b, top_b)
        total_b = tl.sum(sum_b * lane_b, axis=0)
        total_cross = tl.sum(cross * lane_b, axis=0)
        lse_a = top_a + tl.log(total_a)
        lse_b = top_b + tl.log(total_b)
        tl.store(row_kl_ptr + row, total_cross / total_b - lse_b + lse_a)
        tl.store(row_lse_ptr + 2 * row, lse_a)
        tl.store(row_lse_ptr + 2 * row + 1, lse_b)

    @jit
    def _backward_kernel(grad_row_kl_ptr, student_ptr, target_ptr, row_lse_ptr, grad_ptr, classes,
                         inv_t, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * classes
        scale = tl.load(grad_row_kl_ptr + row).to(ACC) * inv_t
        lse_a = tl.load(row_lse_ptr + 2 * row).to(ACC)
        lse_b = tl.load(row_lse_ptr + 2 * row + 1).to(ACC)
        for start in range(0, classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            # masked lanes read -inf: exp(-inf) = 0, no overflow in lanes that are not stored
            a = tl.load(student_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            b = tl.load(target_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            grad = scale * (tl.exp(a - lse_a) - tl.exp(b - lse_b))
            tl.store(grad_ptr + base + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(student):
    block = min(max(triton.next_power_of_2(student.shape[1]), 16), 1024)
    acc = tl.float64 if student.dtype == torch.float64 else tl.float32
    return block, acc


def forward(student: torch.Tensor, target: torch.Tensor, temperature: float):
    """(row_kl [R], row_lse [R, 2]) for [R, C] student and target."""
    student, target = student.contiguous(), target.contiguous()
    rows = student.shape[0]
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_kl = torch.empty(rows, dtype=acc_dtype, device=student.device)
    row_lse = torch.empty(rows, 2, dtype=acc_dtype, device=student.device)
    block, acc = _launch_config(student)
    _forward_kernel[(rows,)](student, target, row_kl, row_lse, student.shape[1], 1.0 / temperature,
                             BLOCK=block, ACC=acc)
    return row_kl, row_lse


def backward(grad_row_kl, student, target, row_lse, temperature):
    """grad_student [R, C] for the per-row gradient grad_row_kl [R]."""
    student, target = student.contiguous(), target.contiguous()
    acc_dtype = row_lse.dtype
    grad_row_kl = grad_row_kl.to(acc_dtype).contiguous()
    grad_student = torch.empty_like(student)
    block, acc = _launch_config(student)
    _backward_kernel[(student.shape[0],)](grad_row_kl, student, target, row_lse.contiguous(),
                                          grad_student, student.shape[1], 1.0 / temperature,
                                          BLOCK=block, ACC=acc)
    return grad_student
