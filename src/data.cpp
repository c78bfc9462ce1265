#include "difftrain/data.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/_upsample_bilinear2d_aa.h>
#include <ATen/ops/adaptive_avg_pool2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/randperm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/upsample_bilinear2d.h>
#include <ATen/ops/where.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "difftrain/config.h"
#include "difftrain/log.h"
#include "difftrain/rng.h"
#include "difftrain/webdataset.h"

namespace difftrain {

namespace fs = std::filesystem;
using formats::FormatError;

namespace {

// The per-sample random stream is a splitmix64 hash (rng.h) of (seed, epoch, index).
uint64_t sample_key(uint64_t seed, int64_t epoch, int64_t index) {
  return splitmix64(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(epoch)) ^ static_cast<uint64_t>(index));
}

at::Tensor pixels_tensor(const uint8_t* data, int64_t c, int64_t h, int64_t w) {
  return at::from_blob(const_cast<uint8_t*>(data), {c, h, w}, at::TensorOptions().dtype(at::kByte)).clone();  // (C, H, W)
}

fs::path first_existing(const fs::path& dir, const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (fs::exists(dir / n)) return dir / n;
  return {};
}

std::shared_ptr<Dataset> open_idx(const DataConfig& cfg) {
  const fs::path dir = cfg.path;
  const std::string prefix = cfg.split == Split::train ? "train" : "t10k";
  const auto images = first_existing(dir, {prefix + "-images-idx3-ubyte.gz", prefix + "-images-idx3-ubyte"});
  const auto labels = first_existing(dir, {prefix + "-labels-idx1-ubyte.gz", prefix + "-labels-idx1-ubyte"});
  if (images.empty() || labels.empty())
    throw FormatError(fmt::format("data.path {}: no IDX {} split there (expected {}-images-idx3-ubyte[.gz] and "
                                  "{}-labels-idx1-ubyte[.gz]; Fashion-MNIST comes with Debian's dataset-fashion-mnist)",
                                  dir.string(), to_string(cfg.split), prefix, prefix));
  auto array = formats::parse_idx_images(formats::read_file(images.string()), images.string());
  array.labels = formats::parse_idx_labels(formats::read_file(labels.string()), labels.string());
  if (static_cast<int64_t>(array.labels.size()) != array.count)
    throw FormatError(fmt::format("{} has {} images but {} has {} labels", images.string(), array.count, labels.string(),
                                  array.labels.size()));
  const int64_t classes = array.labels.empty() ? 0 : *std::max_element(array.labels.begin(), array.labels.end()) + 1;
  const std::string what = fmt::format("IDX {} split of {}: {} images {}x{}x1, {} classes", to_string(cfg.split), dir.string(),
                                       array.count, array.height, array.width, classes);
  return std::make_shared<ArrayDataset>(std::move(array), classes, what);
}

std::shared_ptr<Dataset> open_cifar10(const DataConfig& cfg) {
  const fs::path dir = cfg.path;
  std::vector<std::string> names;
  if (cfg.split == Split::train)
    for (int i = 1; i <= 5; ++i) names.push_back(fmt::format("data_batch_{}.bin", i));
  else
    names.push_back("test_batch.bin");
  formats::ImageArray all;
  for (const auto& n : names) {
    const fs::path file = dir / n;
    if (!fs::exists(file))
      throw FormatError(fmt::format("data.path {}: missing {} (the CIFAR-10 binary version, cifar-10-batches-bin)", dir.string(), n));
    auto part = formats::parse_cifar10(formats::read_file(file.string()), file.string());
    all.count += part.count;
    all.channels = part.channels;
    all.height = part.height;
    all.width = part.width;
    all.pixels.insert(all.pixels.end(), part.pixels.begin(), part.pixels.end());
    all.labels.insert(all.labels.end(), part.labels.begin(), part.labels.end());
  }
  const std::string what = fmt::format("CIFAR-10 {} split of {}: {} images 32x32x3, 10 classes", to_string(cfg.split), dir.string(),
                                       all.count);
  return std::make_shared<ArrayDataset>(std::move(all), 10, what);
}

}  // namespace

