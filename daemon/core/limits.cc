#include "daemon/core/limits.h"

#include "absl/strings/str_format.h"
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
  }
  SVM_CHECK(false);
  return sessions_per_client;
}

absl::string_view Limits::Name(Limit l) {
  constexpr absl::string_view kNames[kLimitCount] = {
      "sessions_per_client", "exports_per_client", "export_bytes_per_client", "imports_per_peer",
      "pending_fetches_per_peer", "sessions"};
  return kNames[Index(l)];
}

absl::string_view Limits::Flag(Limit l) {
  constexpr absl::string_view kFlags[kLimitCount] = {
      "max-sessions-per-client", "max-exports-per-client", "max-export-bytes-per-client",
      "max-imports-per-peer", "max-pending-fetches-per-peer", "max-sessions"};
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

}  // namespace svm::core
