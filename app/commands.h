// The remat subcommands: one file each (app/train.cpp, prepare.cpp, sample.cpp, plan.cpp).
#pragma once
#include <sys/stat.h>

#include <string>

#include "app/cli.h"

namespace remat {

// argv after the subcommand.
int cmd_train(int argc, const char* const* argv);
int cmd_prepare(int argc, const char* const* argv);
int cmd_sample(int argc, const char* const* argv);
int cmd_plan(int argc, const char* const* argv);

// Where `remat prepare` (and `remat train` without --data) put the default corpus.
inline constexpr const char* kDefaultDataDir = "data/fortunes";

// --recompute, or `full` for --grad-checkpoint (the on/off switch of Hugging Face and
// InternVL scripts, gradient_checkpointing=True). Both with another policy is an error.
std::string recompute_policy(const Options& o);

inline bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace remat
