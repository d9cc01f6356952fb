// Crash safety of `remat train`: a run killed at any moment (SIGKILL, including between the
// write of a checkpoint's temporary file and its rename) leaves a checkpoint that loads and
// resumes, and the resumed run computes the same losses, bit for bit, as a run never
// interrupted. SIGINT/SIGTERM stop after the current step with a checkpoint and exit 0; a
// second signal exits at once with 130.
//
// Every run is the real remat binary (REMAT_BINARY), started with fork/exec on a small random
// shard, model `tiny`. Losses are compared as the exact strings of the --log JSONL ("%.9g",
// which round-trips a float), so equal strings mean equal bits.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/atomic_file.h"
#include "io/llmc_model.h"
#include "io/shards.h"
#include "io/train_state.h"
#include "kernels/common.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 40;  // every run in this file trains toward step 40

// ---- child processes (tests/test_util.h) ----

using remat::test::Child;
using remat::test::describe;
using remat::test::slurp;
using remat::test::spawn;
using remat::test::wait_child;

// Runs to completion and expects exit 0.
void run_ok(const std::vector<std::string>& args, const std::string& base) {
  const Child c = spawn(args, base);
  const int st = wait_child(c);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << describe(st, c);
}

// step -> the exact loss text of each complete training line of a --log file. A step logged
// twice (a run killed after logging it, and the resumed run) must log the same loss.
std::map<int, std::string> read_losses(const std::string& path) {
  std::map<int, std::string> out;
  std::istringstream in(slurp(path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line.back() != '}') continue;  // cut short by a kill
    const size_t l = line.find(",\"loss\":");
    if (line.rfind("{\"step\":", 0) != 0 || l == std::string::npos) continue;
    const int step = std::stoi(line.substr(8));
    const size_t v = l + 8;
    const std::string loss = line.substr(v, line.find(',', v) - v);
    auto [it, fresh] = out.emplace(step, loss);
    EXPECT_EQ(it->second, loss) << path << ": step " << step << " logged twice, differently";
  }
  return out;
}

bool has_entry_prefix(const std::string& dir, const std::string& prefix) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return false;
  bool found = false;
  while (dirent* e = ::readdir(d))
    if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) {
      found = true;
      break;
    }
  ::closedir(d);
  return found;
}

// ---- the shared fixture: a shard and one uninterrupted reference run ----

class CrashTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = remat::test::make_temp_dir("remat_crash");
    remat::test::write_random_shard(dir_ + "/train.bin", 20000, 300, 1234);

    run_ok(args({"--out", dir_ + "/ref", "--log", dir_ + "/ref.jsonl"}), dir_ + "/ref");
    ref_losses_ = read_losses(dir_ + "/ref.jsonl");
    ASSERT_EQ(ref_losses_.size(), size_t(kSteps));
    ref_state_ = slurp(dir_ + "/ref/state.bin");
    ref_model_ = slurp(dir_ + "/ref/model.bin");
    ASSERT_FALSE(ref_state_.empty());
  }
  static void TearDownTestSuite() {
    remat::test::remove_temp_dir(dir_);  // REMAT_KEEP_TEST_FILES=1 keeps it
  }

  // The common arguments of every run, plus `extra`.
  static std::vector<std::string> args(const std::vector<std::string>& extra) {
    std::vector<std::string> a = remat::test::tiny_train_args(dir_ + "/train.bin", kSteps);
    a.insert(a.end(), {"--seed", "7"});
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  // Every logged loss equals the reference run's at the same step; returns how many.
  static int expect_reference_losses(const std::string& log) {
    int n = 0;
    for (const auto& [step, loss] : read_losses(log)) {
      auto it = ref_losses_.find(step);
      EXPECT_TRUE(it != ref_losses_.end()) << log << ": unexpected step " << step;
      if (it == ref_losses_.end()) continue;
      EXPECT_EQ(loss, it->second) << log << ": step " << step << " differs from the reference";
      n++;
    }
    return n;
  }

  static std::string dir_;
  static std::map<int, std::string> ref_losses_;
  static std::string ref_state_, ref_model_;
};

std::string CrashTest::dir_;
std::map<int, std::string> CrashTest::ref_losses_;
std::string CrashTest::ref_state_, CrashTest::ref_model_;

