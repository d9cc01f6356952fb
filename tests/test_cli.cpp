// `remat train` and friends as a user meets them: every bad input is a clear message naming the
// file or option and exit code 1 (never a signal or a crash), --help works for every command,
// non-finite steps are skipped and reported, an infeasible memory budget is refused before the
// first step, and a failed checkpoint write is an error that leaves the previous checkpoint
// intact.
//
// Every run is the real remat binary (REMAT_BINARY) started with fork/exec; small random
// shards and checkpoints are written by the test into a temporary directory.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
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

using remat::test::contains;
using remat::test::Limits;
using remat::test::Result;
using remat::test::run_remat;
using remat::test::slurp;

// Expects a clean failure: exit code 1 (not a signal) and stderr containing every `what`.
void expect_error(const Result& r, const std::vector<std::string>& what) {
  ASSERT_TRUE(r.exited()) << r.describe();
  EXPECT_EQ(r.code(), 1) << r.describe();
  for (const std::string& w : what)
    EXPECT_TRUE(contains(r.err, w)) << "missing '" << w << "'\n" << r.describe();
  EXPECT_FALSE(contains(r.out, "step 1/")) << "training started\n" << r.describe();
  // A user's error names what is wrong, never a place in remat's sources, and says who
  // speaks once.
  EXPECT_FALSE(contains(r.err, ".cpp:") || contains(r.err, ".h:") || contains(r.err, ".cu:") ||
               contains(r.err, REMAT_SOURCE_DIR))
      << "a source location in a user's error\n"
      << r.describe();
  const size_t first = r.err.find(": error: ");
  EXPECT_TRUE(first != std::string::npos &&
              r.err.find(": error: ", first + 1) == std::string::npos &&
              r.err.find(": remat ") == std::string::npos &&
              r.err.find(": error: prepare: ") == std::string::npos)
      << "the prefix twice\n"
      << r.describe();
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = remat::test::make_temp_dir("remat_cli");
    remat::test::write_random_shard(dir_ + "/train.bin", 4000, 300, 99);
  }
  static void TearDownTestSuite() {
    remat::test::remove_temp_dir(dir_);  // REMAT_KEEP_TEST_FILES=1 keeps it
  }

  // A short tiny-model run on the test shard, plus `extra` (later options win).
  static std::vector<std::string> train(const std::vector<std::string>& extra) {
    std::vector<std::string> a = remat::test::tiny_train_args(dir_ + "/train.bin", 4);
    a.insert(a.end(), {"--out", dir_ + "/out_default"});
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static std::string path(const std::string& name) { return dir_ + "/" + name; }
  static Result run(const std::vector<std::string>& args, const std::string& name,
                    const Limits& lim = {}) {
    return run_remat(args, path(name), lim);
  }

  static std::string dir_;
};
std::string CliTest::dir_;

// ---- --help ----

TEST_F(CliTest, HelpOfEveryCommandExitsZeroWithUsage) {
  for (const std::string cmd : {"train", "prepare", "sample", "plan"}) {
    for (const std::string flag : {"--help", "-h"}) {
      const Result r = run({cmd, flag}, "help_" + cmd);
      EXPECT_TRUE(r.exited() && r.code() == 0) << cmd << " " << flag << ": " << r.describe();
      EXPECT_TRUE(contains(r.out, "usage: remat " + cmd)) << r.describe();
      EXPECT_TRUE(contains(r.out, "--help")) << r.describe();
    }
  }
  const Result top = run({"--help"}, "help_top");
  EXPECT_EQ(top.code(), 0) << top.describe();
  for (const std::string cmd : {"train", "prepare", "sample", "plan"})
    EXPECT_TRUE(contains(top.out, cmd)) << top.describe();
  const Result unknown = run({"frobnicate"}, "help_unknown");
  EXPECT_TRUE(unknown.exited() && unknown.code() != 0) << unknown.describe();
  EXPECT_TRUE(contains(unknown.err, "frobnicate")) << unknown.describe();
}

// ---- bad inputs: a message naming the file or option, exit code 1 ----

TEST_F(CliTest, MissingDataFileIsNamed) {
  const std::string missing = path("no_such_shard.bin");
  expect_error(run(train({"--data", missing}), "missing_data"), {missing});
}

TEST_F(CliTest, ShardWithWrongMagicIsNamed) {
  std::string bytes = slurp(path("train.bin"));
  bytes[0] ^= 0x5a;
  const std::string bad = path("bad_magic_shard.bin");
  remat::write_file_atomic(bad, bytes.data(), bytes.size());
  expect_error(run(train({"--data", bad}), "shard_magic"), {bad, "magic"});
}