// ---------------------------------------------------------------------------------------------

ArrayDataset::ArrayDataset(formats::ImageArray array, int64_t num_classes, std::string description)
    : array_(std::move(array)), num_classes_(num_classes), description_(std::move(description)) {}

Sample ArrayDataset::get(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < array_.count, "dataset index ", i, " out of range [0, ", array_.count, ")");
  const int64_t n = array_.channels * array_.height * array_.width;
  return {pixels_tensor(array_.pixels.data() + i * n, array_.channels, array_.height, array_.width),
          array_.labels.empty() ? -1 : array_.labels[static_cast<size_t>(i)]};
}

ImageFolderDataset::ImageFolderDataset(const std::string& root, BadImagePolicy policy, int64_t min_side, int64_t jpeg_min_side)
    : root_(root), policy_(policy), jpeg_min_side_(jpeg_min_side) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) throw FormatError(fmt::format("data.path {}: not a directory", root));
  std::vector<fs::path> subdirs, flat;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (e.is_directory()) subdirs.push_back(e.path());
    else if (e.is_regular_file() && formats::is_image_file(e.path())) flat.push_back(e.path());
  }
  std::sort(subdirs.begin(), subdirs.end());
  for (const auto& d : subdirs) {
    std::vector<fs::path> files;
    for (const auto& e : fs::recursive_directory_iterator(d, ec))
      if (e.is_regular_file() && formats::is_image_file(e.path())) files.push_back(e.path());
    if (files.empty()) continue;
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      files_.push_back(f.string());
      labels_.push_back(static_cast<int64_t>(classes_.size()));
    }
    classes_.push_back(d.filename().string());
  }
  if (files_.empty()) {  // a flat folder: unlabelled
    std::sort(flat.begin(), flat.end());
    for (const auto& f : flat) {
      files_.push_back(f.string());
      labels_.push_back(-1);
    }
  } else if (!flat.empty()) {
    log_warn("data.path {}: {} image(s) directly in the folder are ignored; the labelled images are in its subfolders", root,
             flat.size());
  }
  if (files_.empty()) throw FormatError(fmt::format("data.path {}: no PNG or JPEG files (searched it and its subfolders)", root));

  // Every header now, so that a bad file stops the run before training rather than at the epoch that reaches it.
  std::vector<std::string> good;
  std::vector<int64_t> good_labels;
  for (size_t i = 0; i < files_.size(); ++i) {
    try {
      const auto info = formats::check_image_file(files_[i]);
      if (std::min(info.height, info.width) < min_side)
        throw FormatError(fmt::format("{}: {}x{} is smaller than data.resolution = {} and data.allow_upscale is false", files_[i],
                                      info.width, info.height, min_side));
      good.push_back(files_[i]);
      good_labels.push_back(labels_[i]);
    } catch (const FormatError& e) {
      left_out_.push_back(e.what());
    }
  }
  if (left_out_.empty()) return;
  const size_t n = left_out_.size();
  if (policy_ == BadImagePolicy::skip && !good.empty()) {
    log_warn("data.path {}: leaving out {} of {} image files (data.on_bad_image = \"skip\"):\n  {}", root, n, files_.size(),
             fmt::join(left_out_, "\n  "));
    files_ = std::move(good);
    labels_ = std::move(good_labels);
    return;
  }
  constexpr size_t kShown = 20;  // in the error; the log has them all
  if (n > kShown) log_error("data.path {}: all {} bad image files:\n  {}", root, n, fmt::join(left_out_, "\n  "));
  const std::vector<std::string> shown(left_out_.begin(), left_out_.begin() + static_cast<std::ptrdiff_t>(std::min(n, kShown)));
  throw FormatError(fmt::format(
      "data.path {}: {} of {} image files cannot be used:\n  {}{}\n{}", root, n, files_.size(), fmt::join(shown, "\n  "),
      n > kShown ? fmt::format("\n  ... and {} more (all listed in the log above)", n - kShown) : "",
      good.empty() ? "none is usable" : "fix or remove them, or set data.on_bad_image = \"skip\" to leave them out"));
}

