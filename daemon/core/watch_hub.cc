#include "daemon/core/watch_hub.h"

namespace svm::core {

uint64_t WatchHub::Add(const std::string& name, Callback cb) {
  absl::MutexLock l(&mu_);
  uint64_t id = next_id_++;
  watchers_[id] = Watcher{name, std::move(cb)};
  return id;
}

void WatchHub::Remove(uint64_t id) {
  absl::MutexLock l(&mu_);
  watchers_.erase(id);
}

void WatchHub::Publish(const v1::Invalidation& ev) {
  absl::MutexLock l(&mu_);
  for (auto& [id, w] : watchers_) {
    if (w.name == ev.name()) w.cb(ev);
  }
}

}  // namespace svm::core
