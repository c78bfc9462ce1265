#include "difftrain/multistep.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/einsum.h>
#include <ATen/ops/linalg_solve.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>

#include "difftrain/scalar_ops.h"

namespace difftrain {

using scalar_ops::aten_exp;
using scalar_ops::aten_expm1;
using scalar_ops::aten_log;
using scalar_ops::aten_pow;

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t n) {
  constexpr double rho = 7.0;  // "7.0 is the value used in the paper"
  const double min_inv_rho = std::pow(sigma_min, 1 / rho), max_inv_rho = std::pow(sigma_max, 1 / rho);
  std::vector<double> sigmas(static_cast<size_t>(n));
  const double step = n > 1 ? 1.0 / static_cast<double>(n - 1) : 0.0;  // np.linspace(0, 1, n)
  for (int64_t i = 0; i < n; ++i) {
    const double ramp = i == n - 1 && n > 1 ? 1.0 : static_cast<double>(i) * step;
    // σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ  (Karras et al. 2022, eq. 5)
    sigmas[static_cast<size_t>(i)] = std::pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho);
  }
  return sigmas;
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  // low_idx = cumsum(log_sigma - log_sigmas >= 0).argmax(), clipped to T - 2: the last table
  // entry at or below log σ (the first of equal cumulative counts), or 0.
  const auto T = static_cast<int64_t>(log_sigmas.size());
  int64_t low_idx = 0, count = 0, best = -1;
  for (int64_t i = 0; i < T; ++i) {
    count += log_sigma - static_cast<double>(log_sigmas[static_cast<size_t>(i)]) >= 0 ? 1 : 0;
    if (count > best) best = count, low_idx = i;
  }
  low_idx = std::min(low_idx, T - 2);
  const double low = log_sigmas[static_cast<size_t>(low_idx)], high = log_sigmas[static_cast<size_t>(low_idx + 1)];
  const double w = std::clamp((low - log_sigma) / (low - high), 0.0, 1.0);  // interpolate in log σ
  return (1 - w) * static_cast<double>(low_idx) + w * static_cast<double>(low_idx + 1);
}

// ---------------------------------------------------------------------------------------------

MultistepScheduler::MultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order, bool use_karras_sigmas,
                                       bool round_karras_timesteps)
    : cfg_(cfg), solver_order_(solver_order), use_karras_sigmas_(use_karras_sigmas), round_karras_timesteps_(round_karras_timesteps) {
  TORCH_CHECK(solver_order >= 1 && solver_order <= 3, "solver_order must be 1, 2 or 3, got ", solver_order);
  alphas_cumprod_ = sigma_alphas_cumprod(cfg, NoiseSchedule(cfg).alphas_cumprod());
  const auto table = vp_sigmas(alphas_cumprod_).contiguous();  // (T) float32
  table_.assign(table.data_ptr<float>(), table.data_ptr<float>() + table.numel());
  const auto log_table = table.log().contiguous();  // np.log of the float32 table: float32
  log_sigmas_.assign(log_table.data_ptr<float>(), log_table.data_ptr<float>() + log_table.numel());
  model_outputs_.resize(static_cast<size_t>(solver_order));
}

void MultistepScheduler::set_timesteps(int64_t num_inference_steps) {
  timesteps_ = multistep_inference_timesteps(cfg_, num_inference_steps);
  sigmas_.clear();
  if (use_karras_sigmas_) {
    const auto karras = karras_sigmas(table_.front(), table_.back(), num_inference_steps);
    timesteps_.clear();
    for (const double s : karras) {
      const double t = sigma_to_t(s, log_sigmas_);  // unrounded, the cast to int64 truncates
      timesteps_.push_back(static_cast<int64_t>(round_karras_timesteps_ ? std::nearbyint(t) : t));
      sigmas_.push_back(static_cast<float>(s));
    }
  } else {
    // np.interp at the integer timesteps is the table entry itself (the last one beyond the end).
    const auto T = static_cast<int64_t>(table_.size());
    for (const int64_t t : timesteps_) sigmas_.push_back(table_[static_cast<size_t>(std::clamp<int64_t>(t, 0, T - 1))]);
  }
  sigmas_.push_back(0.0f);  // final_sigmas_type = "zero": the last step lands on x₀
  step_index_ = -1;
  std::fill(model_outputs_.begin(), model_outputs_.end(), at::Tensor());
  lower_order_nums_ = 0;
  last_sample_ = at::Tensor();
  this_order_ = 0;
}