Sample read_or_skip(int64_t index, int64_t n, BadImagePolicy policy, std::atomic<int64_t>& skipped, const std::string& what,
                    const std::function<Sample(int64_t)>& read) {
  for (int64_t attempt = 0; attempt < n; ++attempt) {
    try {
      return read((index + attempt) % n);
    } catch (const FormatError& e) {
      if (policy == BadImagePolicy::fail)
        throw FormatError(std::string(e.what()) + " (set data.on_bad_image = \"skip\" to skip such images)");
      ++skipped;
      log_warn("skipping an undecodable image: {}", e.what());
    }
  }
  throw FormatError(fmt::format("{}: none of the {} images could be decoded", what, n));
}

Sample ImageFolderDataset::get(int64_t index) const {
  return read_or_skip(index, size(), policy_, skipped_, "data.path " + root_, [&](int64_t k) {
    const auto& file = files_[static_cast<size_t>(k)];
    const auto bytes = formats::read_file(file, size_t{1} << 28);
    const auto img = formats::decode_image(bytes.data(), bytes.size(), file, jpeg_min_side_);
    return Sample{pixels_tensor(img.pixels.data(), img.channels, img.height, img.width), labels_[static_cast<size_t>(k)]};
  });
}

std::string ImageFolderDataset::describe() const {
  return fmt::format(
      "image folder {}: {} images, {}{}", root_, files_.size(),
      classes_.empty() ? std::string("unlabelled") : fmt::format("{} classes", classes_.size()),
      left_out_.empty() ? "" : fmt::format(" ({} bad file{} left out)", left_out_.size(), left_out_.size() == 1 ? "" : "s"));
}

SubsetDataset::SubsetDataset(std::shared_ptr<Dataset> base, std::vector<int64_t> indices)
    : base_(std::move(base)), indices_(std::move(indices)) {}

std::string SubsetDataset::describe() const { return fmt::format("{} items of {}", indices_.size(), base_->describe()); }

std::shared_ptr<Dataset> open_dataset(const DataConfig& cfg) {
  std::shared_ptr<Dataset> ds;
  const int64_t jpeg_min_side = cfg.jpeg_dct_scaling ? cfg.resolution : 0;  // augment resizes the shorter side to it
  switch (cfg.dataset) {
    case DatasetKind::idx: ds = open_idx(cfg); break;
    case DatasetKind::cifar10: ds = open_cifar10(cfg); break;
    case DatasetKind::image_folder:
      ds =
          std::make_shared<ImageFolderDataset>(cfg.path, cfg.on_bad_image, cfg.allow_upscale ? 0 : cfg.resolution, jpeg_min_side);
      break;
    case DatasetKind::webdataset:
      ds = std::make_shared<WebDataset>(cfg.path, cfg.label_field, cfg.shuffle_buffer, cfg.on_bad_image, jpeg_min_side,
                                        cfg.shard_streams);
      break;
  }
  if (!cfg.allow_upscale && cfg.dataset != DatasetKind::image_folder &&
      cfg.dataset != DatasetKind::webdataset) {  // one size for all: check it now
    const auto& img = ds->get(0).image;
    if (std::min(img.size(1), img.size(2)) < cfg.resolution)
      throw FormatError(fmt::format("data.resolution = {} is larger than the {}x{} images of {}, and data.allow_upscale is false",
                                    cfg.resolution, img.size(1), img.size(2), ds->describe()));
  }
  if (cfg.class_filter.empty() && (cfg.subset == 0 || cfg.subset >= ds->size())) return ds;
  if (cfg.shard_streams > 0)
    throw FormatError(
        fmt::format("data.shard_streams = {} reads whole shards, and data.subset / data.class_filter pick single "
                    "items: use one or the other",
                    cfg.shard_streams));
  std::vector<int64_t> keep;
  if (!cfg.class_filter.empty()) {
    if (ds->num_classes() == 0)
      throw FormatError(fmt::format("data.class_filter: {} has no labels to filter on", ds->describe()));
    for (int64_t i = 0; i < ds->size() && (cfg.subset == 0 || static_cast<int64_t>(keep.size()) < cfg.subset); ++i)
      if (std::find(cfg.class_filter.begin(), cfg.class_filter.end(), ds->label(i)) != cfg.class_filter.end()) keep.push_back(i);
  } else {
    for (int64_t i = 0; i < std::min(cfg.subset, ds->size()); ++i) keep.push_back(i);
  }
  if (keep.empty()) throw FormatError(fmt::format("data.class_filter: no item of {} has one of those labels", ds->describe()));
  return std::make_shared<SubsetDataset>(ds, std::move(keep));
}

