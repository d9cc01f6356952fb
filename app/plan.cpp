// `remat plan`: the memory plan of a run, predicted by running the real schedule through the
// dry-run arena. No GPU and no weights needed.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"
#include "io/llmc_model.h"
#include "io/params.h"
#include "models/data_parallel.h"
#include "models/model.h"
#include "models/trainer.h"
#include "runtime/fit.h"

namespace remat {

// The cost model the planner assumes: bf16 sizes are for the CUDA backend on an H100
// (bf16 dense GEMM ceiling 798 TFLOP/s and about 3.0 TB/s copy bandwidth, measured ceilings
// in shared/ANCHORS.md); fp32 sizes for the CPU backend on a 2-core host.
int cmd_plan(int argc, const char* const* argv) {
  Options o("plan",
            "Print the memory plan of a training run without running it: parameters, gradients,\n"
            "optimizer state, activation peak (from the real schedule run through the dry-run\n"
            "arena), workspace, total, and the recompute overhead.");
  o.add("model", "gpt2", model_option_help())
      .add("vocab", "0", "vocabulary of a small preset (default 50257)")
      .add("batch", "16", "micro-batch size B")
      .add("seq", "1024", "sequence length T")
      .add("recompute", "none", "checkpoint policy (see remat train --help)")
      .add("offload", "none", "tensors kept in host memory (see remat train --help)")
      .flag("offload-optimizer", "fp32 master weights and AdamW moments in pinned host memory")
      .add("world", "1",
           "ranks of a data-parallel run (mpirun -np N remat train): print one rank's memory")
      .add("zero", "0", "with --world: 1 shards the optimizer state by rank (ZeRO-1)")
      .add("bucket-bytes", "25MiB", "with --world: gradient bytes per reduction")
      .add("link-gbps", "0",
           "host <-> device bandwidth the offload model assumes, GB/s (0: 25 for bf16/CUDA, "
           "10 for the CPU backend's copy thread)")
      .flag("max-batch",
            "print, per policy, the largest micro-batch whose device total fits --device-memory")
      .add("device-memory", "", "BYTES for --max-batch (e.g. 24GiB)")
      .add("fit", "",
           "BYTES (e.g. 16GiB): choose recompute, offload and optimizer offload for the least "
           "modelled step time whose device total fits (instead of the three options above)")
      .flag("grad-checkpoint",
            "the same as --recompute full (Hugging Face's gradient_checkpointing=True)")
      .add("dtype", "bf16", "activation type: bf16 (CUDA) or fp32")
      .add("lookahead", "1", "blocks the recompute stream works ahead")
      .flag("json", "print one JSON object");
  if (!o.parse(argc, argv, 0)) {
    std::printf("%s", o.help().c_str());
    return 0;
  }
  REMAT_REQUIRE(o.positional().empty(), "unexpected argument '" + o.positional()[0] +
                                            "' (every input is an option: see remat plan --help)");
  auto t0 = std::chrono::steady_clock::now();
  const std::string model = o.get("model");
  const ModelConfig c = choose_model(model, o.get_count("vocab"), /*want_params=*/false).config;
  const int B = o.get_positive("batch"), T = o.get_positive("seq");
  REMAT_REQUIRE(T <= c.max_seq_len, "--seq " + std::to_string(T) +
                                        " is longer than the model's "
                                        "maximum " +
                                        std::to_string(c.max_seq_len));
  const std::string dts = o.get("dtype");
  REMAT_REQUIRE(dts == "bf16" || dts == "fp32", "--dtype must be bf16 or fp32, got '" + dts + "'");
  const ActDType dt = dts == "bf16" ? ActDType::kBF16 : ActDType::kFP32;
  ScheduleOptions so;
  so.lookahead = o.get_count("lookahead");
  const CostModel cm = cost_model_for(dt, o.get_double("link-gbps"));
  if (o.get_bool("max-batch")) {
    REMAT_REQUIRE(!o.get("device-memory").empty(), "--max-batch needs --device-memory BYTES");
    const uint64_t mem = parse_bytes(o.get("device-memory"));
    struct Policy {
      const char* recompute;
      const char* offload;
      bool optimizer;
      const char* name;
    };
    const Policy policies[] = {{"none", "none", false, "none"},
                               {"selective", "none", false, "selective"},
                               {"full", "none", false, "full"},
                               {"full", "input", false, "full + input offload"},
                               {"full", "input", true, "full + input offload + optimizer offload"}};
    auto device_bytes = [&](const Policy& p, int b) {
      auto prog = model_program(c, b, T);
      Plan q = parse_plan(p.recompute, plan_schema(*prog));
      apply_offload(q, p.offload);
      return evaluate_choice(q, p.optimizer, prog, dt, so, cm).device_bytes;
    };
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    if (!o.get_bool("json"))
      std::printf("largest micro-batch at T=%d, %s, within %s of device memory:\n", T, dts.c_str(),
                  format_bytes(mem).c_str());
    for (const Policy& p : policies) {
      int lo = 0, hi = 1;  // lo fits (0: nothing does), hi is the next to try
      while (hi <= (1 << 20) && device_bytes(p, hi) <= mem) {
        lo = hi;
        hi *= 2;
      }
      while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        (device_bytes(p, mid) <= mem ? lo : hi) = mid;
      }
      const uint64_t used = lo > 0 ? device_bytes(p, lo) : 0;
      if (o.get_bool("json"))
        rows.push_back({{"policy", p.name}, {"max_batch", lo}, {"device_total_bytes", used}});
      else
        std::printf("  %-42s %6d%s\n", p.name, lo,
                    lo > 0 ? ("   (device total " + format_bytes(used) + ")").c_str()
                           : "   (does not fit at B=1)");
    }
    if (o.get_bool("json")) {
      nlohmann::ordered_json j;
      j["model"] = model;
      j["seq"] = T;
      j["dtype"] = dts;
      j["device_memory_bytes"] = mem;
      j["max_batch"] = std::move(rows);
      std::printf("%s\n", j.dump().c_str());
    }
    return 0;
  }
  Plan plan;
  bool offload_optimizer = o.get_bool("offload-optimizer");
  std::string fit_note;
  if (!o.get("fit").empty()) {
    REMAT_REQUIRE(!o.given("recompute") && !o.given("offload") && !offload_optimizer &&
                      !o.get_bool("grad-checkpoint"),
                  "--fit chooses --recompute, --offload and --offload-optimizer itself: give "
                  "either --fit or those");
    const uint64_t budget = parse_bytes(o.get("fit"));
    const FitChoice f = fit_plan(budget, model_program(c, B, T), dt, so, cm);
    plan = f.plan;
    offload_optimizer = f.offload_optimizer;
    char line[256];
    std::snprintf(line, sizeof line,
                  "fit %s: chose %s (device %s, modelled step %.1f ms: recompute %.1f, exposed "
                  "copies %.1f, optimizer link %.1f)\n",
                  format_bytes(budget).c_str(), f.describe().c_str(),
                  format_bytes(f.device_bytes).c_str(), 1e3 * f.seconds(),
                  1e3 * f.recompute_seconds, 1e3 * f.exposed_copy_seconds,
                  1e3 * f.optimizer_link_seconds);
    fit_note = line;
  } else {
    plan = make_plan(recompute_policy(o), c, B, T, dt, so, cm);
    apply_offload(plan, o.get("offload"));
  }
  ModelRunner dry(c, B, T, plan, dt, so, /*dry=*/true);
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  MemoryReport r =
      memory_report(c, B, T, plan, dt, dry.stats(), cm, &dry.host_stats(), offload_optimizer);
  const int world = o.get_positive("world"), zero = o.get_count("zero");
  REMAT_REQUIRE(zero == 0 || zero == 1, "--zero must be 0 or 1, got " + o.get("zero"));
  const DataParallelMemory dpm = apply_data_parallel(r, num_params(c), dt, world, zero == 1,
                                                     parse_bytes(o.get("bucket-bytes")));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const Program& prog = dry.program();
  const size_t K = prog.slots.size();
  std::vector<int> count(K, 0);
  for (const auto& s : plan.recompute)
    for (size_t k = 0; k < K; k++) count[k] += s[k];