TEST_F(CliTest, ShardWhoseSizeDisagreesWithItsHeaderIsNamed) {
  const std::string bytes = slurp(path("train.bin"));
  const std::string cut = path("short_shard.bin"), grown = path("long_shard.bin");
  remat::write_file_atomic(cut, bytes.data(), bytes.size() - 100);
  const std::string longer = bytes + std::string(6, '\0');
  remat::write_file_atomic(grown, longer.data(), longer.size());
  expect_error(run(train({"--data", cut}), "shard_short"), {cut, "4000 tokens"});
  expect_error(run(train({"--data", grown}), "shard_long"), {grown, "4000 tokens"});
  // A header alone, cut short.
  const std::string stub = path("stub_shard.bin");
  remat::write_file_atomic(stub, bytes.data(), 600);
  expect_error(run(train({"--data", stub}), "shard_stub"), {stub, "truncated"});
}

TEST_F(CliTest, TokenPastTheVocabularyIsNamedWithItsValue) {
  std::vector<uint16_t> tokens(400, 7);
  tokens[123] = 291;
  const std::string bad = path("big_token.bin");
  remat::write_shard(bad, tokens.data(), tokens.size());
  // 291 < 300: fine ...
  const Result ok = run(train({"--data", bad, "--steps", "1"}), "token_ok");
  EXPECT_EQ(ok.code(), 0) << ok.describe();
  // ... but not below a vocabulary of 200.
  expect_error(run(train({"--data", bad, "--vocab", "200"}), "token_bad"),
               {bad, "index 123", "291", "200"});
}

TEST_F(CliTest, ModelCheckpointWithWrongMagicOrVersionOrTruncatedIsNamed) {
  // A real checkpoint first.
  const Result made = run(train({"--out", path("model_src"), "--steps", "1"}), "model_src");
  ASSERT_EQ(made.code(), 0) << made.describe();
  const std::string good = slurp(path("model_src/model.bin"));
  ASSERT_GT(good.size(), 1024u);
  auto variant = [&](const std::string& name, std::string bytes) {
    const std::string p = path(name);
    remat::write_file_atomic(p, bytes.data(), bytes.size());
    return p;
  };
  std::string b = good;
  b[0] ^= 1;
  const std::string magic = variant("m_magic.bin", b);
  b = good;
  b[4] = 4;  // version 4
  const std::string version = variant("m_version.bin", b);
  const std::string trunc = variant("m_trunc.bin", good.substr(0, good.size() - 4));
  const std::string header = variant("m_header.bin", good.substr(0, 512));

  // train --model FILE, sample --model FILE and plan --model FILE all say the same.
  expect_error(run(train({"--model", magic}), "m_magic"), {magic, "magic"});
  expect_error(run(train({"--model", version}), "m_version"), {version, "version 4"});
  expect_error(run(train({"--model", trunc}), "m_trunc"), {trunc, "file size"});
  expect_error(run(train({"--model", header}), "m_header"), {header, "truncated"});
  expect_error(run({"sample", "--model", trunc, "--tokens", "2"}, "m_sample"), {trunc});
  expect_error(run({"plan", "--model", magic}, "m_plan"), {magic, "magic"});
  // The good one trains (the model's own shape, so no --vocab).
  const Result ok = run(train({"--model", path("model_src/model.bin"), "--steps", "1"}), "m_ok");
  EXPECT_EQ(ok.code(), 0) << ok.describe();
}

TEST_F(CliTest, TrainingStateThatIsCorruptOrOfAnotherModelIsRefused) {
  const Result made = run(train({"--out", path("state_src"), "--steps", "2"}), "state_src");
  ASSERT_EQ(made.code(), 0) << made.describe();
  const std::string state = path("state_src/state.bin");
  const std::string good = slurp(state);

  // Truncated, and one flipped byte (the checksum).
  const std::string trunc = path("s_trunc.bin"), flipped = path("s_flip.bin");
  remat::write_file_atomic(trunc, good.data(), good.size() / 2);
  std::string f = good;
  f[f.size() / 2] ^= 0x10;
  remat::write_file_atomic(flipped, f.data(), f.size());
  expect_error(run(train({"--resume", trunc}), "s_trunc"), {trunc});
  expect_error(run(train({"--resume", flipped}), "s_flip"), {flipped, "checksum"});
  // A model file is not a training state.
  expect_error(run(train({"--resume", path("state_src/model.bin")}), "s_model"),
               {path("state_src/model.bin"), "not a remat training state"});
  // The state of a `tiny` run resumed into a `mini` run: the shapes disagree, and the message
  // names the file.
  const Result other = run(train({"--model", "mini", "--resume", state}), "s_other");
  expect_error(other, {state});
}

