#include "app/commands.h"

#include <chrono>
#include <memory>

#include "base/error.h"
#include "io/hf_model.h"
#include "io/llmc_model.h"

namespace remat {

std::string recompute_policy(const Options& o) {
  if (!o.get_bool("grad-checkpoint")) return o.get("recompute");
  REMAT_REQUIRE(!o.given("recompute") || o.get("recompute") == "full",
                "--grad-checkpoint means --recompute full; it cannot go with --recompute " +
                    o.get("recompute"));
  return "full";
}

ModelChoice choose_model(const std::string& model, int vocab, bool want_params) {
  ModelChoice m;
  if (is_hf_model_dir(model)) {
    if (want_params) {
      HFModel hf = load_hf_model(model);
      m.config = hf.config;
      m.params = std::move(hf.params);
    } else {
      m.config = read_hf_model_config(model);
    }
    m.from_file = true;
  } else if (model.size() > 4 && model.substr(model.size() - 4) == ".bin") {
    ModelFile mf = read_llmc_model(model);
    m.config = mf.config;
    if (want_params) m.params = std::move(mf.params);
    m.from_file = true;
  } else {
    REMAT_REQUIRE(!file_exists(model) || model.find('/') == std::string::npos,
                  model +
                      ": not a model: a Hugging Face model directory holds config.json and "
                      "model.safetensors, an llm.c checkpoint ends in .bin");
    m.config = preset_config(model, vocab);
  }
  return m;
}

CostModel cost_model_for(ActDType dt, double link_gbps) {
  CostModel m;
  if (dt == ActDType::kBF16) {
    m.flops_per_s = 798e12;
    m.bytes_per_s = 3.0e12;
    m.link_bytes_per_s = 25e9;  // PCIe host <-> device, as copies reach in practice
  } else {
    m.flops_per_s = 1e11;
    m.bytes_per_s = 2e10;
  }
  REMAT_REQUIRE(link_gbps >= 0, "--link-gbps must be >= 0");
  if (link_gbps > 0) m.link_bytes_per_s = link_gbps * 1e9;
  return m;
}

double measure_link_bytes_per_s(Backend& be) {
  constexpr size_t kBytes = 64ull << 20;
  constexpr int kRounds = 3;
  void* host = be.alloc_host(kBytes);
  void* dev = be.alloc(kBytes, "link probe");
  std::unique_ptr<Stream> s = be.make_stream("remat-link-probe", 9);
  be.upload_async(s.get(), dev, host, kBytes, "probe.warmup");
  s->synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kRounds; i++) {
    be.upload_async(s.get(), dev, host, kBytes, "probe.upload");
    be.copy_to_host(s.get(), host, dev, kBytes, "probe.download", -1);
  }
  s->synchronize();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  s.reset();
  be.release(dev);
  be.release_host(host);
  return secs > 0 ? 2.0 * kRounds * kBytes / secs : 0.0;
}

std::string model_option_help() {
  std::string presets;
  for (auto& n : preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  return "a preset (" + presets +
         "), an llm.c checkpoint file (.bin) or a Hugging Face model directory (config.json and "
         "model.safetensors, or its shards; llama, qwen2, mistral or gpt2)";
}

}  // namespace remat
