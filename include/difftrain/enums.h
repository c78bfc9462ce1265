// The config's enums and their spellings, apart from the schema, so that headers needing one
// enum (log.h: LogLevel) do not include the whole config.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace difftrain {

// Enums: DIFFTRAIN_ENUM(Name, a, b) defines `enum class Name { a, b }` and its spellings.
// A trailing underscore is dropped from the spelling (`default_` is spelled "default").
template <class E> struct EnumSpelling;  // specialised by DIFFTRAIN_ENUM

#define DIFFTRAIN_ENUM(Name, ...)  \
  enum class Name { __VA_ARGS__ }; \
  template <> struct EnumSpelling<Name> { static constexpr std::string_view list = #__VA_ARGS__; }

std::vector<std::string> split_enum_list(std::string_view list);

template <class E> const std::vector<std::string>& enum_names() {
  static const std::vector<std::string> names = split_enum_list(EnumSpelling<E>::list);
  return names;
}
template <class E> const std::string& to_string(E e) { return enum_names<E>().at(static_cast<size_t>(e)); }
template <class E> std::optional<E> enum_from_string(std::string_view s) {
  const auto& names = enum_names<E>();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == s) return static_cast<E>(i);
  return std::nullopt;
}

DIFFTRAIN_ENUM(BlockType, DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D);
DIFFTRAIN_ENUM(TimeScaleShift, default_, scale_shift);
DIFFTRAIN_ENUM(BetaSchedule, linear, scaled_linear, squaredcos_cap_v2, sigmoid);
DIFFTRAIN_ENUM(PredictionType, epsilon, v_prediction, sample);
DIFFTRAIN_ENUM(VarianceType, fixed_small, fixed_small_log, fixed_large);
DIFFTRAIN_ENUM(TimestepSpacing, leading, trailing, linspace);
DIFFTRAIN_ENUM(DatasetKind, idx, cifar10, image_folder, webdataset);
DIFFTRAIN_ENUM(Split, train, test);
DIFFTRAIN_ENUM(ResizeMode, area, bilinear);
DIFFTRAIN_ENUM(CropMode, center, random);
DIFFTRAIN_ENUM(BadImagePolicy, fail, skip);
DIFFTRAIN_ENUM(LrSchedule, constant, linear, cosine);
DIFFTRAIN_ENUM(LrScaling, none, linear, sqrt);
DIFFTRAIN_ENUM(MixedPrecision, auto_, no, bf16, fp16);
DIFFTRAIN_ENUM(OptimizerImpl, auto_, fused, foreach, loop);
DIFFTRAIN_ENUM(LogLevel, trace, debug, info, warn, error);
DIFFTRAIN_ENUM(DistBackend, auto_, nccl, gloo);
DIFFTRAIN_ENUM(Formulation, ddpm, edm);  // diffusion.formulation: Ho et al. 2020, or Karras et al. 2022
DIFFTRAIN_ENUM(Sampler, ddpm, ddim, dpm_solver_multistep, unipc_multistep, euler_ancestral, heun, euler);
DIFFTRAIN_ENUM(WeightsKind, ema, model);  // which weights of a checkpoint (train_state.h)

}  // namespace difftrain
