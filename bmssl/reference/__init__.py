"""Pure-PyTorch twins of every bmssl op: the fallback, the oracle in tests, the baseline in
benchmarks. Written for clarity, not speed."""
from bmssl.reference.group_norm import group_norm
from bmssl.reference.kl_bootstrap import kl_bootstrap, kl_bootstrap_rows, reduce_rows
from bmssl.reference.ntxent import ntxent, ntxent_rect, views_to_batch

__all__ = ["group_norm", "kl_bootstrap", "kl_bootstrap_rows", "reduce_rows", "ntxent", "ntxent_rect", "views_to_batch"]
