"""The drop-in losses against plain-PyTorch ports of the formulas of the libraries they stand in
for (lightly, SupContrast, pytorch-metric-learning), on random inputs, on every CPU backend."""
import pytest
import torch
import torch.nn.functional as F

from bmssl import backends
from bmssl.losses import NTXentLoss, PairwiseNTXentLoss, SupConLoss
from bmssl.ops.ntxent import SUPPORT

BACKENDS = [b for b in ("cpu", "triton", "torch")
            if backends.input_reason(b, SUPPORT, torch.device("cpu"), torch.float32) is None]


def lightly_ntxent(out0, out1, temperature):
    """lightly.loss.NTXentLoss (no memory bank, one process), ported."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = out0.shape[0]
    logits_00 = out0 @ out0.t() / temperature
    logits_01 = out0 @ out1.t() / temperature
    logits_10 = out1 @ out0.t() / temperature
    logits_11 = out1 @ out1.t() / temperature
    diag = ~torch.eye(n, dtype=torch.bool)
    logits_00 = logits_00[diag].view(n, -1)
    logits_11 = logits_11[diag].view(n, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(n).repeat(2)
    return F.cross_entropy(logits, labels)


def supcon(features, labels, temperature, base_temperature):
    """SupContrast's SupConLoss, contrast_mode='all', ported."""
    batch, views = features.shape[:2]
    if labels is None:
        mask = torch.eye(batch)
    else:
        mask = (labels[:, None] == labels[None, :]).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(views, views)
    self_mask = 1 - torch.eye(batch * views)
    mask = mask * self_mask
    exp_logits = torch.exp(logits) * self_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(views, batch).mean()


def pml_ntxent(embeddings, labels, temperature):
    """pytorch-metric-learning's NTXentLoss, ported: mean over positive pairs (a, p) of
    -log(e^{s_ap} / (e^{s_ap} + sum_{negatives n of a} e^{s_an}))."""
    u = F.normalize(embeddings, dim=1)
    s = u @ u.t() / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    losses = []
    for a, p in (same & ~eye).nonzero().tolist():
        negatives = s[a][~same[a]]
        losses.append(-s[a, p] + torch.logsumexp(torch.cat([s[a, p].view(1), negatives]), 0))
    return torch.stack(losses).mean()


def check_loss_and_grad(fused, ported, *inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    twins = [x.clone().requires_grad_() for x in inputs]
    got, expected = fused(*leaves), ported(*twins)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, twins)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, d", [(1, 4), (7, 3), (33, 16)])
def test_lightly_ntxent(backend, n, d):
    out0, out1 = torch.randn(n, d), torch.randn(n, d)
    check_loss_and_grad(NTXentLoss(0.3, backend=backend), lambda a, b: lightly_ntxent(a, b, 0.3), out0, out1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_supcon(backend, with_labels):
    features = F.normalize(torch.randn(12, 3, 8), dim=-1)
    labels = torch.randint(100, 104, (12,)) if with_labels else None  # arbitrary integers
    check_loss_and_grad(lambda f: SupConLoss(0.1, base_temperature=0.07, backend=backend)(f, labels),
                        lambda f: supcon(f, labels, 0.1, 0.07), features)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_equals_pml_with_two_per_label(backend):
    labels = torch.tensor([5, 9, 5, 2, 9, 2, 40, 40])
    embeddings = torch.randn(8, 6)
    check_loss_and_grad(lambda e: PairwiseNTXentLoss(0.2, backend=backend)(e, labels),
                        lambda e: pml_ntxent(e, labels, 0.2), embeddings)


def test_pairwise_documents_its_difference_from_pml_beyond_two_per_label():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    embeddings = torch.randn(6, 4)
    ours = PairwiseNTXentLoss(0.2)(embeddings, labels)
    assert abs(ours - pml_ntxent(embeddings, labels, 0.2)) > 1e-4


def test_drop_ins_compile_without_graph_breaks():
    torch._dynamo.reset()
    loss = torch.compile(NTXentLoss(0.5, backend="cpu"), fullgraph=True)
    out0, out1 = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(loss(out0, out1), lightly_ntxent(out0, out1, 0.5))


def test_lightly_gather_distributed_flag_is_accepted_and_without_a_group_changes_nothing():
    out0, out1 = torch.randn(5, 4), torch.randn(5, 4)
    want = lightly_ntxent(out0, out1, 0.5)
    for flag in (False, True):  # tests/test_distributed.py runs True on 2 gloo processes
        torch.testing.assert_close(NTXentLoss(0.5, gather_distributed=flag)(out0, out1), want)


@pytest.mark.parametrize("make, args, message", [
    (lambda: NTXentLoss(0.5), (torch.randn(3, 4), torch.randn(4, 4)), "one shape"),
    (lambda: NTXentLoss(0.5, memory_bank_size=10), None, "memory bank"),
    (lambda: NTXentLoss(-1.0), (torch.randn(3, 4), torch.randn(3, 4)), "temperature"),
    (lambda: SupConLoss(contrast_mode="one"), None, "contrast_mode"),
    (lambda: SupConLoss(), (torch.randn(4, 8),), r"\[bsz, n_views, d\]"),
    (lambda: SupConLoss(), (torch.randn(4, 2, 8), torch.tensor([0, 1, 2])), "labels must be"),
    (lambda: PairwiseNTXentLoss(), (torch.randn(6, 3), torch.tensor([10, 10, 20, 20, 30, 99])),
     r"row 4 \(label 30\) has no positive"),
    (lambda: SupConLoss(), (torch.randn(4, 1, 8), torch.tensor([7, 7, 5, 42])),
     r"sample 2 \(label 5\) has no positive.*n_views = 1"),
    (lambda: NTXentLoss(0.5, gather_distributed="yes"), None, "gather_distributed must be True or False"),
    (lambda: PairwiseNTXentLoss(), (torch.randn(6, 3), torch.tensor([.1, .1, .2, .2, .3, .3])), "integer tensor"),
    (lambda: SupConLoss(), (torch.randn(4, 2, 8), torch.tensor([0.5, 0.5, 1.2, 7.7])), "integer tensor"),
    (lambda: SupConLoss(), (torch.randn(4, 2, 8), torch.tensor([True, False, True, False])), "integer tensor"),
    (lambda: SupConLoss(), (torch.randn(4, 2, 8), [0, 0, 1, 1]), "must be a torch.Tensor"),
    (lambda: SupConLoss(), (torch.randn(0, 2, 8),), "empty features"),
    (lambda: NTXentLoss(0.5), (torch.randn(3, 4), torch.randn(3, 4).half()), "float32 on cpu but out1 is torch.float16"),
])
def test_bad_input(make, args, message):
    with pytest.raises(ValueError, match=message):
        loss = make()
        loss(*args)
