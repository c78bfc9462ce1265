#include "difftrain/weights.h"

#include <algorithm>

#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "difftrain/checkpoint.h"
#include "difftrain/unet.h"

namespace difftrain {

namespace {

// "a, b, c" of at most `n` names, then "and K more".
std::string some(const std::vector<std::string>& names, size_t n = 5) {
  std::vector<std::string> head(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(std::min(n, names.size())));
  return fmt::format("{}{}", fmt::join(head, ", "),
                     names.size() > n ? fmt::format(" and {} more", names.size() - n) : std::string());
}

}  // namespace

std::string shape_text(c10::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

NamedTensors named_parameters(UNet2DModel& model) {
  NamedTensors out;
  for (const auto& item : model->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

std::vector<std::string> weight_mismatches(const NamedTensors& expected, const std::map<std::string, at::Tensor>& weights,
                                           const std::string& expected_what) {
  std::vector<std::string> missing, unexpected, misshapen;
  std::map<std::string, bool> known;
  for (const auto& [name, p] : expected) {
    known[name] = true;
    const auto it = weights.find(name);
    if (it == weights.end()) missing.push_back(name);
    else if (it->second.sizes() != p.sizes())
      misshapen.push_back(
          fmt::format("{} has shape {}, {} {}", name, shape_text(it->second.sizes()), expected_what, shape_text(p.sizes())));
  }
  for (const auto& [name, t] : weights)
    if (!known.count(name)) unexpected.push_back(name);
  std::vector<std::string> out;
  if (!missing.empty()) out.push_back(fmt::format("missing tensors: {}", some(missing)));
  if (!unexpected.empty()) out.push_back(fmt::format("unexpected tensors (not parameters of the model): {}", some(unexpected)));
  out.insert(out.end(), misshapen.begin(), misshapen.end());
  return out;
}

void load_weights(UNet2DModel& model, const std::map<std::string, at::Tensor>& weights, const std::string& source) {
  const auto params = named_parameters(model);
  if (const auto problems = weight_mismatches(params, weights); !problems.empty())
    throw CheckpointError(fmt::format("{} does not fit the model:\n  {}", source, fmt::join(problems, "\n  ")));
  c10::NoGradGuard no_grad;
  for (const auto& [name, p] : params) p.copy_(weights.at(name));
}

}  // namespace difftrain
