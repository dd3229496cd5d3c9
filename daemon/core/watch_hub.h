// Fan-out of invalidation events to local Watch streams, by name.
#ifndef SVM_DAEMON_CORE_WATCH_HUB_H_
#define SVM_DAEMON_CORE_WATCH_HUB_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "svm/v1/control.pb.h"

namespace svm::core {

class WatchHub {
 public:
  // Called under the hub's lock: must queue and return, never block.
  using Callback = std::function<void(const v1::Invalidation&)>;

  uint64_t Add(const std::string& name, Callback cb);
  // After Remove returns, cb is not running and will not be called again.
  void Remove(uint64_t id);
  void Publish(const v1::Invalidation& ev);

 private:
  struct Watcher {
    std::string name;
    Callback cb;
  };
  absl::Mutex mu_;  // guards watchers_, next_id_; held while callbacks run
  std::map<uint64_t, Watcher> watchers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_WATCH_HUB_H_
