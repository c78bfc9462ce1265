// Model FLOPs of the UNet2D per image, forward and backward, from its config alone (no tensors):
// the numerator of train/tflops and train/mfu. Counted as PyTorch's
// torch.utils.flop_counter.FlopCounterMode counts a training step (tests/test_flops.cpp checks
// it against FlopCounterMode on diffusers' UNet2DModel).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "difftrain/config.h"
#include "difftrain/peak.h"

namespace difftrain {

// FLOPs of one image (a batch of B costs B times these). What is counted, as FlopCounterMode
// (torch/utils/flop_counter.py) counts it, each as 2 x multiply-accumulates:
//  - convolutions: 2·H_out·W_out·k²·C_in·C_out forward; backward the grad-weight convolution
//    (the same count) always, and the grad-input one (the same count again) only when the
//    input requires grad, which every convolution's does but conv_in's (its input is data);
//  - linear layers (addmm/mm): 2·rows·in·out forward; backward grad-weight always and
//    grad-input when the input requires grad (all but time_embedding.linear_1, whose input is
//    the sinusoidal timestep embedding);
//  - scaled_dot_product_attention, with flop_counter.py's formulas: forward two bmm
//    (Q·Kᵀ and P·V), 4·L²·C for L = H·W positions and C channels (any head split); backward
//    five bmm (the scores recomputed, then dP, dV, dQ, dK), 10·L²·C.
// Not counted, by FlopCounterMode or here: biases, GroupNorm, SiLU, softmax, the residual and
// elementwise ops, upsampling, the embedding lookup, the loss and the optimizer.
struct ModelFlops {
  int64_t forward = 0;
  int64_t backward = 0;
  int64_t total() const { return forward + backward; }
};

// At a height x width input (the model is fully convolutional).
ModelFlops model_flops(const ModelConfig& model, int64_t height, int64_t width);
// At model.sample_size x model.sample_size, the training resolution.
ModelFlops model_flops(const ModelConfig& model);

// The UNet's self-attention layers in forward order, from the same walk: the channels each
// attends with and the grid of positions (H x W) it attends over.
struct AttentionLayer {
  int64_t channels = 0, height = 0, width = 0;
};
std::vector<AttentionLayer> attention_layers(const ModelConfig& model, int64_t height, int64_t width);

// What train/tflops and train/mfu divide by, said once when training starts.
struct MfuBasis {
  ModelFlops flops;          // per training image, of cfg.model at its sample_size
  std::optional<Peak> peak;  // none: no train/mfu
  std::string description;   // for the log
};
// The peak is run.peak_tflops, else the training GPU's table entry (peak.h) in the precision of
// the step's matrix work: the autocast dtype, else TF32 when train.allow_tf32, else fp32.
MfuBasis mfu_basis(const Config& cfg, const c10::Device& device, std::optional<c10::ScalarType> autocast);

}  // namespace difftrain
