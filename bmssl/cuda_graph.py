"""bmssl.cuda_graph: one outer step's meta-gradient captured as a CUDA graph and replayed.

On the GPU an outer step of BMSSL is hundreds of small kernels: for each of the L + δ inner
steps a forward and a create_graph backward, then the outer backward through the L
differentiable ones. At Conv4 sizes launching them from Python costs more than running them.
With static shapes the whole step, the forward and every backward, is captured once into a
torch.cuda.CUDAGraph; each later step copies the new θ and task images into the graph's input
buffers and launches the graph:

    step = CapturedMetaGradient(model, theta, batch, config)   # checks, warms up, captures
    grads, loss, aux = step(theta, batch)                      # copy in, replay, copy out

What the capture needs, and how it gets it:
- No reads of tensor values on the host (a read waits for the GPU, which a capture forbids).
  check_task_batch reads the labels once, before the capture, and its TaskShape is passed to
  the engine (meta.meta_gradient_tensors); the ops skip their label-value checks while a
  capture runs (validate.values_readable); the CUDA NT-Xent skips its error-flag readback.
- A warm-up on a side stream first: Triton compiles, cuBLAS and cuDNN pick their kernels,
  autograd starts its device threads.
- Static buffers: replay writes the same output tensors each time, so a call returns clones.

A later step must have the captured shapes, dtypes and labels (checked: the labels with one
torch.equal, which reads them on the host before the replay). Tested against the eager
meta-gradient in tests/test_cuda_graph.py (the GPU tests need a CUDA device).
"""
from typing import NamedTuple

import torch

from bmssl.meta import check_task_batch, meta_gradient_tensors

LABELS = ("support_labels", "query_labels")
IMAGES = ("support", "query")


class _StaticBatch(NamedTuple):
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


class CapturedMetaGradient:
    """meta_gradient(model, θ, batch, config) as a replayed CUDA graph. Returns, per call,
    (grads dict, loss, aux dict of 0-dim tensors): the same as meta.meta_gradient except that
    aux stays on the GPU (reading it would wait for the step)."""

    def __init__(self, model, theta, batch, config, batched=None, warmup_steps=2):
        tensors = {**{f"theta[{n!r}]": v for n, v in theta.items()},
                   **{name: getattr(batch, name, None) for name in IMAGES + LABELS}}
        not_cuda = [name for name, t in tensors.items() if not (isinstance(t, torch.Tensor) and t.is_cuda)]
        if not_cuda:
            raise ValueError(f"CapturedMetaGradient captures a CUDA graph: every tensor must be on a CUDA "
                             f"device, but {', '.join(not_cuda[:4])} {'is' if len(not_cuda) == 1 else 'are'} not")
        devices = sorted({str(t.device) for t in tensors.values()})
        if len(devices) > 1:
            raise ValueError(f"CapturedMetaGradient: every tensor must be on one CUDA device, got {devices}")
        # the capture, its side stream and every launch in it on the tensors' device, whichever
        # device is current (on torchrun's rank r, cuda:r: torch.cuda.graph and Stream() take the
        # current device, and a graph captured on another device's stream would hold nothing)
        self.device = next(iter(tensors.values())).device
        with torch.cuda.device(self.device):
            self._capture(model, theta, batch, config, batched, warmup_steps)

    def _capture(self, model, theta, batch, config, batched, warmup_steps):
        if config.checkpoint_inner_steps:
            raise ValueError("CapturedMetaGradient: checkpoint_inner_steps recomputes inside the backward; "
                             "capture the step without it")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 1):
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        self.shape = check_task_batch(batch)  # the one read of the labels
        self._theta = {name: value.detach().clone() for name, value in theta.items()}
        self._batch = _StaticBatch(*(getattr(batch, name).detach().clone() for name in _StaticBatch._fields))

        def step():
            return meta_gradient_tensors(model, self._theta, self._batch, config, batched, shape=self.shape)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
            self._grads, self._loss, self._aux = step()

    def __call__(self, theta, batch):
        with torch.cuda.device(self.device):
            return self._replay(theta, batch)

    def _replay(self, theta, batch):
        if theta.keys() != self._theta.keys():
            raise ValueError(f"θ has parameters {sorted(theta)}, the captured step {sorted(self._theta)}")
        for name, value in theta.items():
            self._copy_into(self._theta[name], value, f"theta[{name!r}]")
        for name in IMAGES:
            self._copy_into(getattr(self._batch, name), getattr(batch, name), name)
        for name in LABELS:
            if not _same_labels(getattr(batch, name), getattr(self._batch, name)):
                raise ValueError(f"{name} differ from the captured step's: the graph replays that task layout "
                                 "(capture a new CapturedMetaGradient for another)")
        self.graph.replay()
        grads = {name: grad.clone() for name, grad in self._grads.items()}
        return grads, self._loss.clone(), {name: value.clone() for name, value in self._aux.items()}

    def replays(self, batch) -> bool:
        """Whether this graph can replay `batch`: the captured image shapes, dtypes and devices,
        and the captured labels (read on the host)."""
        return (all(isinstance(getattr(batch, n, None), torch.Tensor)
                    and (getattr(batch, n).shape, getattr(batch, n).dtype, getattr(batch, n).device)
                    == (getattr(self._batch, n).shape, getattr(self._batch, n).dtype, getattr(self._batch, n).device)
                    for n in IMAGES)
                and all(_same_labels(getattr(batch, n, None), getattr(self._batch, n)) for n in LABELS))

    @staticmethod
    def _copy_into(static, value, name):
        if not isinstance(value, torch.Tensor) or value.shape != static.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} is {shape}, the captured step has {tuple(static.shape)}")
        if value.dtype != static.dtype:
            raise ValueError(f"{name} is {value.dtype}, the captured step has {static.dtype}")
        static.copy_(value.detach())


def _same_labels(labels, captured) -> bool:
    return (isinstance(labels, torch.Tensor) and labels.shape == captured.shape
            and torch.equal(labels.to(captured), captured))
