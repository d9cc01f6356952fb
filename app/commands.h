// The remat subcommands: one file each (app/train.cpp, prepare.cpp, sample.cpp, plan.cpp,
// tokenize.cpp).
#pragma once
#include <sys/stat.h>

#include <string>
#include <vector>

#include "app/cli.h"
#include "io/config.h"
#include "runtime/executor.h"

namespace remat {

// argv after the subcommand.
int cmd_train(int argc, const char* const* argv);
int cmd_prepare(int argc, const char* const* argv);
int cmd_sample(int argc, const char* const* argv);
int cmd_plan(int argc, const char* const* argv);
int cmd_tokenize(int argc, const char* const* argv);

// Where `remat prepare` (and `remat train` without --data) put the default corpus.
inline constexpr const char* kDefaultDataDir = "data/fortunes";

// --recompute, or `full` for --grad-checkpoint (the on/off switch of Hugging Face and
// InternVL scripts, gradient_checkpointing=True). Both with another policy is an error.
std::string recompute_policy(const Options& o);

// --model: a preset, an llm.c checkpoint (.bin) or a Hugging Face model directory
// (config.json + safetensors). params is filled for a file or directory when want_params,
// and left empty for a preset (the caller initialises it); vocab sets a small preset's
// vocabulary (0 keeps the preset's).
struct ModelChoice {
  ModelConfig config;
  std::vector<float> params;
  bool from_file = false;
};
ModelChoice choose_model(const std::string& model, int vocab, bool want_params);
// The device a plan's cost model assumes: bf16 is the CUDA backend (H100-class compute and
// memory bandwidth, 25 GB/s to the host), fp32 the CPU's; link_gbps > 0 overrides the link.
CostModel cost_model_for(ActDType dt, double link_gbps = 0);
// Host <-> device copy bandwidth, measured once: 64 MiB up and down three times between the
// backend's pinned host memory and its device memory on a stream of its own.
double measure_link_bytes_per_s(Backend& be);
// The --model help line.
std::string model_option_help();

inline bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace remat
