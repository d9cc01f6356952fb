#include "models/data_parallel.h"

#include <cstdio>
#include <cstring>

#include "base/error.h"

namespace remat {

std::unique_ptr<Collectives> make_collectives(Backend& backend, double timeout_s) {
  REMAT_REQUIRE(timeout_s > 0, "--comm-timeout must be > 0 seconds");
  if (std::string(backend.name()) == "cpu") return make_mpi_collectives(backend, timeout_s);
  REMAT_REQUIRE(nccl_built(), std::string("data parallel on the ") + backend.name() +
                                  " backend needs NCCL, and this remat was built without it");
  return nccl_hooks().create(backend, timeout_s, 3);
}

ShardLayout::ShardLayout(size_t n, int world) : n_(n), world_(world) {
  REMAT_CHECK(world >= 1, "ShardLayout: world must be >= 1");
  const size_t blocks = (n + kAlign - 1) / kAlign;
  const size_t per_blocks = (blocks + world - 1) / world;
  per_ = std::max<size_t>(1, per_blocks) * kAlign;
}

std::vector<GradBucket> make_buckets(const Program& p, const std::vector<ParamId>& order,
                                     size_t bucket_elems, const ShardLayout& shards) {
  std::vector<GradBucket> out;
  GradBucket b;
  for (ParamId q : order) {
    const ParamDesc& d = p.params.at(q);
    b.params.push_back(q);
    for (size_t at = d.offset; at < d.offset + d.count;) {
      const int owner = shards.owner(at);
      const size_t end = std::min(d.offset + d.count, shards.end(owner));
      b.pieces.push_back({at, end - at, owner});
      at = end;
    }
    b.elems += d.count;
    if (b.elems >= bucket_elems) {
      out.push_back(std::move(b));
      b = GradBucket{};
    }
  }
  if (!b.params.empty()) out.push_back(std::move(b));
  return out;
}

std::vector<ParamId> grad_ready_order(std::shared_ptr<const Program> p, const Plan& plan,
                                      ActDType dt, const ScheduleOptions& so) {
  const size_t np = p->params.size();
  Executor dry(p, plan, dt, so, /*dry=*/true);
  std::vector<ParamId> order;
  dry.set_grad_ready_hook([&order](ParamId q, Stream*) { order.push_back(q); });
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  std::vector<char> seen(np, 0);
  for (ParamId q : order) {
    REMAT_CHECK(q >= 0 && static_cast<size_t>(q) < np && !seen[q],
                "internal: the backward pass reports parameter " + std::to_string(q) +
                    " twice or out of range");
    seen[q] = 1;
  }
  REMAT_CHECK(order.size() == np, "internal: the backward pass finishes " +
                                      std::to_string(order.size()) + " of " + std::to_string(np) +
                                      " parameter gradients");
  return order;
}

DataParallel::DataParallel(Collectives& comm, const Program& p, std::vector<ParamId> order,
                           size_t bucket_bytes, bool zero, ActDType dt, ReduceMode mode)
    : comm_(comm),
      shards_(p.num_params, comm.world()),
      order_(std::move(order)),
      zero_(zero),
      dt_(dt),
      es_(static_cast<size_t>(act_bytes(dt))),
      mode_(mode) {
  REMAT_REQUIRE(bucket_bytes > 0, "--bucket-bytes must be > 0");
  buckets_ = make_buckets(p, order_, std::max<size_t>(1, bucket_bytes / es_), shards_);
  bucket_of_last_.assign(p.params.size(), -1);
  for (size_t b = 0; b < buckets_.size(); b++) bucket_of_last_[buckets_[b].params.back()] = b;
  skip_in_.resize(size_t(p.B) * p.T);
  skip_tg_.resize(size_t(p.B) * p.T);
}

void DataParallel::next_batch(DataLoader& data, int* inputs, int* targets) {
  REMAT_CHECK(size_t(data.B()) * data.T() == skip_in_.size(), "data parallel: batch shape");
  for (int r = 0; r < world(); r++) {
    if (r == rank())
      data.next_batch(inputs, targets);
    else
      data.next_batch(skip_in_.data(), skip_tg_.data());
  }
}

void DataParallel::begin_micro_step(int j, int accum, void* grads, float* acc) {
  REMAT_CHECK(mode_ == ReduceMode::kInPlace || acc != nullptr || shard_size() == 0,
              "data parallel: fold mode needs the shard accumulator");
  j_ = j;
  accum_ = accum;
  grads_ = grads;
  acc_ = acc;
  next_ = 0;
  next_bucket_ = 0;
  reducing_ = mode_ == ReduceMode::kFold || j == accum - 1;
}

void DataParallel::on_grad_ready(ParamId q, Stream* main) {
  if (main == nullptr) return;  // a dry run
  REMAT_CHECK(next_ < order_.size() && order_[next_] == q,
              "internal: the backward pass finished parameter " + std::to_string(q) +
                  " out of the order its dry run gave");
  next_++;
  const int b = bucket_of_last_[q];
  if (!reducing_ || b < 0) return;
  REMAT_CHECK(b == next_bucket_, "internal: gradient buckets completed out of order");
  next_bucket_++;
  const GradBucket& bucket = buckets_[b];
  const bool last = j_ == accum_ - 1;
  const int me = rank();
  char* g = static_cast<char*>(grads_);
  Stream* cs = comm_.stream();
  cs->wait(main->record());
  comm_.group_begin();
  for (const BucketPiece& pc : bucket.pieces) {
    char* src = g + pc.offset * es_;
    if (mode_ == ReduceMode::kFold) {
      float* dst = pc.owner == me ? acc_ + (pc.offset - shard_begin()) : nullptr;
      comm_.reduce_sum(src, dst, pc.count, dt_, pc.owner,
                       j_ == 0 ? Accumulate::kNo : Accumulate::kYes);
    } else if (zero_) {
      comm_.reduce_sum(src, src, pc.count, dt_, pc.owner, Accumulate::kNo);
    } else {
      comm_.all_reduce_sum(src, pc.count, dt_);
    }
  }
  comm_.group_end("comm.reduce_grads");
  if (mode_ == ReduceMode::kFold && last && !zero_) {
    comm_.group_begin();
    for (const BucketPiece& pc : bucket.pieces) {
      const float* from = pc.owner == me ? acc_ + (pc.offset - shard_begin()) : nullptr;
      comm_.broadcast(from, g + pc.offset * es_, pc.count, dt_, pc.owner);
    }
    comm_.group_end("comm.gather_grads");
  }
}

Event DataParallel::end_micro_step() {
  REMAT_CHECK(next_ == order_.size() && (!reducing_ || next_bucket_ == int(buckets_.size())),
              "internal: the backward pass finished " + std::to_string(next_) + " of " +
                  std::to_string(order_.size()) + " parameter gradients");
  return comm_.stream()->record();
}

namespace {

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

template <typename T>
std::vector<T> values_of(const std::string& s) {
  REMAT_CHECK(s.size() % sizeof(T) == 0, "data parallel: a message of the wrong size");
  std::vector<T> v(s.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), s.data(), s.size());
  return v;
}

}  // namespace

