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

Forward mode (jvp, jacfwd, hessian): every output is linear in each input, so the tangent of
y is conv(tx, W) + conv(x, tW) + tb, and those of (gI, gW, gb) are the same maps applied to
each input's tangent in turn (the jvp methods below).

Every term is a differentiable aten op, so a third derivative works too. backend="torch" (or
BMSSL_BACKEND=torch) takes F.conv2d itself, the twin; every other choice takes this
arrangement, on any device, since it calls only aten convolutions.
"""
import operator

import torch
import torch.nn.functional as F

from bmssl import backends
from bmssl.ops._autocast import autocast_enabled

_convolution_backward = torch.ops.aten.convolution_backward.default


class Geometry:
    """(stride, padding, dilation, groups) of one convolution, unpacked as that tuple. One
    opaque argument, not a pytree of lists: torch.func's jvp rule for an autograd.Function
    matches tangents to the inputs' pytree leaves, and lists of ints there threw it off."""

    __slots__ = ("stride", "padding", "dilation", "groups")

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __iter__(self):
        return iter((self.stride, self.padding, self.dilation, self.groups))


def _backward(grad_out, x, weight, geometry, mask):
    """aten convolution_backward of y = conv(x, weight) with `geometry` = (stride, padding,
    dilation, groups): (gI, gW, gb), None where `mask` says not to compute it."""
    stride, padding, dilation, groups = geometry
    bias_channels = [weight.shape[0]] if mask[2] else None
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
        ctx.save_for_forward(x, weight)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias, _tangent_geometry):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        terms = []
        if tangent_x is not None:
            terms.append(F.conv2d(tangent_x, weight, None, stride, padding, dilation, groups))
        if tangent_weight is not None or tangent_bias is not None:
            tangent_weight = torch.zeros_like(weight) if tangent_weight is None else tangent_weight
            terms.append(F.conv2d(x, tangent_weight, tangent_bias, stride, padding, dilation, groups))
        return sum(terms[1:], terms[0])

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
        return _backward(grad_out, x, weight, geometry, (need_x, need_weight, need_bias))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, geometry = inputs[:4]
        ctx.save_for_backward(grad_out, x, weight)
        ctx.save_for_forward(grad_out, x, weight)
        ctx.geometry = geometry
        ctx.mask = tuple(inputs[4:])

    @staticmethod
    def jvp(ctx, tangent_grad_out, tangent_x, tangent_weight, *_tangent_flags):
        """(gI, gW, gb)' = the backward of tangent_grad_out, plus gI's term in tangent_weight
        and gW's in tangent_x (gI is linear in W, gW in x)."""
        grad_out, x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.mask
        if tangent_grad_out is not None:
            tangents = list(_backward(tangent_grad_out, x, weight, ctx.geometry, ctx.mask))
        else:
            tangents = [torch.zeros_like(like) if need else None
                        for need, like in ((need_x, x), (need_weight, weight), (need_bias, weight[:, 0, 0, 0]))]
        if need_x and tangent_weight is not None:
            tangents[0] = tangents[0] + _backward(grad_out, x, tangent_weight, ctx.geometry, (True, False, False))[0]
        if need_weight and tangent_x is not None:
            tangents[1] = tangents[1] + _backward(grad_out, tangent_x, weight, ctx.geometry, (False, True, False))[1]
        return tuple(tangents)

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


def _index(value, name, given, what="an int or a pair of ints"):
    """value as a Python int (numpy integers too), refusing bools, floats and the rest."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"conv2d: {name} must be {what}, got {given!r}")


def _pair(value, name):
    """[h, w] from an int or a sequence of one or two ints, as F.conv2d takes them."""
    if isinstance(value, (list, tuple)):
        if len(value) not in (1, 2):
            raise ValueError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")
        pair = [_index(v, name, value) for v in value]
        return pair * 2 if len(pair) == 1 else pair
    return [_index(value, name, value)] * 2


def _autocast_inputs(device, tensors):
    """autocast's convolution policy, applied before the autograd.Function (whose backward runs
    outside autocast): floating inputs cast to autocast's dtype (fp16 under a bf16 autocast
    too), fp64 left alone."""
    dtype = torch.get_autocast_dtype(device.type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) with the second derivative
    of the module docstring; the same value and first derivative. x [N, C, H, W] (vmap adds
    task dims). String padding ("same", "valid") takes F.conv2d. backend: "torch" takes
    F.conv2d itself; any other backend (or "auto") this op. Under torch.autocast the inputs are
    cast as autocast casts F.conv2d's. An unbatched x [C, H, W] works as in F.conv2d. Inside
    torch.compile this is F.conv2d: dynamo traces an autograd.Function's forward and backward
    but drops its double backward, and with backend="eager" a meta-gradient through it came out
    silently wrong."""
    if backends.requested(backend) == "torch" or isinstance(padding, str) or torch.compiler.is_compiling():
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    geometry = Geometry(_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
                        _index(groups, "groups", groups, "an int"))
    if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched, as F.conv2d takes it
        return conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, backend).squeeze(0)
    if isinstance(x, torch.Tensor) and autocast_enabled(x.device):
        x, weight, bias = _autocast_inputs(x.device, (x, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return Conv2d.apply(x, weight, bias, geometry)
    return Conv2d.apply(x, weight, bias, geometry)