// ---------------------------------------------------------------------------------------------

AugmentOptions AugmentOptions::from(const DataConfig& d) {
  return {d.resolution, d.channels, d.resize, d.crop, d.random_flip, d.allow_upscale};
}

at::Tensor drop_alpha(const at::Tensor& image) {
  const int64_t c = image.size(0);
  return c == 2 || c == 4 ? image.slice(0, 0, c - 1) : image;
}

at::Tensor augment(const at::Tensor& image, const AugmentOptions& o, uint64_t key) {
  TORCH_CHECK(image.dim() == 3 && image.scalar_type() == at::kByte && image.numel() > 0,
              "augment: expected a non-empty (C, H, W) uint8 image, got ", image.sizes());
  TORCH_CHECK(o.resolution >= 1, "augment: resolution must be >= 1");
  at::Tensor x = image;
  // 1. channels: drop alpha, then gray <-> RGB (ITU-R 601-2 luma, as PIL's convert("L")).
  x = drop_alpha(x);
  if (x.size(0) == 1 && o.channels == 3) x = x.expand({3, x.size(1), x.size(2)});
  if (x.size(0) == 3 && o.channels == 1) {
    const auto f = x.to(at::kFloat);
    x = (f[0] * (299.0 / 1000) + f[1] * (587.0 / 1000) + f[2] * (114.0 / 1000)).round().clamp(0, 255).to(at::kByte).unsqueeze(0);
  }
  // 2. resize the shorter side to R (torchvision Resize(R): the longer side is truncated).
  const int64_t h = x.size(1), w = x.size(2), R = o.resolution;
  const int64_t short_side = std::min(h, w), long_side = std::max(h, w);
  if (short_side != R) {
    if (short_side < R && !o.allow_upscale)
      throw RuntimeError(fmt::format("{}x{} image is smaller than data.resolution = {} and data.allow_upscale is false", h, w, R));
    const int64_t new_long = R * long_side / short_side;
    if (new_long > 16 * R)  // bounds the float image resized below (decode_image rejects such files first)
      throw RuntimeError(fmt::format("{}x{} image has an aspect ratio beyond 16:1", h, w));
    const int64_t nh = h <= w ? R : new_long, nw = h <= w ? new_long : R;
    auto f = x.to(at::kFloat).unsqueeze(0);  // (1, C, H, W)
    if (short_side > R && o.resize == ResizeMode::area) f = at::adaptive_avg_pool2d(f, {nh, nw});
    else if (short_side > R) f = at::_upsample_bilinear2d_aa(f, {nh, nw}, /*align_corners=*/false);
    else f = at::upsample_bilinear2d(f, {nh, nw}, /*align_corners=*/false);
    x = f.squeeze(0).round().clamp(0, 255).to(at::kByte);
  }
  // 3. crop R x R: centered (torchvision center_crop rounding) or at a random offset.
  const int64_t H = x.size(1), W = x.size(2);
  // torchvision's center_crop rounds with Python's round(): half to even.
  int64_t top = static_cast<int64_t>(std::nearbyint(static_cast<double>(H - R) / 2.0));
  int64_t left = static_cast<int64_t>(std::nearbyint(static_cast<double>(W - R) / 2.0));
  if (o.crop == CropMode::random) {
    top = static_cast<int64_t>(splitmix64(key ^ 2) % static_cast<uint64_t>(H - R + 1));
    left = static_cast<int64_t>(splitmix64(key ^ 3) % static_cast<uint64_t>(W - R + 1));
  }
  x = x.slice(1, top, top + R).slice(2, left, left + R);
  // 4. horizontal flip with probability 1/2.
  if (o.random_flip && (splitmix64(key ^ 1) & 1)) x = x.flip({2});
  return x.contiguous();  // (channels, R, R)
}

