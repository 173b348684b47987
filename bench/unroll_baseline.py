"""Provider (a) of bench_unroll.py: the BMSSL / MetaSSL outer gradient written the usual way,
as learn2learn and higher users write it. A Python loop over tasks; per inner step,
torch.autograd.grad(create_graph=True) and a per-parameter update; eager losses (the NT-Xent
twin, F.cross_entropy, F.kl_div). Written for this benchmark, independently of bmssl.meta's
vmap engine, as the baseline it is compared with (same model, same objective, same plan of
which views enter which loss).
"""
import torch
import torch.nn.functional as F

from bmssl import reference
from bmssl.meta import check_task_batch, plan_views


def task_loss(model, params, views, labels, config, extra_views=None, extra_labels=None):
    """CE(f_w(views)) + λ NTXent(g_w(views ∪ extra)) with the eager twin; returns (loss, logits)."""
    images = views if extra_views is None else torch.cat([views, extra_views])
    features = model.features(params, images)
    logits = model.logits(params, features[: views.shape[0]])
    loss = F.cross_entropy(logits, labels)
    if config.contrastive_weight > 0:
        z_labels = labels if extra_labels is None else torch.cat([labels, extra_labels])
        z = model.embeddings(params, features)
        loss = loss + config.contrastive_weight * reference.ntxent(
            z, z_labels, config.contrastive_temperature, config.contrastive_variant)
    return loss, logits


def sgd_steps(params, loss_fn, steps, lr, create_graph):
    """w <- w - lr grad, per parameter, with autograd.grad. create_graph=False detaches the
    gradient (first order) but keeps w's own graph."""
    for _ in range(steps):
        names = list(params)
        grads = torch.autograd.grad(loss_fn(params), [params[n] for n in names], create_graph=create_graph)
        params = {n: params[n] - lr * g for n, g in zip(names, grads)}
    return params


def outer_gradient(model, theta, batch, config):
    """(grads of mean_k outer_k w.r.t. θ, loss): a Python loop over the K tasks."""
    plan = plan_views(config, check_task_batch(batch))
    losses = []
    for k in range(batch.support.shape[0]):
        support, query = batch.support[k], batch.query[k]
        s_labels, q_labels = batch.support_labels[k], batch.query_labels[k]
        extra = (query, q_labels) if plan.inner_uses_query else (None, None)

        def inner_loss(w):
            return task_loss(model, w, support, s_labels, config, *extra)[0]

        start = model.task_parameters(theta, plan.ways)  # θ plus a fresh zero head (a leaf)
        start = {n: v if v.requires_grad else v.requires_grad_() for n, v in start.items()}
        if config.order == 1:  # first order: gradients at detached weights, as constants
            adapted = start
            for _ in range(config.inner_steps):
                frozen = {n: v.detach().requires_grad_() for n, v in adapted.items()}
                grads = torch.autograd.grad(inner_loss(frozen), list(frozen.values()))
                adapted = {n: adapted[n] - config.inner_lr * g for n, g in zip(frozen, grads)}
        else:
            adapted = sgd_steps(start, inner_loss, config.inner_steps, config.inner_lr, create_graph=True)
        if config.method == "bmssl":
            with torch.enable_grad():
                target = {n: v.detach().requires_grad_() for n, v in adapted.items()}
                if config.target_data == "support":
                    target_loss = inner_loss
                else:
                    views, labels = torch.cat([support, query]), torch.cat([s_labels, q_labels])
                    target_loss = lambda w: task_loss(model, w, views, labels, config)[0]  # noqa: E731
                target = sgd_steps(target, target_loss, config.target_steps, config.inner_lr, create_graph=False)
            target_logits = model.logits(target, model.features(target, query)).detach()
            logits = model.logits(adapted, model.features(adapted, query))
            t = config.kl_temperature
            losses.append(F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target_logits / t, -1),
                                   log_target=True, reduction="batchmean"))
        else:
            outer_extra = (support, s_labels) if plan.outer_uses_support else (None, None)
            losses.append(task_loss(model, adapted, query, q_labels, config, *outer_extra)[0])
    loss = torch.stack(losses).mean()
    names = list(theta)
    # allow_unused: in first order the projection head reaches the outer loss only through the
    # (detached) inner gradients, so its θ-gradient is exactly zero
    grads = torch.autograd.grad(loss, [theta[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(theta[n]) if g is None else g for n, g in zip(names, grads)]
    return dict(zip(names, grads)), loss.detach()
