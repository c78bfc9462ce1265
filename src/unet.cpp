#include "difftrain/unet.h"

#include <cmath>

#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/padding.h>
#include <torch/nn/functional/upsampling.h>

#include "difftrain/groupnorm_silu.h"

namespace difftrain {

namespace F = torch::nn::functional;
using torch::nn::Conv2dOptions;
using torch::nn::GroupNormOptions;
using torch::nn::LinearOptions;

namespace {
torch::nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride = 1) {
  return torch::nn::Conv2d(Conv2dOptions(in, out, /*kernel_size=*/3).stride(stride).padding(1));
}
torch::nn::GroupNorm group_norm(int64_t groups, int64_t channels, double eps) {
  return torch::nn::GroupNorm(GroupNormOptions(groups, channels).eps(eps).affine(true));
}
bool has_attention(BlockType t) { return t == BlockType::AttnDownBlock2D || t == BlockType::AttnUpBlock2D; }
// SiLU(norm(x)): the two modules, or one fused op on the module's parameters.
torch::Tensor norm_silu(torch::nn::GroupNorm& norm, const torch::Tensor& x, bool fused) {
  if (!fused) return F::silu(norm(x));
  const auto& o = norm->options;
  return group_norm_silu(x, o.num_groups(), norm->weight, norm->bias, o.eps());
}
}  // namespace

torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double freq_shift) {
  TORCH_CHECK(timesteps.dim() == 1, "timestep_embedding: timesteps must be 1-D, got ", timesteps.sizes());
  const int64_t half = dim / 2;
  auto exponent = torch::arange(half, timesteps.options().dtype(torch::kFloat32)) * (-std::log(10000.0));
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  auto emb = timesteps.unsqueeze(1).to(torch::kFloat32) * torch::exp(exponent).unsqueeze(0);  // (B, half)
  emb = torch::cat({torch::sin(emb), torch::cos(emb)}, /*dim=*/-1);                              // (B, 2 half)
  if (flip_sin_to_cos) emb = torch::cat({emb.slice(1, half), emb.slice(1, 0, half)}, /*dim=*/-1);
  if (dim % 2 == 1) emb = F::pad(emb, F::PadFuncOptions({0, 1, 0, 0}));
  return emb;
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool use_sdpa) {
  if (use_sdpa) return at::scaled_dot_product_attention(q, k, v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto weights = torch::softmax(torch::matmul(q, k.transpose(-2, -1)) * scale, /*dim=*/-1);  // (B, h, L, L)
  return torch::matmul(weights, v);                                                          // (B, h, L, d)
}

// ---------------------------------------------------------------------------------------------

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim)
    : linear_1(register_module("linear_1", torch::nn::Linear(in_channels, time_embed_dim))),
      linear_2(register_module("linear_2", torch::nn::Linear(time_embed_dim, time_embed_dim))) {}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& t_emb) { return linear_2(F::silu(linear_1(t_emb))); }

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups,
                                     double eps, double dropout_p, TimeScaleShift norm)
    : time_embedding_norm(norm) {
  norm1 = register_module("norm1", group_norm(groups, in_channels, eps));
  conv1 = register_module("conv1", conv3x3(in_channels, out_channels));
  const int64_t proj = norm == TimeScaleShift::scale_shift ? 2 * out_channels : out_channels;
  time_emb_proj = register_module("time_emb_proj", torch::nn::Linear(temb_channels, proj));
  norm2 = register_module("norm2", group_norm(groups, out_channels, eps));
  dropout = register_module("dropout", torch::nn::Dropout(dropout_p));
  conv2 = register_module("conv2", conv3x3(out_channels, out_channels));
  if (in_channels != out_channels)
    conv_shortcut = register_module("conv_shortcut", torch::nn::Conv2d(Conv2dOptions(in_channels, out_channels, /*kernel_size=*/1)));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  auto h = conv1(norm_silu(norm1, x, fused_groupnorm_silu));           // (B, Cout, H, W)
  auto t = time_emb_proj(F::silu(temb)).unsqueeze(-1).unsqueeze(-1);   // (B, Cout or 2 Cout, 1, 1)
  if (time_embedding_norm == TimeScaleShift::scale_shift) {
    auto scale_shift = t.chunk(2, /*dim=*/1);
    h = F::silu(norm2(h) * (1 + scale_shift[0]) + scale_shift[1]);  // FiLM (Dhariwal & Nichol 2021, §3)
  } else {
    h = norm_silu(norm2, h + t, fused_groupnorm_silu);
  }
  h = conv2(dropout(h));
  return (conv_shortcut ? conv_shortcut(x) : x) + h;
}

