// The activation arena: one reservation per run, carved into blocks by offset.
//
// - alloc()/free() are host-side bookkeeping done in program order; they never block and
//   never allocate. The same calls in the same order give the same offsets, so a dry run
//   (no memory behind it) predicts exactly the peaks of a real run.
// - Frees are stream-ordered: free(b, s) records an event on s; a later alloc() on another
//   stream that reuses any byte of b first makes that stream wait on the event. Reuse on the
//   same stream needs no wait (in-order execution).
// - In builds with REMAT_POISON_FREED, freeing on the CPU backend fills the block with NaN
//   (as work on the freeing stream, so after its last use there) so a read of freed memory
//   shows up as NaN.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/stream.h"

namespace remat {

enum class Phase : int { kForward = 0, kBackward = 1, kRecompute = 2, kOther = 3 };
constexpr int kNumPhases = 4;
const char* phase_name(Phase p);

// What a block holds: activations (what the checkpoint plan decides about) or workspace
// (activation gradients, classifier chunks, scratch). Peaks are kept for each.
enum class Usage : int { kActivation = 0, kWorkspace = 1 };

// Where the reservation comes from. The CPU one is an aligned host allocation.
class MemoryResource {
 public:
  virtual ~MemoryResource() = default;
  virtual void* reserve(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  // Fill [p, p + bytes) with NaN as work on `stream` (debug poisoning). May be a no-op.
  virtual void poison(void* p, size_t bytes, Stream* stream) = 0;
};
MemoryResource* cpu_memory();  // process-wide host resource

struct Block {
  size_t offset = 0;
  size_t bytes = 0;     // rounded up to Arena::kAlign
  void* ptr = nullptr;  // nullptr in a dry run
  Usage usage = Usage::kActivation;
  bool valid() const { return bytes != 0; }
  float* f32() const { return static_cast<float*>(ptr); }
};

struct ArenaStats {
  size_t live_bytes = 0;                  // all usages, now
  size_t peak_bytes = 0;                  // high-water of live_bytes
  std::array<size_t, 2> live_by_usage{};  // indexed by Usage
  std::array<size_t, 2> peak_by_usage{};  // high-water of each usage alone
  std::array<size_t, kNumPhases>
      peak_in_phase{};  // high-water of live_bytes during allocs of each phase
  std::array<size_t, kNumPhases> activation_peak_in_phase{};  // same, activations only
  size_t extent_peak = 0;  // highest offset + bytes ever handed out
  uint64_t allocs = 0, frees = 0, cross_stream_waits = 0;
};

class Arena {
 public:
  static constexpr size_t kAlign = 256;
  // n rounded up to a multiple of kAlign (what a block of n bytes occupies; 0 stays 0).
  static constexpr size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  // Real arena: reserves `capacity` bytes from `memory` once. Dry run: memory == nullptr,
  // nothing is reserved, and capacity may be SIZE_MAX.
  Arena(size_t capacity, MemoryResource* memory);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  bool dry_run() const { return memory_ == nullptr; }
  size_t capacity() const { return capacity_; }

  // A block of at least `bytes` for work on `stream`. Best fit among free regions, else the
  // top. Throws remat::Error naming `name`, the request and the capacity when nothing fits.
  Block alloc(size_t bytes, Stream* stream, Phase phase, Usage usage, const char* name);

  // Return b; its bytes may be reused once everything launched so far on `stream` has run.
  // b is reset to an invalid Block.
  void free(Block& b, Stream* stream);

  const ArenaStats& stats() const { return stats_; }
  void reset_peaks();  // peaks := current live values (start of a step)
  // With nothing live and every stream that used the arena idle: forget the free list, so
  // the next step places its blocks exactly as the first (and the dry run) did. Without it a
  // later step starts from the previous step's fragments and may need more than the dry run
  // sized.
  void rewind();

  // Called (host side, in program order) after every alloc and free with the live bytes;
  // the tracer's memory counter. nullptr = off.
  using LiveHook = void (*)(void* ctx, size_t live_bytes, size_t live_activation_bytes);
  void set_live_hook(LiveHook hook, void* ctx) {
    hook_ = hook;
    hook_ctx_ = ctx;
  }

 private:
  // Events after which a region's bytes are free, one per freeing stream; held inline, as
  // the planner's dry runs move regions around thousands of times.
  struct ReadyEvents {
    static constexpr int kMax = 4;  // streams that may free into one arena
    std::array<Event, kMax> e{};
    int n = 0;
    const Event* begin() const { return e.data(); }
    const Event* end() const { return e.data() + n; }
    Event* begin() { return e.data(); }
    Event* end() { return e.data() + n; }
    void push_back(const Event& x);
  };
  struct FreeRegion {
    size_t offset, bytes;
    ReadyEvents ready;
  };
  void note_live(Phase phase, Usage usage);

  size_t capacity_;
  MemoryResource* memory_;
  char* base_ = nullptr;
  size_t top_ = 0;                // bytes [top_, capacity_) never handed out yet
  std::vector<FreeRegion> free_;  // sorted by offset, coalesced
  ArenaStats stats_;
  LiveHook hook_ = nullptr;
  void* hook_ctx_ = nullptr;
};

}  // namespace remat
