// Fast multistep ODE solvers in the half-log-SNR λ_t = log(α_t / σ_t), with diffusers' names and
// arithmetic:
//   DPMSolverMultistepScheduler (schedulers/scheduling_dpmsolver_multistep.py) with
//     algorithm_type="dpmsolver++", solver_type="midpoint": DPM-Solver++ (Lu et al. 2022,
//     arXiv 2211.01095), multistep, orders 1-3;
//   UniPCMultistepScheduler (schedulers/scheduling_unipc_multistep.py) with solver_type="bh2",
//     predict_x0=True: UniPC (Zhao et al. 2023, arXiv 2302.04867), predictor UniP-p and corrector
//     UniC-p.
// Both keep lower_order_final=True, final_sigmas_type="zero", no thresholding and no corrector
// disabled (diffusers' defaults). diffusers has no clip_sample here, so neither do we.
//
// Here α_t = √ᾱ_t, σ_t = √(1-ᾱ_t) are the VP coefficients of x_t = α_t x₀ + σ_t ε; the tables hold
// the VE noise level σ = σ_t / α_t (vp_sigmas), as diffusers' do, and every step converts back.
//
// Scalars are float32 and taken in diffusers' order. diffusers evaluates them with ATen on 0-dim
// CPU tensors, whose pow/log/exp/expm1 round differently from the C library's; we call the same
// ATen functions, so on the CPU the numbers are equal to the last bit. Schedules (timesteps,
// σ) are host tables; a step costs no host sync.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "difftrain/scheduler.h"

namespace difftrain {

// The σ of the Karras et al. 2022 schedule (eq. 5, ρ = 7) between the table's σ_max = σ_{T-1} and
// σ_min = σ_0, n values, descending, in float64 as diffusers' _convert_to_karras computes them.
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t n);
// The fractional timestep of σ by linear interpolation in log σ over the table (diffusers'
// _sigma_to_t); log_sigmas (T) float32.
double sigma_to_t(double sigma, const std::vector<float>& log_sigmas);

// What DPM-Solver++ and UniPC share: the schedule of σ at the inference timesteps, the step index
// and the history of converted model outputs (x̂₀ predictions, newest last).
class MultistepScheduler {
 public:
  // solver_order: 1..3; use_karras_sigmas: σ from karras_sigmas() and the timesteps from them
  // (rounded, or truncated when not round_karras_timesteps).
  MultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order, bool use_karras_sigmas, bool round_karras_timesteps);
  virtual ~MultistepScheduler() = default;

  const SchedulerConfig& config() const { return cfg_; }
  int64_t solver_order() const { return solver_order_; }
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  // (T) float32, 2^-24 at T-1 with zero SNR

  // Lays out num_inference_steps timesteps and their σ (one more: 0 after the last), and resets
  // the solver state.
  void set_timesteps(int64_t num_inference_steps);
  const std::vector<int64_t>& timesteps() const { return timesteps_; }
  const std::vector<float>& sigmas() const { return sigmas_; }
  int64_t num_inference_steps() const { return static_cast<int64_t>(timesteps_.size()); }
  // -1 before the first step().
  int64_t step_index() const { return step_index_; }

  float init_noise_sigma() const { return 1.0f; }
  at::Tensor scale_model_input(const at::Tensor& sample, int64_t /*timestep*/) const { return sample; }
  // The data prediction x̂₀ at the current step from the model's output (ε, v or x₀):
  // x̂₀ = (x - σ_t ε)/α_t, α_t x - σ_t v, or the output itself (Lu et al. 2022, eq. 4).
  at::Tensor convert_model_output(const at::Tensor& model_output, const at::Tensor& sample) const;

  // Where t is in timesteps(): the second of several matches, the last step when none.
  int64_t index_for_timestep(int64_t timestep) const;

 protected:
  struct AlphaSigma {
    float alpha, sigma;  // α_t = 1/√(σ² + 1), σ_t = σ α_t
  };
  static AlphaSigma sigma_to_alpha_sigma_t(float sigma);
  static float lambda(const AlphaSigma& as);  // λ = log α_t - log σ_t
  void init_step_index(int64_t timestep);

  SchedulerConfig cfg_;
  int64_t solver_order_;
  bool use_karras_sigmas_;
  bool round_karras_timesteps_;
  at::Tensor alphas_cumprod_;      // (T) float32
  std::vector<float> table_;       // σ at every training timestep, from vp_sigmas()
  std::vector<float> log_sigmas_;  // log σ of the table (float32, as numpy takes it)
  std::vector<int64_t> timesteps_;
  std::vector<float> sigmas_;      // (n + 1) float32
  int64_t step_index_ = -1;
  std::vector<at::Tensor> model_outputs_;  // solver_order entries, newest last; undefined until filled
  int64_t lower_order_nums_ = 0;
  at::Tensor last_sample_;  // UniPC: the sample the last prediction started from
  int64_t this_order_ = 0;  // UniPC: the order of the last prediction
};

