// The memory format after each stage of a UNet2DModel forward (conv_in, every down block, the
// mid block, every up block, the output norm and conv_out), for train.channels_last: an op without
// an NHWC kernel (a GroupNorm, an attention reshape) silently returns NCHW, and every op after it
// then runs in NCHW. The stages are UNet2DModelImpl::forward's, called one by one (conv_in's
// output converted as forward() converts it).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "difftrain/unet.h"

namespace difftrain::test {

// (stage, whether its output is channels-last), in forward order. Runs under the caller's
// autocast and grad mode.
inline std::vector<std::pair<std::string, bool>> channels_last_trace(UNet2DModel& m, const at::Tensor& sample,
                                                                     const at::Tensor& t, const at::Tensor& labels = {}) {
  const auto& cfg = m->config();
  auto emb = m->time_embedding(
      timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(sample.scalar_type()));
  if (m->class_embedding) emb = emb + m->class_embedding(labels).to(emb.scalar_type());
  std::vector<std::pair<std::string, bool>> trace;
  auto note = [&](const std::string& stage, const at::Tensor& x) {
    trace.emplace_back(stage, x.is_contiguous(at::MemoryFormat::ChannelsLast));
  };
  auto x = m->conv_in(sample).contiguous(m->memory_format());  // as forward() does
  note("conv_in", x);
  std::vector<at::Tensor> skips{x};
  int i = 0;
  for (const auto& block : *m->down_blocks) note("down_blocks." + std::to_string(i++), x = block->as<DownBlock>()->forward(x, emb, skips));
  note("mid_block", x = m->mid_block(x, emb));
  i = 0;
  for (const auto& block : *m->up_blocks) note("up_blocks." + std::to_string(i++), x = block->as<UpBlock>()->forward(x, emb, skips));
  note("conv_norm_out", x = m->conv_norm_out(x));
  note("conv_out", m->conv_out(torch::silu(x)));
  return trace;
}

}  // namespace difftrain::test
