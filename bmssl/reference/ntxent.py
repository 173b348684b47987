"""Twin of the multi-view NT-Xent (DESIGN.md §1 "Task loss", §2).

    u_i = z_i / ||z_i||,  s_ij = u_i . u_j / tau,  A(i) = {j != i},  P(i) = {j != i : y_j = y_i}
    "in":  l_i = -log sum_{P(i)} e^{s_ij} + log sum_{A(i)} e^{s_ij}     (SimCLR, paper eq. 1)
    "out": l_i = -mean_{P(i)} s_ij        + log sum_{A(i)} e^{s_ij}     (SupCon L_out)
    loss = mean over anchors (and over tasks for [T, B, d])

This twin builds the full B x B matrix; the fused kernels never do.
"""
import torch
import torch.nn.functional as F

from bmssl.reference.kl_bootstrap import accumulation_dtype


def ntxent(z, labels, temperature=0.1, variant="in", normalize=True):
    """z [B, d] or [T, B, d]; labels [B] or [T, B]; returns the scalar loss in z's dtype."""
    u = z.to(accumulation_dtype(z.dtype))
    if normalize:
        u = F.normalize(u, dim=-1)
    sim = u @ u.transpose(-1, -2) / temperature
    batch = z.shape[-2]
    self_mask = torch.eye(batch, dtype=torch.bool, device=z.device)
    positive = (labels[..., :, None] == labels[..., None, :]) & ~self_mask
    lse_all = torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=-1)
    if variant == "in":
        lse_pos = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=-1)
        per_anchor = lse_all - lse_pos
    else:
        mean_pos = (sim * positive).sum(-1) / positive.sum(-1)
        per_anchor = lse_all - mean_pos
    return per_anchor.mean().to(z.dtype)


def views_to_batch(views):
    """[N, M, d] (or [T, N, M, d]) views -> z [N*M, d] and labels [N*M], image j's views label j."""
    *lead, images, per_image, dim = views.shape
    z = views.reshape(*lead, images * per_image, dim)
    labels = torch.arange(images, device=views.device).repeat_interleave(per_image)
    return z, labels.expand(*lead, images * per_image)