TEST_F(CliTest, BadOptionsAreNamed) {
  expect_error(run(train({"--seq", "100"}), "o_seq"), {"--seq 100", "64"});
  expect_error(run(train({"--bogus", "1"}), "o_unknown"), {"unknown option --bogus"});
  expect_error(run(train({"--batch", "2x"}), "o_batch"), {"--batch", "'2x'"});
  expect_error(run(train({"--lr", "fast"}), "o_lr"), {"--lr", "'fast'"});
  expect_error(run(train({"--steps", "99999999999999999999"}), "o_range"), {"--steps"});
  expect_error(run(train({"--batch"}), "o_novalue"), {"--batch needs a value"});
  expect_error(run(train({"--shuffle=yes"}), "o_flagvalue"), {"--shuffle takes no value"});
  expect_error(run(train({"--model", "gpt5"}), "o_preset"), {"gpt5"});
  expect_error(run(train({"--recompute", "sometimes"}), "o_policy"), {"sometimes"});
  expect_error(run(train({"--recompute", "full,99999999999=none"}), "o_block"), {"99999999999"});
  expect_error(run(train({"--vocab", "2147483647"}), "o_vocab"), {"2147483647"});
  expect_error(run(train({"stray"}), "o_positional"), {"stray"});
  // One check per option, agreeing with its help.
  expect_error(run(train({"--batch", "0"}), "o_batch0"),
               {"--batch must be a positive integer", "got 0"});
  expect_error(run(train({"--seq", "-3"}), "o_seqneg"), {"--seq must be a positive integer"});
  expect_error(run(train({"--grad-clip", "-1"}), "o_clip"), {"--grad-clip must be >= 0", "-1"});
  expect_error(run(train({"--recompute", "every:0"}), "o_every0"), {"every:0", "1 <= K"});
  expect_error(run(train({"--lookahead", "-1"}), "o_la"), {"--lookahead"});
  expect_error(run(train({"--grad-checkpoint", "--recompute", "selective"}), "o_gc"),
               {"--grad-checkpoint", "selective"});
  expect_error(run(train({"--grad-checkpoint", "--recompute", "every:2"}), "o_gc2"),
               {"--grad-checkpoint", "--recompute every:2"});
  expect_error(run(train({"--seed", "-1"}), "o_seedneg"), {"--seed", "-1"});
  // An unwritable trace is refused before the first step, not after the run.
  expect_error(run(train({"--trace", path("no/such/dir/t.json")}), "o_trace"),
               {"--trace", "no/such/dir/t.json"});
}

// The other commands: the same rules (the option or file named, no source path, one prefix).
TEST_F(CliTest, BadOptionsOfPlanSampleAndPrepareAreNamed) {
  expect_error(run({"plan", "--batch", "0"}, "p_batch"), {"--batch must be a positive integer"});
  expect_error(run({"plan", "--lookahead", "-2"}, "p_la"), {"--lookahead", "-2"});
  expect_error(run({"plan", "--vocab", "99999999999"}, "p_vocab"), {"--vocab", "99999999999"});
  expect_error(run({"plan", "--dtype", "fp8"}, "p_dtype"), {"--dtype", "fp8"});
  expect_error(run({"plan", "gpt2"}, "p_positional"), {"unexpected argument 'gpt2'"});
  expect_error(run({"plan", "--grad-checkpoint", "--recompute", "selective"}, "p_gc"),
               {"--grad-checkpoint", "--recompute selective"});
  expect_error(run({"plan", "--recompute", "every:0"}, "p_every0"), {"every:0"});
  const std::string missing = path("no_such_model.bin");
  expect_error(run({"sample", "--model", missing}, "sm_missing"), {missing});
  expect_error(run({"sample", "--temperature", "-1"}, "sm_temp"), {"--temperature", "-1"});
  expect_error(run({"sample", "--seed", "-5"}, "sm_seed"), {"--seed", "-5"});
  expect_error(run({"sample", "extra"}, "sm_positional"), {"unexpected argument 'extra'"});
  expect_error(
      run({"prepare", "--out", path("prep"), "--vocab", "100", path("train.bin")}, "pr_vocab"),
      {"--vocab", "100"});
  expect_error(
      run({"prepare", "--out", path("prep"), "--val-fraction", "1", path("train.bin")}, "pr_val"),
      {"--val-fraction", "1"});
  expect_error(run({"prepare", "--out", path("prep"), path("no_such_text")}, "pr_missing"),
               {path("no_such_text")});
}

