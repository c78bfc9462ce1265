#include "difftrain/scheduler.h"

#include <algorithm>
#include <cmath>
#include <iterator>

#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cumprod.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>

namespace difftrain {

SchedulerConfig SchedulerConfig::from(const DiffusionConfig& d) {
  SchedulerConfig c;
  c.num_train_timesteps = d.num_train_timesteps;
  c.beta_start = d.beta_start;
  c.beta_end = d.beta_end;
  c.beta_schedule = d.beta_schedule;
  c.prediction_type = d.prediction_type;
  c.variance_type = d.variance_type;
  c.clip_sample = d.clip_sample;
  c.clip_sample_range = d.clip_sample_range;
  c.timestep_spacing = d.timestep_spacing;
  c.steps_offset = d.steps_offset;
  c.rescale_betas_zero_snr = d.rescale_betas_zero_snr;
  return c;
}

at::Tensor make_betas(const SchedulerConfig& cfg) {
  const int64_t T = cfg.num_train_timesteps;
  TORCH_CHECK(T >= 1, "num_train_timesteps must be >= 1, got ", T);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor betas;
  switch (cfg.beta_schedule) {
    case BetaSchedule::linear:
      betas = at::linspace(cfg.beta_start, cfg.beta_end, T, f32);
      break;
    case BetaSchedule::scaled_linear:  // linear in √β (latent diffusion)
      betas = at::linspace(std::pow(cfg.beta_start, 0.5), std::pow(cfg.beta_end, 0.5), T, f32).pow(2);
      break;
    case BetaSchedule::squaredcos_cap_v2: {
      // Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008,
      // β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), 0.999); in float64, then float32, as diffusers does.
      auto alpha_bar = [](double t) {
        const double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
        return c * c;
      };
      std::vector<float> b(static_cast<size_t>(T));
      for (int64_t i = 0; i < T; ++i) {
        const double t1 = static_cast<double>(i) / static_cast<double>(T), t2 = static_cast<double>(i + 1) / static_cast<double>(T);
        b[static_cast<size_t>(i)] = static_cast<float>(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
      }
      betas = at::tensor(b, f32);
      break;
    }
    case BetaSchedule::sigmoid:
      betas = at::sigmoid(at::linspace(-6, 6, T, f32)) * (cfg.beta_end - cfg.beta_start) + cfg.beta_start;
      break;
  }
  if (cfg.rescale_betas_zero_snr) betas = rescale_zero_terminal_snr(betas);
  return betas;
}

at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  const auto alphas_cumprod = at::cumprod(1 - betas, 0);
  auto sqrt_ab = alphas_cumprod.sqrt();                 // √ᾱ
  const auto sqrt_ab_0 = sqrt_ab[0].clone(), sqrt_ab_T = sqrt_ab[-1].clone();
  sqrt_ab = (sqrt_ab - sqrt_ab_T) * (sqrt_ab_0 / (sqrt_ab_0 - sqrt_ab_T));  // shift to 0 at T, keep √ᾱ₀
  const auto ab = sqrt_ab.pow(2);
  const auto alphas = at::cat({ab.slice(0, 0, 1), ab.slice(0, 1) / ab.slice(0, 0, -1)});
  return 1 - alphas;
}

namespace {
// diffusers' layouts of `n` descending timesteps (no range check: the multistep layout asks for n + 1).
std::vector<int64_t> timestep_layout(const SchedulerConfig& cfg, int64_t n) {
  const int64_t T = cfg.num_train_timesteps;
  std::vector<int64_t> ts;
  switch (cfg.timestep_spacing) {
    case TimestepSpacing::linspace: {  // np.linspace(0, T-1, n).round()[::-1]
      const double step = n > 1 ? static_cast<double>(T - 1) / static_cast<double>(n - 1) : 0.0;
      for (int64_t i = n - 1; i >= 0; --i)
        ts.push_back(i == n - 1 && n > 1 ? T - 1 : static_cast<int64_t>(std::nearbyint(static_cast<double>(i) * step)));
      break;
    }
    case TimestepSpacing::leading: {  // arange(0, n) * (T // n) [::-1] + steps_offset
      const int64_t ratio = T / n;
      for (int64_t i = n - 1; i >= 0; --i) ts.push_back(i * ratio + cfg.steps_offset);
      break;
    }
    case TimestepSpacing::trailing: {  // round(arange(T, 0, -T/n)) - 1
      const double ratio = static_cast<double>(T) / static_cast<double>(n);
      const auto len = static_cast<int64_t>(std::ceil((0.0 - static_cast<double>(T)) / -ratio));
      const double delta = (static_cast<double>(T) + -ratio) - static_cast<double>(T);  // numpy arange's step
      for (int64_t i = 0; i < len; ++i)
        ts.push_back(static_cast<int64_t>(std::nearbyint(static_cast<double>(T) + static_cast<double>(i) * delta)) - 1);
      break;
    }
  }
  return ts;
}
}  // namespace

std::vector<int64_t> inference_timesteps(const SchedulerConfig& cfg, int64_t n) {
  const int64_t T = cfg.num_train_timesteps;
  TORCH_CHECK(n >= 1 && n <= T, "num_inference_steps must be in [1, ", T, "], got ", n);
  return timestep_layout(cfg, n);
}

std::vector<int64_t> multistep_inference_timesteps(const SchedulerConfig& cfg, int64_t n) {
  const int64_t T = cfg.num_train_timesteps;
  TORCH_CHECK(n >= 1 && n <= T, "num_inference_steps must be in [1, ", T, "], got ", n);
  if (cfg.timestep_spacing == TimestepSpacing::trailing) return timestep_layout(cfg, n);
  // linspace: np.linspace(0, T-1, n+1).round()[::-1][:-1]; leading: arange(0, n+1) * (T // (n+1)),
  // reversed, without the last, plus steps_offset.
  auto ts = timestep_layout(cfg, n + 1);
  ts.pop_back();
  return ts;
}

at::Tensor sigma_alphas_cumprod(const SchedulerConfig& cfg, const at::Tensor& alphas_cumprod) {
  if (!cfg.rescale_betas_zero_snr) return alphas_cumprod;
  auto acp = alphas_cumprod.clone();
  acp[-1].fill_(0x1p-24);  // "Close to 0 without being 0 so first sigma is not inf"
  return acp;
}

at::Tensor vp_sigmas(const at::Tensor& alphas_cumprod) {
  return ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5);  // ** 0.5, as diffusers writes it (not sqrt: they round differently)
}

