#include "difftrain/euler_ancestral.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include "difftrain/scalar_ops.h"

namespace difftrain {

using scalar_ops::aten_pow;

namespace {
// np.interp(x, arange(T), fp) for one x, in float64 as numpy computes it.
double interp(double x, const std::vector<float>& fp) {
  const auto T = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp.front();
  if (x >= static_cast<double>(T - 1)) return fp.back();
  const auto j = static_cast<int64_t>(std::floor(x));
  const double xj = static_cast<double>(j), yj = fp[static_cast<size_t>(j)];
  if (xj == x) return yj;
  const double slope = (static_cast<double>(fp[static_cast<size_t>(j + 1)]) - yj) / 1.0;  // (dy[j+1] - dy[j]) / (dx[j+1] - dx[j])
  return slope * (x - xj) + yj;
}
}  // namespace

EulerAncestralDiscreteScheduler::EulerAncestralDiscreteScheduler(const SchedulerConfig& cfg) : cfg_(cfg) {
  const auto table = vp_sigmas(sigma_alphas_cumprod(cfg, NoiseSchedule(cfg).alphas_cumprod())).contiguous();  // (T) float32
  table_.assign(table.data_ptr<float>(), table.data_ptr<float>() + table.numel());
}

void EulerAncestralDiscreteScheduler::set_timesteps(int64_t n) {
  const int64_t T = cfg_.num_train_timesteps;
  TORCH_CHECK(n >= 1 && n <= T, "num_inference_steps must be in [1, ", T, "], got ", n);
  timesteps_.clear();
  if (cfg_.timestep_spacing == TimestepSpacing::linspace) {
    // np.linspace(0, T-1, n, dtype=float32)[::-1]: float64 i (T-1)/(n-1), the end exact, then float32.
    const double step = n > 1 ? static_cast<double>(T - 1) / static_cast<double>(n - 1) : 0.0;
    for (int64_t i = n - 1; i >= 0; --i)
      timesteps_.push_back(static_cast<float>(i == n - 1 && n > 1 ? static_cast<double>(T - 1) : static_cast<double>(i) * step));
  } else {  // "leading" and "trailing" as DDPMScheduler lays them out, as floats
    for (const int64_t t : inference_timesteps(cfg_, n)) timesteps_.push_back(static_cast<float>(t));
  }
  sigmas_.clear();
  for (const float t : timesteps_) sigmas_.push_back(static_cast<float>(interp(t, table_)));
  sigmas_.push_back(0.0f);
  step_index_ = -1;
}

float EulerAncestralDiscreteScheduler::init_noise_sigma() const {
  TORCH_CHECK(!sigmas_.empty(), "EulerAncestralDiscreteScheduler: call set_timesteps() first");
  const float sigma_max = *std::max_element(sigmas_.begin(), sigmas_.end());
  if (cfg_.timestep_spacing == TimestepSpacing::linspace || cfg_.timestep_spacing == TimestepSpacing::trailing)
    return sigma_max;
  return aten_pow(sigma_max * sigma_max + 1.0f, 0.5);
}

int64_t EulerAncestralDiscreteScheduler::index_for_timestep(float timestep) const {
  std::vector<int64_t> matches;
  for (size_t i = 0; i < timesteps_.size(); ++i)
    if (timesteps_[i] == timestep) matches.push_back(static_cast<int64_t>(i));
  TORCH_CHECK(!matches.empty(), "EulerAncestralDiscreteScheduler: timestep ", timestep, " is not one of the timesteps");
  return matches.size() > 1 ? matches[1] : matches[0];
}

at::Tensor EulerAncestralDiscreteScheduler::scale_model_input(const at::Tensor& sample, float timestep) {
  TORCH_CHECK(!timesteps_.empty(), "EulerAncestralDiscreteScheduler: call set_timesteps() first");
  if (step_index_ < 0) step_index_ = index_for_timestep(timestep);
  const float sigma = sigmas_[static_cast<size_t>(step_index_)];
  return sample / aten_pow(sigma * sigma + 1.0f, 0.5);  // x_t = x / √(σ² + 1)
}

SchedulerOutput EulerAncestralDiscreteScheduler::step(const at::Tensor& model_output, float timestep, const at::Tensor& sample,
                                                      std::optional<at::Generator> generator) {
  TORCH_CHECK(!timesteps_.empty(), "EulerAncestralDiscreteScheduler: call set_timesteps() first");
  if (step_index_ < 0) step_index_ = index_for_timestep(timestep);
  const auto i = static_cast<size_t>(step_index_);
  const float sigma = sigmas_[i];
  const auto x = sample.to(at::kFloat);  // "Upcast to avoid precision issues when computing prev_sample"

  // 1. x̂₀ from the σ-scaled model output
  at::Tensor pred_original_sample;
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon: pred_original_sample = x - sigma * model_output; break;
    case PredictionType::v_prediction:  // c_out = -σ/√(σ²+1), c_skip = 1/(σ²+1)
      pred_original_sample = model_output * (-sigma / aten_pow(sigma * sigma + 1.0f, 0.5)) + x / (sigma * sigma + 1.0f);
      break;
    case PredictionType::sample: pred_original_sample = model_output; break;
  }

  // σ_up = √(σ_to² (σ_from² - σ_to²) / σ_from²), σ_down = √(σ_to² - σ_up²)
  const float sigma_from = sigmas_[i], sigma_to = sigmas_[i + 1];
  const float sigma_up =
      aten_pow(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from), 0.5);
  const float sigma_down = aten_pow(sigma_to * sigma_to - sigma_up * sigma_up, 0.5);

  // 2. the ODE derivative d = (x - x̂₀)/σ (Karras et al. eq. 6) and an Euler step to σ_down
  const auto derivative = (x - pred_original_sample) / sigma;
  const float dt = sigma_down - sigma;
  auto prev_sample = x + derivative * dt;

  // 3. fresh noise of σ_up, drawn on the generator's device (also at the last step, where σ_up = 0)
  const auto draw_device = generator ? generator->device() : model_output.device();
  const auto noise = at::randn(model_output.sizes(), generator, model_output.options().device(draw_device)).to(model_output.device());
  prev_sample = prev_sample + noise * sigma_up;
  ++step_index_;
  return {prev_sample.to(model_output.scalar_type()), pred_original_sample};
}

}  // namespace difftrain
