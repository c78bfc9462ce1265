// Datasets behind one interface, the augmentation, and the sharded, deterministic, resumable,
// prefetching Loader. Batches are (B, C, R, R) float in [-1, 1] with (B) int64 labels (-1 when
// the dataset has none).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "difftrain/data_formats.h"
#include "difftrain/enums.h"

namespace difftrain {

struct DataConfig;  // config.h

struct Sample {
  at::Tensor image;  // (C, H, W) uint8, at the file's own size and channel count
  int64_t label = -1;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual Sample get(int64_t index) const = 0;  // thread-safe
  virtual int64_t label(int64_t index) const { return get(index).label; }  // without decoding, where possible
  virtual int64_t num_classes() const = 0;      // 0 when unlabelled
  virtual std::string describe() const = 0;
  // Every index once, in the order epoch `epoch` visits them: a pure function of (seed, epoch).
  // By default a uniform permutation, torch.randperm seeded with seed + epoch (DistributedSampler's).
  virtual std::vector<int64_t> epoch_order(uint64_t seed, int64_t epoch) const;
  // The length of every epoch_order: size(), unless the dataset leaves some items out per epoch.
  virtual int64_t epoch_size() const { return size(); }
  // A number the world size must divide for the dataset's rank split to hold (0: any).
  virtual int64_t world_size_divides() const { return 0; }
};

// IDX and CIFAR-10: the whole split decoded into memory.
class ArrayDataset : public Dataset {
 public:
  ArrayDataset(formats::ImageArray array, int64_t num_classes, std::string description);
  int64_t size() const override { return array_.count; }
  Sample get(int64_t index) const override;
  int64_t label(int64_t index) const override {
    return array_.labels.empty() ? -1 : array_.labels.at(static_cast<size_t>(index));
  }
  int64_t num_classes() const override { return num_classes_; }
  std::string describe() const override { return description_; }

 private:
  formats::ImageArray array_;
  int64_t num_classes_;
  std::string description_;
};

// Item `index` through `read`; when it throws a FormatError, with BadImagePolicy::skip the next
// item that reads (wrapping around), counting and logging each skip in `skipped`; with fail the
// error, plus the hint to skip. `what` names the dataset when none of the `n` items reads.
Sample read_or_skip(int64_t index, int64_t n, BadImagePolicy policy, std::atomic<int64_t>& skipped, const std::string& what,
                    const std::function<Sample(int64_t)>& read);

// A folder of PNG/JPEG files. Labels come from the sorted subfolder names; a flat folder is
// unlabelled. Every file's header is checked at construction (formats::check_image_file), and
// so is its shorter side against `min_side` (data.resolution when upscaling is not allowed); the
// bad ones are all named in one error, or with BadImagePolicy::skip left out and listed in the
// log. Files are decoded on demand; `on_bad_image` also says what one that then fails does.
// `jpeg_min_side` > 0 lets JPEGs decode smaller (formats::decode_jpeg; data.jpeg_dct_scaling).
class ImageFolderDataset : public Dataset {
 public:
  ImageFolderDataset(const std::string& root, BadImagePolicy on_bad_image, int64_t min_side = 0, int64_t jpeg_min_side = 0);
  int64_t size() const override { return static_cast<int64_t>(files_.size()); }
  Sample get(int64_t index) const override;  // a skipped image is replaced by the next good one
  int64_t label(int64_t index) const override { return labels_.at(static_cast<size_t>(index)); }
  int64_t num_classes() const override { return static_cast<int64_t>(classes_.size()); }
  std::string describe() const override;
  const std::vector<std::string>& classes() const { return classes_; }
  const std::vector<std::string>& left_out() const { return left_out_; }  // "file: why", found bad at construction
  int64_t skipped() const { return skipped_.load(); }                     // failed to decode since

