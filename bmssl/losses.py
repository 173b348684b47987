"""Drop-in contrastive losses with the call signatures of popular SSL code, on the fused NT-Xent.

    NTXentLoss(temperature=0.5)(out0, out1)                 # lightly.loss.NTXentLoss
    SupConLoss(temperature=0.07)(features, labels=None)     # SupContrast's SupConLoss
    PairwiseNTXentLoss(temperature=0.07)(embeddings, labels)  # pytorch-metric-learning style

All three run bmssl.ops.ntxent (any backend, BMSSL_BACKEND or backend=), are differentiable
twice, and trace under torch.compile.
"""
import torch
import torch.distributed as dist

from bmssl.ops.ntxent import ntxent
from bmssl.validate import check_integer_labels, values_readable


class NTXentLoss(torch.nn.Module):
    """lightly's NTXentLoss: SimCLR's loss for two batches of views of the same N images.

    loss(out0 [N, d], out1 [N, d]): rows are L2-normalised; each of the 2N rows is an anchor
    whose positive is its partner view and whose negatives are the other 2N - 2 rows; mean over
    the 2N anchors. gather_distributed=True (in an initialised torch.distributed group of more
    than one rank) takes the rows of every rank as negatives, as lightly's does, through
    bmssl.distributed.ntxent_gathered: every rank must pass the same N, and the backward sums
    the gradients all ranks send to a row. lightly's memory bank is not supported.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False,
                 backend: str | None = None):
        super().__init__()
        if memory_bank_size:
            raise ValueError("NTXentLoss: a memory bank is not supported (memory_bank_size must be 0)")
        if not isinstance(gather_distributed, bool):
            raise ValueError(f"NTXentLoss: gather_distributed must be True or False, got {gather_distributed!r}")
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if not isinstance(out0, torch.Tensor) or not isinstance(out1, torch.Tensor) or out0.shape != out1.shape:
            raise ValueError(f"NTXentLoss: out0 and out1 must be tensors of one shape [N, d], got "
                             f"{getattr(out0, 'shape', type(out0))} and {getattr(out1, 'shape', type(out1))}")
        if out0.dim() != 2:
            raise ValueError(f"NTXentLoss: out0 and out1 must be [N, d], got {tuple(out0.shape)}")
        if out0.dtype != out1.dtype or out0.device != out1.device:
            raise ValueError(f"NTXentLoss: out0 is {out0.dtype} on {out0.device} but out1 is {out1.dtype} on "
                             f"{out1.device}")
        views = torch.stack([out0, out1], dim=1)  # [N, 2, d]: image j's two views share label j
        z = views.reshape(-1, views.shape[-1])
        labels = torch.arange(out0.shape[0], device=out0.device).repeat_interleave(2)
        if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from bmssl.distributed import ntxent_gathered

            labels = labels + dist.get_rank() * out0.shape[0]  # image j of rank r: one global label
            return ntxent_gathered(z, labels, self.temperature, "in", normalize=True, backend=self.backend)
        return ntxent(z, labels, self.temperature, "in", normalize=True, backend=self.backend)


class SupConLoss(torch.nn.Module):
    """SupContrast's SupConLoss (Khosla et al. 2020), contrast_mode="all".

    loss(features [bsz, n_views, d], labels [bsz] or None): anchors are all bsz * n_views rows;
    positives share the label (with labels=None, the other views of the same sample: SimCLR);
    L_out = -(T / base_T) mean over anchors of mean_{P(i)} log softmax_{A(i)}(s_i). As in
    SupContrast, features are used as given (normalise them first).
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float = 0.07, backend: str | None = None):
        super().__init__()
        if contrast_mode != "all":
            raise ValueError(f"SupConLoss: only contrast_mode='all' is supported, got {contrast_mode!r}")
        self.temperature, self.base_temperature, self.backend = temperature, base_temperature, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("SupConLoss: an explicit mask is not supported; pass labels")
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            raise ValueError(f"SupConLoss: features must be [bsz, n_views, d], got "
                             f"{getattr(features, 'shape', type(features))}")
        batch, views, _ = features.shape
        if features.numel() == 0:
            raise ValueError(f"SupConLoss: empty features (shape {tuple(features.shape)})")
        if labels is None:
            labels = torch.arange(batch, device=features.device)
        else:
            check_integer_labels("SupConLoss", "labels", labels)
            if labels.shape != (batch,):
                raise ValueError(f"SupConLoss: labels must be [bsz] = [{batch}], got {tuple(labels.shape)}")
            labels = dense_labels("SupConLoss", labels, "sample", views)  # any integers -> [0, #classes)
        z = features.reshape(batch * views, -1)
        loss = ntxent(z, labels.repeat_interleave(views), self.temperature, "out", normalize=False,
                      backend=self.backend)
        return loss * (self.temperature / self.base_temperature)


class PairwiseNTXentLoss(torch.nn.Module):
    """An (embeddings, labels) loss in the style of pytorch-metric-learning's NTXentLoss.

    loss(embeddings [B, d], labels [B] any integers): rows are L2-normalised and every row with
    a same-label partner is an anchor of the multi-view NT-Xent ("in" variant: -log of the
    softmax mass on its positives). With exactly two embeddings per label this equals
    pytorch-metric-learning's NTXentLoss; with more it differs, because that library averages
    over positive pairs with negatives-only denominators. Every label must occur at least twice.
    """

    def __init__(self, temperature: float = 0.07, variant: str = "in", backend: str | None = None):
        super().__init__()
        self.temperature, self.variant, self.backend = temperature, variant, backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_integer_labels("PairwiseNTXentLoss", "labels", labels)
        if labels.dim() != 1:
            raise ValueError(f"PairwiseNTXentLoss: labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
        labels = dense_labels("PairwiseNTXentLoss", labels, "row")
        return ntxent(embeddings, labels, self.temperature, self.variant, normalize=True,
                      backend=self.backend)


def dense_labels(op: str, labels: torch.Tensor, item: str, views: int = 1) -> torch.Tensor:
    """Any integer labels as 0 .. classes - 1 (torch.unique's inverse). Each label needs a positive:
    another view of its item (views >= 2) or another item with that label; an error names the
    caller's label and item, not the dense ones the kernels see."""
    classes, dense, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if views < 2 and values_readable() and labels.device.type != "meta":
        lonely = (counts < 2).nonzero()
        if lonely.numel():
            label = classes[lonely[0, 0]]
            index = int((labels == label).nonzero()[0, 0])
            raise ValueError(f"{op}: {item} {index} (label {int(label)}) has no positive: every label must occur "
                             f"at least twice{' (n_views = 1)' if item == 'sample' else ''}; "
                             f"{lonely.numel()} labels occur once")
    return dense