AttentionImpl::AttentionImpl(int64_t channels, int64_t head_dim, int64_t norm_groups, double eps)
    : heads(channels / head_dim) {
  TORCH_CHECK(channels % head_dim == 0, "Attention: head_dim ", head_dim, " does not divide ", channels, " channels");
  if (norm_groups > 0) group_norm = register_module("group_norm", difftrain::group_norm(norm_groups, channels, eps));
  to_q = register_module("to_q", torch::nn::Linear(channels, channels));
  to_k = register_module("to_k", torch::nn::Linear(channels, channels));
  to_v = register_module("to_v", torch::nn::Linear(channels, channels));
  to_out = register_module("to_out", torch::nn::ModuleList(torch::nn::Linear(channels, channels)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto h = group_norm ? group_norm(x) : x;
  h = h.view({B, C, H * W}).transpose(1, 2);                                // (B, L, C)
  auto split = [&](const torch::Tensor& t) { return t.view({B, H * W, heads, C / heads}).transpose(1, 2); };
  auto out = attention(split(to_q(h)), split(to_k(h)), split(to_v(h)), use_sdpa);  // (B, heads, L, d)
  out = out.transpose(1, 2).reshape({B, H * W, C});                         // (B, L, C)
  out = to_out[0]->as<torch::nn::Linear>()->forward(out);
  return out.transpose(1, 2).reshape({B, C, H, W}) + x;                      // residual connection
}

Downsample2DImpl::Downsample2DImpl(int64_t channels) : conv(register_module("conv", conv3x3(channels, channels, /*stride=*/2))) {}
torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) { return conv(x); }

Upsample2DImpl::Upsample2DImpl(int64_t channels) : conv(register_module("conv", conv3x3(channels, channels))) {}
torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x) {
  auto up = F::interpolate(x, F::InterpolateFuncOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(torch::kNearest));
  return conv(up);
}

// ---------------------------------------------------------------------------------------------

DownBlockImpl::DownBlockImpl(BlockType type, int64_t in_channels, int64_t out_channels, int64_t temb_channels,
                             int64_t num_layers, bool add_downsample, int64_t head_dim, const ModelConfig& cfg) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  downsamplers = register_module("downsamplers", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    resnets->push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, temb_channels, cfg.norm_num_groups,
                                     cfg.norm_eps, cfg.dropout, cfg.resnet_time_scale_shift));
    if (has_attention(type)) attentions->push_back(Attention(out_channels, head_dim, cfg.norm_num_groups, cfg.norm_eps));
  }
  if (add_downsample) downsamplers->push_back(Downsample2D(out_channels));
}

torch::Tensor DownBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>& skips) {
  for (size_t i = 0; i < resnets->size(); ++i) {
    x = resnets[i]->as<ResnetBlock2D>()->forward(x, temb);
    if (!attentions->is_empty()) x = attentions[i]->as<Attention>()->forward(x);
    skips.push_back(x);
  }
  if (!downsamplers->is_empty()) {
    x = downsamplers[0]->as<Downsample2D>()->forward(x);
    skips.push_back(x);
  }
  return x;
}

UpBlockImpl::UpBlockImpl(BlockType type, int64_t in_channels, int64_t prev_output_channels, int64_t out_channels,
                         int64_t temb_channels, int64_t num_layers, bool add_upsample, int64_t head_dim, const ModelConfig& cfg) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  upsamplers = register_module("upsamplers", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    const int64_t skip_channels = i == num_layers - 1 ? in_channels : out_channels;
    const int64_t resnet_in = i == 0 ? prev_output_channels : out_channels;
    resnets->push_back(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps,
                                     cfg.dropout, cfg.resnet_time_scale_shift));
    if (has_attention(type)) attentions->push_back(Attention(out_channels, head_dim, cfg.norm_num_groups, cfg.norm_eps));
  }
  if (add_upsample) upsamplers->push_back(Upsample2D(out_channels));
}

torch::Tensor UpBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>& skips) {
  for (size_t i = 0; i < resnets->size(); ++i) {
    x = torch::cat({x, skips.back()}, /*dim=*/1);
    skips.pop_back();
    x = resnets[i]->as<ResnetBlock2D>()->forward(x, temb);
    if (!attentions->is_empty()) x = attentions[i]->as<Attention>()->forward(x);
  }
  if (!upsamplers->is_empty()) x = upsamplers[0]->as<Upsample2D>()->forward(x);
  return x;
}

MidBlockImpl::MidBlockImpl(int64_t channels, int64_t temb_channels, int64_t head_dim, const ModelConfig& cfg) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  auto resnet = [&] {
    return ResnetBlock2D(channels, channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                         cfg.resnet_time_scale_shift);
  };
  resnets->push_back(resnet());
  // diffusers: attn_groups = resnet_groups under "default", none under "scale_shift".
  const int64_t attn_groups = cfg.resnet_time_scale_shift == TimeScaleShift::default_ ? cfg.norm_num_groups : 0;
  if (cfg.add_attention) attentions->push_back(Attention(channels, head_dim, attn_groups, cfg.norm_eps));
  resnets->push_back(resnet());
}

