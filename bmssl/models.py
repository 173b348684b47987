"""Backbones and heads for the two-level loop, written to be called functionally.

    f_w(x) = head(backbone(x))          classifier logits, W ways  (cross-entropy term)
    g_w(x) = projection(backbone(x))    embeddings in R^d           (NT-Xent term)

Every module here runs under torch.func.functional_call with a dict of parameters, inside
torch.func.vmap over tasks and under gradients of gradients: the inner loop replaces the
parameters by per-task fast weights w_l, so nothing may keep state between calls.

Normalisation (`norm=`):
- "group" (default): per-sample statistics (GroupNorm, gcd(channels, 8) groups: 8 at the
  default width). An image's
  features do not depend on which other images share its forward call, so the support pass,
  the query pass, the bootstrap target's pass and evaluation all agree however they are batched,
  and no statistic leaks from one query image to another.
- "batch": batch statistics of the current call and no running statistics (the MAML
  convention). It is transductive: predictions depend on the batch they are made in.
- "none": no normalisation.
"group" calls bmssl.ops.group_norm (fused with the Conv4 block's ReLU and max-pool; the twin
is F.group_norm); "batch" is written in plain torch ops (see BatchStatNorm2d for why). Both are checked against finite
differences of the second-order meta-gradient under vmap.

Classifier head (`head=`):
- "zero" (default): a W-way linear head created per task at zero. The pseudo-labels of a task
  (which image is class 0) are arbitrary, so a head shared across tasks would learn nothing
  transferable; at zero every class starts equal and the first inner step writes the head from
  the support features (the "zeroing trick" of Kao et al., "MAML is a noisy contrastive
  learner", ICLR 2022).
- "shared": a W-way head that is part of θ, zero-initialised and meta-learned like the rest.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bmssl.ops import conv2d, group_norm

NORMS = ("group", "batch", "none")
HEADS = ("zero", "shared")
BACKBONES = ("conv4", "resnet12")


class GroupNorm2d(nn.Module):
    """Per-sample GroupNorm: y = (x - mean_g) / sqrt(var_g + eps) * gamma_c + beta_c, with the
    mean and (biased) variance over the channels of group g and all pixels of one sample.
    gcd(channels, 8) groups. Runs as bmssl.ops.group_norm: the fused C++ op on CPU (twice
    differentiable, vmap over tasks), the Triton kernels with BMSSL_BACKEND=triton, else
    F.group_norm (the twin; also auto's choice on CUDA until the Triton kernels have run on a GPU). `forward_relu_pool` is the Conv4 block's norm, ReLU
    and 2x2 max-pool as one op."""

    def __init__(self, channels: int, groups: int = 8, eps: float = 1e-5):
        super().__init__()
        self.groups = math.gcd(channels, groups)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return group_norm(x, self.weight, self.bias, self.groups, self.eps)

    def forward_relu_pool(self, x):
        return group_norm(x, self.weight, self.bias, self.groups, self.eps, relu=True, pool=True)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (zero padding) run as bmssl.ops.conv2d: the same forward and backward, and a
    second derivative that computes only the gradients asked for (the inner loop's
    differentiated backward). BMSSL_BACKEND=torch runs F.conv2d itself."""

    def forward(self, x):
        if self.padding_mode != "zeros":  # reflect / replicate / circular: nn.Conv2d's own padding
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchStatNorm2d(nn.Module):
    """BatchNorm with the statistics of the current batch and no running statistics:
    y = (x - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c, mean and biased var over (n, h, w).
    Written in plain torch ops on purpose: with torch 2.13, F.batch_norm (training, no running
    stats) under vmap gives wrong second-order meta-gradients (off by ~10% against the same
    computation looped over tasks); these ops are exact (tests/test_meta.py checks both)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return GroupNorm2d(channels)
    if norm == "batch":
        return BatchStatNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")


def check_image_shape(image_shape) -> tuple:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
    return shape


class ConvNet(nn.Module):
    """`depth` blocks of [conv3x3 `hidden`, norm, ReLU, maxpool 2], flattened.
    Conv4 is depth 4, hidden 64: 28x28x1 -> 64 features, 84x84x3 -> 64*5*5 = 1600."""

    def __init__(self, image_shape=(1, 28, 28), hidden: int = 64, depth: int = 4, norm: str = "group"):
        super().__init__()
        channels, height, width = check_image_shape(image_shape)
        if hidden < 1 or depth < 1:
            raise ValueError(f"ConvNet needs hidden >= 1 and depth >= 1, got hidden={hidden}, depth={depth}")
        if min(height, width) < 2**depth:
            raise ValueError(f"ConvNet of depth {depth} halves the image {depth} times: needs at least "
                             f"{2**depth}x{2**depth} pixels, got {height}x{width}")
        blocks = []
        for index in range(depth):
            blocks += [Conv2d(channels if index == 0 else hidden, hidden, 3, padding=1),
                       make_norm(norm, hidden), nn.ReLU(), nn.MaxPool2d(2)]
            height, width = height // 2, width // 2
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = hidden * height * width

    def forward(self, images):
        x = images
        for start in range(0, len(self.blocks), 4):  # [conv, norm, ReLU, maxpool]
            conv, norm, relu, pool = self.blocks[start:start + 4]
            x = conv(x)
            x = norm.forward_relu_pool(x) if isinstance(norm, GroupNorm2d) else pool(relu(norm(x)))
        return x.flatten(1)


class ResidualBlock(nn.Module):
    """ResNet-12 block: 3 x [conv3x3, norm, LeakyReLU(0.1)] (no activation after the third norm)
    plus a 1x1 conv + norm shortcut, LeakyReLU, maxpool 2."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.conv3 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = make_norm(norm, out_channels)
        self.shortcut = nn.Sequential(Conv2d(in_channels, out_channels, 1, bias=False),
                                      make_norm(norm, out_channels))

    def forward(self, x):
        out = F.leaky_relu(self.norm1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.norm2(self.conv2(out)), 0.1)
        out = self.norm3(self.conv3(out))
        return F.max_pool2d(F.leaky_relu(out + self.shortcut(x), 0.1), 2)


class ResNet12(nn.Module):
    """Four residual blocks of `widths` channels, then global average pooling -> widths[-1].
    The default widths (16, 32, 64, 128) keep it CPU-friendly; the usual few-shot ResNet-12
    is widths=(64, 160, 320, 640)."""

    def __init__(self, image_shape=(3, 84, 84), widths=(16, 32, 64, 128), norm: str = "group"):
        super().__init__()
        channels, height, width = check_image_shape(image_shape)
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"ResNet12 widths must be positive, got {widths}")
        if min(height, width) < 2 ** len(widths):
            raise ValueError(f"ResNet12 with {len(widths)} blocks needs at least {2 ** len(widths)} "
                             f"pixels a side, got {height}x{width}")
        blocks, previous = [], channels
        for out_channels in widths:
            blocks.append(ResidualBlock(previous, out_channels, norm))
            previous = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = widths[-1]

    def forward(self, images):
        return self.blocks(images).mean(dim=(2, 3))