TEST_F(CliTest, HelpTextsSayWhatTheChecksDo) {
  const Result t = run({"train", "--help"}, "help_checks");
  ASSERT_EQ(t.code(), 0) << t.describe();
  for (const std::string w :
       {"--grad-checkpoint", "the same as --recompute full", "0 = off", "a different --seed"})
    EXPECT_TRUE(contains(t.out, w)) << "missing '" << w << "'\n" << t.describe();
  const Result p = run({"plan", "--help"}, "help_plan_gc");
  EXPECT_TRUE(contains(p.out, "--grad-checkpoint") && contains(p.out, "--recompute full"))
      << p.describe();
}

TEST_F(CliTest, GradCheckpointIsRecomputeFull) {
  const Result a = run({"plan", "--model", "gpt2", "--grad-checkpoint"}, "gc_plan");
  const Result b = run({"plan", "--model", "gpt2", "--recompute", "full"}, "full_plan");
  ASSERT_EQ(a.code(), 0) << a.describe();
  ASSERT_EQ(b.code(), 0) << b.describe();
  auto body = [](const std::string& s) { return s.substr(0, s.find("(planned in")); };
  EXPECT_EQ(body(a.out), body(b.out));
  const Result aj = run({"plan", "--model", "gpt2", "--grad-checkpoint", "--json"}, "gc_json");
  const Result bj = run({"plan", "--model", "gpt2", "--recompute", "full", "--json"}, "full_json");
  ASSERT_EQ(aj.code(), 0) << aj.describe();
  auto no_time = [](std::string s) {  // the one field that differs: how long planning took
    const size_t k = s.find("\"plan_seconds");
    if (k != std::string::npos) s.erase(k, s.find_first_of(",}", k) - k);
    return s;
  };
  EXPECT_EQ(no_time(aj.out), no_time(bj.out));
  const Result alone = run(train({"--grad-checkpoint", "--steps", "1"}), "gc_alone");
  EXPECT_EQ(alone.code(), 0) << alone.describe();
  EXPECT_TRUE(contains(alone.out, "recompute full")) << alone.describe();
  const Result t =
      run(train({"--grad-checkpoint", "--recompute", "full", "--steps", "1"}), "gc_train");
  EXPECT_EQ(t.code(), 0) << t.describe();
  EXPECT_TRUE(contains(t.out, "recompute full")) << t.describe();
}

TEST_F(CliTest, ResumeWithAnotherSeedIsRefusedBeforeTheFirstStep) {
  const Result made =
      run(train({"--out", path("seed_src"), "--steps", "2", "--seed", "5"}), "seed_src");
  ASSERT_EQ(made.code(), 0) << made.describe();
  const std::string state = path("seed_src/state.bin");
  expect_error(run(train({"--resume", state, "--seed", "6"}), "seed_other"),
               {state, "--seed 5", "--seed 6"});
  const Result same = run(train({"--resume", state, "--seed", "5", "--steps", "3"}), "seed_same");
  EXPECT_EQ(same.code(), 0) << same.describe();
  // Without --seed the resumed run takes the state's (and says so), and records it again.
  const Result adopted = run(
      train({"--resume", state, "--steps", "3", "--out", path("seed_adopted")}), "seed_adopted");
  ASSERT_EQ(adopted.code(), 0) << adopted.describe();
  EXPECT_TRUE(contains(adopted.out, "seed: 5")) << adopted.describe();
  EXPECT_EQ(remat::load_train_state(state).rng_seed, 5u);
  EXPECT_EQ(remat::load_train_state(path("seed_adopted/state.bin")).rng_seed, 5u);
}

// ---- device and precision ----

