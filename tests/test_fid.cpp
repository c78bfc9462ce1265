// FID and KID: the matrix square root and the Fréchet distance against closed forms (2x2 formulas,
// commuting and scaled covariances, singular ones), statistics and the unbiased MMD against naive
// loops, sample Gaussians against the population value, and the whole path through a tiny
// TorchScript feature network (tests/fid/make_feature_net.py, made at test time) whose features
// are linear in the pixels: identical sets give 0, shifted images the closed-form ‖Δμ‖².
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/fid.h"
#include "difftrain/safetensors.h"
#include "difftrain/sampling.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using torch::indexing::Slice;

at::Tensor random_spd(int64_t d, int64_t rank, uint64_t seed) {
  torch::manual_seed(seed);
  const auto a = torch::randn({d, rank}, torch::kDouble);
  return a.mm(a.t()) / static_cast<double>(rank);  // (d, d), rank `rank`
}

at::Tensor random_rotation(int64_t d, uint64_t seed) {
  torch::manual_seed(seed);
  return std::get<0>(torch::linalg_qr(torch::randn({d, d}, torch::kDouble)));
}

TEST(MatrixSqrt, MatchesTheTwoByTwoClosedForm) {
  // √M = (M + s I) / t with s = √det M, t = √(tr M + 2s), for symmetric positive definite 2x2 M.
  for (const auto& [a, b, c] : {std::tuple{4.0, 1.0, 3.0}, std::tuple{1e-3, 2e-4, 5e-4}, std::tuple{9.0, -2.9, 1.0}}) {
    const auto m = torch::tensor({a, b, b, c}, torch::kDouble).reshape({2, 2});
    const double s = std::sqrt(a * c - b * b), t = std::sqrt(a + c + 2 * s);
    const auto expected = (m + s * torch::eye(2, torch::kDouble)) / t;
    EXPECT_TRUE(torch::allclose(sqrtm_psd(m), expected, 1e-12, 1e-14)) << sqrtm_psd(m) << expected;
  }
}

TEST(MatrixSqrt, SquaresBackForFullAndSingularMatrices) {
  for (const int64_t rank : {128, 16}) {  // 64x64 of full rank, and of rank 16 (fewer samples than features)
    const auto a = random_spd(64, rank, 1);
    const auto r = sqrtm_psd(a);
    EXPECT_TRUE(torch::equal(r, r.t()) || torch::allclose(r, r.t(), 0, 1e-13));
    EXPECT_TRUE(torch::allclose(r.mm(r), a, 1e-9, 1e-10)) << "rank " << rank << ": max error "
                                                           << (r.mm(r) - a).abs().max().item<double>();
    EXPECT_GE(torch::linalg_eigvalsh(r).min().item<double>(), -1e-10);
  }
}

TEST(MatrixSqrt, TraceOfSqrtProductMatchesTheClosedForm) {
  // Non-commuting 2x2: Σ₁Σ₂ has eigenvalues λ₁, λ₂ ≥ 0, so tr √(Σ₁Σ₂) = √λ₁ + √λ₂ = √(tr(Σ₁Σ₂) + 2√(det Σ₁ det Σ₂)).
  const auto s1 = torch::tensor({2.0, 0.7, 0.7, 1.0}, torch::kDouble).reshape({2, 2});
  const auto s2 = torch::tensor({0.5, -0.3, -0.3, 3.0}, torch::kDouble).reshape({2, 2});
  const double expected = std::sqrt(s1.mm(s2).trace().item<double>() +
                                    2 * std::sqrt(torch::det(s1).item<double>() * torch::det(s2).item<double>()));
  EXPECT_NEAR(trace_sqrt_product(s1, s2), expected, 1e-12);
  EXPECT_NEAR(trace_sqrt_product(s2, s1), expected, 1e-12);
}

