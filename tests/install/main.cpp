// Uses the installed difftrain::core the way an embedding program would, and checks values
// that only the real library computes. Usage: consumer CONFIG_DIR (the repository's configs/).
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "difftrain/config.h"
#include "difftrain/data_formats.h"
#include "difftrain/log.h"
#include "difftrain/scheduler.h"
#include "difftrain/unet.h"
#include "difftrain/version.h"

namespace {
int failures = 0;
void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  std::fflush(stdout);  // in order with spdlog's lines
  if (!ok) ++failures;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CONFIG_DIR\n", argv[0]);
    return 2;
  }
  const std::string configs = argv[1];
  try {
    check(std::string(difftrain::kVersion) == DIFFTRAIN_PACKAGE_VERSION,
          std::string("version.h says ") + difftrain::kVersion + ", the package " + DIFFTRAIN_PACKAGE_VERSION);

    difftrain::setup_logging(difftrain::LogLevel::info, /*rank=*/0);  // spdlog, linked by difftrain::log
    difftrain::log_info("consumer of difftrain {}", difftrain::kVersion);

    // Ho et al. 2020, Appendix B: the CIFAR-10 model has 35.7M parameters (35,746,307 exactly).
    const difftrain::Config cifar = difftrain::load_config(configs + "/cifar10_ddpm.json");
    difftrain::UNet2DModel big(cifar.model);
    const int64_t params = difftrain::count_parameters(*big);
    check(params == 35746307, "cifar10_ddpm UNet2DModel has " + std::to_string(params) + " parameters (35746307)");

    // diffusers' pinned DDPM variance for the default linear schedule.
    const difftrain::DDPMScheduler scheduler(difftrain::SchedulerConfig::from(difftrain::Config{}.diffusion));
    const float var = scheduler.get_variance(487);
    check(std::abs(var - 0.00979f) < 1e-5f, "get_variance(487) = " + std::to_string(var) + " (0.00979)");

    // A forward pass of the quickstart model: LibTorch's kernels run from the consumer.
    torch::manual_seed(0);
    const difftrain::Config quick = difftrain::load_config(configs + "/quickstart.json");
    difftrain::UNet2DModel unet(quick.model);
    torch::NoGradGuard no_grad;
    const auto x = torch::randn({2, 1, 28, 28});                  // (B, C, H, W)
    const auto out = unet->forward(x, torch::tensor({10, 500}));  // (B, C, H, W)
    check(out.sizes() == x.sizes() && torch::isfinite(out).all().item<bool>(), "quickstart UNet forward (2, 1, 28, 28)");

    // The formats library (stb_image, zlib): a PNG round trip.
    const std::vector<uint8_t> pixels = {0, 40, 80, 120, 160, 200};  // 1 x 2 x 3
    const auto png = difftrain::formats::encode_png(pixels.data(), 1, 2, 3);
    const auto image = difftrain::formats::decode_image(png.data(), png.size(), "roundtrip.png");
    check(image.channels == 1 && image.height == 2 && image.width == 3 && image.pixels == pixels, "PNG round trip");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failures ? "consumer FAILED" : "consumer passed");
  return failures ? 1 : 0;
}