def build_backbone(name: str, image_shape, norm: str = "group", seed: int | None = None, **options) -> nn.Module:
    """"conv4" (options: hidden=64, depth=4) or "resnet12" (options: widths). With a seed, the
    weights are drawn from that seed without touching the global random state."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(map(repr, BACKBONES))}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "conv4":
            return ConvNet(image_shape, norm=norm, **options)
        return ResNet12(image_shape, norm=norm, **options)


class ProjectionHead(nn.Module):
    """g: Linear(D, hidden) -> ReLU -> Linear(hidden, d), the SimCLR projection."""

    def __init__(self, feature_dim: int, hidden: int, output_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, output_dim))

    def forward(self, features):
        return self.layers(features)


def _prefixed(params: dict, prefix: str) -> dict:
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


class FewShotModel(nn.Module):
    """backbone + projection head g (+ a shared classifier head with head="shared").

    The engine never calls forward: it passes a parameter dict to features / logits /
    embeddings. θ is `meta_parameters()`; a task's starting weights w_0 are
    `task_parameters(θ, ways)`, which adds the zero head for head="zero".
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 64, projection_hidden: int | None = None,
                 head: str = "zero", ways: int | None = None):
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError("the backbone must have an int attribute feature_dim (the size of its "
                             f"flat output), got {feature_dim!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
        if head == "shared" and (ways is None or ways < 2):
            raise ValueError(f"head='shared' needs ways >= 2 (the head's size), got ways={ways!r}")
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
        hidden = projection_hidden or min(feature_dim, 512)
        self.backbone = backbone
        self.projection = ProjectionHead(feature_dim, hidden, projection_dim)
        self.feature_dim, self.head_kind, self.ways = feature_dim, head, ways
        if head == "shared":
            self.head = nn.Linear(feature_dim, ways)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        reference = next(backbone.parameters(), None)
        if reference is not None:
            self.projection.to(reference.device, reference.dtype)
            if head == "shared":
                self.head.to(reference.device, reference.dtype)

    def meta_parameters(self) -> dict:
        """θ: every meta-learned tensor, by name (detached copies are the caller's business)."""
        return dict(self.named_parameters())

    def task_parameters(self, theta: dict, ways: int) -> dict:
        """w_0 for a W-way task: θ, plus a zero W-way head when head="zero"."""
        if self.head_kind == "shared":
            if ways != self.ways:
                raise ValueError(f"the shared head has {self.ways} ways but the task has {ways}")
            return dict(theta)
        reference = theta["projection.layers.0.weight"]
        return {**theta,
                "head.weight": reference.new_zeros(ways, self.feature_dim),
                "head.bias": reference.new_zeros(ways)}

    def features(self, params: dict, images: torch.Tensor) -> torch.Tensor:
        """backbone(images): [n, C, H, W] -> [n, D]."""
        return functional_call(self.backbone, _prefixed(params, "backbone."), (images,))

    def logits(self, params: dict, features: torch.Tensor) -> torch.Tensor:
        """Classifier logits [n, W] = features W_head^T + b_head."""
        return F.linear(features, params["head.weight"], params["head.bias"])

    def embeddings(self, params: dict, features: torch.Tensor) -> torch.Tensor:
        """g(features): [n, D] -> [n, d]."""
        return functional_call(self.projection, _prefixed(params, "projection."), (features,))
