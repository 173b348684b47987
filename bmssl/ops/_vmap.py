"""vmap rules shared by the ops' autograd.Functions."""


def fold_vmapped_dim(args, in_dims, batch_size):
    """Move each tensor's vmapped dim to the front (expanding tensors vmap does not batch) and
    fold it into the next dim: the row dim of row-wise ops, the task dim of task-batched ones."""
    out = []
    for x, dim in zip(args, in_dims):
        x = x.movedim(dim, 0) if dim is not None else x.expand(batch_size, *x.shape)
        out.append(x.reshape(-1, *x.shape[2:]))
    return out
