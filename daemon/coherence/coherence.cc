#include "daemon/coherence/coherence.h"

#include <algorithm>

#include "common/check.h"

namespace svm::coherence {

// --- ExportCoherence ---------------------------------------------------------

uint64_t ExportCoherence::Invalidate(uint64_t first, uint64_t n) {
  ++seq_;
  const uint64_t end = first + n < first ? UINT64_MAX : first + n;
  for (auto it = served_.lower_bound(first); it != served_.end() && it->first < end;) {
    it = served_.erase(it);
  }
  return seq_;
}

std::vector<uint64_t> ExportCoherence::RecordServed(uint64_t first,
                                                    absl::Span<const uint64_t> versions,
                                                    uint64_t served_at) {
  std::vector<uint64_t> changed;
  // An invalidation since the copy: the importer gets it before this reply
  // (same ordered connection) and does not install; what was copied may
  // predate it, so it is not a version anybody holds.
  if (served_at != seq_) return changed;
  for (size_t i = 0; i < versions.size(); ++i) {
    const uint64_t page = first + i;
    auto [it, inserted] = served_.try_emplace(page, versions[i]);
    if (!inserted && it->second != versions[i]) {
      // Another importer holds the version last served; this copy proves
      // the page changed without a notifier. Not recorded: the caller's
      // invalidation overtakes this reply, so it is not installed either.
      served_.erase(it);
      changed.push_back(page);
    }
  }
  return changed;
}

std::vector<std::pair<uint64_t, uint64_t>> ExportCoherence::ServedBatch(uint64_t* cursor,
                                                                        size_t max) const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  if (served_.empty()) return out;
  auto it = served_.lower_bound(*cursor);
  while (out.size() < max && out.size() < served_.size()) {
    if (it == served_.end()) it = served_.begin();
    out.emplace_back(it->first, it->second);
    ++it;
  }
  *cursor = it == served_.end() ? 0 : it->first;
  return out;
}

std::vector<uint64_t> ExportCoherence::StillServed(
    absl::Span<const std::pair<uint64_t, uint64_t>> sampled) const {
  std::vector<uint64_t> out;
  for (const auto& [page, version] : sampled) {
    auto it = served_.find(page);
    if (it != served_.end() && it->second == version) out.push_back(page);
  }
  return out;
}

uint64_t ExportCoherence::Subscribe(uint64_t sub) {
  // A resubscription on the same connection keeps what it acknowledged;
  // it holds whatever it held.
  subs_.try_emplace(sub, seq_);
  return seq_;
}

void ExportCoherence::Unsubscribe(uint64_t sub) {
  subs_.erase(sub);
  for (Retired& r : retired_) r.holders.erase(sub);
}

void ExportCoherence::OnAck(uint64_t sub, uint64_t seq) {
  auto it = subs_.find(sub);
  if (it == subs_.end()) return;
  it->second = std::max(it->second, seq);
  for (Retired& r : retired_) {
    if (seq >= r.at_seq) r.holders.erase(sub);
  }
}

std::vector<uint64_t> ExportCoherence::Laggards(uint64_t target) const {
  std::vector<uint64_t> out;
  for (const auto& [sub, acked] : subs_) {
    if (acked < target) out.push_back(sub);
  }
  return out;
}

void ExportCoherence::Retire(uint64_t id, uint64_t at_seq, absl::Time now) {
  SVM_CHECK(at_seq <= seq_);
  Retired r{id, at_seq, now, {}};
  for (const auto& [sub, acked] : subs_) {
    if (acked < at_seq) r.holders.insert(sub);
  }
  retired_.push_back(std::move(r));
}

std::vector<uint64_t> ExportCoherence::TakeReleasable() {
  std::vector<uint64_t> out;
  for (auto it = retired_.begin(); it != retired_.end();) {
    if (it->holders.empty()) {
      out.push_back(it->id);
      it = retired_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

std::vector<uint64_t> ExportCoherence::RetirementLaggards(absl::Time deadline) const {
  std::set<uint64_t> out;
  for (const Retired& r : retired_) {
    if (r.since <= deadline) out.insert(r.holders.begin(), r.holders.end());
  }
  return {out.begin(), out.end()};
}

// --- ImportCoherence ---------------------------------------------------------

const char* ImportStateName(ImportState s) {
  switch (s) {
    case ImportState::kDetached: return "disconnected";
    case ImportState::kSubscribing: return "connecting";
    case ImportState::kLive: return "connected";
    case ImportState::kGone: return "gone";
  }
  return "unknown";
}

uint64_t ImportCoherence::BeginSubscribe() {
  ++epoch_;
  state_ = ImportState::kSubscribing;
  // Sequences are per subscription: the fresh epoch voids every ticket
  // issued under the old one, so nothing compares against this reset.
  max_seq_ = 0;
  return epoch_;
}

bool ImportCoherence::CompleteSubscribe(uint64_t epoch, uint64_t seq) {
  if (epoch != epoch_ || state_ != ImportState::kSubscribing) return false;
  // Never lowered: invalidations newer than the acknowledgement's sequence
  // may already have been applied in the subscribing window.
  max_seq_ = std::max(max_seq_, seq);
  state_ = ImportState::kLive;
  return true;
}

bool ImportCoherence::OnInvalidation(uint64_t seq, bool terminal) {
  // A gone import is still subscribed on its channel (a fetch may have
  // learnt of the exit before the exit's invalidation arrived): it applies.
  if (state_ == ImportState::kDetached) return false;
  max_seq_ = std::max(max_seq_, seq);
  ++invalidations_;
  if (terminal && state_ != ImportState::kGone) {
    state_ = ImportState::kGone;
    ++epoch_;
  }
  return true;
}

void ImportCoherence::OnDisconnect() {
  ++epoch_;
  lease_until_ns_ = 0;
  if (state_ != ImportState::kGone) state_ = ImportState::kDetached;
}

void ImportCoherence::MarkGone() {
  ++epoch_;
  lease_until_ns_ = 0;
  state_ = ImportState::kGone;
}

// --- ZeroCopyRegionState ----------------------------------------------------

bool ZeroCopyRegionState::Offer(uint64_t seq) {
  if (seq < dropped_at_) return false;
  ++epoch_;
  state_ = RegionState::kUsable;
  return true;
}

uint64_t ZeroCopyRegionState::BeginRead() {
  SVM_CHECK(state_ == RegionState::kUsable);
  ++in_flight_[epoch_];
  return epoch_;
}

void ZeroCopyRegionState::EndRead(uint64_t epoch) {
  auto it = in_flight_.find(epoch);
  SVM_CHECK(it != in_flight_.end());
  if (--it->second == 0) in_flight_.erase(it);
}

uint64_t ZeroCopyRegionState::Drop(uint64_t seq) {
  dropped_at_ = std::max(dropped_at_, seq);
  state_ = RegionState::kNone;
  return epoch_;
}

bool ZeroCopyRegionState::Drained(uint64_t epoch) const {
  return in_flight_.empty() || in_flight_.begin()->first > epoch;
}

}  // namespace svm::coherence
