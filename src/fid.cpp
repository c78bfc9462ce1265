#include "difftrain/fid.h"

#include <algorithm>
#include <cmath>

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_svdvals.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/stack.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/script.h>  // torch::jit::load: only here

#include "difftrain/data.h"
#include "difftrain/data_formats.h"
#include "difftrain/errors.h"
#include "difftrain/io.h"
#include "difftrain/safetensors.h"
#include "difftrain/sha256.h"
#include "difftrain/version.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {

void check_square(const at::Tensor& a, const char* what) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1), what, ": expected a square matrix, got ", a.sizes());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Statistics and distances

FeatureStats feature_stats(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 2 && features.size(0) >= 2, "feature_stats: expected (N >= 2, D) features, got ",
              features.sizes());
  const auto x = features.to(at::kCPU).to(at::kDouble);  // (N, D)
  FeatureStats s;
  s.count = x.size(0);
  s.mu = x.mean(0);                                      // (D)
  const auto centered = x - s.mu;                        // (N, D)
  s.sigma = centered.t().mm(centered) / static_cast<double>(s.count - 1);  // (D, D)
  s.sigma = (s.sigma + s.sigma.t()) / 2;                 // exactly symmetric
  return s;
}

at::Tensor sqrtm_psd(const at::Tensor& a) {
  check_square(a, "sqrtm_psd");
  const auto sym = a.to(at::kDouble);
  auto [lambda, q] = at::linalg_eigh((sym + sym.t()) / 2);  // A = Q diag(λ) Qᵀ, λ ascending
  return (q * lambda.clamp_min(0).sqrt()).mm(q.t());          // Q diag(√λ) Qᵀ
}

double trace_sqrt_product(const at::Tensor& sigma1, const at::Tensor& sigma2) {
  check_square(sigma1, "trace_sqrt_product");
  check_square(sigma2, "trace_sqrt_product");
  TORCH_CHECK(sigma1.sizes() == sigma2.sizes(), "trace_sqrt_product: shapes differ: ", sigma1.sizes(), " vs ", sigma2.sizes());
  // (√Σ₁√Σ₂)(√Σ₁√Σ₂)ᵀ = √Σ₁ Σ₂ √Σ₁, which is similar to Σ₁Σ₂: its singular values are √λᵢ(Σ₁Σ₂).
  // SVD gets small singular values to ε‖·‖, where square roots of eigenvalues of √Σ₁Σ₂√Σ₁ would
  // turn round-off near 0 into √ε errors (1e-4 in FID for singular 2048-d covariances).
  return at::linalg_svdvals(sqrtm_psd(sigma1).mm(sqrtm_psd(sigma2))).sum().item<double>();
}

double frechet_distance(const at::Tensor& mu1, const at::Tensor& sigma1, const at::Tensor& mu2, const at::Tensor& sigma2) {
  TORCH_CHECK(mu1.dim() == 1 && mu1.sizes() == mu2.sizes(), "frechet_distance: means must be (D) vectors of one size");
  TORCH_CHECK(sigma1.dim() == 2 && sigma1.size(0) == mu1.size(0), "frechet_distance: covariance and mean sizes differ");
  const double mean_term = (mu1.to(at::kDouble) - mu2.to(at::kDouble)).pow(2).sum().item<double>();
  const double trace = sigma1.to(at::kDouble).trace().item<double>() + sigma2.to(at::kDouble).trace().item<double>();
  return mean_term + trace - 2 * trace_sqrt_product(sigma1, sigma2);
}

double frechet_distance(const FeatureStats& a, const FeatureStats& b) {
  TORCH_CHECK(a.mu.sizes() == b.mu.sizes(), "frechet_distance: feature sizes differ: ", a.mu.size(0), " vs ", b.mu.size(0));
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma);
}

double polynomial_mmd2_unbiased(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == y.sizes() && x.size(0) >= 2, "polynomial_mmd2_unbiased: expected two (m >= 2, D) "
              "sets of one shape, got ", x.sizes(), " and ", y.sizes());
  const double m = static_cast<double>(x.size(0)), d = static_cast<double>(x.size(1));
  const auto xf = x.to(at::kFloat), yf = y.to(at::kFloat);
  auto kernel = [d](const at::Tensor& a, const at::Tensor& b) {  // (m, m) float64: (aᵀb / D + 1)³
    return (a.mm(b.t()).to(at::kDouble) / d + 1).pow(3);
  };
  const auto kxx = kernel(xf, xf), kyy = kernel(yf, yf), kxy = kernel(xf, yf);
  const double sxx = (kxx.sum() - kxx.trace()).item<double>(), syy = (kyy.sum() - kyy.trace()).item<double>();
  return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * kxy.sum().item<double>() / (m * m);
}

