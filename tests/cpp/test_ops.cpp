// C++ tests of the bmssl ops, called through the dispatcher as any C++ user would.
// Expected values come from ATen's own log_softmax. Exit status 0 means every check passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <tuple>

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
  at::Tensor student = at::randn({4, 5}, at::kDouble);
  at::Tensor target = at::randn({4, 5}, at::kDouble);
  target.index_put_({0, 1}, -std::numeric_limits<double>::infinity());
  auto [row_kl, row_lse] = kl_rows().call(student, target, 1.0);
  check(at::isfinite(row_kl).all().item<bool>(), "a -inf target logit gives a finite KL");
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
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