at::Tensor normalize(const at::Tensor& images) { return images.to(at::kFloat) / 127.5 - 1.0; }

// ---------------------------------------------------------------------------------------------

namespace {

std::vector<int64_t> randperm_order(int64_t n, uint64_t seed, int64_t epoch) {
  auto gen = at::detail::createCPUGenerator(seed + static_cast<uint64_t>(epoch));
  const auto perm = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
  const int64_t* p = perm.data_ptr<int64_t>();
  return {p, p + n};
}

std::vector<int64_t> split_for_rank(const std::vector<int64_t>& order, int64_t rank, int64_t world) {
  const int64_t per_rank = static_cast<int64_t>(order.size()) / world;
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(per_rank));
  for (int64_t i = rank; i < per_rank * world; i += world) out.push_back(order[static_cast<size_t>(i)]);
  return out;
}

}  // namespace

std::vector<int64_t> Dataset::epoch_order(uint64_t seed, int64_t epoch) const { return randperm_order(size(), seed, epoch); }

// torch.utils.data.DistributedSampler(shuffle=True, drop_last=True): randperm seeded with
// seed + epoch, cut to a multiple of the world size, then every world-th item from `rank`.
std::vector<int64_t> epoch_indices(int64_t n, uint64_t seed, int64_t epoch, int64_t rank, int64_t world) {
  return split_for_rank(randperm_order(n, seed, epoch), rank, world);
}

std::vector<int64_t> epoch_indices(const Dataset& dataset, uint64_t seed, int64_t epoch, int64_t rank, int64_t world) {
  return split_for_rank(dataset.epoch_order(seed, epoch), rank, world);
}

// The loader's worker threads and queues, behind Loader's narrow interface.
struct Loader::Impl {
  struct Ready {
    Batch batch;
    std::exception_ptr error;  // a worker's exception, rethrown by next()
  };
  Impl(std::shared_ptr<Dataset> dataset, LoaderOptions opts, LoaderState start);
  ~Impl();
  Batch next();
  std::vector<int64_t> batch_indices(int64_t epoch, int64_t batch) const;  // dataset indices of one batch
  Batch build(int64_t epoch, int64_t batch) const;                         // decode, augment, stack (pinned on CUDA)
  void worker();
  void stop();

  std::shared_ptr<Dataset> dataset_;
  LoaderOptions opts_;
  LoaderState state_;  // the position of the batch next() returns next
  int64_t batches_per_epoch_ = 0;
  at::Tensor preloaded_, preloaded_labels_;  // preload mode: (N, C, R, R) uint8 and (N) on the device
  at::Tensor epoch_order_, epoch_flip_;      // preload mode: this epoch's rank indices and flips, on the device
  int64_t epoch_on_device_ = -1;
  std::exception_ptr failed_;  // once next() has thrown, it throws the same again

  // Workers take consecutive global batch numbers (epoch * batches_per_epoch + batch).
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, Ready> ready_;
  int64_t next_to_build_ = 0, next_to_return_ = 0;
  bool stopping_ = false;
  mutable std::mutex epoch_mu_;
  mutable std::map<int64_t, std::vector<int64_t>> epoch_cache_;  // indices of recent epochs
};

