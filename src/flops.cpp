#include "difftrain/flops.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_probe.h"
#endif

namespace difftrain {

namespace {

bool has_attention(BlockType t) { return t == BlockType::AttnDownBlock2D || t == BlockType::AttnUpBlock2D; }

// Sums the counts layer by layer, walking the UNet as src/unet.cpp builds it (diffusers'
// UNet2DModel), for one image.
struct Counter {
  ModelFlops f;
  std::vector<AttentionLayer> attention_layers;

  // flop_counter.py conv_flop_count: 2·prod(out spatial)·prod(kernel)·C_out·C_in. Its
  // conv_backward_flop counts grad-input as the transposed convolution over the same output
  // positions and grad-weight as conv(input, grad_out): the same product each.
  void conv(int64_t c_in, int64_t c_out, int64_t kernel, int64_t h_out, int64_t w_out, bool input_requires_grad = true) {
    const int64_t n = 2 * h_out * w_out * kernel * kernel * c_in * c_out;
    f.forward += n;
    f.backward += n + (input_requires_grad ? n : 0);
  }
  // addmm/mm: 2·m·k·n; backward grad_weight = grad_outᵀ·x and grad_input = grad_out·W.
  void linear(int64_t in, int64_t out, int64_t rows, bool input_requires_grad = true) {
    const int64_t n = 2 * rows * in * out;
    f.forward += n;
    f.backward += n + (input_requires_grad ? n : 0);
  }
  // sdpa_flop_count / sdpa_backward_flop_count over heads·head_dim = channels: each bmm is
  // 2·heads·L·L·head_dim = 2·L²·C.
  void attention(int64_t channels, int64_t positions) {
    const int64_t bmm = 2 * positions * positions * channels;
    f.forward += 2 * bmm;
    f.backward += 5 * bmm;
  }

  // ResnetBlock2D: conv1, time_emb_proj (Linear on silu(temb), one row per image; 2·C_out
  // outputs for scale_shift), conv2, and a 1x1 conv_shortcut when the channels change.
  void resnet(int64_t c_in, int64_t c_out, int64_t temb, bool scale_shift, int64_t h, int64_t w) {
    conv(c_in, c_out, 3, h, w);
    linear(temb, scale_shift ? 2 * c_out : c_out, 1);
    conv(c_out, c_out, 3, h, w);
    if (c_in != c_out) conv(c_in, c_out, 1, h, w);
  }
  // Attention: to_q, to_k, to_v, to_out[0] over the H·W positions, and SDPA between them.
  void attention_block(int64_t channels, int64_t h, int64_t w) {
    attention_layers.push_back({channels, h, w});
    for (int i = 0; i < 4; ++i) linear(channels, channels, h * w);
    attention(channels, h * w);
  }
};

Counter walk(const ModelConfig& m, int64_t height, int64_t width) {
  Counter c;
  const auto& ch = m.block_out_channels;
  const auto levels = static_cast<int64_t>(ch.size());
  const int64_t temb = 4 * int64_t{ch[0]};
  const bool ss = m.resnet_time_scale_shift == TimeScaleShift::scale_shift;
  int64_t h = height, w = width;

  // time_embedding: linear_1 (its input, the sinusoidal embedding, needs no grad), SiLU, linear_2.
  c.linear(ch[0], temb, 1, /*input_requires_grad=*/false);
  c.linear(temb, temb, 1);
  c.conv(m.in_channels, ch[0], 3, h, w, /*input_requires_grad=*/false);  // conv_in on the noisy sample

  // Down blocks; the skip channels are recorded as the up blocks consume them.
  std::vector<int64_t> skips{ch[0]};
  int64_t out = ch[0];
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = out;
    out = ch[static_cast<size_t>(i)];
    for (int64_t j = 0; j < m.layers_per_block; ++j) {
      c.resnet(j == 0 ? in : out, out, temb, ss, h, w);
      if (has_attention(m.down_block_types[static_cast<size_t>(i)])) c.attention_block(out, h, w);
      skips.push_back(out);
    }
    if (i < levels - 1) {  // Downsample2D: 3x3, stride 2, padding 1
      h = (h - 1) / 2 + 1, w = (w - 1) / 2 + 1;
      c.conv(out, out, 3, h, w);
      skips.push_back(out);
    }
  }

