"""NT-Xent with negatives gathered across the ranks of a torch.distributed group.

Each rank's rows are anchors against the rows of every rank. The gathering is differentiable
and its backward *sums* the gradients that all ranks send to a row (reduce-scatter), so that
with DistributedDataParallel (which averages parameter gradients) training follows the gradient
of the global loss, the mean over all anchors of all ranks. Gathering without that sum is the
bug of lightly #1528 and open_clip #616: each rank then keeps only its own share of the gradient.
"""
import torch
import torch.distributed as dist

from bmssl.ops.ntxent import ntxent, ntxent_rect


class GatherRows(torch.autograd.Function):
    """cat over ranks of each rank's [B, d] rows (all_gather). Backward: the gradient of every
    rank's copy of the gathered rows is summed (all_reduce) and each rank keeps the slice of its
    own rows, i.e. the sum of what all ranks send to a row. (torch.distributed.nn's all_gather
    does the same and is deprecated.)"""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), rows.shape[0]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None


def ntxent_gathered(z, labels, temperature=0.1, variant="in", normalize=True, group=None, backend=None):
    """This rank's mean NT-Xent over its anchors z [B, d] against the rows of all ranks.

    labels [B]: any integers, global identities (rows of any rank with equal labels are
    positives). Every rank must pass the same B. The mean of the returned losses over ranks is
    the loss of one process holding every rank's rows. Without an initialised process group this
    is bmssl.ntxent.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return ntxent(z, torch.unique(labels, return_inverse=True)[1], temperature, variant, normalize,
                      backend=backend)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([z.shape[0]], device=z.device), group=group)
    if any(int(s) != z.shape[0] for s in sizes):
        raise ValueError(f"ntxent_gathered: every rank must pass the same batch size, got "
                         f"{[int(s) for s in sizes]}")
    u = torch.nn.functional.normalize(z, dim=-1) if normalize else z
    u_all = GatherRows.apply(u, group)
    labels_gathered = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(labels_gathered, labels.contiguous(), group=group)
    labels_all = torch.unique(torch.cat(labels_gathered), return_inverse=True)[1]
    offset = rank * z.shape[0]
    return ntxent_rect(u, u_all, labels_all[offset:offset + z.shape[0]], labels_all, offset, temperature,
                       variant, normalize=False, backend=backend)
