// CUDA implementation of QsdMatMul.
#pragma once

#include <string>

#include "qsd_common.h"

namespace qsd {

// Enqueues the computation of p.y on `stream` (a cudaStream_t; nullptr is the
// legacy default stream). All pointers of `p` refer to device memory.
// Returns an empty string on success, otherwise an error message.
std::string LaunchCuda(const Problem& p, void* stream);

}  // namespace qsd
