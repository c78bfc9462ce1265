#include "difftrain/profiler.h"

#include <set>

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include "difftrain/errors.h"

namespace difftrain {

namespace {
namespace kineto = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
}  // namespace

StepProfiler::StepProfiler(int64_t first_step, int64_t num_steps, std::filesystem::path path, bool cuda)
    : first_(first_step), last_(first_step + num_steps - 1), path_(std::move(path)), cuda_(cuda) {}

StepProfiler::~StepProfiler() {
  if (active_) kineto::disableProfiler();
}

void StepProfiler::before_step(int64_t step) {
  if (first_ <= 0 || step != first_ || active_) return;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (cuda_) activities.insert(ActivityType::CUDA);
  const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
  kineto::prepareProfiler(config, activities);
  kineto::enableProfiler(config, activities);
  active_ = true;
}

bool StepProfiler::after_step(int64_t step) {
  if (!active_ || step < last_) return false;
  active_ = false;
  auto result = kineto::disableProfiler();
  std::error_code ec;
  if (path_.has_parent_path()) std::filesystem::create_directories(path_.parent_path(), ec);
  result->save(path_.string());
  if (!std::filesystem::exists(path_)) throw RuntimeError(fmt::format("cannot write the profiler trace {}", path_.string()));
  return true;
}

}  // namespace difftrain