 private:
  std::vector<std::string> files_;
  std::vector<std::string> left_out_;
  std::vector<int64_t> labels_;
  std::vector<std::string> classes_;
  std::string root_;
  BadImagePolicy policy_;
  int64_t jpeg_min_side_;
  mutable std::atomic<int64_t> skipped_{0};
};

// Items `indices` of another dataset (subset and class filter).
class SubsetDataset : public Dataset {
 public:
  SubsetDataset(std::shared_ptr<Dataset> base, std::vector<int64_t> indices);
  int64_t size() const override { return static_cast<int64_t>(indices_.size()); }
  Sample get(int64_t index) const override { return base_->get(indices_.at(static_cast<size_t>(index))); }
  int64_t num_classes() const override { return base_->num_classes(); }
  std::string describe() const override;

 private:
  std::shared_ptr<Dataset> base_;
  std::vector<int64_t> indices_;
};

// Opens data.dataset at data.path for data.split, then applies data.class_filter and data.subset.
// Errors (missing files, bad formats, an empty result) name the file.
std::shared_ptr<Dataset> open_dataset(const DataConfig& cfg);

// ---------------------------------------------------------------------------------------------

struct AugmentOptions {
  int64_t resolution = 32;
  int64_t channels = 1;
  ResizeMode resize = ResizeMode::bilinear;
  CropMode crop = CropMode::center;
  bool random_flip = false;
  bool allow_upscale = true;
  static AugmentOptions from(const DataConfig& d);
};

// (C, H, W) uint8 -> (channels, R, R) uint8: channel conversion (gray <-> RGB, alpha dropped),
// resize of the shorter side to R (area or bilinear with antialiasing), center or random crop,
// random horizontal flip. Random choices come from `key` alone, so the result does not depend on
// which thread runs it.
at::Tensor augment(const at::Tensor& image, const AugmentOptions& opts, uint64_t key);
// (C, H, W) without its alpha plane (C = 2 gray+alpha, 4 RGBA); other images unchanged (a view).
at::Tensor drop_alpha(const at::Tensor& image);
// uint8 [0, 255] -> float [-1, 1].
at::Tensor normalize(const at::Tensor& images);

// ---------------------------------------------------------------------------------------------

struct Batch {
  at::Tensor images;  // (B, C, R, R) float32 in [-1, 1], on the loader's device
  at::Tensor labels;  // (B) int64, -1 when unlabelled
};

// Where a loader is in its stream; goes into checkpoints.
struct LoaderState {
  int64_t epoch = 0;
  int64_t batch = 0;  // next batch within the epoch
  bool operator==(const LoaderState&) const = default;
};

struct LoaderOptions {
  int64_t batch_size = 64;
  uint64_t seed = 0;
  int64_t rank = 0, world_size = 1;
  int64_t num_workers = 2;  // 0 = decode on the calling thread
  int64_t prefetch = 4;     // batches ready ahead, per worker
  bool preload = false;     // whole dataset on the device as uint8; flip and normalise there
  c10::Device device{c10::kCPU};
  AugmentOptions augment;
};

// Epoch e visits a permutation that is a pure function of (seed, e), split across ranks as
// torch's DistributedSampler does (drop_last: every rank gets the same number of whole batches).
std::vector<int64_t> epoch_indices(int64_t dataset_size, uint64_t seed, int64_t epoch, int64_t rank, int64_t world_size);
// The same split of a dataset's own epoch order (Dataset::epoch_order): cut to a multiple of the
// world size, then every world-th index from `rank`.
std::vector<int64_t> epoch_indices(const Dataset& dataset, uint64_t seed, int64_t epoch, int64_t rank, int64_t world_size);

class Loader {
 public:
  Loader(std::shared_ptr<Dataset> dataset, LoaderOptions opts, LoaderState start = {});
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  Batch next();  // blocks until the next batch is ready; after an error, rethrows it on every call
  LoaderState state() const;  // the position of the batch next() returns next
  int64_t batches_per_epoch() const;

 private:
  struct Impl;  // worker threads, the ready queue, the preloaded tensors (data.cpp)
  std::unique_ptr<Impl> impl_;
};

}  // namespace difftrain