TEST(Fid, ClosedForms) {
  const int64_t d = 32;
  torch::manual_seed(3);
  const auto mu1 = torch::randn({d}, torch::kDouble), mu2 = torch::randn({d}, torch::kDouble);
  const double mean_term = (mu1 - mu2).pow(2).sum().item<double>();
  // Commuting covariances Q D₁ Qᵀ, Q D₂ Qᵀ: FID = ‖Δμ‖² + Σ (√d₁ - √d₂)².
  const auto q = random_rotation(d, 4);
  const auto d1 = torch::rand({d}, torch::kDouble) * 3 + 0.01, d2 = torch::rand({d}, torch::kDouble) * 0.5;
  const auto c1 = (q * d1).mm(q.t()), c2 = (q * d2).mm(q.t());
  EXPECT_NEAR(frechet_distance(mu1, c1, mu2, c2), mean_term + (d1.sqrt() - d2.sqrt()).pow(2).sum().item<double>(), 1e-9);
  // Scaled: Σ₂ = k² Σ₁ gives ‖Δμ‖² + (1 - k)² tr Σ₁.
  const auto s = random_spd(d, 2 * d, 5);
  EXPECT_NEAR(frechet_distance(mu1, s, mu2, 0.25 * s), mean_term + 0.25 * s.trace().item<double>(), 1e-9);
  // Identical distributions, also with a singular covariance: 0.
  EXPECT_NEAR(frechet_distance(mu1, s, mu1, s), 0.0, 1e-9);
  for (const auto& [dim, rank] : {std::pair<int64_t, int64_t>{32, 5}, std::pair<int64_t, int64_t>{512, 40}}) {
    const auto singular = random_spd(dim, rank, 6);  // fewer samples than features
    const auto mu = torch::zeros({dim}, torch::kDouble);
    const double f = frechet_distance(mu, singular, mu, singular);
    EXPECT_TRUE(std::isfinite(f));
    EXPECT_NEAR(f, 0.0, 1e-10 * singular.trace().item<double>()) << dim << "x" << dim << " of rank " << rank;
  }
}

TEST(Fid, StatisticsMatchNaiveLoops) {
  torch::manual_seed(7);
  const auto x = torch::randn({50, 5}) * 3 + 1;  // float32 features
  const FeatureStats s = feature_stats(x);
  EXPECT_EQ(s.count, 50);
  EXPECT_EQ(s.mu.scalar_type(), torch::kDouble);
  const auto xd = x.to(torch::kDouble);
  for (int64_t i = 0; i < 5; ++i) {
    double m = 0;
    for (int64_t n = 0; n < 50; ++n) m += xd[n][i].item<double>();
    m /= 50;
    EXPECT_NEAR(s.mu[i].item<double>(), m, 1e-12);
    for (int64_t j = 0; j < 5; ++j) {
      double mj = 0, c = 0;
      for (int64_t n = 0; n < 50; ++n) mj += xd[n][j].item<double>();
      mj /= 50;
      for (int64_t n = 0; n < 50; ++n) c += (xd[n][i].item<double>() - m) * (xd[n][j].item<double>() - mj);
      EXPECT_NEAR(s.sigma[i][j].item<double>(), c / 49, 1e-10);  // unbiased, as numpy.cov
    }
  }
}

TEST(Fid, SampleGaussiansGiveThePopulationValue) {
  // X ~ N(0, I₄), Y ~ N(μ, 4 I₄): FID = ‖μ‖² + 4 (1 - 2)² = 6 + 4 = 10.
  torch::manual_seed(11);
  const auto x = torch::randn({20000, 4}, torch::kDouble);
  const auto mu = torch::tensor({1.0, 2.0, 0.0, -1.0}, torch::kDouble);
  const auto y = torch::randn({20000, 4}, torch::kDouble) * 2 + mu;
  EXPECT_NEAR(frechet_distance(feature_stats(x), feature_stats(y)), 10.0, 0.2);
}

// Unbiased MMD² with k(x, y) = (xᵀy / d + 1)³, written as three double loops.
double naive_mmd2(const at::Tensor& x, const at::Tensor& y) {
  const int64_t m = x.size(0), d = x.size(1);
  const auto a = x.to(torch::kDouble).contiguous(), b = y.to(torch::kDouble).contiguous();
  auto k = [&](const at::Tensor& p, int64_t i, const at::Tensor& q, int64_t j) {
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += p[i][c].item<double>() * q[j][c].item<double>();
    return std::pow(dot / static_cast<double>(d) + 1, 3);
  };
  double xx = 0, yy = 0, xy = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      if (i != j) xx += k(a, i, a, j), yy += k(b, i, b, j);
      xy += k(a, i, b, j);
    }
  const double md = static_cast<double>(m);
  return xx / (md * (md - 1)) + yy / (md * (md - 1)) - 2 * xy / (md * md);
}

TEST(Kid, UnbiasedMmdMatchesNaiveLoops) {
  torch::manual_seed(13);
  const auto x = torch::randn({20, 6}), y = torch::randn({20, 6}) * 1.5 + 0.5;
  const double expected = naive_mmd2(x, y);
  EXPECT_NEAR(polynomial_mmd2_unbiased(x, y), expected, 1e-5 * std::max(1.0, std::abs(expected)));
  // One subset holding every feature is the full-set estimate, whatever the permutation.
  KidOptions o;
  o.num_subsets = 1, o.subset_size = 1000;
  const KidResult r = kernel_inception_distance(x, y, o);
  EXPECT_EQ(r.subset_size, 20);
  EXPECT_NEAR(r.mean, expected, 1e-5 * std::max(1.0, std::abs(expected)));
  EXPECT_EQ(r.std, 0.0);
}

