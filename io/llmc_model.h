// llm.c's GPT-2 checkpoint file, so llm.c users bring their files and take ours back.
//
// Layout (little endian): a header of 256 int32 -- [0] 20240326 magic, [1] version (3: fp32
// parameters, 5: bf16 parameters), [2] maxT, [3] V, [4] L, [5] NH, [6] C, [7] Vp, the rest
// zero -- then every parameter in the order of io/params.h, as fp32 (v3) or bf16 (v5:
// the upper 16 bits of the fp32 value).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"

namespace remat {

constexpr int32_t kModelMagic = 20240326;
constexpr int kModelHeaderInts = 256;

struct ModelFile {
  ModelConfig config;
  std::vector<float> params;  // (num_params(config)) fp32, bf16 files widened exactly
  int version = 3;            // 3 or 5, as stored in the file
};

// Reads a v3 or v5 file. Error naming the path for: a missing file, a short header, a wrong
// magic, an unsupported version, bad dimensions (see check_config), or a file size other
// than 1024 + num_params * element size.
ModelFile read_llmc_model(const std::string& path);

// Writes atomically (io/atomic_file.h). version 3 stores fp32 exactly; version 5 rounds
// each parameter to the nearest bf16, ties to even (NaN stays NaN). params holds
// num_params(c) floats.
void write_llmc_model(const std::string& path, const ModelConfig& c, const float* params,
                      int version);

// Throws an Error naming `path` and the first field that differs (with both values).
void check_model_matches(const ModelConfig& want, const ModelConfig& got, const std::string& path);

// fp32 -> bf16 bits, round to nearest, ties to even; NaN maps to a quiet NaN.
uint16_t float_to_bf16(float x);
// bf16 bits -> fp32 (exact).
float bf16_to_float(uint16_t b);

}  // namespace remat