Loader::Loader(std::shared_ptr<Dataset> dataset, LoaderOptions opts, LoaderState start)
    : impl_(std::make_unique<Impl>(std::move(dataset), std::move(opts), start)) {}
Loader::~Loader() = default;
Batch Loader::next() { return impl_->next(); }
LoaderState Loader::state() const { return impl_->state_; }
int64_t Loader::batches_per_epoch() const { return impl_->batches_per_epoch_; }

Loader::Impl::Impl(std::shared_ptr<Dataset> dataset, LoaderOptions opts, LoaderState start)
    : dataset_(std::move(dataset)), opts_(std::move(opts)), state_(start) {
  TORCH_CHECK(opts_.world_size >= 1 && opts_.rank >= 0 && opts_.rank < opts_.world_size, "Loader: bad rank/world size");
  TORCH_CHECK(opts_.batch_size >= 1 && opts_.prefetch >= 1 && opts_.num_workers >= 0, "Loader: batch_size and prefetch must be >= 1");
  if (const int64_t m = dataset_->world_size_divides(); m > 0 && m % opts_.world_size != 0)
    throw RuntimeError(
        fmt::format("{}: data.shard_streams = {} is not a multiple of the world size {} (each rank reads whole "
                    "streams; set it to a multiple of the number of ranks, or 0)",
                    dataset_->describe(), m, opts_.world_size));
  batches_per_epoch_ = dataset_->epoch_size() / opts_.world_size / opts_.batch_size;
  if (batches_per_epoch_ == 0)
    throw RuntimeError(fmt::format("{} has too few items for one batch of {} on each of {} rank(s)", dataset_->describe(),
                                   opts_.batch_size, opts_.world_size));
  TORCH_CHECK(start.epoch >= 0 && start.batch >= 0 && start.batch < batches_per_epoch_, "Loader: resume position (epoch ",
              start.epoch, ", batch ", start.batch, ") is outside an epoch of ", batches_per_epoch_, " batches");
  next_to_build_ = next_to_return_ = start.epoch * batches_per_epoch_ + start.batch;

  if (opts_.preload) {  // resize and center-crop once; flips happen per batch on the device
    AugmentOptions fixed = opts_.augment;
    fixed.crop = CropMode::center;
    fixed.random_flip = false;
    std::vector<at::Tensor> images;
    std::vector<int64_t> labels;
    for (int64_t i = 0; i < dataset_->size(); ++i) {
      const Sample s = dataset_->get(i);
      images.push_back(augment(s.image, fixed, 0));
      labels.push_back(s.label);
    }
    preloaded_ = at::stack(images).to(opts_.device);  // (N, C, R, R) uint8
    preloaded_labels_ = at::tensor(labels, at::TensorOptions().dtype(at::kLong)).to(opts_.device);
    return;
  }
  for (int64_t i = 0; i < opts_.num_workers; ++i) threads_.emplace_back([this] { worker(); });
}

Loader::Impl::~Impl() { stop(); }

void Loader::Impl::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

std::vector<int64_t> Loader::Impl::batch_indices(int64_t epoch, int64_t batch) const {
  std::lock_guard<std::mutex> lock(epoch_mu_);
  auto it = epoch_cache_.find(epoch);
  if (it == epoch_cache_.end()) {
    if (epoch_cache_.size() > 2) epoch_cache_.erase(epoch_cache_.begin());  // workers straddle at most two epochs
    it = epoch_cache_.emplace(epoch, epoch_indices(*dataset_, opts_.seed, epoch, opts_.rank, opts_.world_size)).first;
  }
  return {it->second.begin() + batch * opts_.batch_size, it->second.begin() + (batch + 1) * opts_.batch_size};
}

