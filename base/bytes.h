// Byte counts as people write them ("8GiB", "512MB", "1e9") and as remat prints them.
#pragma once
#include <cstdint>
#include <string>

namespace remat {

// Accepts K, M, G, KiB, MiB, GiB (powers of 1024), KB, MB, GB (powers of 1000) or none.
// Throws remat::Error naming the text when it is not a byte count.
uint64_t parse_bytes(const std::string& text);
std::string format_bytes(uint64_t bytes);  // "1.50 GiB"

}  // namespace remat
