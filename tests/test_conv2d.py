"""bmssl.ops.conv2d: F.conv2d's value and derivatives (first, second, third; under vmap too),
with a second derivative that skips the input term when the input needs no gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bmssl.ops import conv2d

GEOMETRIES = [dict(stride=1, padding=1), dict(stride=2, padding=1), dict(padding=0, groups=2),
              dict(padding=2, dilation=2)]


def inputs(groups=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64, generator=generator)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=generator)
    bias = torch.randn(6, dtype=torch.float64, generator=generator)
    return x, weight, bias


def inner_loop_gradient(conv, x, weight, bias, geometry):
    """The meta-learner's pattern: the gradient of a loss through the conv with create_graph,
    then a loss on that gradient, differentiated again."""
    y = conv(x, weight, bias, **geometry)
    grads = torch.autograd.grad(y.tanh().square().sum(), [t for t in (x, weight, bias) if t.requires_grad],
                                create_graph=True)
    return sum(g.sin().sum() for g in grads)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_value_and_derivatives_match_f_conv2d(geometry, input_needs_grad):
    leaves = inputs(geometry.get("groups", 1))
    results = {}
    for name, conv in (("bmssl", conv2d), ("torch", F.conv2d)):
        x, weight, bias = (t.clone() for t in leaves)
        x.requires_grad_(input_needs_grad), weight.requires_grad_(), bias.requires_grad_()
        torch.testing.assert_close(conv(x, weight, bias, **geometry), F.conv2d(*leaves, **geometry))
        outer = inner_loop_gradient(conv, x, weight, bias, geometry)
        results[name] = torch.autograd.grad(outer, [t for t in (x, weight, bias) if t.requires_grad])
    for got, want in zip(results["bmssl"], results["torch"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_gradcheck_and_gradgradcheck(geometry):
    x, weight, bias = (t.requires_grad_() for t in inputs())
    fn = lambda x, weight, bias: conv2d(x, weight, bias, **geometry)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_third_derivative_matches_f_conv2d():
    results = []
    for conv in (conv2d, F.conv2d):
        x, weight, bias = (t.requires_grad_() for t in inputs())
        second = torch.autograd.grad(inner_loop_gradient(conv, x, weight, bias, dict(padding=1)), weight,
                                     create_graph=True)[0]
        results.append(torch.autograd.grad(second.cos().sum(), (x, weight, bias)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_matches_f_conv2d_under_vmap_and_func_grad():
    """The engine's task batching: torch.func.grad of the inner loss inside vmap over tasks."""
    x, weight, bias = inputs()
    tasks = torch.stack([x, x.flip(-1)])

    def outer(conv, weight):
        def inner(weight, x):
            return conv(x, weight, bias, padding=1).tanh().square().sum()

        per_task = torch.func.vmap(lambda x: torch.func.grad(inner)(weight, x).sin().sum())(tasks)
        return per_task.sum()

    grads = []
    for conv in (conv2d, F.conv2d):
        w = weight.clone().requires_grad_()
        grads.append(torch.autograd.grad(outer(conv, w), w)[0])
    torch.testing.assert_close(grads[0], grads[1])


class OutputShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("conv,computes_input_term", [(conv2d, False), (F.conv2d, True)])
def test_the_second_derivative_skips_the_input_term_when_the_input_needs_no_gradient(conv, computes_input_term):
    """The first layer's images need no gradient: torch's double backward still computes one
    (a transposed convolution as large as the images); this op does not."""
    images = torch.randn(2, 3, 9, 9, dtype=torch.float64)  # no other tensor here has this shape
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    outer = inner_loop_gradient(conv, images, weight, bias, dict(padding=1))
    with OutputShapes() as mode:
        torch.autograd.grad(outer, (weight, bias))
    assert (tuple(images.shape) in mode.shapes) == computes_input_term


def test_backend_torch_is_f_conv2d_and_bad_geometry_is_refused():
    x, weight, bias = inputs()
    y = conv2d(x.requires_grad_(), weight, bias, padding=1, backend="torch")
    assert y.grad_fn.name() == F.conv2d(x, weight, bias, padding=1).grad_fn.name()
    assert conv2d(x, weight, bias, padding=1).grad_fn.name().startswith("Conv2d")
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        conv2d(x, weight, bias, stride=(1, 1, 1))
    torch.testing.assert_close(conv2d(x, weight, bias, padding="same"), F.conv2d(x, weight, bias, padding="same"))


