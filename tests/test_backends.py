"""Backend selection: what is available, BMSSL_BACKEND, and errors that say why."""
import os
import subprocess
import sys

import pytest
import torch

import bmssl
from bmssl import backends
from bmssl.ops.kl_bootstrap import SUPPORT


def test_available_lists_cpu_triton_and_torch():
    available = bmssl.ops.available()
    assert {"cpu", "triton", "torch"} <= set(available), bmssl.ops.status()
    assert ("cuda" in available) == (torch.cuda.is_available() and
                                    bmssl._extension.has_cuda_kernels())


def test_available_in_a_fresh_process_without_triton_interpret():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import bmssl; print(bmssl.ops.available())"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "'cpu'" in out and "'triton'" in out and "'torch'" in out


def test_auto_prefers_the_compiled_cpu_kernel():
    assert backends.choose(SUPPORT, torch.device("cpu"), torch.float32) == "cpu"


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv("BMSSL_BACKEND", "torch")
    assert backends.choose(SUPPORT, torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("BMSSL_BACKEND", "triton")
    assert backends.choose(SUPPORT, torch.device("cpu"), torch.float32) == "triton"


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("BMSSL_BACKEND", "torch")
    assert backends.choose(SUPPORT, torch.device("cpu"), torch.float32, backend="cpu") == "cpu"


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv("BMSSL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="'tpu' is not a backend"):
        bmssl.kl_bootstrap(torch.randn(2, 3), torch.randn(2, 3))


def test_shape_limits_refuse_a_request_and_auto_takes_the_next_backend():
    """An op's shape_limits: auto skips a backend whose limit refuses the shape, an explicit
    request for it raises with the limit's reason, and shapes within the limit go through."""
    def wide_rows(shape):
        return f"at most 8 columns, got {shape[-1]}" if shape[-1] > 8 else None

    limited = backends.OpSupport(name="toy", backends=("cpu",), shape_limits=(("cpu", wide_rows),))
    cpu = torch.device("cpu")
    assert backends.choose(limited, cpu, torch.float32, shape=(4, 8)) == "cpu"
    assert backends.choose(limited, cpu, torch.float32, shape=(4, 9)) == "torch"
    assert backends.choose(limited, cpu, torch.float32) == "cpu"  # no shape given: not checked
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="toy on torch.float32 tensors on cpu: at most 8 "
                       "columns, got 9") as error:
        backends.choose(limited, cpu, torch.float32, backend="cpu", shape=(4, 9))
    assert "\n  torch: can serve it" in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unservable_request_lists_every_backend():
    with pytest.raises(bmssl.ops.BackendUnavailableError) as error:
        bmssl.kl_bootstrap(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")
    message = str(error.value)
    assert "backend 'cuda' cannot run kl_bootstrap" in message
    for name in backends.BACKENDS:
        assert f"\n  {name}: " in message
    assert "cpu: can serve it" in message


def test_backend_results_agree():
    student, target = torch.randn(50, 9), torch.randn(50, 9)
    results = [bmssl.kl_bootstrap(student, target, 0.7, backend=b) for b in bmssl.ops.available()]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0])


def test_every_registered_op_has_an_autograd_kernel():
    """Each torch.ops.bmssl op either differentiates or refuses by name: none is left to torch's
    autograd fallback (a warning, and wrong errors under create_graph)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bmssl::")]
    assert len(names) >= 10, names
    missing = [n for n in names if n != "bmssl::build_info"
               and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "Autograd")]
    assert missing == []


def test_raw_ntxent_op_second_order_under_create_graph_then_refuses_a_third():
    import torch.nn.functional as F

    from bmssl import reference

    u = F.normalize(torch.randn(1, 8, 4, dtype=torch.float64), dim=-1).requires_grad_()
    labels = torch.arange(4).repeat(2)

    def second(loss_fn):
        g, = torch.autograd.grad(loss_fn(u), u, create_graph=True)
        gg, = torch.autograd.grad((g ** 2).sum(), u, create_graph=True)
        return gg

    got = second(lambda x: torch.ops.bmssl.ntxent_forward(x, labels[None], 2.0, "in")[0].sum())
    expected = second(lambda x: reference.ntxent(x[0], labels, 0.5, "in", normalize=False))
    torch.testing.assert_close(got, expected)
    with pytest.raises(NotImplementedError, match="third derivative of ntxent"):
        torch.autograd.grad((got ** 2).sum(), u)
