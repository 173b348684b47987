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


def _per_anchor(sim, self_mask, positive, variant):
    """l_i for each row of a similarity matrix, given which entries are the anchor itself and
    which are its positives."""
    lse_all = torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=-1)
    if variant == "in":
        return lse_all - torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=-1)
    return lse_all - (sim * positive).sum(-1) / positive.sum(-1)


def _unit_rows(z, normalize):
    u = z.to(accumulation_dtype(z.dtype))
    return F.normalize(u, dim=-1) if normalize else u


def ntxent(z, labels, temperature=0.1, variant="in", normalize=True):
    """z [B, d] or [T, B, d]; labels [B] or [T, B]; returns the scalar loss in z's dtype."""
    u = _unit_rows(z, normalize)
    sim = u @ u.transpose(-1, -2) / temperature
    batch = z.shape[-2]
    self_mask = torch.eye(batch, dtype=torch.bool, device=z.device)
    positive = (labels[..., :, None] == labels[..., None, :]) & ~self_mask
    return _per_anchor(sim, self_mask, positive, variant).mean().to(z.dtype)


def ntxent_rect(z_rows, z_cols, labels_rows, labels_cols, row_offset, temperature=0.1, variant="in",
                normalize=True):
    """Rectangular form: rows z_rows [R, d] (columns row_offset .. row_offset + R - 1 of
    z_cols [N, d]) against all columns; mean over the R anchors, in z_rows' dtype."""
    u_rows, u_cols = _unit_rows(z_rows, normalize), _unit_rows(z_cols, normalize)
    sim = u_rows @ u_cols.t() / temperature
    rows = torch.arange(z_rows.shape[0], device=z_rows.device)
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[rows, rows + row_offset] = True
    positive = (labels_rows[:, None] == labels_cols[None, :]) & ~self_mask
    return _per_anchor(sim, self_mask, positive, variant).mean().to(z_rows.dtype)


def views_to_batch(views):
    """[N, M, d] (or [T, N, M, d]) views -> z [N*M, d] and labels [N*M], image j's views label j."""
    *lead, images, per_image, dim = views.shape
    z = views.reshape(*lead, images * per_image, dim)
    labels = torch.arange(images, device=views.device).repeat_interleave(per_image)
    return z, labels.expand(*lead, images * per_image)