// ---------------------------------------------------------------------------------------------

NoiseSchedule::NoiseSchedule(const SchedulerConfig& cfg) : cfg_(cfg) {
  betas_ = make_betas(cfg);
  alphas_cumprod_ = at::cumprod(1 - betas_, 0);  // ᾱ_t = Π_{s<=t} (1 - β_s)
  const float* p = alphas_cumprod_.data_ptr<float>();
  acp_.assign(p, p + alphas_cumprod_.numel());
  for (int64_t t = cfg.num_train_timesteps - 1; t >= 0; --t) timesteps_.push_back(t);
}

float NoiseSchedule::alpha_prod(int64_t t) const {
  TORCH_CHECK(t >= 0 && t < cfg_.num_train_timesteps, "timestep ", t, " outside [0, ", cfg_.num_train_timesteps, ")");
  return acp_[static_cast<size_t>(t)];
}

const at::Tensor& NoiseSchedule::table_on(const at::Device& device) const {
  if (device.is_cpu()) return alphas_cumprod_;
  if (!device_table_.defined() || device_table_.device() != device) device_table_ = alphas_cumprod_.to(device);
  return device_table_;
}

namespace {
// (B) -> (B, 1, 1, ...) to broadcast against `like`.
at::Tensor per_sample(const at::Tensor& v, const at::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = v.numel();
  return v.reshape(shape);
}
}  // namespace

at::Tensor NoiseSchedule::add_noise(const at::Tensor& original_samples, const at::Tensor& noise, const at::Tensor& timesteps) const {
  const auto ab = table_on(original_samples.device()).to(original_samples.scalar_type()).index_select(0, timesteps);  // (B)
  return per_sample(ab.pow(0.5), original_samples) * original_samples + per_sample((1 - ab).pow(0.5), original_samples) * noise;
}

at::Tensor NoiseSchedule::get_velocity(const at::Tensor& sample, const at::Tensor& noise, const at::Tensor& timesteps) const {
  const auto ab = table_on(sample.device()).to(sample.scalar_type()).index_select(0, timesteps);  // (B)
  return per_sample(ab.pow(0.5), sample) * noise - per_sample((1 - ab).pow(0.5), sample) * sample;
}

