#include <algorithm>

#include "daemon/transport/transport.h"

namespace svm::transport {

const LandingArea* LandingAreas::For(const std::shared_ptr<PeerChannel>& ch) {
  if (ch == nullptr) return nullptr;
  absl::MutexLock l(&mu_);
  // A channel that is gone has no fetch or READ outstanding (its batches
  // completed before their callers released it), so its registration may go.
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.ch.expired(); }),
                 entries_.end());
  for (const Entry& e : entries_) {
    if (e.key == ch.get()) return e.area.get();
  }
  Entry e;
  e.ch = ch;
  e.key = ch.get();
  if (auto a = ch->RegisterLanding(base_, len_, use_); a.ok()) e.area = std::move(*a);
  entries_.push_back(std::move(e));
  return entries_.back().area.get();
}

}  // namespace svm::transport
