// Named weights in and out of a UNet2DModel: one strict matcher, used for checkpoints, for
// --init-from folders, for `sample`/`eval` and for export and import of diffusers folders.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "difftrain/named_tensors.h"

namespace difftrain {

class UNet2DModel;  // unet.h

// "[a, b, c]": how every message here writes a shape.
std::string shape_text(c10::IntArrayRef shape);

// The model's parameters by diffusers name, in named_parameters() order (handles: they share
// storage with the model).
NamedTensors named_parameters(UNet2DModel& model);

// How `weights` differs from the parameters `expected` (names and shapes): one line for the
// missing tensors, one for the unexpected ones, one per misshapen tensor ("name has shape [..],
// <expected_what> [..]"); empty when they match. Lists name at most five tensors, then a count.
std::vector<std::string> weight_mismatches(const NamedTensors& expected, const std::map<std::string, at::Tensor>& weights,
                                           const std::string& expected_what = "the model has");

// Copies `weights` into the model's parameters: every parameter by name, nothing else, every
// shape equal. Otherwise a CheckpointError naming `source` and every mismatch, with the model
// untouched.
void load_weights(UNet2DModel& model, const std::map<std::string, at::Tensor>& weights, const std::string& source);

}  // namespace difftrain
