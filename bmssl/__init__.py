"""bmssl: fused kernels and an engine for Bootstrapped Meta Self-Supervised Learning.

    import bmssl
    bmssl.ops.available()                  # backends built and usable here
    bmssl.kl_bootstrap(student, target)    # KL from a detached target, fused
    bmssl.ntxent(z, labels, 0.1, "in")     # multi-view NT-Xent
"""
__version__ = "0.1.0"

from bmssl import ops  # noqa: E402
from bmssl.ops import kl_bootstrap, ntxent, ntxent_views  # noqa: E402

__all__ = ["ops", "kl_bootstrap", "ntxent", "ntxent_views", "__version__"]
