#include "daemon/core/limits.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/log.h"

namespace svm::core {

uint64_t& LimitValues::Of(Limit l) {
  switch (l) {
    case Limit::kSessionsPerClient:
      return sessions_per_client;
    case Limit::kExportsPerClient:
      return exports_per_client;
    case Limit::kExportBytesPerClient:
      return export_bytes_per_client;
    case Limit::kImportsPerPeer:
      return imports_per_peer;
    case Limit::kPendingFetchesPerPeer:
      return pending_fetches_per_peer;
    case Limit::kSessions:
      return sessions;
    case Limit::kDataConnectionsPerPeer:
      return data_connections_per_peer;
  }
  SVM_CHECK(false);
  return sessions_per_client;
}

absl::string_view Limits::Name(Limit l) {
  constexpr absl::string_view kNames[kLimitCount] = {
      "sessions_per_client", "exports_per_client", "export_bytes_per_client", "imports_per_peer",
      "pending_fetches_per_peer", "sessions", "data_connections_per_peer"};
  return kNames[Index(l)];
}

absl::string_view Limits::Flag(Limit l) {
  constexpr absl::string_view kFlags[kLimitCount] = {
      "max-sessions-per-client", "max-exports-per-client", "max-export-bytes-per-client",
      "max-imports-per-peer", "max-pending-fetches-per-peer", "max-sessions",
      "max-data-connections-per-peer"};
  return kFlags[Index(l)];
}

Limits::Limits(LimitValues v, std::function<absl::Time()> now) : now_(std::move(now)) { Set(v); }

LimitValues Limits::Values() const {
  LimitValues v;
  for (size_t i = 0; i < kLimitCount; ++i) v.Of(static_cast<Limit>(i)) = Get(static_cast<Limit>(i));
  return v;
}

void Limits::Set(const LimitValues& v) {
  for (size_t i = 0; i < kLimitCount; ++i) {
    values_[i].store(v.Of(static_cast<Limit>(i)), std::memory_order_relaxed);
  }
}

absl::Status Limits::Refuse(Limit l, absl::string_view who, absl::string_view detail, uint64_t limit) {
  refusals_[Index(l)].fetch_add(1, std::memory_order_relaxed);
  std::string text = absl::StrFormat("%s %s (limit --%s=%u)", who, detail, Flag(l), limit);
  uint64_t suppressed = 0;
  bool log = false;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = now_();
    auto key = std::make_pair(static_cast<int>(l), std::string(who));
    auto it = logged_.find(key);
    if (it == logged_.end()) {
      if (logged_.size() >= kMaxLogKeys) {
        // Forget the pair logged longest ago.
        auto oldest = logged_.begin();
        for (auto j = logged_.begin(); j != logged_.end(); ++j) {
          if (j->second.last < oldest->second.last) oldest = j;
        }
        logged_.erase(oldest);
      }
      logged_.emplace(std::move(key), LogState{now, 0});
      log = true;
    } else if (now - it->second.last >= kLogInterval) {
      suppressed = it->second.suppressed;
      it->second = LogState{now, 0};
      log = true;
    } else {
      ++it->second.suppressed;
    }
  }
  if (log) {
    log_lines_.fetch_add(1, std::memory_order_relaxed);
    if (suppressed > 0) {
      spdlog::warn("refused: {} (and {} more refusals of it since the last line)", text, suppressed);
    } else {
      spdlog::warn("refused: {}", text);
    }
  }
  return absl::ResourceExhaustedError(std::move(text));
}

std::string PeerKey(absl::Span<const std::string> names, absl::string_view node) {
  return names.empty() ? absl::StrCat("node ", node) : absl::StrCat("peer ", absl::StrJoin(names, ","));
}

struct DataConnections::State {
  explicit State(std::function<absl::Time()> n) : now(std::move(n)) {}
  struct Entry {
    absl::Time offered_until;
    bool bound = false;
  };
  const std::function<absl::Time()> now;
  mutable absl::Mutex mu;
  // who -> slot id -> its state; a who with no slot is erased.
  std::map<std::string, std::map<uint64_t, Entry>> slots ABSL_GUARDED_BY(mu);
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;

  uint64_t CountLocked(const std::string& who) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = slots.find(who);
    if (it == slots.end()) return 0;
    const absl::Time t = now();
    uint64_t n = 0;
    for (const auto& [id, e] : it->second) {
      if (e.bound || t < e.offered_until) ++n;
    }
    return n;
  }
};

class DataConnections::Slot final : public transport::ConnectionSlot {
 public:
  Slot(std::shared_ptr<State> s, std::string who, uint64_t id)
      : state_(std::move(s)), who_(std::move(who)), id_(id) {}
  ~Slot() override {
    absl::MutexLock l(&state_->mu);
    auto it = state_->slots.find(who_);
    SVM_CHECK(it != state_->slots.end());
    SVM_CHECK(it->second.erase(id_) == 1);
    if (it->second.empty()) state_->slots.erase(it);
  }
  void Bind() override {
    absl::MutexLock l(&state_->mu);
    state_->slots[who_][id_].bound = true;
  }

 private:
  const std::shared_ptr<State> state_;
  const std::string who_;
  const uint64_t id_;
};

DataConnections::DataConnections(std::shared_ptr<Limits> limits, std::function<absl::Time()> now)
    : limits_(std::move(limits)), state_(std::make_shared<State>(std::move(now))) {}

absl::StatusOr<std::unique_ptr<transport::ConnectionSlot>> DataConnections::Admit(const std::string& who) {
  const uint64_t max = limits_->Get(Limit::kDataConnectionsPerPeer);
  uint64_t held = 0;
  {
    absl::MutexLock l(&state_->mu);
    held = state_->CountLocked(who);
    if (held < max) {
      const uint64_t id = state_->next_id++;
      state_->slots[who][id] = State::Entry{state_->now() + kOfferLifetime, false};
      return std::make_unique<Slot>(state_, who, id);
    }
  }
  return limits_->Refuse(Limit::kDataConnectionsPerPeer, who,
                         absl::StrFormat("already holds %u data connections to this node", held), max);
}

uint64_t DataConnections::Held(const std::string& who) const {
  absl::MutexLock l(&state_->mu);
  return state_->CountLocked(who);
}

}  // namespace svm::core
