// Named monotonic counters, shown by `svmctl status`, and the figures kept
// per export and per import for the metrics endpoint. Updated per request or
// per event, never per page.
#ifndef SVM_DAEMON_CORE_COUNTERS_H_
#define SVM_DAEMON_CORE_COUNTERS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace svm::core {

class Counters {
 public:
  void Add(const std::string& name, uint64_t n = 1) {
    absl::MutexLock l(&mu_);
    values_[name] += n;
  }
  std::map<std::string, uint64_t> Snapshot() const {
    absl::MutexLock l(&mu_);
    return values_;
  }

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, uint64_t> values_ ABSL_GUARDED_BY(mu_);
};

// A latency histogram with fixed bounds, updated with relaxed atomics (a
// scrape may see a sample in a bucket before it is in the sum: Prometheus
// tolerates that skew).
class LatencyHistogram {
 public:
  // Upper bounds in seconds, 50 us to 5 s (fetch timeouts are 1.5 s).
  static constexpr std::array<double, 12> kBoundsSeconds = {
      50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0, 5.0};

  void Observe(absl::Duration d) {
    const double s = absl::ToDoubleSeconds(d);
    size_t i = 0;
    while (i < kBoundsSeconds.size() && s > kBoundsSeconds[i]) ++i;
    buckets_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<uint64_t>(absl::ToInt64Nanoseconds(d)), std::memory_order_relaxed);
  }
  struct Snapshot {
    std::array<uint64_t, kBoundsSeconds.size() + 1> buckets{};  // per bucket, the last is +Inf
    uint64_t count = 0;
    double sum_seconds = 0;
  };
  Snapshot Read() const {
    Snapshot s;
    for (size_t i = 0; i < buckets_.size(); ++i) {
      s.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
      s.count += s.buckets[i];
    }
    s.sum_seconds = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) * 1e-9;
    return s;
  }

 private:
  std::array<std::atomic<uint64_t>, kBoundsSeconds.size() + 1> buckets_{};
  std::atomic<uint64_t> sum_ns_{0};
};

// One export's traffic, kept by the export table where it serves. Zero-copy
// READs are one-sided (the exporter's CPU never sees them) and so are not
// counted here; the importer counts them.
struct ExportStats {
  std::atomic<uint64_t> local_reads{0};   // reads on the exporting node itself
  std::atomic<uint64_t> fetches{0};       // fetch requests from importers
  std::atomic<uint64_t> bytes_served{0};  // by both
};

// One import's traffic, kept by the import table where it reads.
struct ImportStats {
  std::atomic<uint64_t> reads{0};             // reads through svmd (control and session misses)
  std::atomic<uint64_t> pages_from_cache{0};  // cache hits, in pages
  std::atomic<uint64_t> pages_fetched{0};     // cache misses (and zero-copy READs), in pages
  // When the exporter was last heard from (heartbeat or invalidation),
  // source::MonotonicNs(); 0: never.
  std::atomic<int64_t> last_heard_ns{0};
  LatencyHistogram fetch_latency;  // a read's wire part: one FetchV or zero-copy READ
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_COUNTERS_H_