at::Tensor NoiseSchedule::snr(const at::Tensor& timesteps) const {
  const auto ab = table_on(timesteps.device()).index_select(0, timesteps);  // (B) float32
  return ab / (1 - ab);
}

at::Tensor NoiseSchedule::training_target(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const {
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon: return noise;
    case PredictionType::v_prediction: return get_velocity(x0, noise, timesteps);
    case PredictionType::sample: return x0;
  }
  TORCH_CHECK(false, "unknown prediction type");
}

at::Tensor NoiseSchedule::loss_weights(const at::Tensor& timesteps, std::optional<double> snr_gamma) const {
  const auto s = snr(timesteps);  // (B)
  if (!snr_gamma) return at::ones_like(s);
  const auto clipped = at::clamp_max(s, *snr_gamma);  // min(SNR, γ)
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon: return clipped / s;         // ε-MSE = SNR · x₀-MSE
    case PredictionType::v_prediction: return clipped / (s + 1);  // v-MSE = (SNR + 1) · x₀-MSE
    case PredictionType::sample: return clipped;
  }
  TORCH_CHECK(false, "unknown prediction type");
}

void NoiseSchedule::set_timesteps(int64_t num_inference_steps) {
  timesteps_ = inference_timesteps(cfg_, num_inference_steps);
  num_inference_steps_ = num_inference_steps;
}

int64_t NoiseSchedule::previous_timestep(int64_t t) const {
  const int64_t n = num_inference_steps_ > 0 ? num_inference_steps_ : cfg_.num_train_timesteps;
  return t - cfg_.num_train_timesteps / n;
}

// ---------------------------------------------------------------------------------------------
// DDPM. Scalars are float32, in diffusers' order, so the numbers match it.

int64_t DDPMScheduler::previous_timestep(int64_t t) const {
  if (num_inference_steps_ == 0) return t - 1;
  const auto it = std::find(timesteps_.begin(), timesteps_.end(), t);
  TORCH_CHECK(it != timesteps_.end(), "DDPMScheduler: timestep ", t, " is not one of the ", timesteps_.size(),
              " inference timesteps");
  return std::next(it) == timesteps_.end() ? -1 : *std::next(it);
}

float DDPMScheduler::get_variance(int64_t t) const {
  const int64_t prev_t = previous_timestep(t);
  const float alpha_prod_t = alpha_prod(t);
  const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
  const float current_beta_t = 1.0f - alpha_prod_t / alpha_prod_t_prev;
  // β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t  (Ho et al. eq. 7)
  float variance = std::max((1.0f - alpha_prod_t_prev) / (1.0f - alpha_prod_t) * current_beta_t, 1e-20f);
  switch (cfg_.variance_type) {
    case VarianceType::fixed_small: break;
    case VarianceType::fixed_small_log: variance = std::exp(0.5f * std::log(variance)); break;
    case VarianceType::fixed_large: variance = current_beta_t; break;
  }
  return variance;
}

SchedulerOutput DDPMScheduler::step(const at::Tensor& model_output, int64_t t, const at::Tensor& sample,
                                    std::optional<at::Generator> generator) const {
  const int64_t prev_t = previous_timestep(t);

  // 1. compute alphas, betas
  const float alpha_prod_t = alpha_prod(t);
  const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
  const float beta_prod_t = 1.0f - alpha_prod_t;
  const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
  const float current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
  const float current_beta_t = 1.0f - current_alpha_t;

  // 2. compute the predicted original sample x̂₀ from the model output ("predicted x_0" of formula (15))
  at::Tensor pred_original_sample;
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon:
      pred_original_sample = (sample - std::sqrt(beta_prod_t) * model_output) / std::sqrt(alpha_prod_t);
      break;
    case PredictionType::sample: pred_original_sample = model_output; break;
    case PredictionType::v_prediction:
      pred_original_sample = std::sqrt(alpha_prod_t) * sample - std::sqrt(beta_prod_t) * model_output;
      break;
  }

  // 3. clip x̂₀
  if (cfg_.clip_sample) pred_original_sample = pred_original_sample.clamp(-cfg_.clip_sample_range, cfg_.clip_sample_range);

  // 4. coefficients of x̂₀ and x_t in the posterior mean μ̃_t (formula (7))
  const float pred_original_sample_coeff = (std::sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t;
  const float current_sample_coeff = std::sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t;

  // 5. μ̃_t(x_t, x̂₀)
  auto pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample;

  // 6. add noise: x_{t-1} = μ̃_t + σ_t z, z ~ N(0, I), for t > 0
  if (t > 0) {
    const auto noise = at::randn(model_output.sizes(), generator, model_output.options());
    const float variance = get_variance(t);
    const float sigma = cfg_.variance_type == VarianceType::fixed_small_log ? variance : std::sqrt(variance);
    pred_prev_sample = pred_prev_sample + sigma * noise;
  }
  return {pred_prev_sample, pred_original_sample};
}

