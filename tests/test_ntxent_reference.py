"""The NT-Xent twin: it is the oracle for the fused kernels, so it is checked against
independent formulas (SimCLR's NT-Xent, a per-anchor loop), by gradcheck, and on bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bmssl
from bmssl import reference


def simclr_ntxent(out0, out1, temperature):
    """SimCLR's NT-Xent for two views, as lightly and SimCLR write it: for each of the 2N rows, a
    cross-entropy over the other 2N - 1 rows whose target is the row's partner view."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    n = out0.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, partner)


def per_anchor_loop(z, labels, temperature, variant):
    """The definition of DESIGN.md §1, one anchor at a time, in Python floats."""
    u = F.normalize(z.double(), dim=-1)
    s = (u @ u.t() / temperature).tolist()
    labels = labels.tolist()
    losses = []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        log_all = math.log(sum(math.exp(s[i][j]) for j in others))
        if variant == "in":
            losses.append(log_all - math.log(sum(math.exp(s[i][j]) for j in positives)))
        else:
            losses.append(log_all - sum(s[i][j] for j in positives) / len(positives))
    return sum(losses) / len(losses)


def random_labels(batch, classes, generator):
    """Labels in [0, B) in which every label occurs at least twice."""
    classes = max(1, min(classes, batch // 2))
    labels = torch.cat([torch.arange(classes), torch.arange(classes),
                        torch.randint(0, classes, (batch - 2 * classes,), generator=generator)])
    return labels[torch.randperm(batch, generator=generator)]


@pytest.mark.parametrize("variant", ["in", "out"])
def test_two_views_equal_standard_ntxent(variant):
    out0, out1 = torch.randn(17, 8, dtype=torch.float64), torch.randn(17, 8, dtype=torch.float64)
    z, labels = reference.views_to_batch(torch.stack([out0, out1], dim=1))
    got = reference.ntxent(z, labels, 0.3, variant)
    torch.testing.assert_close(got, simclr_ntxent(out0, out1, 0.3))


@given(batch=st.integers(2, 24), classes=st.integers(1, 12), dim=st.integers(1, 9),
       temperature=st.floats(0.05, 2.0), variant=st.sampled_from(["in", "out"]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_per_anchor_loop(batch, classes, dim, temperature, variant, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    labels = random_labels(batch, classes, generator)
    expected = per_anchor_loop(z, labels, temperature, variant)
    for loss in (reference.ntxent, bmssl.ntxent):  # the twin, and the kernel auto picks
        assert loss(z, labels, temperature, variant).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("variant", ["in", "out"])
def test_task_batched_is_mean_over_tasks(variant):
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(3, 10, 4, dtype=torch.float64, generator=generator)
    labels = torch.stack([random_labels(10, 3, generator) for _ in range(3)])
    expected = sum(per_anchor_loop(z[t], labels[t], 0.5, variant) for t in range(3)) / 3
    for loss in (reference.ntxent, bmssl.ntxent):  # the twin, and the kernel auto picks
        assert loss(z, labels, 0.5, variant).item() == pytest.approx(expected, rel=1e-10)


def test_views_layout_matches_explicit_labels():
    views = torch.randn(2, 5, 3, 6, dtype=torch.float64)  # T=2 tasks, N=5 images, M=3 views
    z, labels = reference.views_to_batch(views)
    assert z.shape == (2, 15, 6) and labels.shape == (2, 15)
    assert labels[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    torch.testing.assert_close(bmssl.ntxent_views(views, 0.2), bmssl.ntxent(z, labels, 0.2))


@pytest.mark.parametrize("variant", ["in", "out"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_and_gradgradcheck(variant, normalize):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.stack([random_labels(8, 3, generator) for _ in range(2)])

    def loss(x):
        return reference.ntxent(x, labels, 0.4, variant, normalize)

    assert torch.autograd.gradcheck(loss, (z,))
    assert torch.autograd.gradgradcheck(loss, (z,))


def loss_accumulated_in(u, labels, temperature, dtype):
    """The "in" loss of unit rows u with every sum a running sum in `dtype`, one term at a time:
    what accumulating in the input dtype would give (the control of the test below)."""
    s = (u.double() @ u.double().t() / temperature).to(dtype)
    batch = s.shape[0]
    others = ~torch.eye(batch, dtype=torch.bool)
    top = s.masked_fill(~others, float("-inf")).max(dim=1).values
    total_all = torch.zeros(batch, dtype=dtype)
    total_pos = torch.zeros(batch, dtype=dtype)
    for j in range(batch):
        term = torch.exp(s[:, j] - top)
        total_all = total_all + torch.where(others[:, j], term, torch.zeros_like(term))
        total_pos = total_pos + torch.where(others[:, j] & (labels == labels[j]), term, torch.zeros_like(term))
    row_loss = torch.log(total_all) - torch.log(total_pos)
    mean = torch.zeros((), dtype=dtype)
    for value in row_loss:
        mean = mean + value
    return (mean / batch).double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    """From fp16/bf16 inputs the loss is the exact loss of those inputs rounded once to the
    dtype (within half its epsilon, relative): its sums run in fp32. The control, the same loss
    with its sums accumulated in the dtype, misses that bound several times over."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(64, 16, generator=generator).to(dtype)
    labels = torch.arange(32).repeat(2)
    exact = reference.ntxent(z.double(), labels, 0.1).item()
    bound = (torch.finfo(dtype).eps / 2 + 1e-5) * exact
    for backend in ("auto", "torch"):
        got = bmssl.ntxent(z, labels, 0.1, backend=backend)
        assert got.dtype == dtype and torch.isfinite(got)
        assert abs(got.item() - exact) <= bound, (backend, got.item(), exact)
    control = loss_accumulated_in(F.normalize(z.double(), dim=-1), labels, 0.1, dtype).item()
    assert abs(control - exact) > 3 * bound, (control, exact)


def test_torch_backend_is_the_twin():
    z, labels = torch.randn(8, 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert bmssl.ntxent(z, labels, 0.2, backend="torch").item() == reference.ntxent(z, labels, 0.2).item()


def test_unservable_backend_says_why():
    z, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="cannot run ntxent"):
        bmssl.ntxent(z, labels, backend="cuda")


Z, LAB = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("args, message", [
    ((Z, LAB[:5]), "must match z's leading dims"),
    ((Z, torch.tensor([0, 0, 1, 1, 2, 6])), r"labels must lie in \[0, B\)"),
    ((Z, torch.tensor([0, 0, 1, 1, -1, -1])), r"labels must lie in \[0, B\)"),
    ((Z, torch.tensor([0, 0, 1, 1, 2, 3])), "anchor 4 .label 2. has no positive"),
    ((Z, LAB, 0.0), "temperature"),
    ((Z, LAB, -0.5), "temperature"),
    ((Z, LAB, float("inf")), "temperature"),
    ((Z, LAB.float()), "integer"),
    ((Z.long(), LAB), "float16, bfloat16, float32 or float64"),
    ((torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), "empty batch"),
    ((torch.randn(6), LAB), r"\[B, d\]"),
    ((Z, LAB, 0.1, "both"), "variant"),
    ((Z[None].expand(2, 6, 4), torch.stack([LAB, torch.tensor([0, 1, 1, 2, 2, 3])])), "anchor 0 of task 1"),
    ((Z, LAB.to("meta")), "labels are on meta"),
    ((Z, LAB.bool()), "integer"),
    ((Z, LAB, float("nan")), "temperature"),
    ((Z, LAB, torch.tensor([0.1, 0.2])), "temperature must be a number"),
])
def test_bad_input_raises_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        bmssl.ntxent(*args)


@pytest.mark.parametrize("views, message", [
    (torch.randn(4, 8), r"views must be \[N, M, d\] or \[T, N, M, d\]"),
    (torch.randn(1, 1, 2, 3, 4), r"views must be \[N, M, d\]"),
    ([[1.0, 2.0]], "views must be a torch.Tensor"),
    (torch.randn(4, 1, 8), "M >= 2 views"),
    (torch.randn(0, 2, 8), "empty batch"),
    (torch.ones(4, 2, 8, dtype=torch.long), "views must be float16"),
])
def test_views_bad_input_names_views(views, message):
    with pytest.raises(ValueError, match=message):
        bmssl.ntxent_views(views)


def test_meta_tensors_give_the_shape_without_reading_values():
    loss = bmssl.ntxent(torch.randn(6, 4, device="meta"), LAB.to("meta"), backend="torch")
    assert loss.device.type == "meta" and loss.shape == ()
