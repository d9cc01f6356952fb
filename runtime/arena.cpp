// The activation arena (runtime/arena.h) and the host memory resource.
//
// Placement, beyond the header:
// - Sizes round up to kAlign; a zero-byte request takes one kAlign block.
// - Best fit: the smallest free region that holds the request, ties to the lowest offset;
//   the request takes the region's low end and the rest stays free with the same events.
// - Otherwise the request goes at the top. top_ never moves down: it is the boundary of
//   bytes ever handed out (so extent_peak == top_). A free region that ends at top_ is
//   instead extended upwards, so "free tail + fresh top" is reused like one region and its
//   events are still waited on. This keeps every handed-out byte covered by the events of
//   its last free without a separate event list for the top.
// - Waits: when the chosen bytes' free region carries events of streams other than the
//   allocating one, the allocating stream waits on each (counted in cross_stream_waits).
//   The decision looks only at stream identity, never at done(), so a dry run (null
//   streams) and a real run make the same decisions, offsets and counts.
// - The caller synchronizes every stream that used a block before destroying the arena.
#include "runtime/arena.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "base/bytes.h"
#include "kernels/common.h"

namespace remat {

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::kForward:
      return "forward";
    case Phase::kBackward:
      return "backward";
    case Phase::kRecompute:
      return "recompute";
    case Phase::kOther:
      return "other";
  }
  return "unknown";
}

namespace {

constexpr size_t kHostAlign = 256;
constexpr int kAct = static_cast<int>(Usage::kActivation);  // indices of the usage arrays
constexpr int kWork = static_cast<int>(Usage::kWorkspace);

// Writes quiet NaN over every whole float of [p, p + bytes) and 0xFF over a ragged tail
// (also a NaN pattern for whatever type reads it).
void fill_nan(void* p, size_t bytes) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  char* c = static_cast<char*>(p);
  const size_t n = bytes / sizeof(float);
  for (size_t i = 0; i < n; ++i) std::memcpy(c + i * sizeof(float), &nan, sizeof(float));
  std::memset(c + n * sizeof(float), 0xFF, bytes - n * sizeof(float));
}

class CpuMemory final : public MemoryResource {
 public:
  // A kHostAlign-aligned allocation of at least `bytes` (at least one kHostAlign block).
  void* reserve(size_t bytes) override {
    REMAT_CHECK(bytes <= std::numeric_limits<size_t>::max() - kHostAlign,
                "cpu_memory: cannot reserve " + std::to_string(bytes) + " bytes");
    const size_t rounded =
        std::max<size_t>(kHostAlign, (bytes + kHostAlign - 1) / kHostAlign * kHostAlign);
    void* p = std::aligned_alloc(kHostAlign, rounded);
    REMAT_REQUIRE(p != nullptr, "out of host memory: cannot reserve the activation arena of " +
                                    format_bytes(bytes) + " (" + std::to_string(bytes) +
                                    " bytes); a --recompute policy that stores less, or a "
                                    "smaller --batch, needs less");
    return p;
  }
  void release(void* p) override { std::free(p); }
  // As work on `stream` (label "poison"), or at once when stream is nullptr.
  void poison(void* p, size_t bytes, Stream* stream) override {
    if (stream) {
      stream->launch([p, bytes] { fill_nan(p, bytes); }, "poison");
    } else {
      fill_nan(p, bytes);
    }
  }
};

// Adds e to a region's ready list, keeping one (the latest) event per stream.
template <typename Events>
void add_ready(Events& ready, const Event& e) {
  if (e.stream == nullptr) return;  // freed with no stream: nothing to wait for
  for (Event& r : ready) {
    if (r.stream == e.stream) {
      r.seq = std::max(r.seq, e.seq);
      return;
    }
  }
  ready.push_back(e);
}

}  // namespace

MemoryResource* cpu_memory() {
  static CpuMemory memory;
  return &memory;
}

Arena::Arena(size_t capacity, MemoryResource* memory) : capacity_(capacity), memory_(memory) {
  if (memory_) base_ = static_cast<char*>(memory_->reserve(capacity_));
}

Arena::~Arena() {
  if (memory_ && base_) memory_->release(base_);
}

void Arena::ReadyEvents::push_back(const Event& x) {
  REMAT_CHECK(n < kMax, "arena: more than " + std::to_string(kMax) + " streams free into it");
  e[n++] = x;
}

