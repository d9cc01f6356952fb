// Data parallel (models/data_parallel.h, runtime/collectives.h): `mpirun -np N remat train`
// on the CPU backend over Open MPI against one process at N times the batch. Every test that
// launches ranks skips, saying why, where mpirun is missing, remat was built without MPI, or
// the build is sanitized (Open MPI's own threads and leaks are not instrumented).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "io/train_state.h"
#include "models/data_parallel.h"
#include "models/model.h"
#include "models/trainer.h"
#include "tests/dp/thread_collectives.h"
#include "tests/test_util.h"

namespace remat {
namespace {

using test::contains;
using test::run_shell;
using test::shell_quote;
using test::ShellResult;
using test::TempDir;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr const char* kSanitized = "a sanitizer build (Open MPI is not instrumented)";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr const char* kSanitized = "a sanitizer build (Open MPI is not instrumented)";
#else
constexpr const char* kSanitized = nullptr;
#endif
#else
constexpr const char* kSanitized = nullptr;
#endif

// Why the multi-rank tests cannot run here, or "" when they can.
std::string why_no_mpi() {
#ifndef REMAT_WITH_MPI
  return "remat was built without MPI (install libopenmpi-dev; scripts/setup.sh does)";
#else
  if (kSanitized) return kSanitized;
  static const bool have = run_shell("command -v mpirun").status == 0;
  if (!have) return "mpirun not found (install openmpi-bin; scripts/setup.sh does)";
  return "";
#endif
}

#define REQUIRE_MPI()                                                         \
  do {                                                                        \
    const std::string why = why_no_mpi();                                     \
    if (!why.empty()) GTEST_SKIP() << "data-parallel tests skipped: " << why; \
  } while (0)

// The tiny run of test_util.h on `shard` writing its log and checkpoint into `out`, plus
// `extra`. B=2, T=16.
std::vector<std::string> run_args(const std::string& shard, const std::string& out, int steps,
                                  const std::vector<std::string>& extra) {
  std::vector<std::string> a = test::tiny_train_args(shard, steps);
  a.insert(a.end(), {"--out", out, "--log", out + ".jsonl", "--lr", "3e-3", "--weight-decay", "0.1",
                     "--warmup", "2"});
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string join_args(const std::vector<std::string>& args) {
  std::string s = shell_quote(REMAT_BINARY);
  for (const std::string& a : args) s += " " + shell_quote(a);
  return s;
}

// mpirun for N ranks on this machine (oversubscribed: CI has 2 cores), as root where need be,
// with the environment `env` (NAME=VALUE) on every rank. One OpenMP thread per rank so that
// the ranks do not fight over the cores.
std::string mpirun(int n, const std::vector<std::string>& env = {}) {
  std::string s = "mpirun --oversubscribe --mca btl_vader_single_copy_mechanism none";
  if (::geteuid() == 0) s += " --allow-run-as-root";
  s += " -x OMP_NUM_THREADS=1";
  for (const std::string& e : env) s += " -x " + shell_quote(e);
  return s + " -np " + std::to_string(n);
}

ShellResult run_ranks(int n, const std::vector<std::string>& args,
                      const std::vector<std::string>& env = {}) {
  return run_shell(mpirun(n, env) + " " + join_args(args));
}

ShellResult run_one(const std::vector<std::string>& args) {
  return run_shell("OMP_NUM_THREADS=1 " + join_args(args));
}

// The per-step training losses of a --log file, in order.
std::vector<double> losses_of(const std::string& log) {
  std::vector<double> out;
  std::istringstream in(test::slurp(log));
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

// Parameters and optimizer state of a checkpoint, compared bit for bit.
void expect_same_state(const std::string& a, const std::string& b, const std::string& what) {
  const TrainState x = load_train_state(a), y = load_train_state(b);
  EXPECT_EQ(x.step, y.step) << what;
  ASSERT_EQ(x.params.size(), y.params.size()) << what;
  EXPECT_EQ(std::memcmp(x.params.data(), y.params.data(), x.params.size() * 4), 0)
      << what << ": weights differ";
  ASSERT_EQ(x.m.size(), y.m.size()) << what;
  EXPECT_EQ(std::memcmp(x.m.data(), y.m.data(), x.m.size() * 4), 0) << what << ": m differs";
  EXPECT_EQ(std::memcmp(x.v.data(), y.v.data(), x.v.size() * 4), 0) << what << ": v differs";
  EXPECT_EQ(x.loader.epoch, y.loader.epoch) << what;
  EXPECT_EQ(x.loader.shard, y.loader.shard) << what;
  EXPECT_EQ(x.loader.batch_in_shard, y.loader.batch_in_shard) << what;
}

void expect_same_losses(const std::string& a, const std::string& b, const std::string& what) {
  const std::vector<double> x = losses_of(a), y = losses_of(b);
  ASSERT_FALSE(x.empty()) << what;
  ASSERT_EQ(x.size(), y.size()) << what;
  for (size_t i = 0; i < x.size(); i++) EXPECT_EQ(x[i], y[i]) << what << ", step " << i + 1;
}

class DataParallel : public ::testing::Test {
 protected:
  void SetUp() override {
    // Two shards, so the ranks' batches run across a shard boundary (4 batches of B T = 32
    // in the first, the rest in the second).
    test::write_random_shard(dir_ / "train_000.bin", 4 * 32 + 10, 67, 5);
    test::write_random_shard(dir_ / "train_001.bin", 6000, 67, 6);
  }
  std::string data() const { return dir_.path + "/train_*.bin"; }
  std::string out(const std::string& name) const { return dir_ / name; }

  // One process at --total-batch `total` and `ranks` processes at the same total, `steps`
  // steps: the same per-step losses and the same checkpoint, bit for bit.
  void expect_ranks_match(int ranks, long total, const std::vector<std::string>& extra,
                          const std::vector<std::string>& rank_extra = {}) {
    const std::string tag = std::to_string(ranks) + " ranks, total " + std::to_string(total);
    std::vector<std::string> common = extra;
    common.insert(common.end(), {"--total-batch", std::to_string(total)});
    const std::string one = out("one_" + std::to_string(n_)),
                      many = out("many_" + std::to_string(n_));
    n_++;
    const ShellResult a = run_one(run_args(data(), one, kSteps, common));
    ASSERT_EQ(a.status, 0) << a.output;
    std::vector<std::string> mine = common;
    mine.insert(mine.end(), rank_extra.begin(), rank_extra.end());
    const ShellResult b = run_ranks(ranks, run_args(data(), many, kSteps, mine));
    ASSERT_EQ(b.status, 0) << b.output;
    EXPECT_TRUE(contains(b.output, "data parallel: " + std::to_string(ranks) + " ranks"))
        << b.output;
    expect_same_losses(one + ".jsonl", many + ".jsonl", tag);
    expect_same_state(one + "/state.bin", many + "/state.bin", tag);
  }

  static constexpr int kSteps = 5;
  TempDir dir_{"remat_dp"};
  int n_ = 0;
};

TEST_F(DataParallel, TwoRanksEqualOneProcessAtTwiceTheBatch) {
  REQUIRE_MPI();
  expect_ranks_match(2, 2 * 32, {});
}

TEST_F(DataParallel, TwoRanksEqualOneProcessWithARecomputePreset) {
  REQUIRE_MPI();
  expect_ranks_match(2, 2 * 32, {"--recompute", "selective"});
  expect_ranks_match(2, 2 * 32, {"--recompute", "full"});
}

TEST_F(DataParallel, TwoRanksEqualOneProcessWithGradientAccumulation) {
  REQUIRE_MPI();
  // Three micro-steps per rank: micro-batch j W + r on rank r, folded in that order.
  expect_ranks_match(2, 6 * 32, {"--recompute", "attention"});
}

TEST_F(DataParallel, ZeroOneEqualsUnshardedBitForBit) {
  REQUIRE_MPI();
  // Small buckets: many reductions under the backward pass, pieces cut at shard boundaries.
  expect_ranks_match(2, 4 * 32, {"--bucket-bytes", "8KiB"}, {"--zero", "1"});
  expect_ranks_match(2, 2 * 32, {}, {"--zero", "1"});
}

TEST_F(DataParallel, ThreeRanksAgreeWithOneProcess) {
  REQUIRE_MPI();
  const std::string one = out("one3"), three = out("three");
  const ShellResult a = run_one(run_args(data(), one, kSteps, {"--total-batch", "96"}));
  ASSERT_EQ(a.status, 0) << a.output;
  const ShellResult b =
      run_ranks(3, run_args(data(), three, kSteps, {"--zero", "1", "--bucket-bytes", "16KiB"}));
  ASSERT_EQ(b.status, 0) << b.output;
  const std::vector<double> x = losses_of(one + ".jsonl"), y = losses_of(three + ".jsonl");
  ASSERT_EQ(x.size(), size_t(kSteps));
  ASSERT_EQ(y.size(), x.size());
  for (size_t i = 0; i < x.size(); i++)
    EXPECT_LE(std::fabs(x[i] - y[i]), 1e-6 * std::fabs(x[i])) << "step " << i + 1;
  const TrainState s = load_train_state(one + "/state.bin"),
                   t = load_train_state(three + "/state.bin");
  ASSERT_EQ(s.params.size(), t.params.size());
  double worst = 0;
  for (size_t i = 0; i < s.params.size(); i++)
    worst = std::max(worst, std::fabs(double(s.params[i]) - t.params[i]) /
                                std::max(1e-30, std::fabs(double(s.params[i]))));
  EXPECT_LE(worst, 1e-6) << "weights, worst relative difference";
}

TEST_F(DataParallel, TwoRankCheckpointResumesOnOneRank) {
  REQUIRE_MPI();
  // Uninterrupted: one process, 6 steps at the total batch of two ranks.
  const std::string straight = out("straight"), half = out("half"), rest = out("rest");
  ShellResult a = run_one(run_args(data(), straight, 6, {"--total-batch", "64", "--shuffle"}));
  ASSERT_EQ(a.status, 0) << a.output;
  // Two ranks with ZeRO-1 for 3 steps (their checkpoint holds every shard), then one process.
  ShellResult b = run_ranks(2, run_args(data(), half, 3, {"--shuffle", "--zero", "1"}));
  ASSERT_EQ(b.status, 0) << b.output;
  ShellResult c = run_one(run_args(
      data(), rest, 6, {"--total-batch", "64", "--shuffle", "--resume", half + "/state.bin"}));
  ASSERT_EQ(c.status, 0) << c.output;
  std::vector<double> x = losses_of(straight + ".jsonl"), y = losses_of(half + ".jsonl");
  const std::vector<double> z = losses_of(rest + ".jsonl");
  y.insert(y.end(), z.begin(), z.end());
  ASSERT_EQ(x.size(), 6u);
  ASSERT_EQ(y.size(), 6u);
  for (size_t i = 0; i < 6; i++) EXPECT_EQ(x[i], y[i]) << "step " << i + 1;
  expect_same_state(straight + "/state.bin", rest + "/state.bin", "resumed on one rank");
}

// Seconds since `t0`.
double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// No process of this test's runs (their command lines name dir) is left.
void expect_no_survivors(const std::string& dir) {
  std::string left;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string pid = e.path().filename();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (std::atoi(pid.c_str()) == ::getpid()) continue;
    std::string cmd = test::slurp(e.path().string() + "/cmdline");
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (contains(cmd, dir + "/")) left += pid + ": " + cmd + "\n";
  }
  EXPECT_TRUE(left.empty()) << "ranks still running:\n" << left;
}

TEST_F(DataParallel, KilledRankEndsEveryRankAndTheLastCheckpointLoads) {
  REQUIRE_MPI();
  const std::string o = out("killed");
  // Rank 1 SIGKILLs itself a few ms into step 4; checkpoints after steps 1, 2 and 3.
  const auto t0 = std::chrono::steady_clock::now();
  const ShellResult r =
      run_ranks(2, run_args(data(), o, 8, {"--ckpt-every", "1", "--comm-timeout", "20"}),
                {"REMAT_TEST_KILL_RANK=1:4"});
  const double secs = since(t0);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_LT(secs, 20.0) << "the job took " << secs << " s to end";
  EXPECT_TRUE(contains(r.output, "rank 1")) << r.output;
  EXPECT_FALSE(contains(r.output, "step 4/8")) << r.output;
  expect_no_survivors(dir_.path);
  TrainState s;
  ASSERT_NO_THROW(s = load_train_state(o + "/state.bin")) << r.output;
  EXPECT_EQ(s.step, 3);
}

TEST_F(DataParallel, StalledRankEndsEveryRankWithinTheTimeout) {
  REQUIRE_MPI();
  const std::string o = out("stalled");
  // Rank 1 stops (SIGSTOP) in step 3: nothing tells the launcher; rank 0's wait runs out.
  const auto t0 = std::chrono::steady_clock::now();
  const ShellResult r =
      run_ranks(2, run_args(data(), o, 8, {"--ckpt-every", "1", "--comm-timeout", "2"}),
                {"REMAT_TEST_STALL_RANK=1:3"});
  const double secs = since(t0);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_LT(secs, 2 + 15.0) << "the job took " << secs << " s to end";
  EXPECT_TRUE(contains(r.output, "rank 0: a gradient or weight exchange: no data from rank 1"))
      << r.output;
  expect_no_survivors(dir_.path);
  TrainState s;
  ASSERT_NO_THROW(s = load_train_state(o + "/state.bin")) << r.output;
  EXPECT_EQ(s.step, 2);
}

TEST_F(DataParallel, RanksThatDisagreeAreRefusedBeforeStepOne) {
  REQUIRE_MPI();
  test::write_random_shard(dir_ / "other.bin", 6000, 67, 9);
  struct Case {
    std::vector<std::string> rank1;  // rank 1's extra flags (rank 0 has none)
    const char* field;
  };
  const Case cases[] = {
      {{"--batch", "4"}, "batch"},           {{"--seed", "7"}, "initial weights"},
      {{"--recompute", "full"}, "plan"},     {{"--data", dir_ / "other.bin"}, "data"},
      {{"--lr", "1e-3"}, "hyperparameters"}, {{"--zero", "1"}, "data parallel"},
  };
  for (const Case& k : cases) {
    const std::string o = out("disagree");
    std::vector<std::string> r1 = run_args(data(), o, 3, {});
    r1.insert(r1.end(), k.rank1.begin(), k.rank1.end());
    const std::string cmd =
        mpirun(1) + " " + join_args(run_args(data(), o, 3, {})) + " : -np 1 " + join_args(r1);
    const ShellResult r = run_shell(cmd);
    EXPECT_NE(r.status, 0) << r.output;
    EXPECT_TRUE(contains(r.output, std::string("ranks disagree before step 1 on ") + k.field))
        << k.field << ":\n"
        << r.output;
    EXPECT_FALSE(contains(r.output, "step 1/3")) << r.output;
  }
}

// ---- without MPI: the layout and the buckets ----

TEST(DataParallelLayout, ShardsAreAlignedContiguousAndCoverTheBuffer) {
  for (size_t n : {size_t(1), size_t(4095), size_t(4096), size_t(100000), size_t(1) << 22}) {
    for (int w : {1, 2, 3, 7}) {
      const ShardLayout s(n, w);
      size_t at = 0;
      for (int r = 0; r < w; r++) {
        EXPECT_EQ(s.begin(r), at);
        EXPECT_TRUE(s.begin(r) % ShardLayout::kAlign == 0 || s.begin(r) == n);
        for (size_t i : {s.begin(r), s.end(r) - 1})
          if (s.size(r) > 0) {
            EXPECT_EQ(s.owner(i), r);
          }
        at = s.end(r);
      }
      EXPECT_EQ(at, n) << "n " << n << " w " << w;
    }
  }
}

TEST(DataParallelLayout, BucketsFollowTheBackwardOrderAndTileEveryParameter) {
  ModelConfig c = test::tiny_config(3);
  const auto p = model_program(c, 2, 8);
  const std::vector<ParamId> order =
      grad_ready_order(p, parse_plan("none", c), ActDType::kFP32, ScheduleOptions{});
  // The backward finishes the last block first and the (tied) embeddings last.
  ASSERT_GE(order.size(), 2u);
  const std::string last = p->params[order.end()[-2]].name + " " + p->params[order.back()].name;
  EXPECT_TRUE(last == "wte.weight wpe.weight" || last == "wpe.weight wte.weight") << last;
  for (ParamId q : order)
    if (p->params[q].name.rfind("h.", 0) == 0) {
      EXPECT_EQ(p->params[q].name.rfind("h.2.", 0), 0u) << p->params[q].name;
      break;
    }
  const ShardLayout shards(p->num_params, 3);
  const std::vector<GradBucket> b = make_buckets(*p, order, 2000, shards);
  ASSERT_GT(b.size(), 3u);
  std::vector<int> covered(p->num_params, 0);
  size_t k = 0;
  for (const GradBucket& g : b) {
    for (ParamId q : g.params) EXPECT_EQ(q, order[k++]);
    for (const BucketPiece& pc : g.pieces) {
      EXPECT_EQ(shards.owner(pc.offset), pc.owner);
      EXPECT_EQ(shards.owner(pc.offset + pc.count - 1), pc.owner);
      for (size_t i = pc.offset; i < pc.offset + pc.count; i++) covered[i]++;
    }
  }
  EXPECT_EQ(k, order.size());
  for (size_t i = 0; i < covered.size(); i++) ASSERT_EQ(covered[i], 1) << "element " << i;
}

// ---- in one process: ranks as threads (tests/dp/thread_collectives.h) ----

// W trainers on threads, each at micro-batch B with `accum` micro-steps, against one trainer
// at accum W a: the same losses, weights and optimizer state, bit for bit. No MPI needed, so
// this also runs in the sanitizer builds.
void expect_threads_match(int W, int accum, int zero, const std::string& policy,
                          size_t bucket_bytes) {
  SCOPED_TRACE(std::to_string(W) + " ranks, accum " + std::to_string(accum) + ", zero " +
               std::to_string(zero) + ", " + policy);
  TempDir dir("remat_dp_threads");
  test::write_random_shard(dir / "d.bin", 3000, 67, 3);
  const ModelConfig c = test::tiny_config(2);
  const int B = 2, T = 8, steps = 3;
  Hyper h;
  h.lr = 3e-3f;
  h.warmup = 1;
  h.weight_decay = 0.1f;
  h.total_steps = steps;
  const Plan plan = parse_plan(policy, c);

  std::vector<float> want_loss;
  TrainState want;
  {
    DataLoader d(dir / "d.bin", B, T, c.vocab_size, true, 4);
    Trainer one(c, B, T, W * accum, h, plan, ScheduleOptions{}, test::init(c, 3));
    for (int s = 0; s < steps; s++) want_loss.push_back(one.step(d).loss);
    want = one.state(d);
  }

  test::ThreadHub hub(W);
  std::vector<std::vector<float>> loss(W);
  std::vector<TrainState> got(W);
  std::vector<std::string> error(W);
  std::vector<std::thread> ranks;
  for (int r = 0; r < W; r++) {
    ranks.emplace_back([&, r] {
      try {
        test::ThreadCollectives comm(hub, r);
        DataLoader d(dir / "d.bin", B, T, c.vocab_size, true, 4);
        DataParallelOptions dp;
        dp.comm = &comm;
        dp.bucket_bytes = bucket_bytes;
        dp.zero = zero;
        Trainer tr(c, B, T, accum, h, plan, ScheduleOptions{}, test::init(c, 3), nullptr, dp);
        for (int s = 0; s < steps; s++) loss[r].push_back(tr.step(d).loss);
        got[r] = tr.state(d);
      } catch (const std::exception& e) {
        error[r] = e.what();
      }
    });
  }
  for (std::thread& t : ranks) t.join();
  for (int r = 0; r < W; r++) {
    ASSERT_EQ(error[r], "") << "rank " << r;
    ASSERT_EQ(loss[r].size(), want_loss.size());
    for (int s = 0; s < steps; s++)
      EXPECT_EQ(std::memcmp(&loss[r][s], &want_loss[s], 4), 0) << "rank " << r << " step " << s;
    ASSERT_EQ(got[r].params.size(), want.params.size());
    EXPECT_EQ(std::memcmp(got[r].params.data(), want.params.data(), want.params.size() * 4), 0)
        << "rank " << r << ": weights";
    ASSERT_EQ(got[r].m.size(), want.m.size());
    EXPECT_EQ(std::memcmp(got[r].m.data(), want.m.data(), want.m.size() * 4), 0) << "rank " << r;
    EXPECT_EQ(std::memcmp(got[r].v.data(), want.v.data(), want.v.size() * 4), 0) << "rank " << r;
    EXPECT_EQ(got[r].loader.batch_in_shard, want.loader.batch_in_shard) << "rank " << r;
  }
}

TEST(DataParallelThreads, RanksEqualOneProcessBitForBit) {
  expect_threads_match(2, 1, 0, "none", size_t(25) << 20);
  expect_threads_match(2, 2, 0, "selective", 4096);
  expect_threads_match(2, 2, 1, "full", 4096);
  expect_threads_match(3, 1, 1, "attention", 16384);
}

// ---- NCCL ----

TEST(DataParallelNccl, TwoGpusTrainLikeOneAtTwiceTheBatch) {
  const std::string why = why_no_mpi();
  if (!why.empty()) GTEST_SKIP() << "NCCL test skipped: " << why;
  const ShellResult gpus = run_shell("nvidia-smi -L 2>/dev/null | grep -c '^GPU'");
  const int n = gpus.status == 0 ? std::atoi(gpus.output.c_str()) : 0;
  if (n < 2)
    GTEST_SKIP() << "NCCL test skipped: it needs two GPUs and this machine has " << n
                 << " (the NCCL collectives are compiled, not run)";
  TempDir dir("remat_nccl");
  test::write_random_shard(dir / "d.bin", 20000, 67, 5);
  const std::vector<std::string> cuda = {"--device", "cuda", "--dtype", "fp32"};
  std::vector<std::string> one_args = run_args(dir / "d.bin", dir / "one", 5, cuda);
  one_args.insert(one_args.end(), {"--total-batch", "64"});
  const ShellResult a = run_one(one_args);
  ASSERT_EQ(a.status, 0) << a.output;
  for (const char* zero : {"0", "1"}) {
    std::vector<std::string> args = run_args(dir / "d.bin", dir / "two", 5, cuda);
    args.insert(args.end(), {"--zero", zero});
    const ShellResult b = run_ranks(2, args);
    ASSERT_EQ(b.status, 0) << b.output;
    const std::vector<double> x = losses_of(dir / "one.jsonl"), y = losses_of(dir / "two.jsonl");
    ASSERT_EQ(x.size(), y.size());
    // NCCL's sum and the in-place accumulation round differently from one GPU's.
    for (size_t i = 0; i < x.size(); i++)
      EXPECT_LE(std::fabs(x[i] - y[i]), 1e-4 * std::fabs(x[i])) << "zero " << zero << " step " << i;
    std::remove((dir / "two.jsonl").c_str());
  }
}

}  // namespace
}  // namespace remat
