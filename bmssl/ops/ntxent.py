"""bmssl.ops.ntxent: the multi-view NT-Xent (maths in bmssl/reference/ntxent.py).

Only the pure-PyTorch twin serves it so far; the fused kernels are issue #4. Requesting another
backend explicitly says so.
"""
from bmssl import backends, reference
from bmssl.validate import check_ntxent

SUPPORT = backends.OpSupport(name="ntxent", backends=())


def ntxent(z, labels, temperature=0.1, variant="in", normalize=True, backend=None):
    """Multi-view NT-Xent. z: [B, d] or [T, B, d] embeddings (fp16/bf16/fp32/fp64).
    labels: [B] or [T, B] integers in [0, B); every label must occur at least twice.
    variant: "in" (SimCLR / paper eq. 1) or "out" (SupCon L_out). normalize: L2-normalise z
    first. Returns the mean over anchors (and tasks) in z's dtype."""
    temperature = check_ntxent(z, labels, temperature, variant)
    backends.choose(SUPPORT, z.device, z.dtype, backend)
    return reference.ntxent(z, labels, temperature, variant, normalize)


def ntxent_views(views, temperature=0.1, variant="in", normalize=True, backend=None):
    """NT-Xent over a views layout [N, M, d] (or [T, N, M, d]): the M views of image j are
    positives of each other."""
    z, labels = reference.views_to_batch(views)
    return ntxent(z, labels, temperature, variant, normalize, backend)