int64_t MultistepScheduler::index_for_timestep(int64_t timestep) const {
  std::vector<int64_t> matches;
  for (size_t i = 0; i < timesteps_.size(); ++i)
    if (timesteps_[i] == timestep) matches.push_back(static_cast<int64_t>(i));
  if (matches.empty()) return static_cast<int64_t>(timesteps_.size()) - 1;
  return matches.size() > 1 ? matches[1] : matches[0];
}

void MultistepScheduler::init_step_index(int64_t timestep) {
  TORCH_CHECK(!timesteps_.empty(), "call set_timesteps() before step()");
  step_index_ = index_for_timestep(timestep);
}

MultistepScheduler::AlphaSigma MultistepScheduler::sigma_to_alpha_sigma_t(float sigma) {
  // α_t = 1 / (σ² + 1) ** 0.5, σ_t = σ α_t
  const float alpha = 1.0f / aten_pow(sigma * sigma + 1.0f, 0.5);
  return {alpha, sigma * alpha};
}

float MultistepScheduler::lambda(const AlphaSigma& as) { return aten_log(as.alpha) - aten_log(as.sigma); }

at::Tensor MultistepScheduler::convert_model_output(const at::Tensor& model_output, const at::Tensor& sample) const {
  const AlphaSigma s = sigma_to_alpha_sigma_t(sigmas_[static_cast<size_t>(step_index_)]);
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon: return (sample - s.sigma * model_output) / s.alpha;
    case PredictionType::sample: return model_output;
    case PredictionType::v_prediction: return s.alpha * sample - s.sigma * model_output;
  }
  TORCH_CHECK(false, "unknown prediction type");
}

// ---------------------------------------------------------------------------------------------
// DPM-Solver++ (data prediction). Every scalar as diffusers takes it, in float32.

DPMSolverMultistepScheduler::DPMSolverMultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order,
                                                         bool use_karras_sigmas)
    // DPM-Solver rounds the timesteps of Karras σ except for squaredcos_cap_v2 (truncates them).
    : MultistepScheduler(cfg, solver_order, use_karras_sigmas, cfg.beta_schedule != BetaSchedule::squaredcos_cap_v2) {}

at::Tensor DPMSolverMultistepScheduler::dpm_solver_first_order_update(const at::Tensor& model_output,
                                                                      const at::Tensor& sample) const {
  const auto i = static_cast<size_t>(step_index_);
  const AlphaSigma t = sigma_to_alpha_sigma_t(sigmas_[i + 1]), s = sigma_to_alpha_sigma_t(sigmas_[i]);
  const float h = lambda(t) - lambda(s);
  return (t.sigma / s.sigma) * sample - (t.alpha * (aten_exp(-h) - 1.0f)) * model_output;
}

at::Tensor DPMSolverMultistepScheduler::multistep_dpm_solver_second_order_update(
    const std::vector<at::Tensor>& model_output_list, const at::Tensor& sample) const {
  const auto i = static_cast<size_t>(step_index_);
  const AlphaSigma t = sigma_to_alpha_sigma_t(sigmas_[i + 1]), s0 = sigma_to_alpha_sigma_t(sigmas_[i]),
                   s1 = sigma_to_alpha_sigma_t(sigmas_[i - 1]);
  const float lambda_t = lambda(t), lambda_s0 = lambda(s0), lambda_s1 = lambda(s1);
  const auto& m0 = model_output_list.end()[-1];
  const auto& m1 = model_output_list.end()[-2];
  const float h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1;
  const float r0 = h_0 / h;
  const auto& D0 = m0;
  const auto D1 = (1.0f / r0) * (m0 - m1);
  const float c = t.alpha * (aten_exp(-h) - 1.0f);
  return (t.sigma / s0.sigma) * sample - c * D0 - (0.5f * c) * D1;  // midpoint: D0 + ½ D1
}

