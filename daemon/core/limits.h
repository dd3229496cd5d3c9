// svmd's resource limits (issue 11): what one local client (a uid) and one
// peer (a node) may hold, so that a flooding client or peer is refused with
// RESOURCE_EXHAUSTED instead of pushing svmd's memory past the bound that
// docs/operations.md ("Limits") works out from these values.
//
// The values are read on every admission and may be replaced at any time
// (SIGHUP re-reads the flags): a lowered limit refuses new work only; what
// is already held above it stays (exports, imports, sessions and queued
// fetches are never dropped by a reload).
//
// Every refusal is counted per limit (svm_limit_refusals_total{limit=...})
// and logged at most once per (who, limit) per kLogInterval, with the number
// of refusals the log left out since the last line.
#ifndef SVM_DAEMON_CORE_LIMITS_H_
#define SVM_DAEMON_CORE_LIMITS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "daemon/transport/transport.h"

namespace svm::core {

enum class Limit : int {
  kSessionsPerClient = 0,  // open sessions of one uid (session socket)
  kExportsPerClient,       // exports of one uid (their processes alive)
  kExportBytesPerClient,   // bytes those exports span
  kImportsPerPeer,         // subscriptions of one importing node, over every export
  kPendingFetchesPerPeer,  // fetches waiting on all of one peer's data connections together
  kSessions,               // open sessions of all clients together (session socket)
  kDataConnectionsPerPeer, // data connections of one peer (SetupData), offered or open
};
inline constexpr size_t kLimitCount = 7;

struct LimitValues {
  uint64_t sessions_per_client = 256;
  uint64_t exports_per_client = 256;
  uint64_t export_bytes_per_client = uint64_t{1} << 40;  // 1 TiB
  uint64_t imports_per_peer = 1024;
  uint64_t pending_fetches_per_peer = 4096;
  uint64_t sessions = 1024;
  uint64_t data_connections_per_peer = 16;

  uint64_t& Of(Limit l);
  uint64_t Of(Limit l) const { return const_cast<LimitValues*>(this)->Of(l); }
};

class Limits {
 public:
  static constexpr absl::Duration kLogInterval = absl::Seconds(60);
  // (who, limit) pairs remembered for the log's rate limit; beyond it the
  // oldest are forgotten (a forgotten pair may log again early).
  static constexpr size_t kMaxLogKeys = 4096;

  // now: the clock of the log's rate limit (tests pass their own).
  explicit Limits(LimitValues v = {}, std::function<absl::Time()> now = absl::Now);

  uint64_t Get(Limit l) const { return values_[Index(l)].load(std::memory_order_relaxed); }
  LimitValues Values() const;
  // Takes effect for every admission from now on; holds are not revisited.
  void Set(const LimitValues& v);

  // The refusal of one request: counted, logged (rate-limited), and the
  // status to answer with: RESOURCE_EXHAUSTED "<who> <detail> (limit
  // --<flag>=<limit>)". who names the client or peer ("uid 1000", "node b",
  // "peer b.example": a TLS identity), or "svmd" for a daemon-wide limit.
  absl::Status Refuse(Limit l, absl::string_view who, absl::string_view detail, uint64_t limit);
  uint64_t refusals(Limit l) const { return refusals_[Index(l)].load(std::memory_order_relaxed); }
  // Lines logged so far (tests check the rate limit).
  uint64_t log_lines() const { return log_lines_.load(std::memory_order_relaxed); }

  // "sessions_per_client": the metric's label.
  static absl::string_view Name(Limit l);
  // "max-sessions-per-client": the svmd flag.
  static absl::string_view Flag(Limit l);

 private:
  static size_t Index(Limit l) { return static_cast<size_t>(l); }

  std::array<std::atomic<uint64_t>, kLimitCount> values_{};
  std::array<std::atomic<uint64_t>, kLimitCount> refusals_{};
  std::atomic<uint64_t> log_lines_{0};
  const std::function<absl::Time()> now_;

  struct LogState {
    absl::Time last;
    uint64_t suppressed = 0;
  };
  absl::Mutex mu_;  // guards logged_; never held across a log call
  std::map<std::pair<int, std::string>, LogState> logged_ ABSL_GUARDED_BY(mu_);
};

// Who a per-peer limit counts: "peer <names joined by ,>" when the peer
// proved identities (TLS), else "node <the name it declared>" (without TLS
// anyone can claim any name: the limit is then per name, not per machine).
std::string PeerKey(absl::Span<const std::string> names, absl::string_view node);

// The data connections each peer holds on this exporter
// (--max-data-connections-per-peer). PeerService::SetupData asks Admit
// before a transport makes anything; the slot it returns goes to the
// transport (Transport::PrepareSession), which keeps it as long as the
// connection's resources exist. A slot counts from Admit until it is
// destroyed, except an offer the importer never took up: an unbound slot
// stops counting kOfferLifetime after Admit (the session token expired:
// SessionRegistry), even while a transport's table still holds it.
//
// LOCKING: one mutex (in State, shared with the slots so that a slot may
// outlive this object); a leaf: nothing is called under it.
class DataConnections {
 public:
  // The session registry's token lifetime (30 s), plus a margin for the
  // time between Admit and the token's issue.
  static constexpr absl::Duration kOfferLifetime = absl::Seconds(31);

  explicit DataConnections(std::shared_ptr<Limits> limits,
                           std::function<absl::Time()> now = absl::Now);

  // A slot for one more data connection of who (PeerKey), or
  // RESOURCE_EXHAUSTED naming --max-data-connections-per-peer (counted and
  // logged by Limits::Refuse).
  absl::StatusOr<std::unique_ptr<transport::ConnectionSlot>> Admit(const std::string& who);
  // The slots of who that count now.
  uint64_t Held(const std::string& who) const;

 private:
  struct State;
  class Slot;
  const std::shared_ptr<Limits> limits_;
  const std::shared_ptr<State> state_;
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_LIMITS_H_
