// `remat train`.
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"
#include "base/rng.h"
#include "io/hf_model.h"
#include "io/hf_tokenizer.h"
#include "io/llmc_model.h"
#include "io/params.h"
#include "io/prepare.h"
#include "io/tokenizer.h"
#include "kernels/classifier.h"
#include "models/data_parallel.h"
#include "models/trainer.h"
#include "profiling/overlap.h"
#include "profiling/tracer.h"
#include "runtime/collectives.h"
#include "runtime/fit.h"
#include "runtime/plan.h"

namespace remat {
namespace {

std::string dir_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// Signals: the first SIGINT/SIGTERM asks the loop to stop after the current step (and save);
// the second exits at once.
std::atomic<int> g_signals{0};
void on_signal(int) {
  if (g_signals.fetch_add(1) >= 1) _exit(130);
}

// Test-only: REMAT_TEST_KILL_RANK=R:S (or REMAT_TEST_STALL_RANK) makes rank R SIGKILL (or
// SIGSTOP) itself from another thread as step S begins, i.e. in the middle of its work.
void inject_rank_fault(int rank, int64_t step) {
  for (const char* var : {"REMAT_TEST_KILL_RANK", "REMAT_TEST_STALL_RANK"}) {
    const char* e = std::getenv(var);
    int r = -1;
    long long at = -1;
    if (!e || std::sscanf(e, "%d:%lld", &r, &at) != 2 || r != rank || at != step) continue;
    const int sig = var[11] == 'K' ? SIGKILL : SIGSTOP;
    std::thread([sig] { ::kill(::getpid(), sig); }).detach();
  }
}

// Prepares the default corpus on first use.
PrepareResult default_corpus() {
  PrepareResult r;
  r.train_pattern = std::string(kDefaultDataDir) + "/train_*.bin";
  r.val_pattern = std::string(kDefaultDataDir) + "/val_*.bin";
  r.tokenizer_path = std::string(kDefaultDataDir) + "/tokenizer.bin";
  if (file_exists(r.tokenizer_path) && file_exists(std::string(kDefaultDataDir) + "/train_000.bin"))
    return r;
  REMAT_REQUIRE(file_exists(kDefaultCorpusDir),
                std::string("no --data given and the default corpus ") + kDefaultCorpusDir +
                    " is missing: install Debian's 'fortunes' package or pass --data");
  std::printf("preparing the default corpus %s into %s (first use)\n", kDefaultCorpusDir,
              kDefaultDataDir);
  return prepare_corpus({kDefaultCorpusDir}, kDefaultDataDir, 512, 0.05);
}

// Bytes of weights, gradients and AdamW state a run keeps in the backend's memory: 16 per
// parameter on both backends (fp32 weights, gradients and moments; or fp32 master weights and
// moments beside bf16 weights and gradients). With --offload-optimizer on CUDA the master
// weights and moments are host memory: 4 (bf16) or 8 (fp32: weights and gradients) remain.
uint64_t state_bytes(const ModelConfig& c, const ScheduleOptions& so, ActDType dt, bool device) {
  const uint64_t P = num_params(c);
  if (!(device && so.offload_optimizer)) return 16ull * P;
  return (dt == ActDType::kBF16 ? 4ull : 8ull) * P;
}

// Bytes a training run needs on its backend before its first step: its state_bytes plus the
// arena reservation the dry run of this plan asks for (and, on the CPU backend, whose memory
// is the host's, the host arena of offloaded activations).
uint64_t bytes_needed(const ModelConfig& c, int B, int T, const Plan& plan,
                      const ScheduleOptions& so, ActDType dt, bool device) {
  ModelRunner dry(c, B, T, plan, dt, so, /*dry=*/true);
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  return state_bytes(c, so, dt, device) + dry.stats().extent_peak +
         (device ? 0 : dry.host_stats().extent_peak);
}

// An error before anything is allocated when the run cannot fit the backend's memory, naming
// the plan, what it needs and what would fit.
void check_fits_in_memory(const ModelConfig& c, int B, int T, const Plan& plan,
                          const ScheduleOptions& so, const std::string& policy, Backend& be) {
  const uint64_t avail = be.available_bytes();
  if (avail == 0) return;
  const ActDType dt = be.dtype();
  const bool device = std::string(be.name()) == "cuda";
  const uint64_t need = bytes_needed(c, B, T, plan, so, dt, device);
  if (need <= avail) return;
  const std::string where = device ? "GPU memory" : "memory";
  const uint64_t state = state_bytes(c, so, dt, device);
  std::string msg = "this run needs " + format_bytes(need) + " of " + where +
                    " (weights, gradients and AdamW state " + format_bytes(state) +
                    ", activations and workspace with --recompute " + policy + " " +
                    format_bytes(need - state) + ") but only " + format_bytes(avail) +
                    " is available";
  Plan full = parse_plan("full", c);
  const uint64_t need_full = bytes_needed(c, B, T, full, so, dt, device);
  if (need_full <= avail) {
    msg += "; --recompute full needs " + format_bytes(need_full) + " and fits";
  } else {
    int b = B;
    while (b > 1 && bytes_needed(c, b, T, full, so, dt, device) > avail) b /= 2;
    if (bytes_needed(c, b, T, full, so, dt, device) <= avail)
      msg += "; even --recompute full needs " + format_bytes(need_full) + "; --batch " +
             std::to_string(b) + " with --recompute full fits";
    else
      msg += "; the weights and optimizer state alone do not fit: choose a smaller model";
  }
  throw Error(msg);
}

// Creates the checkpoint directory (and its parents) and proves it writable before the first
// step, so a bad --out is found now rather than hours later at the first save. Removes
// temporary files that a killed earlier run left behind (their writer is gone).
void prepare_out_dir(const std::string& out) {
  std::string partial;
  for (size_t i = 0; i <= out.size(); i++) {
    if (i == out.size() || (out[i] == '/' && i > 0)) {
      partial = out.substr(0, i);
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
        throw Error(partial +
                    ": cannot create the checkpoint directory (--out): " + std::strerror(errno));
    }
  }
  const std::string probe = out + "/.remat_write_test." + std::to_string(::getpid());
  FILE* f = std::fopen(probe.c_str(), "wb");
  if (!f)
    throw Error(out +
                ": the checkpoint directory (--out) is not writable: " + std::strerror(errno));
  std::fclose(f);
  std::remove(probe.c_str());
  for (const char* name : {"state.bin", "model.bin", "model.safetensors", "config.json"}) {
    glob_t g;
    const std::string pattern = out + "/" + name + ".tmp.*";
    if (::glob(pattern.c_str(), 0, nullptr, &g) == 0) {
      for (size_t i = 0; i < g.gl_pathc; i++) {
        const std::string path = g.gl_pathv[i];
        const long pid = std::atol(path.substr(path.rfind('.') + 1).c_str());
        if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
          std::remove(path.c_str());
      }
    }
    ::globfree(&g);
  }
}

// Where --trace PATH puts the overlap report: PATH with .json replaced by .overlap.json.
std::string overlap_report_path(const std::string& trace) {
  std::string r = trace;
  if (r.size() > 5 && r.substr(r.size() - 5) == ".json") r.resize(r.size() - 5);
  return r + ".overlap.json";
}

// For a file written only after training: an error naming `what` now when `path` cannot be
// written. Opens it for appending (an existing file is left as it is) and removes it again
// when this made it.
void check_writable(const std::string& path, const std::string& what) {
  const bool existed = file_exists(path);
  FILE* f = std::fopen(path.c_str(), "a");
  if (!f) throw Error(what + " " + path + ": cannot write it: " + std::strerror(errno));
  std::fclose(f);
  if (!existed) std::remove(path.c_str());
}

// One --log line: a JSON object (non-finite numbers are written as null).
void log_line(FILE* log, const nlohmann::ordered_json& j) {
  const std::string s = j.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), log);
  std::fflush(log);
}

}  // namespace

