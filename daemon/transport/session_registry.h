// The exporter's table of data-connection sessions, one per transport
// (tcp and rdma share this code): PrepareSession issues a one-time token for
// a peer node; the data connection that presents it first claims it; the
// peer service finds that connection by its token (Subscribe); the
// connection forgets it when it closes.
//
// Lifetimes: an issued token that no connection claims expires after the
// registry's lifetime (pruned on the next Issue). A claimed token never
// expires and is never claimable again, not even after its connection has
// died: it lives until the connection Forget()s it. The registry holds
// connections weakly; a connection keeps itself alive.
//
// Tokens are secrets: every comparison with a presented token takes the
// same time whatever its content (TokensEqual; lookups compare against every
// entry instead of searching an ordered map).
//
// LOCKING: mu_ guards the table; nothing is called under it (slots are
// destroyed after it is released).
#ifndef SVM_DAEMON_TRANSPORT_SESSION_REGISTRY_H_
#define SVM_DAEMON_TRANSPORT_SESSION_REGISTRY_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "daemon/transport/transport.h"

namespace svm::transport {

// Whether a presented token equals an issued one, in time that depends only
// on the lengths (CRYPTO_memcmp), never on where the bytes first differ.
bool TokensEqual(std::string_view presented, std::string_view issued);

class SessionRegistry {
 public:
  static constexpr size_t kTokenBytes = 16;
  static constexpr absl::Duration kDefaultLifetime = absl::Seconds(30);

  // now: the clock expiry is measured with (tests inject their own).
  explicit SessionRegistry(absl::Duration lifetime = kDefaultLifetime,
                           std::function<absl::Time()> now = [] { return absl::Now(); })
      : lifetime_(lifetime), now_(std::move(now)) {}

  // A new token for node: kTokenBytes from getrandom(2), distinct from every
  // token in the table. Fails only when the kernel gives no randomness.
  // slot (may be null) stays with the token until a connection claims it
  // (Claim hands it over) or the token is pruned or forgotten.
  absl::StatusOr<std::string> Issue(const std::string& node,
                                    std::unique_ptr<ConnectionSlot> slot = nullptr);

  // Binds conn to token and returns the node the token was issued for; the
  // token's slot, if any, moves to *slot (when slot is not null).
  // PERMISSION_DENIED, changing nothing, when the token is unknown, expired
  // or was claimed before (by any connection, alive or not).
  absl::StatusOr<std::string> Claim(const std::string& token, std::shared_ptr<Subscriber> conn,
                                    std::unique_ptr<ConnectionSlot>* slot = nullptr);

  // The live connection that claimed token; nullptr when the token is
  // unknown, unclaimed, or its connection is gone.
  std::shared_ptr<Subscriber> Find(const std::string& token);

  // Removes token. Only the connection that claimed it calls this (as it
  // closes), so that a refused claimant cannot unbind the owner.
  void Forget(const std::string& token);

  // Tokens in the table (issued and not yet pruned, claimed and not forgotten).
  size_t size();

 private:
  struct Entry;
  // The entry whose token equals token, compared with every entry in
  // constant time; nullptr if none.
  Entry* Match(const std::string& token) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Entry {
    std::string node;
    absl::Time expires;  // unclaimed only
    bool claimed = false;
    std::weak_ptr<Subscriber> conn;
    std::unique_ptr<ConnectionSlot> slot;  // until claimed
  };

  const absl::Duration lifetime_;
  const std::function<absl::Time()> now_;
  absl::Mutex mu_;  // guards tokens_
  std::map<std::string, Entry> tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_SESSION_REGISTRY_H_