  // Mid block: resnet, attention (when add_attention), resnet.
  c.resnet(ch.back(), ch.back(), temb, ss, h, w);
  if (m.add_attention) c.attention_block(ch.back(), h, w);
  c.resnet(ch.back(), ch.back(), temb, ss, h, w);

  // Up blocks: layers_per_block + 1 resnets, each on its input concatenated with a skip.
  out = ch.back();
  for (int64_t i = 0; i < levels; ++i) {
    out = ch[static_cast<size_t>(levels - 1 - i)];
    for (int64_t j = 0; j <= m.layers_per_block; ++j) {
      const int64_t x_channels = j == 0 ? (i == 0 ? ch.back() : ch[static_cast<size_t>(levels - i)]) : out;
      c.resnet(x_channels + skips.back(), out, temb, ss, h, w);
      skips.pop_back();
      if (has_attention(m.up_block_types[static_cast<size_t>(i)])) c.attention_block(out, h, w);
    }
    if (i < levels - 1) {  // Upsample2D: nearest x2 (not counted), then a 3x3 conv
      h *= 2, w *= 2;
      c.conv(out, out, 3, h, w);
    }
  }

  c.conv(ch[0], m.out_channels, 3, h, w);  // conv_out, after conv_norm_out and SiLU
  return c;
}

}  // namespace

ModelFlops model_flops(const ModelConfig& m, int64_t height, int64_t width) { return walk(m, height, width).f; }

ModelFlops model_flops(const ModelConfig& model) { return model_flops(model, model.sample_size, model.sample_size); }

std::vector<AttentionLayer> attention_layers(const ModelConfig& model, int64_t height, int64_t width) {
  return walk(model, height, width).attention_layers;
}

MfuBasis mfu_basis(const Config& cfg, const c10::Device& device, std::optional<c10::ScalarType> autocast) {
  MfuBasis out;
  out.flops = model_flops(cfg.model);
  const PeakPrecision precision = autocast == c10::kBFloat16 ? PeakPrecision::bf16
                                  : autocast == c10::kHalf   ? PeakPrecision::fp16
                                  : cfg.train.allow_tf32     ? PeakPrecision::tf32
                                                             : PeakPrecision::fp32;
  std::optional<std::string> gpu_name;
#ifdef DIFFTRAIN_WITH_CUDA
  if (device.is_cuda() && cfg.run.peak_tflops <= 0) {
    const int index = device.has_index() ? device.index() : 0;
    for (const auto& g : cuda::probe().gpus)
      if (g.index == index) gpu_name = g.name;
  }
#else
  (void)device;
#endif
  out.peak = choose_peak(cfg.run.peak_tflops, gpu_name, precision);
  out.description = fmt::format(
      "model FLOPs per image: {:.4g} GFLOP forward + {:.4g} backward = {:.4g} GFLOP per training image (counted as "
      "torch.utils.flop_counter does); {}",
      static_cast<double>(out.flops.forward) / 1e9, static_cast<double>(out.flops.backward) / 1e9,
      static_cast<double>(out.flops.total()) / 1e9,
      out.peak   ? fmt::format("train/mfu against a peak of {:g} TFLOP/s per device ({})", out.peak->tflops, out.peak->source)
      : gpu_name ? fmt::format("no train/mfu: {} has no {} entry in the peak table; set run.peak_tflops", *gpu_name,
                               to_string(precision))
                 : std::string("no train/mfu on this device unless run.peak_tflops is set"));
  return out;
}

}  // namespace difftrain