// ---------------------------------------------------------------------------------------------
// DDIM (Song et al. 2021), same conventions.

float DDIMScheduler::get_variance(int64_t t, int64_t prev_t) const {
  const float alpha_prod_t = alpha_prod(t);
  const float final_alpha = cfg_.set_alpha_to_one ? 1.0f : alpha_prod(0);
  const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : final_alpha;
  const float beta_prod_t = 1.0f - alpha_prod_t;
  const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
  return (beta_prod_t_prev / beta_prod_t) * (1.0f - alpha_prod_t / alpha_prod_t_prev);
}

SchedulerOutput DDIMScheduler::step(const at::Tensor& model_output, int64_t t, const at::Tensor& sample, double eta,
                                    std::optional<at::Generator> generator, bool use_clipped_model_output) const {
  // 1. previous step value (=t-1 in the paper's notation, one inference step back)
  const int64_t prev_t = previous_timestep(t);

  // 2. compute alphas, betas
  const float alpha_prod_t = alpha_prod(t);
  const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : (cfg_.set_alpha_to_one ? 1.0f : alpha_prod(0));
  const float beta_prod_t = 1.0f - alpha_prod_t;

  // 3. predicted x̂₀ and ε̂ ("predicted x_0" of formula (12))
  at::Tensor pred_original_sample, pred_epsilon;
  switch (cfg_.prediction_type) {
    case PredictionType::epsilon:
      pred_original_sample = (sample - std::sqrt(beta_prod_t) * model_output) / std::sqrt(alpha_prod_t);
      pred_epsilon = model_output;
      break;
    case PredictionType::sample:
      pred_original_sample = model_output;
      pred_epsilon = (sample - std::sqrt(alpha_prod_t) * pred_original_sample) / std::sqrt(beta_prod_t);
      break;
    case PredictionType::v_prediction:
      pred_original_sample = std::sqrt(alpha_prod_t) * sample - std::sqrt(beta_prod_t) * model_output;
      pred_epsilon = std::sqrt(alpha_prod_t) * model_output + std::sqrt(beta_prod_t) * sample;
      break;
  }

  // 4. clip x̂₀
  if (cfg_.clip_sample) pred_original_sample = pred_original_sample.clamp(-cfg_.clip_sample_range, cfg_.clip_sample_range);

  // 5. σ_t(η) (formula (16))
  const float variance = get_variance(t, prev_t);
  const float std_dev_t = static_cast<float>(eta) * std::sqrt(variance);
  if (use_clipped_model_output)  // ε̂ re-derived from the clipped x̂₀, as in Glide
    pred_epsilon = (sample - std::sqrt(alpha_prod_t) * pred_original_sample) / std::sqrt(beta_prod_t);

  // 6. "direction pointing to x_t" of formula (12)
  const auto pred_sample_direction = std::sqrt(1.0f - alpha_prod_t_prev - std_dev_t * std_dev_t) * pred_epsilon;

  // 7. x_{t-1} without the random noise of formula (12), then σ_t z
  auto prev_sample = std::sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction;
  if (eta > 0) prev_sample = prev_sample + std_dev_t * at::randn(model_output.sizes(), generator, model_output.options());
  return {prev_sample, pred_original_sample};
}

at::Tensor diffusion_loss(const at::Tensor& model_output, const at::Tensor& target, const at::Tensor& weights) {
  const auto mse = (model_output.to(at::kFloat) - target.to(at::kFloat)).pow(2).mean({1, 2, 3});  // (B)
  return mse * weights;
}

}  // namespace difftrain
