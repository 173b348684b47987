"""Autograd for the last derivative an op family implements."""
import torch


def register_no_derivative(op, what):
    """Give `op` an autograd kernel whose backward raises NotImplementedError(what).

    Without one, torch's fallback runs a C++ op under autograd when its output is used with
    create_graph=True (its ATen calls with out= then fail with an unrelated message), and lets a
    backward pass through it with only a warning. With it, the op runs below autograd and its
    output's derivative is refused by name."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"bmssl: {what} is not implemented")

    torch.library.register_autograd(op, backward, setup_context=setup_context)