KidResult kernel_inception_distance(const at::Tensor& x, const at::Tensor& y, const KidOptions& opts) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "kernel_inception_distance: expected (N, D) and (M, D) "
              "features, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(opts.num_subsets >= 1 && opts.subset_size >= 2, "kernel_inception_distance: needs num_subsets >= 1 and "
              "subset_size >= 2");
  const int64_t m = std::min({opts.subset_size, x.size(0), y.size(0)});
  TORCH_CHECK(m >= 2, "kernel_inception_distance: needs at least 2 features on each side");
  auto gen = at::globalContext().defaultGenerator(c10::Device(c10::kCPU)).clone();
  gen.set_current_seed(opts.seed);
  const auto xd = x.to(opts.device), yd = y.to(opts.device);
  std::vector<double> values;
  for (int64_t s = 0; s < opts.num_subsets; ++s) {
    const auto ix = at::randperm(x.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, m).to(opts.device);
    const auto iy = at::randperm(y.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, m).to(opts.device);
    values.push_back(polynomial_mmd2_unbiased(xd.index_select(0, ix), yd.index_select(0, iy)));
  }
  KidResult r;
  r.num_subsets = opts.num_subsets, r.subset_size = m;
  for (double v : values) r.mean += v;
  r.mean /= static_cast<double>(values.size());
  for (double v : values) r.std += (v - r.mean) * (v - r.mean);
  r.std = std::sqrt(r.std / static_cast<double>(values.size()));
  return r;
}

// ---------------------------------------------------------------------------------------------
// The feature network

struct FeatureNetwork::Impl {
  torch::jit::Module module;
  bool return_features = false;  // forward takes return_features (the NVlabs interface)
};

FeatureNetwork::FeatureNetwork(const fs::path& path, const c10::Device& device)
    : impl_(std::make_unique<Impl>()), path_(path), device_(device) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw UsageError(fmt::format("feature network {}: no such file (docs/EVALUATION.md says where to get the TorchScript "
                                 "Inception, inception-2015-12-05.pt)", path.string()));
  try {
    impl_->module = torch::jit::load(path.string(), device);
  } catch (const c10::Error& e) {
    throw UsageError(fmt::format("feature network {}: not a TorchScript archive that torch::jit::load reads ({}). The "
                                 "pytorch-fid .pth (a state dict) and NVlabs' .pkl (a Python pickle) are not TorchScript; "
                                 "see docs/EVALUATION.md", path.string(), e.what_without_backtrace()));
  }
  impl_->module.eval();
  const auto method = impl_->module.find_method("forward");
  if (!method) throw UsageError(fmt::format("feature network {}: the TorchScript module has no forward method", path.string()));
  for (const auto& arg : method->function().getSchema().arguments())
    if (arg.name() == "return_features") impl_->return_features = true;
  sha256_ = sha256_file(path);
}

FeatureNetwork::~FeatureNetwork() = default;

at::Tensor FeatureNetwork::features(const at::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.scalar_type() == at::kByte && (images.size(1) == 1 || images.size(1) == 3),
              "FeatureNetwork: expected (N, 1 or 3, H, W) uint8 images, got ", images.sizes(), " ", images.scalar_type());
  const int64_t n = images.size(0);
  auto x = images.to(device_).to(at::kFloat);              // (N, C, H, W) in [0, 255]
  if (x.size(1) == 1) x = x.expand({n, 3, x.size(2), x.size(3)}).contiguous();  // gray -> RGB, as stylegan's metrics
  torch::NoGradGuard no_grad;
  std::vector<c10::IValue> inputs{x};
  torch::jit::Kwargs kwargs;
  if (impl_->return_features) kwargs["return_features"] = true;
  c10::IValue out;
  try {
    out = impl_->module.forward(inputs, kwargs);
  } catch (const c10::Error& e) {
    throw RuntimeError(fmt::format("feature network {} failed on a ({}, 3, {}, {}) batch: {}", path_.string(), n, x.size(2),
                                   x.size(3), e.what_without_backtrace()));
  }
  if (!out.isTensor())
    throw RuntimeError(fmt::format("feature network {}: forward returned {}, not a tensor", path_.string(), out.tagKind()));
  auto f = out.toTensor();
  if (f.dim() < 2 || f.size(0) != n)
    throw RuntimeError(fmt::format("feature network {}: forward returned shape [{}] for {} images; expected (N, D)", path_.string(),
                                   fmt::join(f.sizes(), ", "), n));
  return f.reshape({n, -1}).to(at::kCPU).to(at::kFloat);  // (N, D)
}