torch::Tensor MidBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb) {
  x = resnets[0]->as<ResnetBlock2D>()->forward(x, temb);
  if (!attentions->is_empty()) x = attentions[0]->as<Attention>()->forward(x);
  return resnets[1]->as<ResnetBlock2D>()->forward(x, temb);
}

// ---------------------------------------------------------------------------------------------

UNet2DModelImpl::UNet2DModelImpl(const ModelConfig& cfg) : cfg_(cfg) {
  const auto& ch = cfg.block_out_channels;
  const int64_t levels = static_cast<int64_t>(ch.size());
  TORCH_CHECK(levels > 0 && cfg.down_block_types.size() == ch.size() && cfg.up_block_types.size() == ch.size(),
              "UNet2DModel: block_out_channels, down_block_types and up_block_types differ in length");
  const int64_t time_embed_dim = ch[0] * 4;
  auto head_dim = [&](int64_t channels) { return cfg.attention_head_dim ? int64_t{*cfg.attention_head_dim} : channels; };

  conv_in = register_module("conv_in", conv3x3(cfg.in_channels, ch[0]));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], time_embed_dim));
  if (cfg.num_class_embeds)
    class_embedding = register_module("class_embedding", torch::nn::Embedding(*cfg.num_class_embeds + 1, time_embed_dim));

  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out = ch[0];
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = out;
    out = ch[i];
    down_blocks->push_back(DownBlock(cfg.down_block_types[i], in, out, time_embed_dim, cfg.layers_per_block,
                                     /*add_downsample=*/i < levels - 1, head_dim(out), cfg));
  }

  mid_block = register_module("mid_block", MidBlock(ch.back(), time_embed_dim, head_dim(ch.back()), cfg));

  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  out = ch.back();
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t prev = out;
    out = ch[levels - 1 - i];
    const int64_t in = ch[std::max<int64_t>(levels - 2 - i, 0)];
    up_blocks->push_back(UpBlock(cfg.up_block_types[i], in, prev, out, time_embed_dim, cfg.layers_per_block + 1,
                                 /*add_upsample=*/i < levels - 1, head_dim(out), cfg));
  }

  conv_norm_out = register_module("conv_norm_out", group_norm(cfg.norm_num_groups, ch[0], cfg.norm_eps));
  conv_out = register_module("conv_out", conv3x3(ch[0], cfg.out_channels));
}

torch::Tensor UNet2DModelImpl::forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                       const torch::Tensor& class_labels) {
  TORCH_CHECK(sample.dim() == 4, "UNet2DModel: sample must be (B, C, H, W), got ", sample.sizes());
  const int64_t B = sample.size(0);
  const auto t = (timesteps.dim() == 0 ? timesteps.expand({B}) : timesteps).to(sample.device());  // (B)
  auto emb = time_embedding(timestep_embedding(t, cfg_.block_out_channels[0], cfg_.flip_sin_to_cos, cfg_.freq_shift)
                                .to(sample.scalar_type()));  // (B, 4 C0)
  if (class_embedding) {
    TORCH_CHECK(class_labels.defined(), "UNet2DModel: this model is class-conditional; pass class_labels");
    emb = emb + class_embedding(class_labels).to(emb.scalar_type());
  } else {
    TORCH_CHECK(!class_labels.defined(), "UNet2DModel: class_labels given to an unconditional model");
  }

  auto x = conv_in(sample);  // (B, C0, H, W)
  if (memory_format_ != at::MemoryFormat::Contiguous) x = x.contiguous(memory_format_);
  std::vector<torch::Tensor> skips{x};
  for (const auto& block : *down_blocks) x = block->as<DownBlock>()->forward(x, emb, skips);
  x = mid_block(x, emb);
  for (const auto& block : *up_blocks) x = block->as<UpBlock>()->forward(x, emb, skips);
  return conv_out(norm_silu(conv_norm_out, x, fused_groupnorm_silu_));  // (B, out_channels, H, W)
}

void UNet2DModelImpl::set_use_sdpa(bool on) {
  for (auto& m : modules(/*include_self=*/false))
    if (auto* a = dynamic_cast<AttentionImpl*>(m.get())) a->use_sdpa = on;
}

void UNet2DModelImpl::set_memory_format(at::MemoryFormat format) {
  torch::NoGradGuard no_grad;
  for (auto& p : parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(format));  // the rest has no layout to choose
  memory_format_ = format;
}

void UNet2DModelImpl::set_fused_groupnorm_silu(bool on) {
  fused_groupnorm_silu_ = on;
  for (auto& m : modules(/*include_self=*/false))
    if (auto* r = dynamic_cast<ResnetBlock2DImpl*>(m.get())) r->fused_groupnorm_silu = on;
}

int64_t count_parameters(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

}  // namespace difftrain
