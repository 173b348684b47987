"""Twin of bmssl::group_norm_*: GroupNorm, then ReLU, then a 2x2 stride-2 max-pool, each
optional, in plain torch ops (the Conv4 block as torch users write it)."""
import torch.nn.functional as F


def group_norm(x, weight, bias, groups, eps=1e-5, relu=False, pool=False):
    """x [N, C, H, W]; weight, bias [C]. Returns max_pool2d(relu(group_norm(x)), 2) with the
    relu and the pool as asked."""
    y = F.group_norm(x, groups, weight, bias, eps)
    if relu:
        y = F.relu(y)
    if pool:
        y = F.max_pool2d(y, 2)
    return y
