"""How close a kernel must be to the fp64 oracle (STYLE.md §6).

A kernel's error against the fp64 reference may be at most twice the error of plain PyTorch
(the twin) computing in the same input dtype, plus a small per-dtype floor (atol, rtol) so that
a twin which happens to be exact does not demand an exact kernel.
"""
import torch

FLOOR = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def assert_close_to_oracle(got, oracle, twin, dtype, what="", scale=1.0):
    """|got - oracle| <= 2 max|twin - oracle| + scale atol + rtol |oracle|, elementwise, with
    the floor of `dtype` (the input dtype of the computation being judged). `scale` is the
    size of the intermediate values (for a loss of logits, max |logit| / T): a result near 0
    that is a difference of such values can only be as exact as they are."""
    got, oracle, twin = got.double(), oracle.double(), twin.double()
    atol, rtol = FLOOR[dtype]
    twin_error = (twin - oracle).abs().max().item() if oracle.numel() else 0.0
    error = (got - oracle).abs()
    bad = error > 2 * twin_error + max(scale, 1.0) * atol + rtol * oracle.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values off; worst error "
                           f"{error.max().item():.3g}, twin's error {twin_error:.3g}")