// DPM-Solver++ (Lu et al. 2022): data-prediction multistep solver of the diffusion ODE, Algorithm 2
// (2M) and its third-order extension; deterministic.
class DPMSolverMultistepScheduler : public MultistepScheduler {
 public:
  explicit DPMSolverMultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order = 2, bool use_karras_sigmas = false);

  // x̃_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) x̂₀, h = λ_t - λ_s: DDIM in λ (Lu et al. 2022, eq. 5).
  at::Tensor dpm_solver_first_order_update(const at::Tensor& model_output, const at::Tensor& sample) const;
  // Multistep second order, "midpoint" form: D0 = m0, D1 = (m0 - m1)/r0 with r0 = h_0/h,
  // x̃_t = (σ_t/σ_s0) x - α_t (e^{-h} - 1) (D0 + ½ D1) (Lu et al. 2022, Algorithm 2, eq. 9).
  at::Tensor multistep_dpm_solver_second_order_update(const std::vector<at::Tensor>& model_output_list,
                                                      const at::Tensor& sample) const;
  // Multistep third order (Lu et al. 2022, arXiv 2206.00927, Algorithm 3 / appendix B, in data
  // prediction form).
  at::Tensor multistep_dpm_solver_third_order_update(const std::vector<at::Tensor>& model_output_list,
                                                     const at::Tensor& sample) const;
  // One step from sample at `timestep`: converts and stores the model output, then applies the
  // highest order the history and the final steps allow. prev_sample is x_{t_next};
  // pred_original_sample is this step's x̂₀. The generator is unused (the ODE solver draws nothing).
  SchedulerOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                       std::optional<at::Generator> generator = std::nullopt);
};

// UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2") in data prediction: each step first corrects
// the previous prediction with the new model output (UniC, Algorithm 2), then predicts the next
// sample (UniP, Algorithm 1); deterministic.
class UniPCMultistepScheduler : public MultistepScheduler {
 public:
  explicit UniPCMultistepScheduler(const SchedulerConfig& cfg, int64_t solver_order = 2, bool use_karras_sigmas = false);

  // UniP-p: x̃_t = (σ_t/σ_s0) x - α_t h φ₁(h) m0 - α_t B(h) Σ_k ρ_k D1_k, D1_k = (m_k - m0)/r_k
  // (Zhao et al. 2023, eq. 8 and Algorithm 1; ρ solves R_p ρ = φ_p/B(h), ρ = ½ for p = 2).
  at::Tensor multistep_uni_p_bh_update(const at::Tensor& sample, int64_t order) const;
  // UniC-p: the same update from last_sample, plus the term of the new model output
  // (Zhao et al. 2023, eq. 9 and Algorithm 2).
  at::Tensor multistep_uni_c_bh_update(const at::Tensor& this_model_output, const at::Tensor& last_sample,
                                       const at::Tensor& this_sample, int64_t order) const;
  // One step: UniC on the sample (from the second step on), then UniP to the next timestep.
  // prev_sample is the predicted x_{t_next}; pred_original_sample this step's x̂₀.
  SchedulerOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                       std::optional<at::Generator> generator = std::nullopt);

};

}  // namespace difftrain
