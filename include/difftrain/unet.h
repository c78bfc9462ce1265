// UNet2D with the block structure, parameter names and math of diffusers' UNet2DModel
// (models/unets/unet_2d.py), so a state dict maps one-to-one onto diffusers' for the same config.
// Class conditioning adds one learned null class (index num_class_embeds) for classifier-free
// guidance; the equivalent diffusers model has num_class_embeds + 1 classes.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "difftrain/config.h"

namespace difftrain {

// Sinusoidal timestep embedding (Vaswani et al. 2017 §3.5; diffusers get_timestep_embedding):
// freq_i = exp(-ln(10000) * i / (half - freq_shift)), emb = [sin(t freq), cos(t freq)] (cos first
// when flip_sin_to_cos).
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double freq_shift);

// Scaled dot-product attention, (B, heads, L, d) each: SDPA kernels (flash / memory-efficient
// on GPU) or the explicit softmax(q kᵀ / √d) v, which tests compare.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool use_sdpa = true);

// diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  torch::Tensor forward(const torch::Tensor& t_emb);  // (B, in) -> (B, time_embed_dim)
  torch::nn::Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

// diffusers ResnetBlock2D (pre-norm, time embedding added or as FiLM scale/shift).
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps,
                    double dropout, TimeScaleShift time_embedding_norm);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb);  // (B, Cin, H, W), (B, T) -> (B, Cout, H, W)

  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  torch::nn::Linear time_emb_proj{nullptr};
  torch::nn::Dropout dropout{nullptr};
  TimeScaleShift time_embedding_norm;
  // SiLU(norm1(x)), and SiLU(norm2(h + t)) under the default time_embedding_norm, as one op
  // (group_norm_silu); under scale_shift the FiLM sits between norm2 and the SiLU.
  bool fused_groupnorm_silu = false;
};
TORCH_MODULE(ResnetBlock2D);

// diffusers Attention as used by the 2D blocks: spatial self-attention with GroupNorm in front and
// a residual connection (_from_deprecated_attn_block=True).
class AttentionImpl : public torch::nn::Module {
 public:
  // norm_groups = 0: no group_norm (the mid block under scale_shift).
  AttentionImpl(int64_t channels, int64_t head_dim, int64_t norm_groups, double eps);
  torch::Tensor forward(const torch::Tensor& x);  // (B, C, H, W) -> (B, C, H, W)

  torch::nn::GroupNorm group_norm{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [Linear]: "to_out.0"
  int64_t heads;
  bool use_sdpa = true;
};
TORCH_MODULE(Attention);

// Conv2d(3x3, stride 2, padding 1) named "conv", as diffusers Downsample2D.
class Downsample2DImpl : public torch::nn::Module {
 public:
  explicit Downsample2DImpl(int64_t channels);
  torch::Tensor forward(const torch::Tensor& x);  // (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// Nearest 2x upsampling, then Conv2d(3x3) named "conv", as diffusers Upsample2D.
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(int64_t channels);
  torch::Tensor forward(const torch::Tensor& x);  // (B, C, H, W) -> (B, C, 2H, 2W)
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// DownBlock2D / AttnDownBlock2D: resnets (each followed by attention in the Attn variant), then
// a downsampler except at the last level. Returns the output and every skip tensor it produced.
class DownBlockImpl : public torch::nn::Module {
 public:
  DownBlockImpl(BlockType type, int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t num_layers,
                bool add_downsample, int64_t head_dim, const ModelConfig& cfg);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>& skips);

  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr}, downsamplers{nullptr};
};
TORCH_MODULE(DownBlock);

// UpBlock2D / AttnUpBlock2D: each resnet takes the running tensor concatenated with a skip
// (popped from the back), then an upsampler except at the last level.
class UpBlockImpl : public torch::nn::Module {
 public:
  UpBlockImpl(BlockType type, int64_t in_channels, int64_t prev_output_channels, int64_t out_channels, int64_t temb_channels,
              int64_t num_layers, bool add_upsample, int64_t head_dim, const ModelConfig& cfg);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>& skips);

  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr}, upsamplers{nullptr};
};
TORCH_MODULE(UpBlock);

// UNetMidBlock2D: resnet, [attention, resnet].
class MidBlockImpl : public torch::nn::Module {
 public:
  MidBlockImpl(int64_t channels, int64_t temb_channels, int64_t head_dim, const ModelConfig& cfg);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb);

  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(MidBlock);

class UNet2DModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DModelImpl(const ModelConfig& cfg);
  // sample (B, in_channels, H, W) with H and W divisible by 2^(levels-1); timesteps (B) or ()
  // integer or float; class_labels (B) int64 in [0, num_class_embeds] (the last is the null
  // class), required exactly when the model is class-conditional. Returns (B, out_channels, H, W).
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                        const torch::Tensor& class_labels = torch::Tensor());

  // Index of the learned null class (classifier-free guidance); -1 when unconditional.
  int64_t null_class() const { return cfg_.num_class_embeds ? *cfg_.num_class_embeds : -1; }
  const ModelConfig& config() const { return cfg_; }
  // Switch every attention between SDPA and the explicit softmax form.
  void set_use_sdpa(bool on);
  // train.channels_last: the convolution kernels in `format`, and conv_in's output made so too.
  // With one input channel, conv_in's input and kernel are NCHW and NHWC at once, and the
  // convolution then picks NCHW; every later convolution follows its (unambiguous) kernel.
  void set_memory_format(at::MemoryFormat format);
  at::MemoryFormat memory_format() const { return memory_format_; }
  // Every GroupNorm followed by a SiLU (the resnets' and conv_norm_out) as one op (group_norm_silu,
  // train.fused_groupnorm_silu), or as the two modules. The same function and parameters either way.
  void set_fused_groupnorm_silu(bool on);

  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::Embedding class_embedding{nullptr};
  torch::nn::ModuleList down_blocks{nullptr}, up_blocks{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  ModelConfig cfg_;
  at::MemoryFormat memory_format_ = at::MemoryFormat::Contiguous;
  bool fused_groupnorm_silu_ = false;
};
TORCH_MODULE(UNet2DModel);

// Parameters in the model (the DDPM CIFAR-10 preset has 35,746,307).
int64_t count_parameters(torch::nn::Module& m);

}  // namespace difftrain
