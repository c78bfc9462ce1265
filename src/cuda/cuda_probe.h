// Asks the CUDA runtime directly what is there, so the report can tell a missing driver from a
// missing device. Built only against a CUDA LibTorch; env.cpp reports "not built" otherwise.
#pragma once

#include "difftrain/env.h"

namespace difftrain::cuda {

CudaStatus probe();

}  // namespace difftrain::cuda