// Waits until the --log file shows at least `step` training steps (or the child exits).
bool wait_for_step(const Child& c, const std::string& log, int step, double timeout_s = 120) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    const auto losses = read_losses(log);
    if (!losses.empty() && losses.rbegin()->first >= step) return true;
    int status;
    if (::waitpid(c.pid, &status, WNOHANG) == c.pid) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  return false;
}

TEST_F(CrashTest, SigkillAtManyPointsLeavesALoadableCheckpointAndResumesBitForBit) {
  const std::string out = dir_ + "/kill";
  const std::string state = out + "/state.bin", model = out + "/model.bin";
  // A good checkpoint first: three steps, one checkpoint per step.
  run_ok(args({"--steps", "3", "--ckpt-every", "1", "--out", out, "--log", dir_ + "/kill0.jsonl"}),
         dir_ + "/kill0");
  ASSERT_EQ(remat::load_train_state(state).step, 3);

  int64_t last_step = 3;
  int kills = 0, during_write = 0, finished = 0, logs_compared = 0;
  // One resumed run that is killed; `tmp_trigger` kills it as soon as (and `delay_us` after) a
  // checkpoint's temporary file appears, otherwise `delay_us` after it starts.
  auto killed_run = [&](int i, bool tmp_trigger, int64_t delay_us) {
    const std::string base = dir_ + "/kill_run" + std::to_string(i);
    const Child c = spawn(
        args({"--resume", state, "--ckpt-every", "1", "--out", out, "--log", base + ".jsonl"}),
        base);
    bool saw_tmp = false;
    if (tmp_trigger) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (std::chrono::steady_clock::now() < deadline) {
        if (has_entry_prefix(out, "state.bin.tmp.") || has_entry_prefix(out, "model.bin.tmp.")) {
          saw_tmp = true;
          break;
        }
        siginfo_t info{};
        if (::waitid(P_PID, c.pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == c.pid)
          break;  // it finished (left waitable for wait_child)
      }
    }
    if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    // A temp file present right now means the kill lands between a write and its rename.
    if (has_entry_prefix(out, "state.bin.tmp.") || has_entry_prefix(out, "model.bin.tmp."))
      saw_tmp = true;
    ::kill(c.pid, SIGKILL);
    const int st = wait_child(c);
    if (WIFEXITED(st)) {
      // It finished before the kill: that must have been a clean exit.
      ASSERT_EQ(WEXITSTATUS(st), 0) << describe(st, c);
      finished++;
    } else {
      ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << describe(st, c);
      kills++;
      during_write += saw_tmp;
    }
    // Whatever the moment, the checkpoint loads and never goes back in time.
    remat::TrainState s;
    ASSERT_NO_THROW(s = remat::load_train_state(state)) << "after kill " << i;
    ASSERT_GE(s.step, last_step) << "after kill " << i;
    ASSERT_LE(s.step, kSteps);
    last_step = s.step;
    ASSERT_NO_THROW(remat::read_llmc_model(model)) << "after kill " << i;
    logs_compared += expect_reference_losses(base + ".jsonl");
  };

  // How long a whole resumed run takes here (from a copy of the checkpoint), to spread the kill
  // points over one.
  const std::string probe = dir_ + "/kill_probe";
  fs::create_directories(probe);
  fs::copy_file(state, probe + "/state.bin");
  const auto t0 = std::chrono::steady_clock::now();
  run_ok(args({"--resume", probe + "/state.bin", "--ckpt-every", "1", "--out", probe}), probe);
  const double whole_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();

  // Kill points by time: sleeps growing geometrically from 0 through 20 us to 5% of a run
  // (startup, loading the checkpoint, the first steps), then linearly from 5% to 50% of what
  // is left of the run (each run resumes from what the previous kill left).
  const int kTimed = 24;
  for (int i = 0; i < kTimed; i++) {
    int64_t us = 0;
    if (i > 0 && i < 12)
      us = static_cast<int64_t>(20 * std::pow(0.05 * whole_us / 20, (i - 1) / 10.0));
    if (i >= 12) {
      const double left = std::max(0.1, (kSteps - last_step) / (kSteps - 3.0));
      us = static_cast<int64_t>(whole_us * left * (0.05 + 0.45 * (i - 12) / 11.0));
    }
    killed_run(i, false, us);
    if (HasFatalFailure()) return;
  }
  // Kill points inside a checkpoint write: once the temporary file exists, after 0 to 3.2 ms.
  const int64_t extra_us[] = {0, 0, 50, 100, 200, 400, 800, 1600, 3200};
  for (int j = 0; j < 9; j++) {
    killed_run(kTimed + j, true, extra_us[j]);
    if (HasFatalFailure()) return;
  }
  std::printf(
      "[ info ] a resumed run takes %.0f ms; %d runs killed (%d with a checkpoint temp file "
      "present), %d finished first; "
      "checkpoint reached step %lld; %d logged losses matched the reference\n",
      whole_us / 1000, kills, during_write, finished, static_cast<long long>(last_step),
      logs_compared);
  EXPECT_GE(kills, 20);

  // Resume to the end: the result is the uninterrupted run's, byte for byte.
  run_ok(args({"--resume", state, "--ckpt-every", "1", "--out", out, "--log",
               dir_ + "/kill_final.jsonl"}),
         dir_ + "/kill_final");
  expect_reference_losses(dir_ + "/kill_final.jsonl");
  EXPECT_EQ(remat::load_train_state(state).step, kSteps);
  EXPECT_TRUE(slurp(state) == ref_state_) << "final training state differs from the reference";
  EXPECT_TRUE(slurp(model) == ref_model_) << "final model differs from the reference";
}

