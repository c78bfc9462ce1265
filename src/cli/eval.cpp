// `difftrain eval`: FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of generated images
// (a folder, or a checkpoint sampled on the fly) against a reference (a dataset, a folder, or
// cached statistics), on the features of a TorchScript network given by path.
#include <fstream>
#include <iostream>
#include <memory>

#include <ATen/ops/stack.h>
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/data.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/fid.h"
#include "difftrain/io.h"
#include "difftrain/log.h"
#include "difftrain/run.h"
#include "difftrain/sampling.h"
#include "difftrain/sha256.h"
#include "difftrain/train_state.h"
#include "difftrain/weights.h"

namespace difftrain::cli {

namespace {

namespace fs = std::filesystem;

struct EvalCommand {
  std::string feature_net;
  std::string samples;
  CheckpointOptions checkpoint;
  SamplingFlags sampling;
  DeviceOptions device;
  ConfigOptions config;
  std::string ref_stats, ref_folder, stats_cache;
  int64_t kid_subsets = 100, kid_subset_size = 1000, feature_batch_size = 64;
  std::string out;
};

struct FeatureSet {
  at::Tensor features;       // (N, D) float32
  std::string description;
  std::vector<int64_t> image_shape;  // (C, H, W) of the images, when known
};

FeatureSet folder_features(FeatureNetwork& net, const fs::path& dir, int64_t batch_size) {
  const auto files = list_image_files(dir);
  FeatureSet set;
  set.description = fmt::format("{} images in {}", files.size(), dir.string());
  log_info("features of {}", set.description);
  set.features = extract_features(net, static_cast<int64_t>(files.size()), batch_size, [&](int64_t begin, int64_t end) {
    std::vector<at::Tensor> images;
    for (int64_t i = begin; i < end; ++i) {
      auto img = read_image_file(files[static_cast<size_t>(i)]);  // (C, H, W)
      if (set.image_shape.empty()) set.image_shape = img.sizes().vec();
      if (img.sizes().vec() != set.image_shape)
        throw UsageError(fmt::format("{} is {}, but {} is {}: the images of a folder must share one size and channel count",
                                     files[static_cast<size_t>(i)].string(), shape_text(img.sizes().vec()), files[0].string(),
                                     shape_text(set.image_shape)));
      images.push_back(img);
    }
    return at::stack(images);  // (B, C, H, W)
  });
  return set;
}

FeatureSet dataset_features(FeatureNetwork& net, const DataConfig& data, int64_t batch_size) {
  const auto dataset = open_dataset(data);
  AugmentOptions ao = AugmentOptions::from(data);
  ao.crop = CropMode::center, ao.random_flip = false;  // the images as training sees them, without randomness
  FeatureSet set;
  set.description = fmt::format("{} at {}x{}, center crop", dataset->describe(), data.resolution, data.resolution);
  set.image_shape = {data.channels, data.resolution, data.resolution};
  log_info("features of {} ({} images)", set.description, dataset->size());
  set.features = extract_features(net, dataset->size(), batch_size, [&](int64_t begin, int64_t end) {
    std::vector<at::Tensor> images;
    for (int64_t i = begin; i < end; ++i) images.push_back(augment(dataset->get(i).image, ao, /*key=*/0));
    return at::stack(images);  // (B, C, R, R)
  });
  return set;
}

// The reference: cached statistics, a folder, or a dataset (cached next to the run).
ReferenceStats reference(const EvalCommand& c, FeatureNetwork& net, const Config* checkpoint_config,
                         const fs::path& run_dir, std::vector<int64_t>& image_shape) {
  const int sources = !c.ref_stats.empty() + !c.ref_folder.empty();
  if (sources > 1) throw UsageError("give at most one of --ref-stats and --ref-folder (neither: the dataset of the config)");
  if (!c.ref_stats.empty()) {
    ReferenceStats r = load_reference_stats(c.ref_stats);
    if (r.feature_net_sha256 != net.sha256())
      throw UsageError(fmt::format("--ref-stats {} was computed with a feature network of SHA-256 {}, but --feature-net {} has "
                                   "{}; recompute it with this network", c.ref_stats, r.feature_net_sha256,
                                   net.path().string(), net.sha256()));
    log_info("reference: {} ({})", c.ref_stats, r.description);
    return r;
  }
  if (!c.ref_folder.empty()) {
    FeatureSet set = folder_features(net, c.ref_folder, c.feature_batch_size);
    image_shape = set.image_shape;
    return {feature_stats(set.features), set.features, "", net.sha256(), set.description};
  }
  const bool config_given = !c.config.config_path.empty() || !c.config.overrides.empty();
  const Config cfg = config_given || !checkpoint_config ? load(c.config) : *checkpoint_config;
  image_shape = {cfg.data.channels, cfg.data.resolution, cfg.data.resolution};
  const std::string key = reference_key(cfg.data, net.sha256());
  fs::path cache = c.stats_cache;
  if (cache.empty()) {
    fs::path dir = run_dir;
    if (dir.empty() && config_given && fs::is_directory(fs::path(cfg.run.output_dir) / cfg.run.name))
      dir = fs::path(cfg.run.output_dir) / cfg.run.name;
    if (!dir.empty()) cache = dir / "fid_stats" / fmt::format("reference_{}.safetensors", sha256_hex(key.data(), key.size()).substr(0, 16));
  }
  if (!cache.empty() && fs::exists(cache)) {
    ReferenceStats r = load_reference_stats(cache);
    if (r.key == key) {
      log_info("reference: cached statistics {} ({})", cache.string(), r.description);
      return r;
    }
    log_info("{} was computed from other data or another feature network; recomputing", cache.string());
  }
  FeatureSet set = dataset_features(net, cfg.data, c.feature_batch_size);
  ReferenceStats r{feature_stats(set.features), set.features, key, net.sha256(), set.description};
  if (!cache.empty()) {
    save_reference_stats(cache, r);
    log_info("cached the reference statistics in {}", cache.string());
  } else {
    log_info("reference statistics not cached (no run directory known; --stats-cache FILE caches them)");
  }
  return r;
}

int run_eval(const EvalCommand& c) {
  const c10::Device device = pick_device(c.device);
  FeatureNetwork net(c.feature_net, device);
  log_info("feature network {} (SHA-256 {})", c.feature_net, net.sha256());

  if (!c.samples.empty() && c.checkpoint.checkpoint_given())
    throw UsageError("give either --samples DIR (a folder of generated images) or --checkpoint (generate them now), not both");

  FeatureSet generated;
  std::optional<CheckpointWeights> ckpt;
  fs::path run_dir;
  if (!c.samples.empty()) {
    generated = folder_features(net, c.samples, c.feature_batch_size);
  } else {
    ckpt = open_checkpoint(c.checkpoint);
    run_dir = run_dir_of_checkpoint(ckpt->path);
    const int64_t n = ckpt->config.sampling.num_final_samples > 0 ? ckpt->config.sampling.num_final_samples : 1000;
    const SamplingOptions opts = sampling_options(c.sampling, ckpt->config, n);
    UNet2DModel model = model_with_weights(ckpt->config.model, weights_map(ckpt->weights),
                                           (ckpt->path / (to_string(ckpt->kind) + ".safetensors")).string(), device);
    log_info("generating {} images ({}, {} steps, NFE {}, seed {})", opts.num_samples, to_string(opts.sampler),
             opts.num_inference_steps, sampler_nfe(opts), opts.seed);
    const auto images = to_uint8(generate(model, ckpt->config.diffusion, opts, device));  // (N, C, H, W)
    generated.description =
        fmt::format("{} images generated from {} ({} weights, {} {} steps, NFE {}, seed {})", images.size(0), ckpt->path.string(),
                    to_string(ckpt->kind), to_string(opts.sampler), opts.num_inference_steps, sampler_nfe(opts), opts.seed);
    generated.image_shape = images.sizes().slice(1).vec();
    generated.features = extract_features(net, images.size(0), c.feature_batch_size,
                                          [&](int64_t b, int64_t e) { return images.slice(0, b, e); });
  }

  std::vector<int64_t> ref_shape;
  const ReferenceStats ref = reference(c, net, ckpt ? &ckpt->config : nullptr, run_dir, ref_shape);
  const int64_t n = generated.features.size(0), d = generated.features.size(1);
  if (ref.features.size(1) != d)
    throw UsageError(fmt::format("the reference has {} features per image, the feature network gives {}", ref.features.size(1), d));
  if (!ref_shape.empty() && !generated.image_shape.empty() && ref_shape != generated.image_shape)
    log_warn("generated images are {} but the reference images are {}: the feature network sees them at different sizes",
             shape_text(generated.image_shape), shape_text(ref_shape));
  for (const auto& [count, what] : {std::pair{n, "generated"}, std::pair{ref.stats.count, "reference"}}) {
    if (count < 2) throw UsageError(fmt::format("{} {} image(s): FID and KID need at least 2 on each side", count, what));
    if (count <= d)
      log_warn("only {} {} images for {} features: the covariance is singular and FID is biased upward; use 10,000 or more "
               "(50,000 is the usual)", count, what, d);
  }

  const FeatureStats gen_stats = feature_stats(generated.features);
  const double fid = frechet_distance(gen_stats, ref.stats);
  KidOptions ko;
  ko.num_subsets = c.kid_subsets, ko.subset_size = c.kid_subset_size, ko.device = device;
  const KidResult kid = kernel_inception_distance(generated.features, ref.features, ko);

  nlohmann::ordered_json result = {{"fid", fid},
                                   {"kid", kid.mean},
                                   {"kid_std", kid.std},
                                   {"kid_subsets", kid.num_subsets},
                                   {"kid_subset_size", kid.subset_size},
                                   {"num_generated", n},
                                   {"num_reference", ref.stats.count},
                                   {"feature_dim", d},
                                   {"feature_net", c.feature_net},
                                   {"feature_net_sha256", net.sha256()},
                                   {"generated", generated.description},
                                   {"reference", ref.description}};
  if (ckpt) result["step"] = ckpt->step;
  log_info("FID {:.4f} | KID {:.6f} ± {:.6f} ({} generated vs {} reference images, {} features)", fid, kid.mean, kid.std, n,
           ref.stats.count, d);
  std::cout << result.dump(2) << "\n";
  if (!c.out.empty()) write_file_atomic(c.out, result.dump(2) + "\n");
  return kExitOk;
}

}  // namespace

void set_eval_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("eval", "FID and KID of generated images against a dataset, a folder or cached statistics, "
                                          "on the features of a TorchScript network (docs/EVALUATION.md)");
  auto c = std::make_shared<EvalCommand>();  // owned by the callback, so by the App
  cmd->add_option("--feature-net", c->feature_net,
                  "TorchScript feature network, e.g. NVlabs' Inception inception-2015-12-05.pt (docs/EVALUATION.md says where "
                  "to get it; nothing is downloaded)")
      ->type_name("FILE")
      ->required()
      ->group("Features");
  cmd->add_option("--feature-batch-size", c->feature_batch_size, "Images per feature-network call")
      ->type_name("B")
      ->check(CLI::PositiveNumber)
      ->capture_default_str()
      ->group("Features");
  cmd->add_option("--samples", c->samples,
                  "Generated images: a folder of PNG/JPEG files (difftrain sample's output; grid.png "
                  "is skipped). Without it, images are generated from --checkpoint")
      ->type_name("DIR")
      ->group("Generated images");
  add_checkpoint_options(cmd, c->checkpoint);
  add_sampling_flags(cmd, c->sampling,
                     "Images to generate from the checkpoint (default: its sampling.num_final_samples, or 1000 when that is 0)");
  add_device_options(cmd, c->device);
  cmd->add_option("--ref-stats", c->ref_stats, "Reference: statistics cached by an earlier eval (<run>/fid_stats/*.safetensors)")
      ->type_name("FILE")
      ->group("Reference");
  cmd->add_option("--ref-folder", c->ref_folder, "Reference: a folder of PNG/JPEG images")->type_name("DIR")->group("Reference");
  add_config_options(cmd, c->config);
  cmd->get_option("--config")->description("Reference: the dataset of this config's data.* (default: the checkpoint's config, "
                                           "else the built-in defaults)")->group("Reference");
  cmd->get_option("--set")->group("Reference");
  cmd->add_option("--stats-cache", c->stats_cache,
                  "Where the dataset's statistics are cached (default: "
                  "<run>/fid_stats/reference_<hash>.safetensors)")
      ->type_name("FILE")
      ->group("Reference");
  cmd->add_option("--kid-subsets", c->kid_subsets, "KID: random subsets averaged")
      ->type_name("N")
      ->check(CLI::PositiveNumber)
      ->capture_default_str()
      ->group("Metrics");
  cmd->add_option("--kid-subset-size", c->kid_subset_size, "KID: images per subset (capped at the smaller set)")
      ->type_name("M")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 40))
      ->capture_default_str()
      ->group("Metrics");
  cmd->add_option("-o,--out", c->out, "Also write the result JSON to this file")->type_name("FILE")->group("Metrics");
  cmd->callback([c, &exit_code] { exit_code = run_eval(*c); });
}

}  // namespace difftrain::cli
