// remat: the command-line program.
#include <cstdio>
#include <cstring>
#include <string>

#include "app/commands.h"
#include "base/error.h"
#ifdef REMAT_WITH_CUDA
#include "runtime/cuda/cuda_backend.h"
#endif
#ifdef REMAT_WITH_NCCL
#include "runtime/cuda/nccl_collectives.h"
#endif

namespace {
const char* kUsage =
    "remat: memory-optimized GPT-2 training\n"
    "usage: remat COMMAND [options]   (remat COMMAND --help for each)\n\n"
    "commands:\n"
    "  train     train a model (default: a small model on Debian's fortunes corpus)\n"
    "  prepare   turn text files into token shards and a tokenizer\n"
    "  sample    generate text from a checkpoint\n"
    "  tokenize  print the token ids of a text (a tokenizer.json or tokenizer.bin)\n"
    "  plan      print the memory plan of a run without running it\n";
}

int main(int argc, char** argv) {
#ifdef REMAT_WITH_CUDA
  remat::install_cuda_backend();  // --device cuda|auto can choose it
#endif
#ifdef REMAT_WITH_NCCL
  remat::install_nccl_collectives();  // data parallel on GPUs (mpirun -np N remat train)
#endif
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    std::printf("%s", kUsage);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const char* const* rest = argv + 2;
  const int n = argc - 2;
  try {
    if (cmd == "train") return remat::cmd_train(n, rest);
    if (cmd == "prepare") return remat::cmd_prepare(n, rest);
    if (cmd == "sample") return remat::cmd_sample(n, rest);
    if (cmd == "plan") return remat::cmd_plan(n, rest);
    if (cmd == "tokenize") return remat::cmd_tokenize(n, rest);
    std::fprintf(stderr, "remat: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "remat %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