class SignalTest : public CrashTest, public ::testing::WithParamInterface<int> {};

TEST_P(SignalTest, StopsAfterTheStepWithACheckpointAndResumesIdentically) {
  const int sig = GetParam();
  const std::string name = sig == SIGINT ? "sigint" : "sigterm";
  const std::string out = dir_ + "/" + name, log = dir_ + "/" + name + ".jsonl";
  const Child c = spawn(args({"--out", out, "--log", log}), dir_ + "/" + name);
  ASSERT_TRUE(wait_for_step(c, log, 2)) << "no step 2 logged\n" << slurp(c.err);
  ::kill(c.pid, sig);
  const int st = wait_child(c);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << describe(st, c);
  const std::string stdout_text = slurp(c.out);
  ASSERT_NE(stdout_text.find("signal received: stopping after step"), std::string::npos)
      << stdout_text;

  // The checkpoint holds the last step logged; the run stopped early.
  const auto before = read_losses(log);
  ASSERT_FALSE(before.empty());
  const int stopped = before.rbegin()->first;
  EXPECT_LT(stopped, kSteps) << "the signal came too late to test anything";
  EXPECT_EQ(remat::load_train_state(out + "/state.bin").step, stopped);
  EXPECT_EQ(expect_reference_losses(log), stopped);

  const std::string log2 = dir_ + "/" + name + "_resumed.jsonl";
  run_ok(args({"--resume", out + "/state.bin", "--out", out, "--log", log2}),
         dir_ + "/" + name + "_resumed");
  const auto after = read_losses(log2);
  ASSERT_FALSE(after.empty());
  EXPECT_EQ(after.begin()->first, stopped + 1);
  EXPECT_EQ(expect_reference_losses(log2), kSteps - stopped);
  EXPECT_TRUE(slurp(out + "/state.bin") == ref_state_);
  EXPECT_TRUE(slurp(out + "/model.bin") == ref_model_);
}

INSTANTIATE_TEST_SUITE_P(Signals, SignalTest, ::testing::Values(SIGINT, SIGTERM),
                         [](const auto& info) {
                           return std::string(info.param == SIGINT ? "SIGINT" : "SIGTERM");
                         });

TEST_F(CrashTest, SecondSignalExitsAtOnceAndTheCheckpointStillLoads) {
  const std::string out = dir_ + "/twice", log = dir_ + "/twice.jsonl";
  const Child c =
      spawn(args({"--steps", "100000", "--ckpt-every", "1", "--out", out, "--log", log}),
            dir_ + "/twice");
  ASSERT_TRUE(wait_for_step(c, log, 2)) << slurp(c.err);
  // Two different signals, so that neither can merge into the other while pending.
  ::kill(c.pid, SIGINT);
  ::kill(c.pid, SIGTERM);
  const int st = wait_child(c);
  ASSERT_TRUE(WIFEXITED(st)) << describe(st, c);
  EXPECT_EQ(WEXITSTATUS(st), 130) << describe(st, c);
  remat::TrainState s;
  ASSERT_NO_THROW(s = remat::load_train_state(out + "/state.bin"));
  EXPECT_GE(s.step, 1);
  EXPECT_LT(s.step, 100000);
}

}  // namespace
