"""bmssl.ops.conv2d: F.conv2d with a leaner second derivative, for the inner loop's
differentiated backward.

The maths. y = conv(x, W) + b. Its backward, given gO = dL/dy, is three linear maps:
    gI = conv_T(gO, W)      (the input gradient: conv_transpose, i.e. convolution_backward's first output)
    gW = corr(x, gO)        (the weight gradient: sum over n, pixels of x gO at each tap)
    gb = sum over n, pixels of gO
The double backward, given (ggI, ggW, ggb), the gradients arriving at (gI, gW, gb), is their
adjoint in each argument:
    d gO = conv(ggI, W) + conv(x, ggW) + ggb      (gI, gW, gb are linear in gO)
    d x  = conv_T(gO, ggW)                        (gW is linear in x: the input gradient of
                                                   a conv with weight ggW, given gO)
    d W  = corr(ggI, gO)                          (gI is linear in W: the weight gradient of a
                                                   conv with input ggI, given gO)
torch's own double backward (aten::_convolution_double_backward, torch 2.13) computes d x
whether or not x needs a gradient (the images of the first layer never do), and d W as a
convolution whose batch and channel axes are swapped (a kernel the size of the image). Here d x
runs only when asked for, and d W is convolution_backward's weight gradient. On the CPU
(oneDNN, one thread, 30 x 64 x 42 x 42): the swapped convolution takes 91 ms and the weight
gradient 62 ms; the skipped first-layer d x was 50 ms per inner step at 84 x 84.

Every term is a differentiable aten op, so a third derivative works too. backend="torch" (or
BMSSL_BACKEND=torch) takes F.conv2d itself, the twin; every other choice takes this
arrangement, on any device, since it calls only aten convolutions.
"""
import torch
import torch.nn.functional as F

from bmssl import backends
from bmssl.ops._autocast import autocast_enabled

_convolution_backward = torch.ops.aten.convolution_backward.default


def _backward(grad_out, x, weight, geometry, mask, bias_channels=None):
    """aten convolution_backward of y = conv(x, weight) with `geometry` = (stride, padding,
    dilation, groups): (gI, gW, gb), None where `mask` says not to compute it."""
    stride, padding, dilation, groups = geometry
    return _convolution_backward(grad_out, x, weight, bias_channels, stride, padding, dilation, False, [0, 0],
                                 groups, list(mask))


class Conv2d(torch.autograd.Function):
    """y = conv(x, weight) + bias; its backward is Conv2dBackward (differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, geometry):
        stride, padding, dilation, groups = geometry
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = Conv2dBackward.apply(grad_out, x, weight, ctx.geometry, need_x, need_weight,
                                     need_bias and ctx.has_bias)
        return (*grads, None)


class Conv2dBackward(torch.autograd.Function):
    """(gI, gW, gb) of the convolution, each None unless asked for; its backward is the
    double backward of the module docstring."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, x, weight, geometry, need_x, need_weight, need_bias):
        bias_channels = [weight.shape[0]] if need_bias else None
        return _backward(grad_out, x, weight, geometry, (need_x, need_weight, need_bias), bias_channels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, geometry = inputs[:4]
        ctx.save_for_backward(grad_out, x, weight)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_out, x, weight = ctx.saved_tensors
        need_grad_out, need_x, need_weight = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.geometry
        d_grad_out = d_x = d_weight = None
        if need_grad_out:
            terms = []
            if gg_x is not None:
                terms.append(F.conv2d(gg_x, weight, None, stride, padding, dilation, groups))
            if gg_weight is not None:
                terms.append(F.conv2d(x, gg_weight, gg_bias, stride, padding, dilation, groups))
            elif gg_bias is not None:
                terms.append(gg_bias[:, None, None].expand_as(grad_out))
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_weight is not None:
            d_x = _backward(grad_out, x, gg_weight, ctx.geometry, (True, False, False))[0]
        if need_weight and gg_x is not None:
            d_weight = _backward(grad_out, gg_x, weight, ctx.geometry, (False, True, False))[1]
        return d_grad_out, d_x, d_weight, None, None, None, None


def _pair(value, name):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return list(pair)


def _autocast_inputs(device, tensors):
    """autocast's convolution policy, applied before the autograd.Function (whose backward runs
    outside autocast): fp32 inputs cast to autocast's dtype, fp64 and others left alone."""
    dtype = torch.get_autocast_dtype(device.type)
    return [t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in tensors]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) with the second derivative
    of the module docstring; the same value and first derivative. x [N, C, H, W] (vmap adds
    task dims). String padding ("same", "valid") takes F.conv2d. backend: "torch" takes
    F.conv2d itself; any other backend (or "auto") this op. Under torch.autocast the inputs are
    cast as autocast casts F.conv2d's."""
    if backends.requested(backend) == "torch" or isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    geometry = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
    if isinstance(x, torch.Tensor) and autocast_enabled(x.device):
        x, weight, bias = _autocast_inputs(x.device, (x, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return Conv2d.apply(x, weight, bias, geometry)
    return Conv2d.apply(x, weight, bias, geometry)