float DataParallel::mean_loss(const std::vector<float>& mine) {
  const std::vector<std::string> all = comm_.host_all_gather(bytes_of(mine));
  std::vector<std::vector<float>> per(all.size());
  for (size_t r = 0; r < all.size(); r++) {
    per[r] = values_of<float>(all[r]);
    REMAT_CHECK(per[r].size() == mine.size(), "data parallel: ranks ran different micro-steps");
  }
  double sum = 0;  // m = j W + r: micro-step j of every rank in rank order, then j + 1
  for (size_t j = 0; j < mine.size(); j++)
    for (size_t r = 0; r < per.size(); r++) sum += per[r][j];
  const int M = static_cast<int>(mine.size() * per.size());
  return static_cast<float>(sum / M);
}

double DataParallel::sum_squares(const std::vector<double>& mine) {
  double total = 0.0;
  for (const std::string& s : comm_.host_all_gather(bytes_of(mine)))
    for (double x : values_of<double>(s)) total += x;
  return total;
}

void DataParallel::broadcast_shards(void* weights, size_t elem_bytes, const char* label) {
  char* w = static_cast<char*>(weights);
  comm_.group_begin();
  for (int r = 0; r < world(); r++)
    if (shards_.size(r) > 0) {
      char* at = w + shards_.begin(r) * elem_bytes;
      comm_.broadcast(at, at, shards_.size(r), dt_, r);
    }
  comm_.group_end(label);
}