Batch Loader::Impl::build(int64_t epoch, int64_t batch) const {
  const std::vector<int64_t> indices = batch_indices(epoch, batch);
  const int64_t B = opts_.batch_size, C = opts_.augment.channels, R = opts_.augment.resolution;
  auto options = at::TensorOptions().dtype(at::kByte);
  if (opts_.device.is_cuda()) options = options.pinned_memory(true);  // for non_blocking copies
  auto images = at::empty({B, C, R, R}, options);                     // (B, C, R, R) uint8
  std::vector<int64_t> labels(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t index = indices[static_cast<size_t>(b)];
    const Sample s = dataset_->get(index);
    try {
      images[b].copy_(augment(s.image, opts_.augment, sample_key(opts_.seed, epoch, index)));
    } catch (const RuntimeError& e) {
      throw RuntimeError(fmt::format("{} item {}: {}", dataset_->describe(), index, e.what()));
    }
    labels[static_cast<size_t>(b)] = s.label;
  }
  auto label_tensor = at::tensor(labels, at::TensorOptions().dtype(at::kLong));
  if (opts_.device.is_cuda()) label_tensor = label_tensor.pin_memory();
  return {images, label_tensor};
}

void Loader::Impl::worker() {
  while (true) {
    int64_t g;
    {
      std::unique_lock<std::mutex> lock(mu_);
      const int64_t ahead = opts_.prefetch * std::max<int64_t>(1, opts_.num_workers);
      cv_.wait(lock, [&] { return stopping_ || next_to_build_ < next_to_return_ + ahead; });
      if (stopping_) return;
      g = next_to_build_++;
    }
    Ready r;
    try {
      r.batch = build(g / batches_per_epoch_, g % batches_per_epoch_);
    } catch (...) {
      r.error = std::current_exception();  // rethrown, with its type, by next()
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_.emplace(g, std::move(r));
    }
    cv_.notify_all();
  }
}

Batch Loader::Impl::next() {
  if (failed_) std::rethrow_exception(failed_);  // a loader that failed stays failed
  const int64_t g = state_.epoch * batches_per_epoch_ + state_.batch;
  Batch host;
  try {
    if (opts_.preload) {
      if (epoch_on_device_ != state_.epoch) {  // one upload per epoch: its order and flips
        const auto order = epoch_indices(*dataset_, opts_.seed, state_.epoch, opts_.rank, opts_.world_size);
        std::vector<uint8_t> flip(order.size(), 0);
        if (opts_.augment.random_flip)
          for (size_t b = 0; b < order.size(); ++b) flip[b] = splitmix64(sample_key(opts_.seed, state_.epoch, order[b]) ^ 1) & 1;
        epoch_order_ = at::tensor(order, at::TensorOptions().dtype(at::kLong)).to(opts_.device);
        epoch_flip_ = at::tensor(flip, at::TensorOptions().dtype(at::kByte)).to(opts_.device).to(at::kBool);
        epoch_on_device_ = state_.epoch;
      }
      const int64_t from = state_.batch * opts_.batch_size, to = from + opts_.batch_size;
      const auto index = epoch_order_.slice(0, from, to);                  // (B) on the device
      const auto mask = epoch_flip_.slice(0, from, to).view({-1, 1, 1, 1});
      const auto images = preloaded_.index_select(0, index);               // (B, C, R, R) uint8 on the device
      host = {at::where(mask, images.flip({3}), images), preloaded_labels_.index_select(0, index)};
    } else if (threads_.empty()) {
      host = build(state_.epoch, state_.batch);
    } else {
      Ready r;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return ready_.count(g) > 0; });
        r = std::move(ready_.at(g));
        ready_.erase(g);
        next_to_return_ = g + 1;
      }
      cv_.notify_all();
      if (r.error) std::rethrow_exception(r.error);
      host = std::move(r.batch);
    }
  } catch (...) {
    failed_ = std::current_exception();
    throw;
  }
  if (++state_.batch == batches_per_epoch_) {
    state_.batch = 0;
    ++state_.epoch;
  }
  return {normalize(host.images.to(opts_.device, /*non_blocking=*/true)), host.labels.to(opts_.device, /*non_blocking=*/true)};
}

}  // namespace difftrain
