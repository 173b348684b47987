// C++ tests of three bmssl ops (kl_bootstrap_rows and its backward, ntxent_forward,
// sgd_unroll_step), called through the dispatcher as any C++ user would. Expected values come
// from ATen ops in fp64 (log_softmax, logsumexp, matmul). Exit status 0: every check passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++failures;
}

auto kl_rows() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("bmssl::kl_bootstrap_rows", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>();
}

auto kl_rows_backward() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("bmssl::kl_bootstrap_rows_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
}

void test_forward_and_backward(at::ScalarType dtype, double tolerance, const char* name) {
  at::manual_seed(0);
  const double t = 0.7;
  at::Tensor student = (at::randn({37, 11}) * 3).to(dtype);
  at::Tensor target = (at::randn({37, 11}) * 3).to(dtype);
  auto [row_kl, row_lse] = kl_rows().call(student, target, t);
  at::Tensor log_p = at::log_softmax(student.to(at::kDouble) / t, 1);
  at::Tensor log_q = at::log_softmax(target.to(at::kDouble) / t, 1);
  at::Tensor expected = (log_q.exp() * (log_q - log_p)).sum(1);
  check(at::allclose(row_kl.to(at::kDouble), expected, tolerance, tolerance), name);

  at::Tensor grad_rows = at::randn({37}, at::kDouble);
  at::Tensor grad = kl_rows_backward().call(grad_rows.to(row_kl.scalar_type()), student, target, row_lse, t);
  at::Tensor expected_grad = grad_rows.unsqueeze(1) * (log_p.exp() - log_q.exp()) / t;
  check(grad.scalar_type() == dtype, "backward keeps the input dtype");
  check(at::allclose(grad.to(at::kDouble), expected_grad, tolerance, tolerance), name);
}

void test_zero_probability_target() {
  at::manual_seed(1);
  at::Tensor student = at::randn({4, 5}, at::kDouble);
  at::Tensor target = at::randn({4, 5}, at::kDouble);
  target.index_put_({0, 1}, -std::numeric_limits<double>::infinity());
  auto [row_kl, row_lse] = kl_rows().call(student, target, 1.0);
  check(at::isfinite(row_kl).all().item<bool>(), "a -inf target logit gives a finite KL");
  // KL = sum_j q_j (log q_j - log p_j) over the columns with q_j > 0 (0 log 0 = 0)
  at::Tensor log_p = at::log_softmax(student, 1), log_q = at::log_softmax(target, 1);
  at::Tensor terms = at::where(log_q.isinf(), at::zeros_like(log_q), log_q.exp() * (log_q - log_p));
  check(at::allclose(row_kl, terms.sum(1), 1e-12, 1e-12), "a -inf target logit counts as probability 0");
}

auto ntxent_forward() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("bmssl::ntxent_forward", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
}

// loss_i = logsumexp_{j != i} s_ij - logsumexp_{j in P(i)} s_ij ("in"), s = u u^T / tau, averaged per task
void test_ntxent_forward() {
  at::manual_seed(2);
  const int64_t batch = 10;
  const double inv_tau = 1.0 / 0.3;
  at::Tensor z = at::randn({1, batch, 6}, at::kDouble);
  at::Tensor u = z / z.norm(2, -1, true);
  at::Tensor labels = at::arange(batch / 2, at::kLong).repeat({2}).unsqueeze(0);  // pairs (j, j + B/2)
  auto [task_loss, stats] = ntxent_forward().call(u, labels, inv_tau, "in");
  at::Tensor s = at::matmul(u[0], u[0].t()) * inv_tau;
  at::Tensor self = at::eye(batch, at::kDouble).to(at::kBool);
  at::Tensor positive = labels[0].unsqueeze(0).eq(labels[0].unsqueeze(1)).logical_and(self.logical_not());
  const double minus_inf = -std::numeric_limits<double>::infinity();
  at::Tensor lse_all = at::logsumexp(s.masked_fill(self, minus_inf), 1);
  at::Tensor lse_pos = at::logsumexp(s.masked_fill(positive.logical_not(), minus_inf), 1);
  check(at::allclose(task_loss, (lse_all - lse_pos).mean().unsqueeze(0), 1e-12, 1e-12),
        "ntxent_forward fp64 matches logsumexp over the masked similarities");
  check(at::allclose(stats[0][0], lse_all, 1e-12, 1e-12), "ntxent_forward returns each row's logsumexp");
}

auto sgd_step() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("bmssl::sgd_unroll_step", "")
      .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>();
}

void test_sgd_unroll_step() {
  at::manual_seed(3);
  std::vector<at::Tensor> params{at::randn({3, 4}), at::randn({7})}, grads{at::randn({3, 4}), at::randn({7})};
  std::vector<at::Tensor> out = sgd_step().call(params, grads, 0.25);
  bool ok = out.size() == 2;
  for (size_t k = 0; ok && k < out.size(); ++k)
    ok = out[k].sizes() == params[k].sizes() && at::equal(out[k], params[k] - 0.25 * grads[k]);
  check(ok, "sgd_unroll_step gives p - lr g for every tensor (fp32, bit for bit)");
}

void test_bad_shape_throws() {
  bool threw = false;
  try {
    kl_rows().call(at::randn({3, 4}), at::randn({3, 5}), 1.0);
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "mismatched shapes raise c10::Error");
}

}  // namespace

int main() {
  test_forward_and_backward(at::kDouble, 1e-10, "kl_bootstrap_rows fp64 matches log_softmax");
  test_forward_and_backward(at::kFloat, 1e-4, "kl_bootstrap_rows fp32 matches log_softmax");
  test_zero_probability_target();
  test_bad_shape_throws();
  test_ntxent_forward();
  test_sgd_unroll_step();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
