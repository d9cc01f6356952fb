// Shared helpers for the CPU reference kernels. Nothing here touches CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace remat {

// Thrown by every op and reader on bad shapes or bad input; the message says what and where.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define REMAT_CHECK(cond, msg)                                                         \
  do {                                                                                 \
    if (!(cond))                                                                       \
      throw ::remat::Error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + \
                           ": " + (msg));                                              \
  } while (0)

}  // namespace remat