TEST(Kid, SubsetsAreSeededAndSeparateDistributions) {
  torch::manual_seed(17);
  const auto x = torch::randn({2000, 8}), x2 = torch::randn({2000, 8}), y = torch::randn({2000, 8}) + 0.5;
  KidOptions o;
  o.num_subsets = 20, o.subset_size = 500;
  const KidResult same = kernel_inception_distance(x, x2, o), shifted = kernel_inception_distance(x, y, o);
  EXPECT_LT(std::abs(same.mean), 5e-3) << "an unbiased estimate between samples of one distribution";
  EXPECT_GT(shifted.mean, 20 * same.std + 0.05);
  EXPECT_EQ(kernel_inception_distance(x, y, o).mean, shifted.mean) << "deterministic for a seed";
  o.seed = 1;
  EXPECT_NE(kernel_inception_distance(x, y, o).mean, shifted.mean);
}

// ---------------------------------------------------------------------------------------------
// The tiny TorchScript feature network

struct TinyNet {
  fs::path path;
  at::Tensor weight, bias;  // features = W · flatten(avgpool₄(img / 255)) + b
};

// Made once per process by tests/fid/make_feature_net.py; nullopt without a venv Python.
const std::optional<TinyNet>& tiny_net() {
  static const std::optional<TinyNet> net = []() -> std::optional<TinyNet> {
    const std::string python = test::python();
    if (python.empty()) return std::nullopt;
    const fs::path dir = fs::temp_directory_path() / fmt::format("difftrain_fidnet_{}", ::getpid());
    fs::create_directories(dir);
    static const struct Cleanup {
      fs::path dir;
      ~Cleanup() { fs::remove_all(dir); }
    } cleanup{dir};
    const std::string cmd = python + " " + test::source_dir() + "/tests/fid/make_feature_net.py " + (dir / "net.pt").string() +
                            " " + (dir / "params.safetensors").string() + " >" + (dir / "log").string() + " 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      std::ifstream log(dir / "log");
      ADD_FAILURE() << "make_feature_net.py failed:\n" << std::string(std::istreambuf_iterator<char>(log), {});
      return std::nullopt;
    }
    const auto params = load_safetensors(dir / "params.safetensors").by_name();
    return TinyNet{dir / "net.pt", params.at("weight"), params.at("bias")};
  }();
  return net;
}

#define REQUIRE_TINY_NET()                                                                         \
  if (!tiny_net()) GTEST_SKIP() << "no venv python with torch (make test installs it)";           \
  const TinyNet& tiny = *tiny_net()

at::Tensor expected_features(const TinyNet& t, const at::Tensor& images) {  // (N, C, H, W) uint8
  auto x = images.to(torch::kDouble) / 255;
  if (x.size(1) == 1) x = x.expand({x.size(0), 3, x.size(2), x.size(3)});
  const auto pooled = torch::adaptive_avg_pool2d(x, {4, 4}).flatten(1);  // (N, 48)
  return pooled.mm(t.weight.to(torch::kDouble).t()) + t.bias.to(torch::kDouble);  // (N, 8)
}

// Pixels round(N(128, 25²)) clamped to [30, 220]: room for a +20 shift without clipping.
at::Tensor gaussian_images(int64_t n, int64_t c, int64_t size, uint64_t seed) {
  torch::manual_seed(seed);
  return (torch::randn({n, c, size, size}) * 25 + 128).round().clamp(30, 220).to(torch::kByte);
}

TEST(FeatureNetwork, CallsForwardWithReturnFeatures) {
  REQUIRE_TINY_NET();
  FeatureNetwork net(tiny.path, torch::kCPU);
  const auto rgb = gaussian_images(10, 3, 8, 1);
  const auto f = net.features(rgb);
  ASSERT_EQ(f.sizes(), (std::vector<int64_t>{10, 8})) << "features (D = 8), not the 3 logits";
  EXPECT_TRUE(torch::allclose(f.to(torch::kDouble), expected_features(tiny, rgb), 1e-5, 1e-5));
  // Gray images are replicated to RGB; other sizes pass through (the network resizes).
  const auto gray = gaussian_images(4, 1, 12, 2);
  EXPECT_TRUE(torch::allclose(net.features(gray).to(torch::kDouble), expected_features(tiny, gray), 1e-5, 1e-5));
  EXPECT_EQ(net.sha256().size(), 64u);
}

