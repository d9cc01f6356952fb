// The error type of every layer and its check macro: the lowest layer of remat.
#pragma once
#include <stdexcept>
#include <string>

namespace remat {

// Thrown on bad shapes or bad input; the message says what and where.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An internal invariant: the message carries the source file and line. For what a user
// supplies (options, files, values) throw Error with a message naming it instead.
#define REMAT_CHECK(cond, msg)                                                                     \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      throw ::remat::Error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " + (msg)); \
  } while (0)

// What a user supplies (an option, a file, a value): the message names it, with no source
// location.
#define REMAT_REQUIRE(cond, msg)            \
  do {                                      \
    if (!(cond)) throw ::remat::Error(msg); \
  } while (0)

}  // namespace remat