// Without a GPU (CI): auto says once that it chose the CPU and trains; an explicit cuda is a
// clean error naming what is missing; bf16 is refused on the CPU. On a machine with a GPU the
// auto run trains on CUDA instead and the cuda run is not an error.
TEST_F(CliTest, DeviceChoiceIsSaidOnceAndAMissingGpuIsAClearError) {
  const Result a = run(train({"--device", "auto", "--steps", "1"}), "dev_auto");
  ASSERT_TRUE(a.exited() && a.code() == 0) << a.describe();
  size_t said = 0;
  for (size_t p = a.out.find("device: "); p != std::string::npos; p = a.out.find("device: ", p + 1))
    said++;
  EXPECT_EQ(said, 1u) << a.out;
  if (contains(a.out, "device: CUDA"))
    GTEST_SKIP() << "a GPU is present: the no-GPU errors do not apply";
  EXPECT_TRUE(contains(a.out, "device: CPU backend (")) << a.out;
  expect_error(run(train({"--device", "cuda"}), "dev_cuda"), {"--device cuda", "--device cpu"});
  expect_error(run(train({"--device", "cpu", "--dtype", "bf16"}), "dev_bf16"),
               {"--dtype bf16", "CUDA"});
  expect_error(run(train({"--device", "tpu"}), "dev_tpu"), {"--device", "'tpu'"});
  expect_error(run(train({"--dtype", "fp8"}), "dev_fp8"), {"--dtype", "'fp8'"});
}

// ---- non-finite steps ----

TEST_F(CliTest, NonFiniteStepIsSkippedAndReported) {
  // REMAT_TEST_NAN_STEPS=2 poisons the third step (0-based 2, printed as step 3).
  const std::string log = path("nan1.jsonl");
  const Result r = run(train({"--steps", "3", "--out", path("nan1"), "--log", log}), "nan1",
                       Limits{{"REMAT_TEST_NAN_STEPS=2"}});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.err, "step 3: non-finite")) << r.describe();
  EXPECT_TRUE(contains(r.err, "skipped")) << r.describe();
  EXPECT_FALSE(contains(r.err, "step 2:")) << r.describe();
  const std::string lines = slurp(log);
  EXPECT_TRUE(contains(lines, "{\"step\":3,\"loss\":null")) << lines;
  EXPECT_TRUE(contains(lines.substr(lines.find("{\"step\":3,")), "\"skipped\":true")) << lines;
  EXPECT_TRUE(contains(lines.substr(0, lines.find("{\"step\":3,")), "\"skipped\":false")) << lines;
  EXPECT_FALSE(contains(lines.substr(0, lines.find("{\"step\":3,")), "\"skipped\":true")) << lines;

  // The skipped step left the parameters as they were after step 2.
  const Result two = run(train({"--steps", "2", "--out", path("nan1_ref")}), "nan1_ref");
  ASSERT_EQ(two.code(), 0) << two.describe();
  EXPECT_TRUE(slurp(path("nan1/model.bin")) == slurp(path("nan1_ref/model.bin")))
      << "a skipped step changed the parameters";
  EXPECT_EQ(remat::load_train_state(path("nan1/state.bin")).step, 3);
}

TEST_F(CliTest, TooManyBadStepsExitThreeAndKeepTheGoodCheckpoint) {
  const std::string out = path("nan_many");
  const Result good = run(train({"--steps", "2", "--out", out}), "nan_many_good");
  ASSERT_EQ(good.code(), 0) << good.describe();
  const std::string before = slurp(out + "/state.bin"), model_before = slurp(out + "/model.bin");

  // Steps 2.. (0-based) are NaN: the third bad one in a row stops the run.
  const Result r = run(train({"--resume", out + "/state.bin", "--steps", "20", "--out", out,
                              "--max-bad-steps", "3"}),
                       "nan_many", Limits{{"REMAT_TEST_NAN_STEPS=1-100"}});
  ASSERT_TRUE(r.exited()) << r.describe();
  EXPECT_EQ(r.code(), 3) << r.describe();
  EXPECT_TRUE(contains(r.err, "3 consecutive non-finite steps")) << r.describe();
  for (const char* s : {"step 3: non-finite", "step 4: non-finite", "step 5: non-finite"})
    EXPECT_TRUE(contains(r.err, s)) << r.describe();
  EXPECT_FALSE(contains(r.out, "step 6/")) << r.describe();
  EXPECT_TRUE(slurp(out + "/state.bin") == before) << "the good checkpoint was touched";
  EXPECT_TRUE(slurp(out + "/model.bin") == model_before) << "the good model was touched";
  EXPECT_EQ(remat::load_train_state(out + "/state.bin").step, 2);
}

// ---- memory ----

