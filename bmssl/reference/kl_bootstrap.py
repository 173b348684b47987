"""Twin of bmssl::kl_bootstrap (DESIGN.md §1, "Bootstrapped target").

    row_kl = KL(softmax(target/T) || softmax(student/T))
           = sum_j q_j (log q_j - log p_j),   q = softmax(target/T), p = softmax(student/T)
    d row_kl / d student = (p - q) / T

The target is a stop-gradient (it is detached). Entries where q_j = 0 add nothing. A target row
with no finite entry has no softmax: its KL is NaN (as in every backend), never a silent 0.
"""
import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_bootstrap_rows(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL over the last dim, in the accumulation dtype, shape student.shape[:-1]."""
    acc = accumulation_dtype(student.dtype)
    log_p = torch.log_softmax(student.to(acc) / temperature, dim=-1)
    log_q = torch.log_softmax(target.detach().to(acc) / temperature, dim=-1)
    q = log_q.exp()
    terms = torch.where(q == 0, torch.zeros_like(q), q * (log_q - log_p))  # a NaN q stays NaN
    return terms.sum(dim=-1)


def reduce_rows(row_kl: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return row_kl.mean()
    if reduction == "sum":
        return row_kl.sum()
    return row_kl


def kl_bootstrap(student, target, temperature=1.0, reduction="mean"):
    """Mean (or sum, or per-row) KL from the detached target to the student, in student's dtype."""
    return reduce_rows(kl_bootstrap_rows(student, target, temperature), reduction).to(student.dtype)
