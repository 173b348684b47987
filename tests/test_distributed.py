"""The rectangular NT-Xent and its torch.distributed helper: rows against gathered columns, and
2 gloo processes that together give the loss and gradients of one process with the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bmssl
import bmssl.distributed
import bmssl.losses
from bmssl import reference


@pytest.mark.parametrize("backend", ["cpu"])  # the only compiled backend of ntxent_rect; "torch" is the twin
@given(columns=st.integers(4, 60), data=st.data(), variant=st.sampled_from(["in", "out"]),
       normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rect_matches_twin(backend, columns, data, variant, normalize, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = data.draw(st.integers(1, columns))
    offset = data.draw(st.integers(0, columns - rows))
    labels = torch.arange(columns) % max(1, columns // 2)  # every label at least twice
    z_cols = torch.randn(columns, 6, dtype=torch.float64, generator=generator)
    z_rows = z_cols[offset:offset + rows].clone()

    def run(fn):
        a, c = z_rows.clone().requires_grad_(), z_cols.clone().requires_grad_()
        loss = fn(a, c)
        return (loss, *torch.autograd.grad(loss, (a, c)))

    got = run(lambda a, c: bmssl.ops.ntxent_rect(a, c, labels[offset:offset + rows], labels, offset, 0.4,
                                                 variant, normalize, backend=backend))
    expected = run(lambda a, c: reference.ntxent_rect(a, c, labels[offset:offset + rows], labels, offset, 0.4,
                                                      variant, normalize))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


def test_rect_with_all_rows_is_the_square_form():
    z = torch.randn(20, 5, dtype=torch.float64)
    labels = torch.arange(10).repeat(2)
    rect = bmssl.ops.ntxent_rect(z, z, labels, labels, 0, 0.2, backend="cpu")
    torch.testing.assert_close(rect, bmssl.ntxent(z, labels, 0.2, backend="cpu"))


def test_rect_gradcheck_and_opcheck():
    z_cols = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])

    def loss(c):
        return bmssl.ops.ntxent_rect(c[3:6], c, labels[3:6], labels, 3, 0.5, backend="cpu")

    assert torch.autograd.gradcheck(loss, (z_cols,))
    u = F.normalize(z_cols.detach(), dim=-1)
    torch.library.opcheck(torch.ops.bmssl.ntxent_rect_forward.default, (u[3:6], u, labels[3:6], labels, 3, 2.0, "in"))


def test_rect_under_torch_func_grad_matches_the_twin_and_refuses_a_second_derivative():
    """torch.func.grad of the cpu backend raised: its backward called the raw op, whose
    register_autograd wrapper refuses functorch transforms."""
    z_cols = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) // 2
    loss = lambda backend: lambda z: bmssl.ops.ntxent_rect(z[4:8], z, labels[4:8], labels, 4, 0.3,  # noqa: E731
                                                             backend=backend)
    torch.testing.assert_close(torch.func.grad(loss("cpu"))(z_cols), torch.func.grad(loss("torch"))(z_cols))
    z = z_cols.clone().requires_grad_()
    first, = torch.autograd.grad(loss("cpu")(z), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivative of ntxent_rect"):
        torch.autograd.grad(first.sum(), z)


def test_rect_raw_op_is_differentiable():
    """torch.ops.bmssl.ntxent_rect_forward called directly has the backward registered: gradcheck
    on the raw op, and no 'autograd kernel was not registered' warning."""
    import warnings

    u_cols = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=-1).requires_grad_()
    u_rows = u_cols.detach()[3:6].clone().requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradcheck(
            lambda r, c: torch.ops.bmssl.ntxent_rect_forward(r, c, labels[3:6], labels, 3, 2.0, "out")[0],
            (u_rows, u_cols))


Z6 = torch.randn(6, 4)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3, 4), torch.randn(6, 5), torch.zeros(3, dtype=torch.long), torch.zeros(6, dtype=torch.long), 0), "share d"),
    ((torch.randn(3, 4), torch.randn(6, 4), torch.zeros(3, dtype=torch.long), torch.zeros(6, dtype=torch.long), 4), "row_offset"),
    ((torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3, 4, 5]), 0), "no positive"),
    ((torch.randn(3, 4), torch.randn(6, 4), torch.tensor([1, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), 0), "must equal"),
    ((torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), 0),
     r"z_rows must equal z_cols\[row_offset:row_offset \+ R\]"),
    ((Z6[:3], Z6, torch.tensor([True, False, True]), torch.tensor([True, False, True] * 2), 0), "integer tensor"),
    ((Z6[:3], Z6, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), 0.0), "row_offset must be an integer"),
    ((Z6[:3], Z6, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), True), "row_offset must be an integer"),
])
def test_rect_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        bmssl.ops.ntxent_rect(*args)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, z_all, labels_all, variant, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = z_all.shape[0] // world
        z = z_all[rank * local:(rank + 1) * local].clone().requires_grad_()
        labels = labels_all[rank * local:(rank + 1) * local]
        loss = bmssl.distributed.ntxent_gathered(z, labels, 0.3, variant, backend="cpu")
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["in", "out"])
def test_two_gloo_processes_equal_one_process(tmp_path, variant):
    """Rank k's gradient is the gradient of the sum of all ranks' losses (the all_gather backward
    sums), i.e. W times that of the global mean loss: DDP's averaging then gives the exact
    global gradient. Labels pair rows across ranks, so cross-rank positives are exercised."""

    world, local = 2, 6
    generator = torch.Generator().manual_seed(0)
    z_all = torch.randn(world * local, 5, dtype=torch.float64, generator=generator)
    labels_all = torch.tensor([7, 8, 9, 10, 11, 12, 7, 8, 9, 10, 11, 12]) * 3  # arbitrary integers
    mp.spawn(_rank_main, args=(world, _free_port(), z_all, labels_all, variant, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    z = z_all.clone().requires_grad_()
    global_loss = bmssl.ntxent(z, torch.unique(labels_all, return_inverse=True)[1], 0.3, variant, backend="cpu")
    (global_grad,) = torch.autograd.grad(global_loss, z)
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), global_loss)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), world * global_grad)


def _lightly_rank_main(rank, world, port, out0_all, out1_all, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = out0_all.shape[0] // world
        out0 = out0_all[rank * local:(rank + 1) * local].clone().requires_grad_()
        out1 = out1_all[rank * local:(rank + 1) * local].clone().requires_grad_()
        loss = bmssl.losses.NTXentLoss(0.4, gather_distributed=True, backend="cpu")(out0, out1)
        alone = bmssl.losses.NTXentLoss(0.4, backend="cpu")(out0.detach(), out1.detach())
        loss.backward()
        torch.save({"loss": loss.detach(), "alone": alone, "grads": (out0.grad, out1.grad)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lightly_style_gather_distributed_with_two_gloo_processes(tmp_path):
    """NTXentLoss(gather_distributed=True) on 2 ranks: the mean of the ranks' losses is the loss of
    one process with both batches, and each rank's gradient is world × that of the global loss
    (for DDP's averaging); without the flag each rank sees only its own negatives."""
    world, local = 2, 3
    generator = torch.Generator().manual_seed(1)
    out0_all, out1_all = torch.randn(2, world * local, 5, dtype=torch.float64, generator=generator)
    mp.spawn(_lightly_rank_main, args=(world, _free_port(), out0_all, out1_all, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    out0, out1 = out0_all.clone().requires_grad_(), out1_all.clone().requires_grad_()
    global_loss = bmssl.losses.NTXentLoss(0.4, backend="cpu")(out0, out1)
    global_grads = torch.autograd.grad(global_loss, (out0, out1))
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), global_loss)
    for side in (0, 1):
        torch.testing.assert_close(torch.cat([r["grads"][side] for r in results]), world * global_grads[side])
    assert all(abs(r["alone"] - r["loss"]) > 1e-3 for r in results)  # the gathered negatives mattered


def test_without_a_process_group_it_is_the_plain_loss():

    z, labels = torch.randn(8, 3), torch.tensor([4, 4, 9, 9, 1, 1, 6, 6])
    torch.testing.assert_close(bmssl.distributed.ntxent_gathered(z, labels, 0.2),
                               bmssl.ntxent(z, torch.unique(labels, return_inverse=True)[1], 0.2))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rect_learnable_temperature_gets_its_gradient(backend):
    """A temperature tensor that requires grad (CLIP-style) reaches autograd: d loss / d T equals
    that of the plain formula with T in the graph."""
    z_cols = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(8) % 4
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = bmssl.ops.ntxent_rect(z_cols[2:6], z_cols, labels[2:6], labels, 2, tau, backend=backend)
    got = torch.autograd.grad(loss, (tau, z_cols))
    u = F.normalize(z_cols, dim=-1)
    sim = u[2:6] @ u.T / tau
    self_mask = torch.zeros(4, 8, dtype=torch.bool)
    self_mask[torch.arange(4), torch.arange(4) + 2] = True
    positive = (labels[2:6, None] == labels[None]) & ~self_mask
    expected_loss = (torch.logsumexp(sim.masked_fill(self_mask, -torch.inf), 1)
                     - torch.logsumexp(sim.masked_fill(~positive, -torch.inf), 1)).mean()
    expected = torch.autograd.grad(expected_loss, (tau, z_cols))
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
