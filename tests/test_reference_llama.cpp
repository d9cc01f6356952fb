// remat's training losses on the Llama family against an independent float64 numpy reference
// (tests/reference/llama_numpy.py, written from the math like gpt2_numpy.py): `remat train
// --model DIR` from a random Hugging Face directory (config.json + model.safetensors) and token
// shard, AdamW without weight decay or clipping, must report the reference's loss at every one
// of 10 steps to 1e-6 relative: Llama with grouped-query attention (4 query heads on 2 kv
// heads), untied and tied; Qwen2 with q/k/v biases on one kv head; Mistral without GQA. The
// same with --recompute full, whose losses must also equal the plain run's bit for bit.
// Needs python3 with numpy; skipped without it.
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <map>
#include <string>

#include "tests/test_util.h"

namespace {

using remat::test::contains;
using remat::test::slurp;
using remat::test::TempDir;

using Result = remat::test::ShellResult;
using remat::test::run_shell;
using remat::test::shell_quote;

const std::string kReferenceDir = std::string(REMAT_SOURCE_DIR) + "/tests/reference";
const char* kConfigs[] = {"llama-gqa", "llama-tied", "qwen2", "mistral"};

bool have_numpy() {
  return run_shell("python3 -c 'import numpy'").status == 0;
}

// Runs check_llama_losses.sh on every config in `work` (the per-config directories stay there).
Result check(const std::string& work, const std::string& extra_args) {
  std::string cmd = "WORK_DIR=" + shell_quote(work) + " RTOL=1e-6";
  if (!extra_args.empty()) cmd += " REMAT_EXTRA_ARGS=" + shell_quote(extra_args);
  cmd += " bash " + shell_quote(kReferenceDir + "/check_llama_losses.sh") + " " +
         shell_quote(REMAT_BINARY);
  for (const char* c : kConfigs) cmd += std::string(" ") + c;
  return run_shell(cmd);
}

// step -> the "loss" and "grad_norm" text of remat's --log lines (as written, so that two runs
// compare bit for bit).
std::map<int, std::string> logged_steps(const std::string& path) {
  std::map<int, std::string> rows;
  const std::string log = slurp(path);
  size_t pos = 0;
  while (pos < log.size()) {
    size_t end = log.find('\n', pos);
    if (end == std::string::npos) end = log.size();
    const std::string line = log.substr(pos, end - pos);
    pos = end + 1;
    const size_t s = line.find("\"step\":"), l = line.find("\"loss\":");
    if (s == std::string::npos || l == std::string::npos) continue;
    const size_t g = line.find("\"grad_norm\":");
    auto field = [&](size_t at) { return line.substr(at, line.find_first_of(",}", at) - at); };
    rows[std::atoi(line.c_str() + s + 7)] =
        field(l + 7) + " " + (g == std::string::npos ? "" : field(g + 12));
  }
  return rows;
}

TEST(LlamaReference, NumpyReferenceSelfTest) {
  if (!have_numpy()) GTEST_SKIP() << "python3 with numpy is not available (pip install numpy)";
  const Result r =
      run_shell("python3 " + shell_quote(kReferenceDir + "/llama_numpy.py") + " self-test");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "self-test PASSED")) << r.output;
}

TEST(LlamaReference, TrainingLossesMatchReference) {
  if (!have_numpy()) GTEST_SKIP() << "python3 with numpy is not available (pip install numpy)";
  TempDir plain("remat_llama_ref"), full("remat_llama_ref_full");
  const Result a = check(plain.path, "");
  EXPECT_EQ(a.status, 0) << a.output;
  if (a.status == 0) printf("%s", a.output.c_str());
  // Recomputing every block's activations must not change a loss: against the reference, and
  // bit for bit against the plain run.
  const Result b = check(full.path, "--recompute full");
  EXPECT_EQ(b.status, 0) << b.output;
  if (b.status == 0) printf("%s", b.output.c_str());
  for (const char* c : kConfigs) {
    const auto x = logged_steps(plain / (std::string(c) + "/remat.jsonl"));
    const auto y = logged_steps(full / (std::string(c) + "/remat.jsonl"));
    EXPECT_EQ(x.size(), 10u) << c;
    EXPECT_EQ(x, y) << c << ": --recompute full changed the logged losses or gradient norms";
  }
}

}  // namespace