std::vector<float> DataParallel::gather_shards(const std::vector<float>& mine) {
  REMAT_CHECK(mine.size() == shard_size(), "data parallel: shard of the wrong size");
  std::vector<float> out;
  out.reserve(shards_.n());
  const std::vector<std::string> all =
      comm_.host_all_gather(bytes_of(mine), 10 * comm_.timeout_s());
  for (size_t r = 0; r < all.size(); r++) {
    const std::vector<float> v = values_of<float>(all[r]);
    REMAT_CHECK(v.size() == shards_.size(static_cast<int>(r)), "data parallel: shard sizes");
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

bool DataParallel::any(bool mine) {
  for (const std::string& s : comm_.host_all_gather(std::string(1, mine ? '1' : '0')))
    if (s == "1") return true;
  return false;
}

DataParallelMemory apply_data_parallel(MemoryReport& r, uint64_t num_params, ActDType dt, int world,
                                       bool zero, uint64_t bucket_bytes) {
  REMAT_REQUIRE(world >= 1, "--world must be >= 1");
  DataParallelMemory d;
  d.world = world;
  d.zero = zero && world > 1;
  const ShardLayout shards(num_params, world);
  d.shard_params = shards.size(0);
  d.optimizer_bytes = r.optimizer_bytes;
  if (world == 1) return d;
  // optimizer_bytes counts exactly what ZeRO-1 shards: the moments, and the master weights
  // where they are not the working weights.
  if (d.zero && num_params > 0) {
    d.optimizer_bytes = r.optimizer_bytes / num_params * d.shard_params +
                        r.optimizer_bytes % num_params * d.shard_params / num_params;
    const uint64_t saved = r.optimizer_bytes - d.optimizer_bytes;
    r.optimizer_bytes = d.optimizer_bytes;
    if (r.optimizer_on_host) {
      r.host_total_bytes -= saved;
    } else {
      r.total_bytes -= saved;
      r.device_total_bytes -= saved;
    }
  }
  if (dt == ActDType::kFP32) {
    d.comm_bytes = 4 * d.shard_params + static_cast<uint64_t>(world) * bucket_bytes;
    r.total_bytes += d.comm_bytes;
    r.device_total_bytes += d.comm_bytes;
  }
  return d;
}

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; i++) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

void check_ranks_agree(Collectives& comm,
                       const std::vector<std::pair<std::string, std::string>>& fields,
                       double timeout_s) {
  auto shorten = [](std::string v) {
    for (char& ch : v)
      if (ch == '\n' || ch == '\t') ch = ' ';
    return v.size() > 160 ? v.substr(0, 157) + "..." : v;
  };
  // One line per field: name TAB hash TAB shortened value.
  std::string mine;
  for (const auto& f : fields) {
    char h[17];
    std::snprintf(h, sizeof h, "%016llx",
                  static_cast<unsigned long long>(fnv1a64(f.second.data(), f.second.size())));
    mine += f.first + "\t" + h + "\t" + shorten(f.second) + "\n";
  }
  const std::vector<std::string> all = comm.host_all_gather(mine, timeout_s);
  auto lines = [](const std::string& s) {
    std::vector<std::string> out;
    size_t at = 0;
    while (at < s.size()) {
      const size_t nl = s.find('\n', at);
      out.push_back(s.substr(at, nl - at));
      at = nl + 1;
    }
    return out;
  };
  auto part = [](const std::string& line, int k) {
    size_t at = 0;
    for (int i = 0; i < k; i++) at = line.find('\t', at) + 1;
    return line.substr(at, k < 2 ? line.find('\t', at) - at : std::string::npos);
  };
  const std::vector<std::string> ref = lines(all[0]);
  for (size_t r = 1; r < all.size(); r++) {
    const std::vector<std::string> got = lines(all[r]);
    if (got.size() != ref.size())
      throw Error("ranks disagree before step 1: rank " + std::to_string(r) + " checks " +
                  std::to_string(got.size()) + " settings, rank 0 " + std::to_string(ref.size()) +
                  " (different remat versions?)");
    for (size_t i = 0; i < ref.size(); i++) {
      if (got[i] == ref[i]) continue;
      throw Error("ranks disagree before step 1 on " + part(ref[i], 0) + ": rank 0 has '" +
                  part(ref[i], 2) + "', rank " + std::to_string(r) + " has '" + part(got[i], 2) +
                  "' (every rank must run the same model, batch, plan, data and seed)");
    }
  }
}

}  // namespace remat