Block Arena::alloc(size_t bytes, Stream* stream, Phase phase, Usage usage, const char* name) {
  const char* what = name ? name : "(unnamed)";
  const int p = static_cast<int>(phase);
  const int u = static_cast<int>(usage);
  REMAT_CHECK(p >= 0 && p < kNumPhases && (u == kAct || u == kWork),
              std::string("arena: bad phase or usage for '") + what + "'");
  REMAT_CHECK(bytes <= std::numeric_limits<size_t>::max() - kAlign,
              std::string("arena: request for '") + what +
                  "' is too large: " + std::to_string(bytes) + " bytes");
  const size_t size = bytes == 0 ? kAlign : round_up(bytes);

  // Best fit among free regions (scan in offset order; strict < keeps the lowest offset),
  // preferring regions that need no cross-stream wait: those whose frees were all on
  // `stream`. Which stream freed a region is known in program order, so the choice stays
  // independent of timing (dry run == real run).
  auto foreign = [&](const FreeRegion& r) {
    for (const Event& e : r.ready)
      if (e.stream != nullptr && e.stream != stream) return true;
    return false;
  };
  size_t best = free_.size();
  for (int pass = 0; pass < 2 && best == free_.size(); ++pass) {
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].bytes < size || (pass == 0 && foreign(free_[i]))) continue;
      if (best == free_.size() || free_[i].bytes < free_[best].bytes) best = i;
    }
  }
  // Else a free region ending at top_ grows into the top; else the top itself.
  size_t offset;
  size_t from = free_.size();  // the free region the bytes come from, if any
  if (best != free_.size()) {
    offset = free_[best].offset;
    from = best;
  } else if (!free_.empty() && free_.back().offset + free_.back().bytes == top_) {
    offset = free_.back().offset;
    from = free_.size() - 1;
  } else {
    offset = top_;
  }
  REMAT_CHECK(offset <= capacity_ && size <= capacity_ - offset,
              std::string("arena: out of memory for '") + what + "': requested " +
                  std::to_string(bytes) + " bytes (" + std::to_string(size) + " rounded), live " +
                  std::to_string(stats_.live_bytes) + " bytes, capacity " +
                  std::to_string(capacity_) + " bytes, extent " + std::to_string(top_) + " bytes");

  if (from != free_.size()) {
    FreeRegion& r = free_[from];
    if (stream) {
      for (const Event& e : r.ready) {
        if (e.stream != stream) {
          stream->wait(e);
          ++stats_.cross_stream_waits;
        }
      }
    }
    if (r.bytes > size) {
      r.offset += size;
      r.bytes -= size;
    } else {
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(from));
    }
  }
  top_ = std::max(top_, offset + size);
  stats_.extent_peak = std::max(stats_.extent_peak, offset + size);

  stats_.live_bytes += size;
  stats_.live_by_usage[u] += size;
  ++stats_.allocs;
  note_live(phase, usage);

  Block b;
  b.offset = offset;
  b.bytes = size;
  b.ptr = base_ ? base_ + offset : nullptr;
  b.usage = usage;
  if (hook_) hook_(hook_ctx_, stats_.live_bytes, stats_.live_by_usage[kAct]);
  return b;
}

void Arena::free(Block& b, Stream* stream) {
  REMAT_CHECK(b.valid(), "arena: free of an invalid block");
  REMAT_CHECK(b.offset % kAlign == 0 && b.bytes % kAlign == 0 && b.offset <= top_ &&
                  b.bytes <= top_ - b.offset,
              "arena: free of a block this arena did not hand out (offset " +
                  std::to_string(b.offset) + ", " + std::to_string(b.bytes) + " bytes)");
  const int u = static_cast<int>(b.usage);
  REMAT_CHECK(u == kAct || u == kWork, "arena: free of a block with a bad usage");
  REMAT_CHECK(stats_.live_by_usage[u] >= b.bytes,
              "arena: free of more bytes than are live for the block's usage");

  // First region at or after b; b must end before it and start after its predecessor ends.
  auto next = std::lower_bound(free_.begin(), free_.end(), b.offset,
                               [](const FreeRegion& r, size_t off) { return r.offset < off; });
  const bool overlaps_next = next != free_.end() && next->offset < b.offset + b.bytes;
  const bool overlaps_prev =
      next != free_.begin() && std::prev(next)->offset + std::prev(next)->bytes > b.offset;
  REMAT_CHECK(!overlaps_next && !overlaps_prev,
              "arena: double free of offset " + std::to_string(b.offset));

#ifdef REMAT_POISON_FREED
  // Poison before recording the event, so the fill is ordered before any reuse.
  if (memory_ && b.ptr) memory_->poison(b.ptr, b.bytes, stream);
#endif
  const Event ev = stream ? stream->record() : Event{};

  auto it = free_.insert(next, FreeRegion{b.offset, b.bytes, {}});
  add_ready(it->ready, ev);
  // Merge with the following region, then with the preceding one.
  auto after = std::next(it);
  if (after != free_.end() && it->offset + it->bytes == after->offset) {
    it->bytes += after->bytes;
    for (const Event& e : after->ready) add_ready(it->ready, e);
    it = std::prev(free_.erase(after));
  }
  if (it != free_.begin()) {
    auto before = std::prev(it);
    if (before->offset + before->bytes == it->offset) {
      before->bytes += it->bytes;
      for (const Event& e : it->ready) add_ready(before->ready, e);
      free_.erase(it);
    }
  }

  stats_.live_bytes -= b.bytes;
  stats_.live_by_usage[u] -= b.bytes;
  ++stats_.frees;
  b = Block{};
  if (hook_) hook_(hook_ctx_, stats_.live_bytes, stats_.live_by_usage[kAct]);
}

void Arena::rewind() {
  REMAT_CHECK(stats_.live_bytes == 0,
              "arena: rewind with " + std::to_string(stats_.live_bytes) + " bytes live");
  free_.clear();
  top_ = 0;
}

void Arena::reset_peaks() {
  // extent_peak stays: it is the extent ever handed out (top_), which never shrinks.
  stats_.peak_bytes = stats_.live_bytes;
  stats_.peak_by_usage = stats_.live_by_usage;
  stats_.peak_in_phase.fill(stats_.live_bytes);
  stats_.activation_peak_in_phase.fill(stats_.live_by_usage[kAct]);
}

void Arena::note_live(Phase phase, Usage usage) {
  const int p = static_cast<int>(phase);
  const int u = static_cast<int>(usage);
  stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.live_bytes);
  stats_.peak_by_usage[u] = std::max(stats_.peak_by_usage[u], stats_.live_by_usage[u]);
  stats_.peak_in_phase[p] = std::max(stats_.peak_in_phase[p], stats_.live_bytes);
  stats_.activation_peak_in_phase[p] =
      std::max(stats_.activation_peak_in_phase[p], stats_.live_by_usage[kAct]);
}

}  // namespace remat
