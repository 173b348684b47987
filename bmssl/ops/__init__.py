"""The op layer: typed entry points that validate their input, choose a backend
(bmssl.backends) and call torch.ops.bmssl.* or the pure-PyTorch twin."""
from bmssl.backends import BackendUnavailableError, available, status
from bmssl.ops.conv2d import conv2d
from bmssl.ops.group_norm import group_norm
from bmssl.ops.kl_bootstrap import kl_bootstrap
from bmssl.ops.ntxent import ntxent, ntxent_rect, ntxent_views
from bmssl.ops.sgd import sgd_unroll_step

__all__ = ["available", "status", "BackendUnavailableError", "conv2d", "group_norm", "kl_bootstrap", "ntxent", "ntxent_rect", "ntxent_views",
           "sgd_unroll_step"]
