"""Triton kernels of bmssl::kl_bootstrap_rows (maths in csrc/kl_bootstrap.cpp).

    a = student/T, b = target/T;  row_kl = sum_j softmax(b)_j (b_j - a_j) - lse(b) + lse(a)
                                         = sum_j softmax(b)_j (b'_j - a'_j) + log(sum e^{a'} / sum e^{b'})
    with a' = a - max a, b' = b - max b;  grad_student_rj = grad_row_kl_r (softmax(a)_j - softmax(b)_j) / T

One program per row walks its C classes in BLOCK chunks twice: the row maxima, then the sums of
e^{a'}, e^{b'} and e^{b'} (b' - a') (the shifts cancel inside each term, so large logits or a
student that is the target plus a constant lose no accuracy).
student, target: [R, C] contiguous; row_kl [R], row_lse [R, 2] in ACC (fp32, fp64 for fp64).
A target entry of -inf has probability 0 and adds nothing. 1/T arrives as a one-element ACC
tensor: a Python float argument is typed fp32 by the compiler (1/0.7 rounded to fp32 put fp64
rows 2e-7 off), though the interpreter keeps it a double. The launches turn off fp contraction:
compiled, pass 1's maxima are of rounded products x * inv_t while pass 2 and the backward fused
x * inv_t - max into one fma, so the maximal entry's a' was a rounding error rather than 0.
"""
import torch

from bmssl.triton import jit, triton

if triton is not None:
    import triton.language as tl

    @jit
    def _forward_kernel(student_ptr, target_ptr, row_kl_ptr, row_lse_ptr, classes, inv_t_ptr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        inv_t = tl.load(inv_t_ptr)
        base = row * classes
        # pass 1: the row maxima of a and b
        lane_max_a = tl.full([BLOCK], float("-inf"), ACC)
        lane_max_b = tl.full([BLOCK], float("-inf"), ACC)
        for start in range(0, classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            a = tl.load(student_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            b = tl.load(target_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            lane_max_a = tl.maximum(lane_max_a, a)
            lane_max_b = tl.maximum(lane_max_b, b)
        max_a = tl.max(lane_max_a, axis=0)
        max_b = tl.max(lane_max_b, axis=0)
        # pass 2: with a' = a - max_a, b' = b - max_b, sums of e^{a'}, e^{b'} and cross = sum
        # e^{b'} (b' - a'): the shifts cancel inside each term (see csrc/cpu/kl_bootstrap.cpp)
        sum_a = tl.zeros([BLOCK], ACC)
        sum_b = tl.zeros([BLOCK], ACC)
        cross = tl.zeros([BLOCK], ACC)
        for start in range(0, classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            a = tl.load(student_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_a
            b = tl.load(target_ptr + base + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_b
            weight_b = tl.exp(b)  # masked lanes: exp(-inf - max) = 0
            # where q_j = 0 the term is 0; zeroing a and b there keeps 0 * inf out
            live = weight_b > 0
            sum_a += tl.where(mask, tl.exp(a), 0.0)
            sum_b += tl.where(mask, weight_b, 0.0)
            cross += tl.where(live, weight_b * (tl.where(live, b, 0.0) - tl.where(live, a, 0.0)), 0.0)
        total_a = tl.sum(sum_a, axis=0)
        total_b = tl.sum(sum_b, axis=0)
        total_cross = tl.sum(cross, axis=0)
        tl.store(row_kl_ptr + row, total_cross / total_b + tl.log(total_a / total_b))
        tl.store(row_lse_ptr + 2 * row, max_a + tl.log(total_a))
        tl.store(row_lse_ptr + 2 * row + 1, max_b + tl.log(total_b))

    @jit
    def _backward_kernel(grad_row_kl_ptr, student_ptr, target_ptr, row_lse_ptr, grad_ptr, classes,
                         inv_t_ptr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        inv_t = tl.load(inv_t_ptr)
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


def _inverse(temperature, dtype, device):
    """1/T as a one-element tensor of the accumulation dtype (see the module docstring)."""
    return torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)


def forward(student: torch.Tensor, target: torch.Tensor, temperature: float):
    """(row_kl [R], row_lse [R, 2]) for [R, C] student and target."""
    student, target = student.contiguous(), target.contiguous()
    rows = student.shape[0]
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_kl = torch.empty(rows, dtype=acc_dtype, device=student.device)
    row_lse = torch.empty(rows, 2, dtype=acc_dtype, device=student.device)
    block, acc = _launch_config(student)
    inv_t = _inverse(temperature, acc_dtype, student.device)
    _forward_kernel[(rows,)](student, target, row_kl, row_lse, student.shape[1], inv_t, BLOCK=block, ACC=acc,
                             enable_fp_fusion=False)
    return row_kl, row_lse


def backward(grad_row_kl, student, target, row_lse, temperature):
    """grad_student [R, C] for the per-row gradient grad_row_kl [R]."""
    student, target = student.contiguous(), target.contiguous()
    acc_dtype = row_lse.dtype
    grad_row_kl = grad_row_kl.to(acc_dtype).contiguous()
    grad_student = torch.empty_like(student)
    block, acc = _launch_config(student)
    inv_t = _inverse(temperature, acc_dtype, student.device)
    _backward_kernel[(student.shape[0],)](grad_row_kl, student, target, row_lse.contiguous(),
                                          grad_student, student.shape[1], inv_t, BLOCK=block, ACC=acc,
                                          enable_fp_fusion=False)
    return grad_student
