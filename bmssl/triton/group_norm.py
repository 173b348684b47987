"""Triton kernels of the fused GroupNorm (+ ReLU) (+ 2x2 max-pool) block (maths in
csrc/group_norm.cpp; csrc/cpu/group_norm.cpp is the same algorithm in C++).

    group S = (t, n, g) of m = C/G H W values: mean, rstd = (var + eps)^-1/2 (biased var)
    scale = w_c rstd, a = (x - mean) scale + b_c, y = pool(act(a))
    da = grad_y routed to each window's first maximum, times [a > 0] for relu;  h = w_c da
    grad_x = rstd (h - mean h - xhat mean(h xhat)),  grad_w_c = sum da xhat,  grad_b_c = sum da

One program per group walks its C/G channel planes in BLOCK chunks; xhat, a and da are
recomputed from x and the stored (mean, rstd), so nothing full-size is kept besides the outputs.
da is formed per input element: its window a0 a1 / a2 a3 is re-read and its first maximum found
as the forward finds it (relu masks a window whose max a <= 0), and every kernel computes
a = fma(x - mean, scale, b) from the stats as stored, so masks and argmaxes agree. Per-channel sums
over n (grad_weight, grad_bias, d weight) are [T, N, C] fp32 partials summed in torch afterwards:
no atomics. x [T, N, C, H, W] contiguous, weight / bias [T, C], stats [T, N, G, 2] (mean, rstd)
in fp32 whatever x's dtype (fp32, fp16, bf16: a mean rounded to bf16 is off by up to half its
ulp, 0.25 near 100 and 2 near 1000, far past the tolerances for a group whose mean is large
beside its spread); all maths in fp32. Group bases are int64 offsets.
"""
import torch

from bmssl.triton import jit, triton

