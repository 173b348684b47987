"""Twin of bmssl::sgd_unroll_step: out_k = params_k - lr * grads_k, one torch op per tensor."""


def sgd_unroll_step(params, grads, lr):
    """params, grads: sequences of tensors of matching shapes; returns the list of updates."""
    return [p - lr * g for p, g in zip(params, grads)]
