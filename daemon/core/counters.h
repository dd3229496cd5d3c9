// Named monotonic counters, shown by `svmctl status`. Updated per request or
// per event, never per page.
#ifndef SVM_DAEMON_CORE_COUNTERS_H_
#define SVM_DAEMON_CORE_COUNTERS_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

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

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_COUNTERS_H_