if triton is not None:
    import triton.language as tl

    @jit
    def _group_layout(batch, channels, groups, height, width, out_h, out_w):
        """(group index over [T, N, G], its C/G channels, the weight index of its first channel
        in its task's row, plane size H W, group size m, output plane size H' W')."""
        group = tl.program_id(0).to(tl.int64)
        group_channels = channels // groups
        task = group // (batch * groups)
        first_weight = task * channels + (group % groups) * group_channels
        plane = height * width
        return group, group_channels, first_weight, plane, group_channels * plane, out_h * out_w

    @jit
    def _load_stats(stats_ptr, group):
        return tl.load(stats_ptr + 2 * group).to(tl.float32), tl.load(stats_ptr + 2 * group + 1).to(tl.float32)

    @jit
    def _affine(w_ptr, b_ptr, index, rstd):
        """(w, scale = w rstd, b) of one channel."""
        w = tl.load(w_ptr + index).to(tl.float32)
        return w, w * rstd, tl.load(b_ptr + index).to(tl.float32)

    @jit
    def _normalise(x, mean, scale, bias):
        """a = (x - mean) scale + b: the one rounding of a that every kernel uses. x = mean gives
        exactly b (x scale + (b - mean scale) left the rounding error of mean scale under fma)."""
        return tl.fma(x - mean, scale, bias)

    @jit
    def _channel(x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane,
                 mean, rstd):
        """Channel k of the group: (its index over [T, N, C], w, scale, b, its x plane, its
        grad_y (or y) plane)."""
        channel = group * group_channels + k
        w, scale, bias = _affine(w_ptr, b_ptr, first_weight + k, rstd)
        return channel, w, scale, bias, x_ptr + channel * plane, grad_y_ptr + channel * out_plane

    @jit
    def _window(x_plane, out, mask, width, out_w, mean, scale, bias, RELU: tl.constexpr):
        """Pooled outputs `out` of one plane: (offset of the window's a0, position 0..3 of its
        first maximum or -1 where relu masks it, that maximum)."""
        out_row = out // out_w
        base = 2 * out_row * width + 2 * (out - out_row * out_w)
        best = _normalise(tl.load(x_plane + base, mask=mask, other=0.0).to(tl.float32), mean, scale, bias)
        arg = tl.zeros_like(out).to(tl.int32)
        for position in tl.static_range(1, 4):
            offset = base + (position // 2) * width + position % 2
            a = _normalise(tl.load(x_plane + offset, mask=mask, other=0.0).to(tl.float32), mean, scale, bias)
            take = a > best
            best = tl.where(take, a, best)
            arg = tl.where(take, position, arg)
        if RELU:
            arg = tl.where(best <= 0.0, -1, arg)  # a NaN maximum is not masked: NaN stays NaN
        return base, arg, best

    @jit
    def _route(x_plane, grad_y_plane, offs, plane, width, out_h, out_w, mean, scale, bias,
               RELU: tl.constexpr, POOL: tl.constexpr):
        """(x, da, offs < plane) at plane offsets offs: da is grad_y at its window's first
        maximum, 0 at the window's other elements, on a dropped odd row / column and where relu
        masks."""
        mask = offs < plane
        x = tl.load(x_plane + offs, mask=mask, other=0.0).to(tl.float32)
        if POOL:
            row = offs // width
            col = offs - row * width
            inside = mask & (row < 2 * out_h) & (col < 2 * out_w)
            out = (row // 2) * out_w + col // 2
            _, arg, _ = _window(x_plane, out, inside, width, out_w, mean, scale, bias, RELU)
            grad = tl.load(grad_y_plane + out, mask=inside, other=0.0).to(tl.float32)
            da = tl.where(inside & (arg == (row % 2) * 2 + col % 2), grad, 0.0)
        else:
            da = tl.load(grad_y_plane + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                da = tl.where(_normalise(x, mean, scale, bias) > 0.0, da, 0.0)
        return x, da, mask

    @jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, batch, channels, groups, height, width,
                        out_h, out_w, eps, RELU: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr):
        group, group_channels, first_weight, plane, m, out_plane = _group_layout(batch, channels, groups, height,
                                                                                 width, out_h, out_w)
        x_group = x_ptr + group * m
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        # mean = x_0 + sum (x - x_0) / m: deviations from the group's first value keep a constant
        # group exact and an offset one accurate (csrc/cpu/group_norm.cpp); if they overflow, the
        # plain sum of x / m, whose terms and partial sums stay finite
        origin = tl.load(x_group).to(tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, m, BLOCK):
            mask = start + lanes < m
            total += tl.where(mask, tl.load(x_group + start + lanes, mask=mask, other=0.0).to(tl.float32) - origin, 0.0)
        deviations = tl.sum(total, axis=0)
        mean = origin + deviations / m
        if (tl.abs(deviations) == float("inf")) & (tl.abs(origin) < float("inf")):
            inv_m = 1.0 / m
            total = tl.zeros([BLOCK], tl.float32)
            for start in range(0, m, BLOCK):
                total += tl.load(x_group + start + lanes, mask=start + lanes < m, other=0.0).to(tl.float32) * inv_m
            mean = tl.sum(total, axis=0)
        squares = tl.zeros([BLOCK], tl.float32)
        for start in range(0, m, BLOCK):
            mask = start + lanes < m
            centred = tl.where(mask, tl.load(x_group + start + lanes, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            squares += centred * centred
        variance = tl.sum(squares, axis=0) / m
        rstd = 1.0 / tl.sqrt_rn(variance + eps)
        if (variance == float("inf")) & (tl.abs(mean) < float("inf")):
            # (x - mean)^2 overflowed fp32 (|x - mean| past 1.8e19) from finite x: with a =
            # max |x - mean| and q = mean(((x - mean) / a)^2) <= 1, rstd = 1 / (a sqrt(q + eps / a^2)).
            # Only such groups take these two extra passes; x - mean itself infinite gives NaN (a / a).
            largest = tl.zeros([BLOCK], tl.float32)
            for start in range(0, m, BLOCK):
                mask = start + lanes < m
                centred = tl.load(x_group + start + lanes, mask=mask, other=0.0).to(tl.float32) - mean
                largest = tl.maximum(largest, tl.where(mask, tl.abs(centred), 0.0))
            a = tl.max(largest, axis=0)
            scaled = tl.zeros([BLOCK], tl.float32)
            for start in range(0, m, BLOCK):
                mask = start + lanes < m
                centred = tl.load(x_group + start + lanes, mask=mask, other=0.0).to(tl.float32) - mean
                ratio = tl.where(mask, centred / a, 0.0)
                scaled += ratio * ratio
            rstd = 1.0 / (a * tl.sqrt_rn(tl.sum(scaled, axis=0) / m + eps / (a * a)))
        # the stats as stored are what the backward kernels read: use them here too
        mean_stored = mean.to(stats_ptr.dtype.element_ty)
        rstd_stored = rstd.to(stats_ptr.dtype.element_ty)
        tl.store(stats_ptr + 2 * group, mean_stored)
        tl.store(stats_ptr + 2 * group + 1, rstd_stored)
        mean = mean_stored.to(tl.float32)
        rstd = rstd_stored.to(tl.float32)
        # NaN / Inf input, or rstd past the stats dtype's range: the group's output is NaN,
        # never a finite, meaningless value
        finite = (tl.abs(mean) < float("inf")) & (rstd > 0.0) & (rstd < float("inf"))
        for k in range(0, group_channels):
            # distinct names, not `_`: Triton's compiler (not its interpreter) rejects a loop
            # variable that changes type, and `_` is fp32 here and int64 in the pooling loop
            _channel_index, _w, scale, bias, x_plane, y_plane = _channel(
                x_ptr, y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            for start in range(0, out_plane, BLOCK):
                out = start + lanes
                mask = out < out_plane
                if POOL:
                    _a0, arg, best = _window(x_plane, out, mask, width, out_w, mean, scale, bias, RELU)
                    y = tl.where(arg >= 0, best, 0.0)
                else:
                    y = _normalise(tl.load(x_plane + out, mask=mask, other=0.0).to(tl.float32), mean, scale, bias)
                    if RELU:
                        y = tl.where(y < 0.0, 0.0, y)
                y = tl.where(finite, y, float("nan"))
                tl.store(y_plane + out, y.to(y_ptr.dtype.element_ty), mask=mask)

    @jit
    def _backward_kernel(grad_y_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, grad_x_ptr, w_partial_ptr, b_partial_ptr,
                         batch, channels, groups, height, width, out_h, out_w,
                         RELU: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr):
        group, group_channels, first_weight, plane, m, out_plane = _group_layout(batch, channels, groups, height,
                                                                                 width, out_h, out_w)
        mean, rstd = _load_stats(stats_ptr, group)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        # pass 1: the per-channel sums of da and da xhat; the group sums of h and h xhat
        sum_h = tl.zeros([BLOCK], tl.float32)
        sum_h_xhat = tl.zeros([BLOCK], tl.float32)
        for k in range(0, group_channels):
            channel, w, scale, bias, x_plane, grad_y_plane = _channel(
                x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            sum_da = tl.zeros([BLOCK], tl.float32)
            sum_da_xhat = tl.zeros([BLOCK], tl.float32)
            for start in range(0, plane, BLOCK):
                x, da, _ = _route(x_plane, grad_y_plane, start + lanes, plane, width, out_h, out_w, mean, scale, bias,
                                  RELU, POOL)
                sum_da += da
                sum_da_xhat += da * ((x - mean) * rstd)
            tl.store(b_partial_ptr + channel, tl.sum(sum_da, axis=0))
            tl.store(w_partial_ptr + channel, tl.sum(sum_da_xhat, axis=0))
            sum_h += w * sum_da
            sum_h_xhat += w * sum_da_xhat
        mean_h = tl.sum(sum_h, axis=0) / m
        mean_h_xhat = tl.sum(sum_h_xhat, axis=0) / m
        # pass 2: grad_x = rstd (w da - mean h - xhat mean(h xhat))
        for k in range(0, group_channels):
            channel, w, scale, bias, x_plane, grad_y_plane = _channel(
                x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            for start in range(0, plane, BLOCK):
                offs = start + lanes
                x, da, mask = _route(x_plane, grad_y_plane, offs, plane, width, out_h, out_w, mean, scale, bias, RELU,
                                     POOL)
                grad_x = rstd * (w * da - mean_h - (x - mean) * rstd * mean_h_xhat)
                tl.store(grad_x_ptr + channel * plane + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)

    @jit
    def _double_backward_kernel(u_ptr, p_ptr, q_ptr, grad_y_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, d_grad_y_ptr,
                                d_x_ptr, w_partial_ptr, batch, channels, groups, height, width, out_h, out_w,
                                RELU: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr):
        """u = grad_grad_x, p = grad_grad_weight, q = grad_grad_bias (the names of
        csrc/group_norm.cpp)."""
        group, group_channels, first_weight, plane, m, out_plane = _group_layout(batch, channels, groups, height,
                                                                                 width, out_h, out_w)
        mean, rstd = _load_stats(stats_ptr, group)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        # pass 1: the group sums of u, u xhat, h, h xhat, u h
        sum_u = tl.zeros([BLOCK], tl.float32)
        sum_u_xhat = tl.zeros([BLOCK], tl.float32)
        sum_h = tl.zeros([BLOCK], tl.float32)
        sum_h_xhat = tl.zeros([BLOCK], tl.float32)
        sum_u_h = tl.zeros([BLOCK], tl.float32)
        for k in range(0, group_channels):
            channel, w, scale, bias, x_plane, grad_y_plane = _channel(
                x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            for start in range(0, plane, BLOCK):
                offs = start + lanes
                x, da, mask = _route(x_plane, grad_y_plane, offs, plane, width, out_h, out_w, mean, scale, bias, RELU,
                                     POOL)
                u = tl.load(u_ptr + channel * plane + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                sum_u += u
                sum_u_xhat += u * xhat
                sum_h += w * da
                sum_h_xhat += w * da * xhat
                sum_u_h += w * da * u
        total_u = tl.sum(sum_u, axis=0)
        total_u_xhat = tl.sum(sum_u_xhat, axis=0)
        total_h = tl.sum(sum_h, axis=0)
        total_h_xhat = tl.sum(sum_h_xhat, axis=0)
        mean_u = total_u / m
        mean_u_xhat = total_u_xhat / m
        phi_r = tl.sum(sum_u_h, axis=0) - total_h * total_u / m - total_h_xhat * total_u_xhat / m
        g_h = -rstd / m * total_u_xhat
        g_u = -rstd / m * total_h_xhat
        # pass 2: d grad_y = route^T(w rstd P(u) + p xhat + q), the d weight partials
        # sum da rstd P(u), and the group sums of G = (g_h w + p) da + g_u u and G xhat
        sum_g = tl.zeros([BLOCK], tl.float32)
        sum_g_xhat = tl.zeros([BLOCK], tl.float32)
        for k in range(0, group_channels):
            channel, w, scale, bias, x_plane, grad_y_plane = _channel(
                x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            p = tl.load(p_ptr + first_weight + k).to(tl.float32)
            q = tl.load(q_ptr + first_weight + k).to(tl.float32)
            u_plane = u_ptr + channel * plane
            sum_d_weight = tl.zeros([BLOCK], tl.float32)
            for start in range(0, plane, BLOCK):
                offs = start + lanes
                x, da, mask = _route(x_plane, grad_y_plane, offs, plane, width, out_h, out_w, mean, scale, bias, RELU,
                                     POOL)
                u = tl.load(u_plane + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                sum_d_weight += da * (rstd * (u - mean_u - xhat * mean_u_xhat))
                g = (g_h * w + p) * da + g_u * u
                sum_g += g
                sum_g_xhat += g * xhat
            tl.store(w_partial_ptr + channel, tl.sum(sum_d_weight, axis=0))
            d_grad_y_plane = d_grad_y_ptr + channel * out_plane
            for start in range(0, out_plane, BLOCK):
                out = start + lanes
                mask = out < out_plane
                if POOL:  # d_da at the window's first maximum
                    base, arg, _ = _window(x_plane, out, mask, width, out_w, mean, scale, bias, RELU)
                    live = mask & (arg >= 0)
                    arg = tl.where(live, arg, 0)
                    at = base + (arg // 2) * width + arg % 2
                    x = tl.load(x_plane + at, mask=live, other=0.0).to(tl.float32)
                    u = tl.load(u_plane + at, mask=live, other=0.0).to(tl.float32)
                else:
                    x = tl.load(x_plane + out, mask=mask, other=0.0).to(tl.float32)
                    u = tl.load(u_plane + out, mask=mask, other=0.0).to(tl.float32)
                    live = mask
                    if RELU:
                        live = live & (_normalise(x, mean, scale, bias) > 0.0)
                xhat = (x - mean) * rstd
                d_da = w * rstd * (u - mean_u - xhat * mean_u_xhat) + p * xhat + q
                tl.store(d_grad_y_plane + out, tl.where(live, d_da, 0.0).to(d_grad_y_ptr.dtype.element_ty),
                         mask=mask)
        # pass 3: d x = rstd (G - mean G - xhat mean(G xhat)) - (rstd^2 / m) Phi_r xhat
        mean_g = tl.sum(sum_g, axis=0) / m
        mean_g_xhat = tl.sum(sum_g_xhat, axis=0) / m
        r_term = rstd * rstd / m * phi_r
        for k in range(0, group_channels):
            channel, w, scale, bias, x_plane, grad_y_plane = _channel(
                x_ptr, grad_y_ptr, w_ptr, b_ptr, group, k, group_channels, first_weight, plane, out_plane, mean, rstd)
            gain = g_h * w + tl.load(p_ptr + first_weight + k).to(tl.float32)
            for start in range(0, plane, BLOCK):
                offs = start + lanes
                x, da, mask = _route(x_plane, grad_y_plane, offs, plane, width, out_h, out_w, mean, scale, bias, RELU,
                                     POOL)
                u = tl.load(u_ptr + channel * plane + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                d_x = rstd * (gain * da + g_u * u - mean_g - xhat * mean_g_xhat) - r_term * xhat
                tl.store(d_x_ptr + channel * plane + offs, d_x.to(d_x_ptr.dtype.element_ty), mask=mask)


def _sizes(x, groups, pool):
    """Grid and the size arguments shared by the three kernels."""
    tasks, batch, channels, height, width = x.shape
    out_h, out_w = (height // 2, width // 2) if pool else (height, width)
    return (tasks * batch * groups,), (batch, channels, groups, height, width, out_h, out_w)


def _block(x):
    return min(max(triton.next_power_of_2(x.shape[3] * x.shape[4]), 16), 1024)


def _summed_over_batch(partials, dtype):
    """[T, N, C] fp32 partials -> [T, C] in dtype."""
    return partials.sum(1).to(dtype)


def forward(x, weight, bias, groups, eps, relu, pool):
    """(y [T, N, C, H', W'] in x's dtype, stats [T, N, G, 2] in fp32)."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    grid, sizes = _sizes(x, groups, pool)
    y = x.new_empty(*x.shape[:3], sizes[-2], sizes[-1])
    stats = x.new_empty(x.shape[0], x.shape[1], groups, 2, dtype=torch.float32)
    if x.numel():
        _forward_kernel[grid](x, weight, bias, y, stats, *sizes, eps, RELU=relu, POOL=pool, BLOCK=_block(x))
    return y, stats


def backward(grad_y, x, weight, bias, stats, groups, relu, pool):
    """(grad_x, grad_weight [T, C], grad_bias [T, C]) in x's dtype."""
    dtype = x.dtype
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    grad_y, stats = grad_y.to(dtype).contiguous(), stats.to(torch.float32).contiguous()
    grid, sizes = _sizes(x, groups, pool)
    grad_x = torch.empty_like(x)
    w_partials = x.new_zeros(*x.shape[:3], dtype=torch.float32)
    b_partials = torch.zeros_like(w_partials)
    if x.numel():
        _backward_kernel[grid](grad_y, x, weight, bias, stats, grad_x, w_partials, b_partials, *sizes,
                               RELU=relu, POOL=pool, BLOCK=_block(x))
    return grad_x, _summed_over_batch(w_partials, dtype), _summed_over_batch(b_partials, dtype)


def double_backward(gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups, relu, pool):
    """(d grad_y, d x, d weight [T, C]) in x's dtype, for the gradients (gg_x, gg_weight,
    gg_bias) arriving at the backward's outputs."""
    dtype = x.dtype
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    gg_x, gg_weight, gg_bias, grad_y = (t.to(dtype).contiguous() for t in (gg_x, gg_weight, gg_bias, grad_y))
    stats = stats.to(torch.float32).contiguous()
    grid, sizes = _sizes(x, groups, pool)
    d_grad_y, d_x = torch.empty_like(grad_y), torch.empty_like(x)
    w_partials = x.new_zeros(*x.shape[:3], dtype=torch.float32)
    if x.numel():
        _double_backward_kernel[grid](gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, d_grad_y, d_x,
                                      w_partials, *sizes, RELU=relu, POOL=pool, BLOCK=_block(x))
    return d_grad_y, d_x, _summed_over_batch(w_partials, dtype)