TEST_F(CliTest, InfeasibleBudgetIsRefusedBeforeTheFirstStepNamingTheSmallestFeasibleOne) {
  const Result r = run(train({"--recompute", "budget:1K"}), "budget");
  expect_error(r, {"budget:1K", "infeasible", "smallest feasible budget is budget:"});
  EXPECT_FALSE(contains(r.out, "step 1")) << r.describe();
  // The budget it names does fit.
  const size_t at = r.err.find("budget is budget:");
  ASSERT_NE(at, std::string::npos);
  const std::string bytes = std::to_string(std::stoull(r.err.substr(at + 17)));
  const Result ok = run(train({"--recompute", "budget:" + bytes, "--steps", "1"}), "budget_ok");
  EXPECT_EQ(ok.code(), 0) << ok.describe();
  EXPECT_TRUE(contains(ok.out, "step 1/")) << ok.describe();
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;  // the sanitizers' shadow memory needs no RLIMIT_AS
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

TEST_F(CliTest, ModelThatCannotFitTheMachineIsRefusedBeforeAnyAllocation) {
  if (kSanitized) GTEST_SKIP() << "sanitizer builds cannot run under an address-space limit";
  // GPT-2 XL at B=512, T=1024 needs terabytes: the pre-flight check refuses it before the
  // weights are even allocated (the 8 GiB address-space cap makes sure nothing big happens).
  const Result r = run(train({"--model", "gpt2-xl", "--vocab", "0", "--batch", "512", "--seq",
                              "1024", "--steps", "1"}),
                       "xl", Limits{{}, RLIM_INFINITY, rlim_t(8) << 30});
  expect_error(r, {"this run needs", "available"});
}

TEST_F(CliTest, RunThatCannotFitInMemoryIsACleanError) {
  if (kSanitized) GTEST_SKIP() << "sanitizer builds cannot run under an address-space limit";
  // A batch of 256 x 256 tokens of the `small` preset needs gigabytes of activations; under
  // a 2 GiB address-space limit that is an error message, not a crash: the pre-flight check
  // (if the machine has less memory available than that) or the arena's reservation.
  std::vector<uint16_t> tokens(256 * 256 + 1, 5);
  const std::string shard = path("big_batch.bin");
  remat::write_shard(shard, tokens.data(), tokens.size());
  const Result r = run(train({"--model", "small", "--data", shard, "--batch", "256", "--seq", "256",
                              "--steps", "1"}),
                       "too_big", Limits{{}, RLIM_INFINITY, rlim_t(2) << 30});
  expect_error(r, {});
  EXPECT_TRUE(contains(r.err, "cannot reserve") || contains(r.err, "this run needs"))
      << r.describe();
}

// ---- disk ----

TEST_F(CliTest, OutUnderARegularFileIsAnErrorNamingThePath) {
  const std::string file = path("plain_file");
  remat::write_file_atomic(file, "x", 1);
  const std::string out = file + "/out";
  const Result r = run(train({"--steps", "1", "--out", out}), "out_under_file");
  ASSERT_TRUE(r.exited()) << r.describe();
  EXPECT_EQ(r.code(), 1) << r.describe();
  // Found before the first step, naming the directory.
  EXPECT_TRUE(contains(r.err, out + ": cannot create the checkpoint directory")) << r.describe();
  EXPECT_FALSE(contains(r.out, "step 1/")) << r.describe();
  EXPECT_EQ(slurp(file), "x");
}

TEST_F(CliTest, FullDiskFailsTheSaveAndKeepsThePreviousCheckpoint) {
  const std::string out = path("full_disk");
  const Result good = run(train({"--steps", "2", "--out", out}), "full_disk_good");
  ASSERT_EQ(good.code(), 0) << good.describe();
  const std::string before = slurp(out + "/state.bin"), model_before = slurp(out + "/model.bin");
  ASSERT_GT(before.size(), 64u * 1024);

  // RLIMIT_FSIZE of 64 KiB: the new state file cannot be written (EFBIG, SIGXFSZ ignored).
  const Result r = run(train({"--resume", out + "/state.bin", "--steps", "3", "--out", out}),
                       "full_disk", Limits{{}, 64 * 1024});
  ASSERT_TRUE(r.exited()) << r.describe();
  EXPECT_EQ(r.code(), 1) << r.describe();
  EXPECT_TRUE(contains(r.err, out + "/state.bin")) << r.describe();
  EXPECT_TRUE(contains(r.err, "File too large")) << r.describe();
  EXPECT_TRUE(slurp(out + "/state.bin") == before) << "the previous checkpoint was damaged";
  EXPECT_TRUE(slurp(out + "/model.bin") == model_before);
  EXPECT_EQ(remat::load_train_state(out + "/state.bin").step, 2);
  // No temporary file is left behind.
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

}  // namespace
