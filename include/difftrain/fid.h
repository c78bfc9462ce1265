// Sample quality metrics on the features of a TorchScript network given by path (nothing is
// downloaded): Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
// Update Rule ...", eq. 6) and Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD
// GANs", §4: the unbiased MMD² with the cubic polynomial kernel, averaged over random subsets as
// torch-fidelity and clean-fid compute it).
//
// The feature network follows the interface of NVlabs' TorchScript Inception
// (inception-2015-12-05.pt, used by stylegan2-ada-pytorch, stylegan3 and clean-fid): forward(img,
// return_features=True) with img (N, 3, H, W) float32 pixel values in [0, 255]; it resizes
// internally and returns (N, D) features (D = 2048 pool3 features for Inception). A network
// whose forward has no return_features argument is called as forward(img). docs/EVALUATION.md
// says where the file comes from.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "difftrain/config.h"

namespace difftrain {

// ---------------------------------------------------------------------------------------------
// Statistics and distances (float64 throughout)

struct FeatureStats {
  at::Tensor mu;     // (D) float64
  at::Tensor sigma;  // (D, D) float64, unbiased (divided by N - 1) as numpy.cov and pytorch-fid
  int64_t count = 0;
};
// Mean and covariance of (N, D) features, N >= 2.
FeatureStats feature_stats(const at::Tensor& features);

// The symmetric PSD square root of a symmetric PSD matrix by eigendecomposition in float64
// (A = Q Λ Qᵀ, √A = Q √Λ Qᵀ; eigenvalues below zero from round-off are clamped to 0).
at::Tensor sqrtm_psd(const at::Tensor& a);
// tr √(Σ₁Σ₂) for symmetric PSD Σ₁, Σ₂. Σ₁Σ₂ is not symmetric, but it is similar to the PSD
// matrix √Σ₁ Σ₂ √Σ₁ = (√Σ₁√Σ₂)(√Σ₁√Σ₂)ᵀ, so the trace is the sum of the singular values of
// √Σ₁√Σ₂ (its nuclear norm): two symmetric eigendecompositions and an SVD, all in float64, real by
// construction (no complex sqrtm and no imaginary parts to discard), and accurate to ε‖Σ‖ also
// for singular covariances (fewer samples than features).
double trace_sqrt_product(const at::Tensor& sigma1, const at::Tensor& sigma2);
// FID = ‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 √(Σ₁Σ₂))  (Heusel et al. 2017, eq. 6; Dowson & Landau 1982).
double frechet_distance(const at::Tensor& mu1, const at::Tensor& sigma1, const at::Tensor& mu2, const at::Tensor& sigma2);
double frechet_distance(const FeatureStats& a, const FeatureStats& b);

// Unbiased MMD² between (m, D) sets X and Y with k(x, y) = (xᵀy / D + 1)³ (Bińkowski et al. 2018,
// eq. 2 with the kernel of §4):
//   1/(m(m-1)) Σ_{i≠j} k(xᵢ, xⱼ) + 1/(m(m-1)) Σ_{i≠j} k(yᵢ, yⱼ) - 2/m² Σ_{i,j} k(xᵢ, yⱼ).
// Kernel matrices are float32 products accumulated in float64.
double polynomial_mmd2_unbiased(const at::Tensor& x, const at::Tensor& y);

struct KidOptions {
  int64_t num_subsets = 100;    // torch-fidelity's kid_subsets
  int64_t subset_size = 1000;   // torch-fidelity's kid_subset_size; capped at the smaller set
  uint64_t seed = 0;            // which subsets (drawn without replacement, CPU generator)
  c10::Device device{c10::kCPU};  // where the kernel matrices are computed
};
struct KidResult {
  double mean = 0, std = 0;  // over subsets (std as numpy.std: population)
  int64_t num_subsets = 0, subset_size = 0;
};
KidResult kernel_inception_distance(const at::Tensor& x, const at::Tensor& y, const KidOptions& opts = {});

// ---------------------------------------------------------------------------------------------
// The feature network

class FeatureNetwork {
 public:
  // torch::jit::load of `path` onto `device`. UsageError when the file is missing or is not a
  // TorchScript archive with a forward method.
  FeatureNetwork(const std::filesystem::path& path, const c10::Device& device);
  ~FeatureNetwork();
  FeatureNetwork(const FeatureNetwork&) = delete;
  FeatureNetwork& operator=(const FeatureNetwork&) = delete;

  // (N, C, H, W) uint8 images, C = 1 (replicated to RGB) or 3 -> (N, D) float32 features on the CPU.
  at::Tensor features(const at::Tensor& images);
  const std::filesystem::path& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }  // of the file: identifies cached statistics
  const c10::Device& device() const { return device_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::filesystem::path path_;
  std::string sha256_;
  c10::Device device_;
};

// Features of `count` images delivered in batches: batch(begin, end) returns images [begin, end)
// as (B, C, H, W) uint8. Returns (count, D) float32.
at::Tensor extract_features(FeatureNetwork& net, int64_t count, int64_t batch_size,
                            const std::function<at::Tensor(int64_t, int64_t)>& batch);

// The PNG/JPEG files of a folder, sorted by name, without grid.png (what `difftrain sample`
// writes next to the samples). UsageError when the folder is missing or holds no images.
std::vector<std::filesystem::path> list_image_files(const std::filesystem::path& dir);
// One image file as (C, H, W) uint8 with C = 1 or 3 (alpha dropped).
at::Tensor read_image_file(const std::filesystem::path& path);

// ---------------------------------------------------------------------------------------------
// Reference statistics, cached next to the run

struct ReferenceStats {
  FeatureStats stats;
  at::Tensor features;  // (N, D) float32, for KID
  std::string key;      // what they were computed from (reference_key); empty when unknown
  std::string feature_net_sha256;
  std::string description;  // the dataset, for messages
};
// Identifies a dataset reference: the feature network's SHA-256 and every data.* key that changes
// the images (reader, path, split, resolution, channels, resize, subset, class filter).
std::string reference_key(const DataConfig& data, const std::string& feature_net_sha256);
// A safetensors file: mu (D) F64, sigma (D, D) F64, features (N, D) F32, and the key,
// feature-network hash and description in the metadata. Written atomically.
void save_reference_stats(const std::filesystem::path& file, const ReferenceStats& ref);
ReferenceStats load_reference_stats(const std::filesystem::path& file);

}  // namespace difftrain