def test_the_backbone_conv_keeps_nn_conv2d_padding_modes_and_state_dict():
    from bmssl.models import Conv2d
    torch.manual_seed(0)
    for mode in ("zeros", "reflect"):
        ours, theirs = Conv2d(3, 4, 3, padding=1, padding_mode=mode), torch.nn.Conv2d(3, 4, 3, padding=1,
                                                                                      padding_mode=mode)
        theirs.load_state_dict(ours.state_dict())  # the same parameters, by the same names
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(ours(x), theirs(x))


def test_forward_mode_matches_f_conv2d():
    """jvp, jacfwd and hessian (forward over reverse: the jvp of the backward) as F.conv2d
    gives them; this op and its backward op once raised NotImplementedError (they had no jvp)."""
    x, weight, bias = (t.requires_grad_() for t in inputs())
    fn = lambda x, weight, bias: conv2d(x, weight, bias, stride=2, padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias), check_forward_ad=True, check_backward_ad=False)
    x, weight, bias = (t.detach() for t in (x, weight, bias))
    for argnums in (0, 1, 2, (0, 1)):
        hessians = [torch.func.hessian(lambda *a: conv(*a, padding=1).tanh().square().sum(), argnums)(x, weight, bias)
                    for conv in (conv2d, F.conv2d)]
        torch.testing.assert_close(hessians[0], hessians[1])


def test_unbatched_input_matches_f_conv2d():
    """[C, H, W], as F.conv2d takes it; the backward once asked aten for a 4-D input."""
    x, weight, bias = inputs()
    results = []
    for conv in (conv2d, F.conv2d):
        leaves = [t.clone().requires_grad_() for t in (x[0], weight, bias)]
        outer = inner_loop_gradient(conv, *leaves, dict(padding=1))
        results.append((conv(*leaves, padding=1), *torch.autograd.grad(outer, leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_inside_torch_compile_the_meta_gradient_is_f_conv2d_s():
    """dynamo traces an autograd.Function's backward but drops its double backward: under
    torch.compile(backend="eager") the inner gradient came back without a graph, so the
    outer gradient silently lost its second-order term (76 off here). Inside compile the op
    is F.conv2d."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)

    def outer(x):
        (grad,) = torch.autograd.grad(conv2d(x, weight, None, 1, 1).tanh().square().sum(), weight, create_graph=True)
        return grad.sin().sum() + weight.square().sum()

    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(outer, backend="eager")(x), weight)[0]
    torch.testing.assert_close(compiled, torch.autograd.grad(outer(x), weight)[0])


def test_autocast_casts_fp16_inputs_as_f_conv2d_does():
    """A bf16 autocast casts every floating input but fp64 to bf16, fp16 included (fp32 only
    was cast: fp16 x with fp32 weights failed, fp16 inputs stayed fp16)."""
    x, weight, bias = (t.float() for t in inputs())
    for dtypes in ((torch.float16,) * 3, (torch.float16, torch.float32, torch.float32)):
        args = [t.to(d) for t, d in zip((x, weight, bias), dtypes)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = conv2d(*args, padding=1), F.conv2d(*args, padding=1)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)


def test_geometry_is_read_as_f_conv2d_reads_it():
    x, weight, bias = inputs()
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(conv2d(x, weight, bias, stride=(2,), padding=[1], dilation=np.int64(1)),
                               F.conv2d(x, weight, bias, stride=2, padding=1))
    with pytest.raises(ValueError, match="groups must be an int"):
        conv2d(x, weight, bias, groups=2.0)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        conv2d(x, weight, bias, stride=True)

@pytest.mark.gpu
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_derivatives_match_f_conv2d_on_cuda(input_needs_grad):
    """auto runs this op on CUDA too (cuDNN through aten): the same second derivative there."""
    results = []
    for conv in (conv2d, F.conv2d):
        x, weight, bias = (t.cuda() for t in inputs())
        x.requires_grad_(input_needs_grad), weight.requires_grad_(), bias.requires_grad_()
        outer = inner_loop_gradient(conv, x, weight, bias, dict(padding=1))
        results.append(torch.autograd.grad(outer, [t for t in (x, weight, bias) if t.requires_grad]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