at::Tensor extract_features(FeatureNetwork& net, int64_t count, int64_t batch_size,
                            const std::function<at::Tensor(int64_t, int64_t)>& batch) {
  TORCH_CHECK(count >= 1 && batch_size >= 1, "extract_features: needs count >= 1 and batch_size >= 1");
  std::vector<at::Tensor> parts;
  for (int64_t begin = 0; begin < count; begin += batch_size)
    parts.push_back(net.features(batch(begin, std::min(count, begin + batch_size))));
  return at::cat(parts);  // (count, D)
}

std::vector<fs::path> list_image_files(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw UsageError(fmt::format("image folder {}: no such directory", dir.string()));
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file()) continue;
    if (formats::is_image_file(entry.path().string()) && entry.path().filename() != "grid.png") files.push_back(entry.path());
  }
  if (ec) throw RuntimeError(fmt::format("cannot list {}: {}", dir.string(), ec.message()));
  if (files.empty()) throw UsageError(fmt::format("image folder {} holds no PNG or JPEG files (grid.png aside)", dir.string()));
  std::sort(files.begin(), files.end());
  return files;
}

at::Tensor read_image_file(const fs::path& path) {
  const auto bytes = formats::read_file(path.string());
  auto img = formats::decode_image(bytes.data(), bytes.size(), path.string());
  auto t = at::from_blob(img.pixels.data(), {img.channels, img.height, img.width}, at::TensorOptions().dtype(at::kByte)).clone();
  return drop_alpha(t).contiguous();  // (C, H, W), C = 1 or 3
}

// ---------------------------------------------------------------------------------------------
// Reference statistics

std::string reference_key(const DataConfig& d, const std::string& feature_net_sha256) {
  std::error_code ec;
  const auto abs = fs::weakly_canonical(d.path, ec);
  nlohmann::ordered_json j = {{"feature_net_sha256", feature_net_sha256},
                              {"dataset", to_string(d.dataset)},
                              {"path", ec ? d.path : abs.string()},
                              {"split", to_string(d.split)},
                              {"resolution", d.resolution},
                              {"channels", d.channels},
                              {"resize", to_string(d.resize)},
                              {"allow_upscale", d.allow_upscale},
                              {"subset", d.subset},
                              {"class_filter", d.class_filter},
                              {"crop", "center"}};
  if (d.dataset == DatasetKind::image_folder || d.dataset == DatasetKind::webdataset)  // JPEG pixels depend on it
    j["jpeg_dct_scaling"] = d.jpeg_dct_scaling;
  return j.dump();
}

void save_reference_stats(const fs::path& file, const ReferenceStats& ref) {
  const NamedTensors tensors = {{"mu", ref.stats.mu.to(at::kDouble).contiguous()},
                                {"sigma", ref.stats.sigma.to(at::kDouble).contiguous()},
                                {"features", ref.features.to(at::kFloat).contiguous()}};
  const std::map<std::string, std::string> metadata = {{"format", "difftrain-fid-reference"},
                                                       {"difftrain_version", kVersion},
                                                       {"key", ref.key},
                                                       {"feature_net_sha256", ref.feature_net_sha256},
                                                       {"description", ref.description},
                                                       {"count", std::to_string(ref.stats.count)}};
  std::error_code ec;
  if (file.has_parent_path()) fs::create_directories(file.parent_path(), ec);
  write_file_atomic(file, safetensors_bytes(tensors, metadata));
}

ReferenceStats load_reference_stats(const fs::path& file) {
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) throw UsageError(fmt::format("reference statistics {}: no such file", file.string()));
  const auto st = load_safetensors(file);
  const auto t = st.by_name();
  auto meta = [&](const std::string& k) {
    const auto it = st.metadata.find(k);
    return it == st.metadata.end() ? std::string() : it->second;
  };
  if (meta("format") != "difftrain-fid-reference" || !t.count("mu") || !t.count("sigma") || !t.count("features"))
    throw RuntimeError(fmt::format("{}: not a difftrain reference-statistics file (expected mu, sigma and features, and "
                                   "format = difftrain-fid-reference in its metadata)", file.string()));
  ReferenceStats r;
  r.stats.mu = t.at("mu").to(at::kDouble), r.stats.sigma = t.at("sigma").to(at::kDouble);
  r.features = t.at("features").to(at::kFloat);
  r.stats.count = r.features.size(0);
  const int64_t d = r.stats.mu.size(0);
  if (r.stats.mu.dim() != 1 || r.stats.sigma.sizes() != at::IntArrayRef({d, d}) || r.features.dim() != 2 || r.features.size(1) != d)
    throw RuntimeError(fmt::format("{}: mu, sigma and features have inconsistent shapes", file.string()));
  r.key = meta("key"), r.feature_net_sha256 = meta("feature_net_sha256"), r.description = meta("description");
  return r;
}

}  // namespace difftrain