at::Tensor DPMSolverMultistepScheduler::multistep_dpm_solver_third_order_update(
    const std::vector<at::Tensor>& model_output_list, const at::Tensor& sample) const {
  const auto i = static_cast<size_t>(step_index_);
  const AlphaSigma t = sigma_to_alpha_sigma_t(sigmas_[i + 1]), s0 = sigma_to_alpha_sigma_t(sigmas_[i]),
                   s1 = sigma_to_alpha_sigma_t(sigmas_[i - 1]), s2 = sigma_to_alpha_sigma_t(sigmas_[i - 2]);
  const float lambda_t = lambda(t), lambda_s0 = lambda(s0), lambda_s1 = lambda(s1), lambda_s2 = lambda(s2);
  const auto& m0 = model_output_list.end()[-1];
  const auto& m1 = model_output_list.end()[-2];
  const auto& m2 = model_output_list.end()[-3];
  const float h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2;
  const float r0 = h_0 / h, r1 = h_1 / h;
  const auto& D0 = m0;
  const auto D1_0 = (1.0f / r0) * (m0 - m1), D1_1 = (1.0f / r1) * (m1 - m2);
  const auto D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1);
  const auto D2 = (1.0f / (r0 + r1)) * (D1_0 - D1_1);
  const float e = aten_exp(-h) - 1.0f;  // e^{-h} - 1
  return (t.sigma / s0.sigma) * sample - (t.alpha * e) * D0 + (t.alpha * (e / h + 1.0f)) * D1 -
         (t.alpha * ((e + h) / (h * h) - 0.5f)) * D2;
}

SchedulerOutput DPMSolverMultistepScheduler::step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                                                  std::optional<at::Generator> /*generator*/) {
  TORCH_CHECK(!timesteps_.empty(), "DPMSolverMultistepScheduler: call set_timesteps() before step()");
  if (step_index_ < 0) init_step_index(timestep);
  const auto n = static_cast<int64_t>(timesteps_.size());
  // Lower orders at the end, "for numerical stability for small number of steps": the last step
  // is first order (its σ is 0), the one before second order when n < 15.
  const bool lower_order_final = step_index_ == n - 1;
  const bool lower_order_second = step_index_ == n - 2 && n < 15;

  const auto x0 = convert_model_output(model_output, sample);
  std::rotate(model_outputs_.begin(), model_outputs_.begin() + 1, model_outputs_.end());
  model_outputs_.back() = x0;

  const auto sample32 = sample.to(at::kFloat);  // "Upcast to avoid precision issues when computing prev_sample"
  at::Tensor prev_sample;
  if (solver_order_ == 1 || lower_order_nums_ < 1 || lower_order_final)
    prev_sample = dpm_solver_first_order_update(x0, sample32);
  else if (solver_order_ == 2 || lower_order_nums_ < 2 || lower_order_second)
    prev_sample = multistep_dpm_solver_second_order_update(model_outputs_, sample32);
  else
    prev_sample = multistep_dpm_solver_third_order_update(model_outputs_, sample32);
  if (lower_order_nums_ < solver_order_) ++lower_order_nums_;
  ++step_index_;
  return {prev_sample.to(model_output.scalar_type()), x0};
}

// ---------------------------------------------------------------------------------------------
// UniPC, bh2, data prediction.

