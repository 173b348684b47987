"""torch.autocast around bmssl: the Conv4 backbone runs (its GroupNorm takes a bf16 conv output
with fp32 parameters, as F.group_norm does), and an op gives the same value on every backend
(the twins run with autocast off, computing in their inputs' dtype as the kernels do)."""
import pytest
import torch

from bmssl import backends
from bmssl.models import build_backbone
from bmssl.ops import group_norm, kl_bootstrap, ntxent
from bmssl.ops.ntxent import SUPPORT as NTXENT_SUPPORT

CPU = torch.device("cpu")
BACKENDS = [b for b in ("cpu", "torch") if backends.input_reason(b, NTXENT_SUPPORT, CPU, torch.float32) is None]


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_conv4_forward_and_backward_under_autocast():
    model = build_backbone("conv4", image_shape=(1, 28, 28), seed=0)
    images = torch.randn(4, 1, 28, 28)
    with bf16_autocast():
        features = model(images)
    assert features.dtype == torch.bfloat16 and torch.isfinite(features).all()
    features.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    exact = model(images)
    assert (features.float() - exact).abs().max() < 0.1 * exact.abs().max()  # bf16 convs, same network


def test_group_norm_casts_its_parameters_to_x_under_autocast():
    x = torch.randn(2, 4, 6, 6).bfloat16()
    weight, bias = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="weight is torch.float32"):
        group_norm(x, weight, bias, 2)  # outside autocast mixed dtypes stay an error
    with bf16_autocast():
        got = group_norm(x, weight, bias, 2, relu=True, pool=True)
    want = group_norm(x, weight.bfloat16(), bias.bfloat16(), 2, relu=True, pool=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_losses_are_computed_in_fp32_under_autocast(backend):
    z = torch.randn(16, 32)
    labels = torch.arange(8).repeat_interleave(2)
    exact = ntxent(z.double(), labels, 0.2, backend="torch")
    with bf16_autocast():
        loss = ntxent(z, labels, 0.2, backend=backend)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - exact) < 1e-5 * exact  # autocast's bf16 matmul was off by ~1e-3
    student, target = torch.randn(6, 5) * 4, torch.randn(6, 5) * 4
    with bf16_autocast():
        kl = kl_bootstrap(student, target, 1.5, backend=backend)
    torch.testing.assert_close(kl, kl_bootstrap(student, target, 1.5, backend=backend))
