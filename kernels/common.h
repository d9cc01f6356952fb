// Shared helpers for the CPU reference kernels. Nothing here touches CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

#include "base/error.h"
