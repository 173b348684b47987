// Schema of the fused GroupNorm (+ ReLU) (+ 2x2 max-pool) block of the Conv4 backbone, with
// its backward and double backward (the inner loop differentiates it twice).
//
//   x [T, N, C, H, W], weight / bias [T, C] (T tasks, each with its own affine), G groups of
//   C/G channels; a group S = (t, n, g) holds m = C/G * H * W values.
//   mean = mean_S x, rstd = (var_S x + eps)^-1/2 (biased var), xhat = (x - mean) rstd
//   a = weight_c xhat + bias_c,  y = pool(act(a))   act = relu or identity, pool = 2x2 stride-2
//   max (floor, first maximum wins) or identity.  stats [T, N, G, 2] = (mean, rstd), fp32 (fp64
//   for fp64 x).
//
// Backward, given grad_y: da = grad_y routed to each window's argmax, times [a > 0] for relu
// (the pool and the mask are piecewise constant). With h = weight_c da and means over S:
//   grad_x = rstd (h - mean h - xhat mean(h xhat)),  grad_weight_c = sum da xhat,
//   grad_bias_c = sum da   (the sums over every n and pixel of channel c of task t).
// Double backward, given (u, p, q), the gradients arriving at (grad_x, grad_weight, grad_bias),
// with P(u) = u - mean u - xhat mean(u xhat) and, per group,
//   Phi_r = sum u h - sum h sum u / m - sum h xhat sum u xhat / m,
//   G = -(rstd/m) (h sum u xhat + u sum h xhat) + p_c da:
//   d grad_y = route^T(weight_c rstd P(u) + p_c xhat + q_c),   d weight_c = sum da rstd P(u),
//   d x = rstd (G - mean G - xhat mean(G xhat)) - (rstd^2/m) Phi_r xhat.
// bias reaches the backward only through the piecewise-constant mask: no gradient.
// Kernels: csrc/cpu/group_norm.cpp. Twin: bmssl/reference/group_norm.py (F.group_norm, relu,
// max_pool2d).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bmssl, m) {
  m.def(
      "group_norm_forward(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool relu, "
      "bool pool) -> (Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor stats, "
      "int groups, bool relu, bool pool) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_double_backward(Tensor grad_grad_x, Tensor grad_grad_weight, Tensor grad_grad_bias, "
      "Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor stats, int groups, bool relu, "
      "bool pool) -> (Tensor, Tensor, Tensor)");
}