  if (o.get_bool("json")) {
    // The numbers keep the precision they have always been printed with.
    auto rounded = [](const char* format, double x) {
      char b[64];
      std::snprintf(b, sizeof b, format, x);
      return std::strtod(b, nullptr);
    };
    nlohmann::ordered_json j;
    j["model"] = model;
    j["batch"] = B;
    j["seq"] = T;
    j["dtype"] = dts;
    j["recompute"] = plan.spec;
    j["lookahead"] = so.lookahead;
    j["num_params"] = static_cast<uint64_t>(num_params(c));
    j["params_bytes"] = static_cast<uint64_t>(r.params_bytes);
    j["grads_bytes"] = static_cast<uint64_t>(r.grads_bytes);
    j["optimizer_bytes"] = static_cast<uint64_t>(r.optimizer_bytes);
    j["activation_peak_bytes"] = static_cast<uint64_t>(r.activation_peak);
    j["workspace_peak_bytes"] = static_cast<uint64_t>(r.workspace_peak);
    j["arena_peak_bytes"] = static_cast<uint64_t>(r.arena_peak);
    j["total_bytes"] = static_cast<uint64_t>(r.total_bytes);
    j["offload"] = plan.offload_spec.empty() ? "none" : plan.offload_spec;
    j["offload_optimizer"] = r.optimizer_on_host;
    j["optimizer_link_bytes_per_step"] = static_cast<uint64_t>(r.optimizer_link_bytes);
    j["device_total_bytes"] = static_cast<uint64_t>(r.device_total_bytes);
    j["host_total_bytes"] = static_cast<uint64_t>(r.host_total_bytes);
    if (world > 1) {  // the byte counts above are one rank's
      j["world"] = world;
      j["zero"] = zero;
      j["shard_params"] = static_cast<uint64_t>(dpm.shard_params);
      j["comm_bytes"] = static_cast<uint64_t>(dpm.comm_bytes);
    }
    j["host_activation_peak_bytes"] = static_cast<uint64_t>(r.host_activation_peak);
    j["copy_bytes_per_step"] = static_cast<uint64_t>(r.copy_bytes);
    j["copy_seconds_model"] = rounded("%.6g", r.copy_seconds);
    j["activation_peak_forward_bytes"] = static_cast<uint64_t>(r.activation_peak_in_phase[0]);
    j["activation_peak_backward_bytes"] = static_cast<uint64_t>(r.activation_peak_in_phase[1]);
    j["activation_peak_recompute_bytes"] = static_cast<uint64_t>(r.activation_peak_in_phase[2]);
    j["recompute_flops"] = rounded("%.6g", r.recompute_flops);
    j["step_flops"] = rounded("%.6g", step_flops(c, B, T));
    j["recompute_flops_fraction"] = rounded("%.6g", r.recompute_flops_fraction);
    j["recompute_seconds_model"] = rounded("%.6g", r.recompute_seconds);
    nlohmann::ordered_json recomputed = nlohmann::ordered_json::object();
    for (size_t k = 0; k < K; k++) recomputed[prog.slots[k]] = count[k];
    j["recomputed"] = std::move(recomputed);
    j["plan_seconds"] = rounded("%.4f", secs);
    std::printf("%s\n",
                j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace).c_str());
    return 0;
  }
  if (c.is_llama())
    std::printf("model %s: %s, %.1fM parameters\n", model.c_str(), describe(c).c_str(),
                num_params(c) / 1e6);
  else
    std::printf("model %s: L=%d C=%d NH=%d V=%d, %.1fM parameters\n", model.c_str(), c.num_layers,
                c.channels, c.num_heads, c.vocab_size, num_params(c) / 1e6);
  std::printf("%s", fit_note.c_str());
  std::printf("run: B=%d T=%d, %s activations, lookahead %d, recompute %s%s\n\n", B, T, dts.c_str(),
              so.lookahead, plan.spec.c_str(),
              plan.offload_spec.empty() ? "" : (", offload " + plan.offload_spec).c_str());
  std::printf("  %-6s %14s   %s\n", "kind", "bytes/block", "recomputed in blocks");
  for (size_t k = 0; k < K; k++) {
    std::printf("  %-6s %14s   %d of %d\n", prog.slots[k].c_str(),
                format_bytes(prog.tensor_bytes(prog.slot_tensor[0][k], act_bytes(dt))).c_str(),
                count[k], c.num_layers);
  }
  std::printf("\n  %-34s %14s\n", "parameters", format_bytes(r.params_bytes).c_str());
  std::printf("  %-34s %14s\n", "gradients", format_bytes(r.grads_bytes).c_str());
  std::printf("  %-34s %14s\n", r.optimizer_on_host ? "optimizer state (host)" : "optimizer state",
              format_bytes(r.optimizer_bytes).c_str());
  std::printf("  %-34s %14s\n", "activation peak", format_bytes(r.activation_peak).c_str());
  std::printf("  %-34s %14s\n", "  during forward",
              format_bytes(r.activation_peak_in_phase[0]).c_str());
  std::printf("  %-34s %14s\n", "  during backward",
              format_bytes(r.activation_peak_in_phase[1]).c_str());
  std::printf("  %-34s %14s\n", "  during recompute",
              format_bytes(r.activation_peak_in_phase[2]).c_str());
  std::printf("  %-34s %14s\n", "workspace peak (grads of acts, logits)",
              format_bytes(r.workspace_peak).c_str());
  std::printf("  %-34s %14s\n", "arena peak (activations + workspace)",
              format_bytes(r.arena_peak).c_str());
  if (world > 1 && dpm.comm_bytes > 0)
    std::printf("  %-34s %14s\n", "communication (accumulator, buckets)",
                format_bytes(dpm.comm_bytes).c_str());
  std::printf("  %-34s %14s\n", "total", format_bytes(r.total_bytes).c_str());
  if (world > 1)
    std::printf("  (per rank of %d%s: %.1fM parameters in the largest shard)\n", world,
                zero ? ", ZeRO-1 optimizer state sharded" : "", dpm.shard_params / 1e6);
  if (plan.any_offload() || r.optimizer_on_host) {
    std::printf("  %-34s %14s\n", "device total", format_bytes(r.device_total_bytes).c_str());
    std::printf("  %-34s %14s\n", "host total (pinned)", format_bytes(r.host_total_bytes).c_str());
  }
  if (plan.any_offload()) {
    int inputs = 0;
    for (uint8_t x : plan.offload_input) inputs += x;
    std::string what;
    if (inputs) what += "input in " + std::to_string(inputs) + " blocks";
    for (size_t k = 0; k < K; k++) {
      int n = 0;
      for (const auto& row : plan.offload) n += row[k];
      if (n) what += (what.empty() ? "" : ", ") + prog.slots[k] + " in " + std::to_string(n);
    }
    std::printf("\noffload: %s; %s copied per step (out and back), modelled %.2f ms at %.0f GB/s\n",
                what.c_str(), format_bytes(r.copy_bytes).c_str(), 1e3 * r.copy_seconds,
                cm.link_bytes_per_s / 1e9);
  }
  if (r.optimizer_on_host)
    std::printf(
        "%soptimizer offload: the update reads and writes %s per step across the link, "
        "modelled %.2f ms\n",
        plan.any_offload() ? "" : "\n", format_bytes(r.optimizer_link_bytes).c_str(),
        1e3 * r.optimizer_link_seconds);
  std::printf(
      "\nrecompute: %.3g GFLOP per step = %.2f%% of the step's %.3g GFLOP; modelled %.2f ms\n",
      r.recompute_flops / 1e9, 100 * r.recompute_flops_fraction, step_flops(c, B, T) / 1e9,
      1e3 * r.recompute_seconds);
  std::printf("(planned in %.3f s)\n", secs);
  return 0;
}

}  // namespace remat
