// Tensors by name, in order: a state dict as safetensors stores it and the optimizer reports it.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace difftrain {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

}  // namespace difftrain