int cmd_train(int argc, const char* const* argv) {
  Options o("train",
            "Train a GPT-2 or Llama-family model (a preset, an llm.c checkpoint or a Hugging Face\n"
            "directory). With no --data it trains on Debian's fortunes corpus,\n"
            "prepared on first use into " +
                std::string(kDefaultDataDir) + ".");
  o.add("model", "mini", model_option_help())
      .add("data", "", "glob of training shards (llm.c format)")
      .add("val-data", "", "glob of validation shards")
      .add("tokenizer", "",
           "tokenizer for samples: remat's tokenizer.bin or a Hugging Face tokenizer.json "
           "(default: either beside the data)")
      .add("vocab", "0", "vocabulary of a small preset (default: the tokenizer's)")
      .add("batch", "8", "micro-batch size B")
      .add("seq", "64", "sequence length T")
      .add("total-batch", "0", "tokens per optimizer step (multiple of B*T); 0 = B*T")
      .add("steps", "500", "optimizer steps")
      .add("lr", "3e-4", "peak learning rate")
      .add("warmup", "0", "linear warmup steps")
      .add("schedule", "constant", "constant or cosine")
      .add("lr-final-frac", "0.1", "cosine: final learning rate as a fraction of --lr")
      .add("weight-decay", "0", "AdamW decoupled weight decay (matrices only)")
      .add("beta1", "0.9", "AdamW beta1")
      .add("beta2", "0.95", "AdamW beta2")
      .add("eps", "1e-8", "AdamW epsilon")
      .add("grad-clip", "1.0", "max global gradient norm; 0 = off")
      .add("seed", "1337",
           "random seed (initialisation, shuffling, sampling); with --resume the state's own "
           "seed unless given")
      .flag("shuffle", "permute batches and shards each epoch (default: file order)")
      .add("eval-every", "100", "validation interval in steps; 0 = only at start and end")
      .add("eval-batches", "8", "validation batches")
      .add("sample-every", "0", "sample interval in steps; 0 = only at the end")
      .add("sample-tokens", "48", "tokens per sample")
      .add("out", "out",
           "checkpoint directory: state.bin (to resume), config.json + model.safetensors (for "
           "transformers) and, for GPT-2, llm.c's model.bin")
      .add("ckpt-every", "0", "checkpoint interval in steps; 0 = only at the end")
      .add("resume", "",
           "training state file to continue from, bit for bit: the run takes the seed the "
           "state records, and a different --seed is refused")
      .add("device", "auto", "auto (CUDA when a GPU is found), cpu or cuda")
      .add("dtype", "auto", "auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32 (CUDA: TF32 off)")
      .add("attention", "remat",
           "remat (its own flash attention) or cudnn (cuDNN's fused attention: CUDA, bf16)")
      .add("log", "", "append one JSON object per step to this file")
      .add("recompute", "none",
           "checkpoint policy: none, selective, attention, full, every:K, budget:BYTES, "
           "kind lists like ln1+gelu, per-block overrides ',A-B=POLICY'")
      .add("offload", "none",
           "tensors kept in host memory between forward and backward: input (each block's "
           "input), slot names (see remat plan), joined by '+', e.g. input+qkv; bitwise like "
           "keeping them")
      .flag("offload-optimizer",
            "keep the fp32 master weights and AdamW moments in pinned host memory (CUDA: the "
            "update reads and writes them across PCIe; the CPU backend's are host memory "
            "anyway); bitwise the same training")
      .add("fit", "",
           "BYTES or auto (the device's free memory less 5%, at least 256 MiB): choose "
           "--recompute, --offload and --offload-optimizer for the least modelled step time "
           "whose device total fits")
      .add("link-gbps", "0",
           "host <-> device bandwidth the offload model assumes, GB/s (0: measured at start on "
           "CUDA, 10 for the CPU backend's copy thread)")
      .flag("grad-checkpoint",
            "recompute every block's activations but its input: the same as --recompute full "
            "(Hugging Face's gradient_checkpointing=True)")
      .add("lookahead", "1", "blocks the recompute stream works ahead")
      .flag("verify-recompute", "keep originals and compare every recomputed tensor bit for bit")
      .add("max-bad-steps", "5", "stop after this many consecutive non-finite steps")
      .add("trace", "",
           "trace the --trace-steps steps into this Chrome/Perfetto trace JSON and "
           "write the recompute overlap report beside it (.json -> .overlap.json)")
      .add("trace-steps", "2:3",
           "steps to trace with --trace, A:B as printed (1-based, inclusive); the default "
           "is clamped to the run")
      .add("zero", "0",
           "data parallel (mpirun -np N remat train ...): 1 shards the fp32 master weights and "
           "AdamW moments by rank (ZeRO-1); bitwise the same training")
      .add("bucket-bytes", "25MiB",
           "data parallel: gradient bytes per reduction, started as soon as the backward pass "
           "has written them")
      .add("comm-timeout", "30",
           "data parallel: seconds a collective may wait without progress before the job is "
           "ended on every rank (a rank died or stalls); setup and checkpoints allow 10x");
  if (!o.parse(argc, argv, 0)) {
    std::printf("%s", o.help().c_str());
    return 0;
  }
  REMAT_REQUIRE(o.positional().empty(), "unexpected argument '" + o.positional()[0] +
                                            "' (every input is an option: see remat train --help)");

  // Data parallel: started by mpirun, every process is one rank of the job (rank and world
  // from MPI). Only rank 0 prints, logs, traces and writes checkpoints; errors go to stderr
  // on every rank.
  MpiSession mpi;
  const bool dp = mpi.world() > 1;
  const bool rank0 = mpi.rank() == 0;
  if (!rank0) REMAT_CHECK(std::freopen("/dev/null", "w", stdout), "cannot silence stdout");
  if (dp && nccl_built() && o.get("device") != "cpu")
    nccl_hooks().select_device(local_rank_from_env());

  // Device.
  BackendChoice bc = choose_backend(o.get("device"), o.get("dtype"));
  Backend& be = *bc.backend;
  be.set_attention(o.get("attention"));
  if (!bc.note.empty()) std::printf("%s\n", bc.note.c_str());
  std::printf("backend: %s\n", be.describe().c_str());
  const double comm_timeout = o.get_double("comm-timeout");
  REMAT_REQUIRE(comm_timeout > 0,
                "--comm-timeout must be > 0 seconds, got " + o.get("comm-timeout"));
  const double slow_timeout = 10 * comm_timeout;  // one rank reads or writes files, others wait
  const int zero = o.get_count("zero");
  REMAT_REQUIRE(zero == 0 || zero == 1, "--zero must be 0 or 1, got " + o.get("zero"));
  std::unique_ptr<Collectives> comm;
  if (dp) {
    comm = make_collectives(be, comm_timeout);
    std::printf("data parallel: %d ranks over %s%s, buckets of %s, comm timeout %g s\n",
                comm->world(), comm->name(), zero ? ", ZeRO-1" : "",
                format_bytes(parse_bytes(o.get("bucket-bytes"))).c_str(), comm_timeout);
  }

  // Data.
  std::string train_pat = o.get("data"), val_pat = o.get("val-data"), tok_path = o.get("tokenizer");
  if (train_pat.empty()) {
    // Rank 0 prepares it on first use while the others wait, then they read it.
    if (comm && !rank0) comm->host_barrier(slow_timeout);
    PrepareResult pr = default_corpus();
    if (comm && rank0) comm->host_barrier(slow_timeout);
    train_pat = pr.train_pattern;
    if (val_pat.empty()) val_pat = pr.val_pattern;
    if (tok_path.empty()) tok_path = pr.tokenizer_path;
  }
  const std::vector<std::string> train_files = expand_glob(train_pat);
  for (const char* name : {"/tokenizer.bin", "/tokenizer.json"})
    if (tok_path.empty() && file_exists(dir_of(train_files[0]) + name))
      tok_path = dir_of(train_files[0]) + name;
  // remat's tokenizer.bin, or a Hugging Face tokenizer.json (what prepare --tokenizer copies
  // beside the shards).
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<HfTokenizer> hf;
  if (tok_path.size() >= 5 && tok_path.compare(tok_path.size() - 5, 5, ".json") == 0)
    hf = std::make_unique<HfTokenizer>(HfTokenizer::load(tok_path));
  else if (!tok_path.empty())
    tok = std::make_unique<Tokenizer>(Tokenizer::load(tok_path));

  // Model.
  const std::string model = o.get("model");
  uint64_t seed = o.get_seed("seed");
  int vocab = o.get_count("vocab");
  if (vocab <= 0 && is_small_preset(model)) {
    REMAT_REQUIRE(tok != nullptr || hf != nullptr, "preset '" + model +
                                                       "' takes its vocabulary from the "
                                                       "tokenizer: pass --tokenizer or --vocab");
    vocab = tok ? tok->vocab_size() : hf->vocab_size();
  }
  ModelChoice mc = choose_model(model, vocab, /*want_params=*/true);
  const ModelConfig c = mc.config;
  std::vector<float> params = std::move(mc.params);

  // --resume: read the state now, before anything keyed by the seed (shuffling, sampling) is
  // made, and before a step. Another seed would not continue the run bit for bit.
  const std::string resume = o.get("resume");
  std::optional<TrainState> resumed;
  if (!resume.empty()) {
    resumed = load_train_state(resume);
    check_model_matches(c, resumed->config, resume);
    const std::string was = std::to_string(resumed->rng_seed);
    if (o.given("seed")) {
      REMAT_REQUIRE(resumed->rng_seed == seed, "--seed " + std::to_string(seed) +
                                                   " differs from --seed " + was + " that " +
                                                   resume + " was trained with: pass --seed " +
                                                   was + " (or omit --seed) to continue that run");
    } else if (resumed->rng_seed != seed) {
      seed = resumed->rng_seed;
      std::printf("seed: %s, the one %s records\n", was.c_str(), resume.c_str());
    }
  }
  const int B = o.get_positive("batch"), T = o.get_positive("seq");
  REMAT_REQUIRE(T <= c.max_seq_len, "--seq " + std::to_string(T) +
                                        " is longer than the model's "
                                        "maximum sequence length " +
                                        std::to_string(c.max_seq_len));
  // Data parallel: the W ranks' micro-batches together make up each step's total batch.
  const long long W = mpi.world();
  long long total = o.get_int("total-batch");
  if (total <= 0) total = (long long)B * T * W;
  REMAT_REQUIRE(total % ((long long)B * T * W) == 0,
                "--total-batch " + std::to_string(total) + " is not a multiple of B*T" +
                    (W > 1 ? "*ranks = " : " = ") + std::to_string((long long)B * T * W));
  const int accum = static_cast<int>(total / ((long long)B * T * W));

  Hyper h;
  h.lr = static_cast<float>(o.get_double("lr"));
  h.warmup = o.get_count("warmup");
  const std::string sched = o.get("schedule");
  REMAT_REQUIRE(sched == "constant" || sched == "cosine",
                "--schedule must be constant or cosine, got '" + sched + "'");
  h.cosine = sched == "cosine";
  h.final_frac = static_cast<float>(o.get_double("lr-final-frac"));
  h.weight_decay = static_cast<float>(o.get_double("weight-decay"));
  h.beta1 = static_cast<float>(o.get_double("beta1"));
  h.beta2 = static_cast<float>(o.get_double("beta2"));
  h.eps = static_cast<float>(o.get_double("eps"));
  h.grad_clip = static_cast<float>(o.get_double("grad-clip"));
  REMAT_REQUIRE(h.grad_clip >= 0,
                "--grad-clip must be >= 0 (0 turns clipping off), got " + o.get("grad-clip"));
  const int steps = o.get_count("steps");
  h.total_steps = steps;

  ScheduleOptions so;
  so.lookahead = o.get_count("lookahead");
  so.verify_recompute = o.get_bool("verify-recompute");
  so.offload_optimizer = o.get_bool("offload-optimizer");
  CostModel cm = cost_model_for(be.dtype(), o.get_double("link-gbps"));
  if (!o.get("fit").empty() && o.get_double("link-gbps") == 0 && std::string(be.name()) == "cuda") {
    const double link = measure_link_bytes_per_s(be);
    if (link > 0) cm.link_bytes_per_s = link;
    std::printf("link: %.1f GB/s host <-> device (measured)\n", cm.link_bytes_per_s / 1e9);
  }
  std::string policy = recompute_policy(o);
  Plan plan;
  if (!o.get("fit").empty()) {
    REMAT_REQUIRE(!o.given("recompute") && !o.given("offload") && !so.offload_optimizer &&
                      !o.get_bool("grad-checkpoint"),
                  "--fit chooses --recompute, --offload and --offload-optimizer itself: give "
                  "either --fit or those");
    uint64_t budget = 0;
    if (o.get("fit") == "auto") {
      const uint64_t avail = be.available_bytes();
      REMAT_REQUIRE(avail > 0,
                    "--fit auto: the backend does not say how much memory is free; "
                    "give --fit BYTES");
      // The margin: 5% of what is free, at least 256 MiB (allocator slack, other users).
      const uint64_t margin = std::max<uint64_t>(avail / 20, 256ull << 20);
      REMAT_REQUIRE(avail > margin, "--fit auto: only " + format_bytes(avail) + " is free");
      budget = avail - margin;
      std::printf("fit auto: %s free less a margin of %s\n", format_bytes(avail).c_str(),
                  format_bytes(margin).c_str());
    } else {
      budget = parse_bytes(o.get("fit"));
    }
    const FitChoice f = fit_plan(budget, model_program(c, B, T), be.dtype(), so, cm);
    plan = f.plan;
    so.offload_optimizer = f.offload_optimizer;
    policy = plan.spec;
    std::printf("fit %s: chose %s (device %s, host %s, modelled step %.1f ms)\n",
                format_bytes(budget).c_str(), f.describe().c_str(),
                format_bytes(f.device_bytes).c_str(), format_bytes(f.host_bytes).c_str(),
                1e3 * f.seconds());
  } else {
    plan = make_plan(policy, c, B, T, be.dtype(), so, cm);
    apply_offload(plan, o.get("offload"));
  }
  check_fits_in_memory(c, B, T, plan, so, policy, be);
  if (params.empty()) {
    params.resize(num_params(c));
    init_params(params.data(), c, seed);
  }

  DataLoader train(train_pat, B, T, c.vocab_size, o.get_bool("shuffle"), seed);
  std::unique_ptr<DataLoader> val;
  if (!val_pat.empty())
    val = std::make_unique<DataLoader>(val_pat, B, T, c.vocab_size, false, seed);

  if (comm) {
    // Before anything is allocated for training: every rank must train the same model on the
    // same data the same way.
    std::string data_desc;
    for (int i = 0; i < train.num_shards(); i++)
      data_desc += train.files()[i] + ":" + std::to_string(train.tokens_in_shard(i)) + " ";
    if (val)
      for (int i = 0; i < val->num_shards(); i++)
        data_desc += "val " + val->files()[i] + ":" + std::to_string(val->tokens_in_shard(i)) + " ";
    std::string plan_desc = plan.spec + " offload " + plan.offload_spec + " |";
    for (const auto& row : plan.recompute)
      for (auto x : row) plan_desc += x ? '1' : '0';
    char hw[64];
    std::snprintf(hw, sizeof hw, "%016llx",
                  (unsigned long long)fnv1a64(params.data(), params.size() * sizeof(float)));
    const std::string hyper = "lr " + o.get("lr") + " warmup " + o.get("warmup") + " " +
                              o.get("schedule") + " " + o.get("lr-final-frac") + " wd " +
                              o.get("weight-decay") + " betas " + o.get("beta1") + " " +
                              o.get("beta2") + " eps " + o.get("eps") + " clip " +
                              o.get("grad-clip") + " steps " + std::to_string(steps);
    // Every rank compares the same gathered values, so all of them refuse together and may
    // leave MPI cleanly.
    auto refuse_together = [&](const std::vector<std::pair<std::string, std::string>>& f) {
      try {
        check_ranks_agree(*comm, f, slow_timeout);
      } catch (const Error&) {
        comm.reset();
        mpi.finish();
        throw;
      }
    };
    refuse_together(
        {{"model", model + " " + (c.is_llama() ? describe(c) : std::to_string(num_params(c)))},
         {"initial weights", hw},
         {"batch", "B=" + std::to_string(B) + " T=" + std::to_string(T) + " total " +
                       std::to_string(total) + " (" + std::to_string(accum) + " micro-steps)"},
         {"plan", plan_desc},
         {"data", data_desc + (o.get_bool("shuffle") ? "shuffled" : "in order")},
         {"seed", std::to_string(seed)},
         {"resume",
          resumed ? resume + " at step " + std::to_string(resumed->step) + " weights " +
                        std::to_string(fnv1a64(resumed->params.data(), resumed->params.size() * 4))
                  : "none"},
         {"hyperparameters", hyper},
         {"backend", std::string(be.name()) + " " + dtype_name(be.dtype()) + " " +
                         o.get("attention") + (so.offload_optimizer ? " optimizer offloaded" : "")},
         {"data parallel", "zero " + std::to_string(zero) + " buckets " +
                               std::to_string(parse_bytes(o.get("bucket-bytes")))}});
  }
  // Pre-flight passed, but the device may still run out (other processes, fragmentation):
  // say which plan ran out and what stores less.
  std::unique_ptr<Trainer> trainer;
  try {
    DataParallelOptions dpo;
    dpo.comm = comm.get();
    dpo.bucket_bytes = parse_bytes(o.get("bucket-bytes"));
    dpo.zero = zero;
    trainer = std::make_unique<Trainer>(c, B, T, accum, h, plan, so, std::move(params), &be, dpo);
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.find("out of memory") == std::string::npos) throw;
    throw Error(what + "\n  while setting up --recompute " + policy + " (" +
                format_bytes(bytes_needed(c, B, T, plan, so, be.dtype(), true)) +
                " planned); --recompute full needs " +
                format_bytes(bytes_needed(c, B, T, parse_plan("full", c), so, be.dtype(), true)) +
                ", or give --recompute budget:BYTES with what is free");
  }
  Trainer& tr = *trainer;
  if (const char* e = std::getenv("REMAT_TEST_NAN_STEPS")) {  // test-only: "A" or "A-B"
    long long a = 0, b = 0;
    int n = std::sscanf(e, "%lld-%lld", &a, &b);
    tr.inject_nan_steps(a, n == 2 ? b : a);
  }
  if (resumed) {
    tr.restore(*resumed);
    train.restore(resumed->loader);
    std::printf("resumed from %s at step %lld\n", resume.c_str(), (long long)resumed->step);
    resumed.reset();
  }

  const std::string out = o.get("out");
  if (!out.empty() && rank0) prepare_out_dir(out);
  // Data parallel: every rank takes part in gathering the state (ZeRO-1's shards), rank 0
  // writes it (the same file at any world size), and the others wait for it to be written.
  auto save = [&]() {
    if (out.empty()) return;
    TrainState st = tr.state(train);
    st.rng_seed = seed;  // Trainer::state() leaves it 0; a resume takes it (or refuses another)
    if (!rank0) {
      comm->host_barrier(slow_timeout);
      return;
    }
    save_train_state(out + "/state.bin", st);
    // The model for other tools: Hugging Face's directory layout (config.json and
    // model.safetensors) always, llm.c's model.bin for GPT-2.
    save_hf_model(out, c, st.params.data());
    if (!c.is_llama()) write_llmc_model(out + "/model.bin", c, st.params.data(), 3);
    if (comm) comm->host_barrier(slow_timeout);
    std::printf("checkpoint: %s/state.bin, %s/model.safetensors%s (step %lld)\n", out.c_str(),
                out.c_str(), c.is_llama() ? "" : (", " + out + "/model.bin").c_str(),
                (long long)tr.steps_done());
  };
  FILE* log = nullptr;
  if (!o.get("log").empty() && rank0) {
    log = std::fopen(o.get("log").c_str(), "a");
    REMAT_REQUIRE(log, o.get("log") + ": cannot open the log file: " + std::strerror(errno));
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);

  // Tracing: the tracer is attached to both streams and the arena only around the steps in
  // [trace_first, trace_last] (streams synchronized between steps); with no --trace nothing
  // is attached. The trace and the report are written when the last traced step is done.
  const std::string trace_path = o.get("trace");
  std::unique_ptr<Tracer> tracer;
  long long trace_first = 0, trace_last = -1;
  int traced_steps = 0;
  if (!trace_path.empty() && rank0) {
    // The trace and its report are written after the traced steps: prove both writable now.
    check_writable(trace_path, "--trace");
    check_writable(overlap_report_path(trace_path), "--trace's overlap report");
    const std::string ts = o.get("trace-steps");
    char tail = 0;
    REMAT_REQUIRE(std::sscanf(ts.c_str(), "%lld:%lld%c", &trace_first, &trace_last, &tail) == 2 &&
                      trace_first >= 1 && trace_last >= trace_first,
                  "--trace-steps must be A:B with 1 <= A <= B, got '" + ts + "'");
    if (!o.given("trace-steps")) {
      trace_last = std::min<long long>(trace_last, std::max(steps, 1));
      trace_first = std::min(trace_first, trace_last);
    }
    REMAT_REQUIRE(trace_last <= steps, "--trace-steps " + ts + " ends after the run's last step " +
                                           std::to_string(steps));
    tracer = std::make_unique<Tracer>();
  }
  auto finish_trace = [&]() {
    if (!tracer || traced_steps == 0) return;
    const std::string report_path = overlap_report_path(trace_path);
    tracer->write_chrome_json(trace_path);
    std::vector<int> lanes = {tr.runner().copy_stream()->id()};
    if (comm) lanes.push_back(comm->stream()->id());  // communication: busy, hidden, exposed
    const OverlapReport rep = overlap_report(tracer->data(), tr.runner().main_stream()->id(),
                                             tr.runner().side_stream()->id(), lanes);
    FILE* f = std::fopen(report_path.c_str(), "wb");
    REMAT_REQUIRE(f, report_path + ": cannot write the overlap report: " + std::strerror(errno));
    const std::string js = to_json(rep);
    const bool ok = std::fwrite(js.data(), 1, js.size(), f) == js.size();
    REMAT_REQUIRE(std::fclose(f) == 0 && ok, report_path + ": error writing the overlap report");
    print(rep, stdout);
    std::printf("trace: %s (open in ui.perfetto.dev or chrome://tracing), report: %s\n",
                trace_path.c_str(), report_path.c_str());
    tracer.reset();
  };

  const uint64_t P = num_params(c);
  if (c.is_llama())
    std::printf("model: %s, %.2fM parameters\n", describe(c).c_str(), P / 1e6);
  else
    std::printf("model: L=%d C=%d NH=%d V=%d (padded %d) maxT=%d, %.2fM parameters\n", c.num_layers,
                c.channels, c.num_heads, c.vocab_size, c.padded_vocab, c.max_seq_len, P / 1e6);
  std::printf(
      "batch: B=%d T=%d x %d micro-steps = %lld tokens/step, %d steps, recompute %s (%d of %d "
      "block activations rebuilt)\n",
      B, T, accum, total, steps, plan.spec.c_str(), plan.num_recomputed(),
      c.num_layers * static_cast<int>(plan.slots.size()));
  const int eval_every = o.get_count("eval-every");
  const int eval_batches = o.get_count("eval-batches");
  const int sample_every = o.get_count("sample-every");
  const int sample_n = o.get_count("sample-tokens");
  const int max_bad = o.get_count("max-bad-steps");
  auto do_eval = [&](int64_t step) {
    if (!val) return;
    float vl = tr.evaluate(*val, eval_batches);
    std::printf("step %lld/%d | val loss %.4f\n", (long long)step, steps, vl);
    if (log) log_line(log, {{"step", step}, {"val_loss", vl}});
  };
  auto do_sample = [&](int64_t step) {
    if (sample_n <= 0) return;
    int start =
        tok && tok->eot_token() >= 0 && tok->eot_token() < c.vocab_size ? tok->eot_token() : 0;
    if (hf) {  // a document's start: BOS, else end-of-text
      const int b = hf->bos_token() >= 0 ? hf->bos_token() : hf->eot_token();
      start = b >= 0 && b < c.vocab_size ? b : 0;
    }
    std::vector<int> gen =
        sample_tokens(c, tr.params().data(), {start}, sample_n, 1.0f, seed, 1000 + step);
    std::string text;
    if (hf) {
      text = hf->decode(gen);  // all at once: a character split between tokens comes out whole
    } else if (tok) {
      for (int t : gen) text += t == tok->eot_token() ? std::string("\n---\n") : tok->decode(t);
    } else {
      for (int t : gen) text += std::to_string(t) + " ";
    }
    std::printf("sample (step %lld):\n%s\n", (long long)step, text.c_str());
  };

  if (tr.steps_done() == 0) do_eval(0);
  int bad = 0;
  int exit_code = 0;
  while (tr.steps_done() < steps) {
    const bool traced =
        tracer && tr.steps_done() + 1 >= trace_first && tr.steps_done() + 1 <= trace_last;
    if (traced) {
      tracer->attach(tr.runner().main_stream());
      tracer->attach(tr.runner().side_stream());
      tracer->attach(tr.runner().copy_stream());
      if (comm) tracer->attach(comm->stream());
      tracer->attach_arena(&tr.runner().arena());
    }
    inject_rank_fault(mpi.rank(), tr.steps_done() + 1);
    auto t0 = std::chrono::steady_clock::now();
    StepResult r = tr.step(train);
    const auto t1 = std::chrono::steady_clock::now();
    double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const int64_t s = tr.steps_done();
    if (traced) {
      auto ns = [](std::chrono::steady_clock::time_point t) {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
      };
      tracer->add_span("step", ns(t0), ns(t1), static_cast<int>(s));
      tracer->note_stats(tr.runner().stats());
      tracer->detach();
      traced_steps++;
    }
    const uint64_t peak = tr.runner().stats().peak_bytes + 16 * P;
    std::printf(
        "step %lld/%d | loss %.4f | norm %.4f | lr %.2e | %.1f ms | %.0f tok/s | peak %s%s\n",
        (long long)s, steps, r.loss, r.grad_norm, r.lr, ms, total / (ms / 1000.0),
        format_bytes(peak).c_str(), r.skipped ? " | SKIPPED" : "");
    if (log) {
      log_line(log, {{"step", s},
                     {"loss", r.loss},
                     {"grad_norm", r.grad_norm},
                     {"lr", r.lr},
                     {"ms", ms},
                     {"tokens_per_s", total / (ms / 1000.0)},
                     {"peak_bytes", peak},
                     {"activation_peak_bytes", tr.runner().stats().peak_by_usage[0]},
                     {"skipped", r.skipped}});
    }
    if (traced && s == trace_last) finish_trace();
    std::fflush(stdout);
    if (r.skipped) {
      bad++;
      std::fprintf(stderr,
                   "step %lld: non-finite loss (%g) or gradient norm (%g): update skipped\n",
                   (long long)s, r.loss, r.grad_norm);
      if (bad >= max_bad) {
        std::fprintf(stderr,
                     "stopping: %d consecutive non-finite steps (up to step %lld); the last "
                     "checkpoint in %s was not touched\n",
                     bad, (long long)s, out.empty() ? "(none)" : out.c_str());
        exit_code = 3;
        break;
      }
    } else {
      bad = 0;
    }
    // Data parallel: all ranks stop after the same step when any rank got the signal.
    if (dp ? tr.data_parallel()->any(g_signals.load() > 0) : g_signals.load() > 0) {
      std::printf("signal received: stopping after step %lld\n", (long long)s);
      finish_trace();
      save();
      if (log) std::fclose(log);
      mpi.finish();
      return 0;
    }
    if (eval_every > 0 && s % eval_every == 0 && s != steps) do_eval(s);
    if (sample_every > 0 && s % sample_every == 0 && s != steps) do_sample(s);
    const int ckpt_every = o.get_count("ckpt-every");
    // No checkpoint during a streak of skipped steps: the last good one stays as it is.
    if (ckpt_every > 0 && s % ckpt_every == 0 && s != steps && bad == 0) save();
  }
  finish_trace();  // a run that stopped inside the traced steps
  if (exit_code == 0) {
    do_eval(tr.steps_done());
    do_sample(tr.steps_done());
    save();
  }
  if (log) std::fclose(log);
  mpi.finish();
  return exit_code;
}

}  // namespace remat