namespace {
// Shared by UniP and UniC: h, r_k, D1_k = (m_k - m0)/r_k, h φ₁(h) = e^{hh} - 1 with hh = -h, B(h)
// and the right-hand side b of Zhao et al.'s R_p ρ = φ_p(h)/B(h) (Algorithm 1; φ_{k+1} by the
// recurrence φ_{k+1}(h) = (φ_k(h) - 1/k!)/h).
struct UniTerms {
  float alpha_t = 0, sigma_ratio = 0, h_phi_1 = 0, B_h = 0;
  std::vector<float> rks;  // r_1 .. r_{p-1}, then 1
  std::vector<float> b;    // p entries
  std::vector<at::Tensor> D1s;
};

// From the step's (α_t, σ_t), σ_s0, the λ of t, s0 and the older steps s_k, and their x̂₀ m_k.
UniTerms uni_terms(float alpha_t, float sigma_t, float sigma_s0, float lambda_t, float lambda_s0,
                   const std::vector<float>& lambda_si, const std::vector<at::Tensor>& m_i, const at::Tensor& m0,
                   int64_t order) {
  UniTerms u;
  u.alpha_t = alpha_t;
  u.sigma_ratio = sigma_t / sigma_s0;
  const float h = lambda_t - lambda_s0;
  for (size_t k = 0; k < lambda_si.size(); ++k) {
    const float rk = (lambda_si[k] - lambda_s0) / h;
    u.rks.push_back(rk);
    u.D1s.push_back((m_i[k] - m0) / rk);
  }
  u.rks.push_back(1.0f);
  const float hh = -h;  // predict_x0
  u.h_phi_1 = aten_expm1(hh);  // h φ₁(h) = e^h - 1
  float h_phi_k = u.h_phi_1 / hh - 1.0f;
  int64_t factorial_i = 1;
  u.B_h = aten_expm1(hh);  // bh2: B(h) = e^h - 1
  for (int64_t i = 1; i <= order; ++i) {
    u.b.push_back(h_phi_k * static_cast<float>(factorial_i) / u.B_h);
    factorial_i *= i + 1;
    h_phi_k = h_phi_k / hh - static_cast<float>(1.0 / static_cast<double>(factorial_i));
  }
  return u;
}

// R_p = (r_k^{i-1})_{i,k} (p × p) from the rks, float32 on the CPU, as diffusers stacks it.
at::Tensor uni_R(const std::vector<float>& rks) {
  const auto r = at::tensor(rks, at::TensorOptions().dtype(at::kFloat));
  std::vector<at::Tensor> rows;
  for (size_t i = 1; i <= rks.size(); ++i) rows.push_back(at::pow(r, static_cast<int64_t>(i - 1)));
  return at::stack(rows);
}

// Σ_k ρ_k D1_k, as diffusers' einsum("k,bkc...->bc...") sums it.
at::Tensor weighted_sum(const at::Tensor& rhos, const std::vector<at::Tensor>& D1s) {
  const auto D1 = at::stack(D1s, /*dim=*/1);  // (B, K, C, H, W)
  return at::einsum("k,bkc...->bc...", {rhos.to(D1.device()).to(D1.scalar_type()), D1});
}
}  // namespace

UniPCMultistepScheduler::UniPCMultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order, bool use_karras_sigmas)
    : MultistepScheduler(cfg, solver_order, use_karras_sigmas, /*round_karras_timesteps=*/true) {}

at::Tensor UniPCMultistepScheduler::multistep_uni_p_bh_update(const at::Tensor& sample, int64_t order) const {
  const auto i = static_cast<size_t>(step_index_);
  const auto& m0 = model_outputs_.end()[-1];
  const AlphaSigma t = sigma_to_alpha_sigma_t(sigmas_[i + 1]), s0 = sigma_to_alpha_sigma_t(sigmas_[i]);
  std::vector<float> lambda_si;
  std::vector<at::Tensor> m_i;
  for (int64_t k = 1; k < order; ++k) {  // the k-th older step
    lambda_si.push_back(lambda(sigma_to_alpha_sigma_t(sigmas_[i - static_cast<size_t>(k)])));
    m_i.push_back(model_outputs_.end()[-(k + 1)]);
  }
  const UniTerms u = uni_terms(t.alpha, t.sigma, s0.sigma, lambda(t), lambda(s0), lambda_si, m_i, m0, order);
  const auto x_t_ = u.sigma_ratio * sample - (u.alpha_t * u.h_phi_1) * m0;
  if (u.D1s.empty()) return x_t_.to(sample.scalar_type());
  // ρ = ½ for p = 2 ("a simplified version"), else R_{p-1} ρ = b_{1..p-1}.
  const auto rhos_p = order == 2 ? at::tensor({0.5f}, at::TensorOptions().dtype(at::kFloat))
                                 : at::linalg_solve(uni_R(u.rks).slice(0, 0, -1).slice(1, 0, -1),
                                                    at::tensor(u.b, at::TensorOptions().dtype(at::kFloat)).slice(0, 0, -1));
  const auto pred_res = weighted_sum(rhos_p, u.D1s);
  return (x_t_ - (u.alpha_t * u.B_h) * pred_res).to(sample.scalar_type());
}