TEST(FeatureNetwork, RejectsFilesThatAreNotTorchScript) {
  const fs::path bad = fs::temp_directory_path() / fmt::format("difftrain_not_ts_{}.pth", ::getpid());
  std::ofstream(bad) << "a pickled state dict is not TorchScript";
  try {
    FeatureNetwork net(bad, torch::kCPU);
    ADD_FAILURE() << "no error";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("not a TorchScript archive"), std::string::npos) << e.what();
  }
  fs::remove(bad);
  EXPECT_THROW({ FeatureNetwork missing(bad, torch::kCPU); }, UsageError);
}

// Through the network: identical sets give FID 0; a +20 shift of every pixel moves every pooled
// input by 20/255 and leaves the covariance unchanged, so FID = ‖W (20/255) 1‖² exactly.
TEST(FeatureNetwork, FidOfIdenticalAndShiftedImages) {
  REQUIRE_TINY_NET();
  FeatureNetwork net(tiny.path, torch::kCPU);
  const auto images = gaussian_images(300, 3, 8, 3);
  auto batches = [](const at::Tensor& all) { return [all](int64_t b, int64_t e) { return all.slice(0, b, e); }; };
  const auto f = extract_features(net, 300, 64, batches(images));
  const auto f_again = extract_features(net, 300, 7, batches(images));
  EXPECT_TRUE(torch::allclose(f, f_again, 1e-6, 1e-6)) << "batching does not change the features";
  EXPECT_NEAR(frechet_distance(feature_stats(f), feature_stats(f_again)), 0.0, 1e-6);

  const auto shifted = (images.to(torch::kInt) + 20).to(torch::kByte);
  const auto g = extract_features(net, 300, 64, batches(shifted));
  const double closed_form = tiny.weight.to(torch::kDouble).sum(1).mul(20.0 / 255).pow(2).sum().item<double>();
  ASSERT_GT(closed_form, 0.01);
  EXPECT_NEAR(frechet_distance(feature_stats(f), feature_stats(g)), closed_form, 1e-4 * closed_form);
  KidOptions o;
  o.num_subsets = 10, o.subset_size = 100;
  EXPECT_GT(kernel_inception_distance(f, g, o).mean, 0.0);
}

TEST(ReferenceStats, RoundTripAndKey) {
  torch::manual_seed(19);
  const auto features = torch::randn({40, 6});
  ReferenceStats r{feature_stats(features), features, "key-1", std::string(64, 'a'), "test data"};
  const fs::path file = fs::temp_directory_path() / fmt::format("difftrain_refstats_{}", ::getpid()) / "ref.safetensors";
  save_reference_stats(file, r);
  const ReferenceStats back = load_reference_stats(file);
  EXPECT_TRUE(torch::equal(back.stats.mu, r.stats.mu));
  EXPECT_TRUE(torch::equal(back.stats.sigma, r.stats.sigma));
  EXPECT_TRUE(torch::equal(back.features, features));
  EXPECT_EQ(back.stats.count, 40);
  EXPECT_EQ(back.key, "key-1");
  EXPECT_EQ(back.feature_net_sha256, std::string(64, 'a'));
  EXPECT_EQ(back.description, "test data");
  save_safetensors(file, {{"x", torch::zeros({2})}});
  EXPECT_THROW(load_reference_stats(file), RuntimeError);
  fs::remove_all(file.parent_path());

  DataConfig d;
  const std::string k = reference_key(d, "sha");
  EXPECT_EQ(reference_key(d, "sha"), k);
  EXPECT_NE(reference_key(d, "other"), k);
  DataConfig d2 = d;
  d2.split = Split::test;
  EXPECT_NE(reference_key(d2, "sha"), k);
  d2 = d, d2.random_flip = true, d2.num_workers = 7;  // neither changes the reference images
  EXPECT_EQ(reference_key(d2, "sha"), k);
}

TEST(ImageFolder, ListsSamplesWithoutTheGrid) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("difftrain_imgfolder_{}", ::getpid());
  fs::remove_all(dir);
  const auto images = gaussian_images(3, 3, 8, 5);
  save_sample_folder(dir, images);  // 000000.png .. 000002.png and grid.png
  std::ofstream(dir / "notes.txt") << "not an image";
  const auto files = list_image_files(dir);
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files[0].filename(), "000000.png");
  EXPECT_TRUE(torch::equal(read_image_file(files[2]), images[2]));
  fs::remove_all(dir);
  EXPECT_THROW(list_image_files(dir), UsageError);
}

}  // namespace
}  // namespace difftrain