at::Tensor UniPCMultistepScheduler::multistep_uni_c_bh_update(const at::Tensor& this_model_output, const at::Tensor& last_sample,
                                                              const at::Tensor& this_sample, int64_t order) const {
  const auto i = static_cast<size_t>(step_index_);
  const auto& m0 = model_outputs_.end()[-1];  // the previous step's x̂₀: the history is not shifted yet
  const AlphaSigma t = sigma_to_alpha_sigma_t(sigmas_[i]), s0 = sigma_to_alpha_sigma_t(sigmas_[i - 1]);
  std::vector<float> lambda_si;
  std::vector<at::Tensor> m_i;
  for (int64_t k = 1; k < order; ++k) {
    lambda_si.push_back(lambda(sigma_to_alpha_sigma_t(sigmas_[i - static_cast<size_t>(k + 1)])));
    m_i.push_back(model_outputs_.end()[-(k + 1)]);
  }
  const UniTerms u = uni_terms(t.alpha, t.sigma, s0.sigma, lambda(t), lambda(s0), lambda_si, m_i, m0, order);
  // ρ = ½ for p = 1, else R_p ρ = b.
  const auto rhos_c = order == 1 ? at::tensor({0.5f}, at::TensorOptions().dtype(at::kFloat))
                                 : at::linalg_solve(uni_R(u.rks), at::tensor(u.b, at::TensorOptions().dtype(at::kFloat)));
  const auto x_t_ = u.sigma_ratio * last_sample - (u.alpha_t * u.h_phi_1) * m0;
  const auto D1_t = this_model_output - m0;
  const float rho_t = rhos_c[-1].item<float>();  // a CPU tensor: no device sync
  auto res = rho_t * D1_t;
  if (!u.D1s.empty()) res = weighted_sum(rhos_c.slice(0, 0, -1), u.D1s) + res;
  return (x_t_ - (u.alpha_t * u.B_h) * res).to(last_sample.scalar_type());
}

SchedulerOutput UniPCMultistepScheduler::step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                                              std::optional<at::Generator> /*generator*/) {
  TORCH_CHECK(!timesteps_.empty(), "UniPCMultistepScheduler: call set_timesteps() before step()");
  if (step_index_ < 0) init_step_index(timestep);
  const auto n = static_cast<int64_t>(timesteps_.size());
  const bool use_corrector = step_index_ > 0 && last_sample_.defined();

  const auto x0 = convert_model_output(model_output, sample);
  at::Tensor corrected = sample;
  if (use_corrector) corrected = multistep_uni_c_bh_update(x0, last_sample_, sample, this_order_);
  std::rotate(model_outputs_.begin(), model_outputs_.begin() + 1, model_outputs_.end());
  model_outputs_.back() = x0;

  // lower_order_final: no higher order than the steps left; warm-up: than the history holds.
  this_order_ = std::min({solver_order_, n - step_index_, lower_order_nums_ + 1});
  last_sample_ = corrected;
  const auto prev_sample = multistep_uni_p_bh_update(corrected, this_order_);
  if (lower_order_nums_ < solver_order_) ++lower_order_nums_;
  ++step_index_;
  return {prev_sample, x0};
}

}  // namespace difftrain
