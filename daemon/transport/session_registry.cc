#include "daemon/transport/session_registry.h"

#include <openssl/crypto.h>

#include <vector>

#include "common/random.h"

namespace svm::transport {

bool TokensEqual(std::string_view presented, std::string_view issued) {
  if (presented.size() != issued.size() || issued.empty()) return false;
  return CRYPTO_memcmp(presented.data(), issued.data(), issued.size()) == 0;
}

SessionRegistry::Entry* SessionRegistry::Match(const std::string& token) {
  Entry* found = nullptr;
  for (auto& [issued, e] : tokens_) {
    if (TokensEqual(token, issued)) found = &e;
  }
  return found;
}

absl::StatusOr<std::string> SessionRegistry::Issue(const std::string& node,
                                                   std::unique_ptr<ConnectionSlot> slot) {
  std::vector<std::unique_ptr<ConnectionSlot>> pruned;  // destroyed after the lock
  for (;;) {
    std::string token(kTokenBytes, '\0');
    RandomBytes(token.data(), token.size());
    absl::MutexLock l(&mu_);
    const absl::Time now = now_();
    for (auto it = tokens_.begin(); it != tokens_.end();) {
      if (!it->second.claimed && it->second.expires < now) {
        if (it->second.slot) pruned.push_back(std::move(it->second.slot));
        it = tokens_.erase(it);
      } else {
        ++it;
      }
    }
    if (tokens_.contains(token)) continue;  // 2^-128: draw again rather than alias a session
    tokens_.emplace(token, Entry{node, now + lifetime_, false, {}, std::move(slot)});
    return token;
  }
}

absl::StatusOr<std::string> SessionRegistry::Claim(const std::string& token,
                                                   std::shared_ptr<Subscriber> conn,
                                                   std::unique_ptr<ConnectionSlot>* slot) {
  absl::MutexLock l(&mu_);
  Entry* e = Match(token);
  if (e == nullptr || e->claimed || e->expires < now_()) {
    return absl::PermissionDeniedError("unknown, expired or used session token");
  }
  e->claimed = true;
  e->conn = std::move(conn);
  if (slot != nullptr) *slot = std::move(e->slot);
  return e->node;
}

std::shared_ptr<Subscriber> SessionRegistry::Find(const std::string& token) {
  absl::MutexLock l(&mu_);
  Entry* e = Match(token);
  if (e == nullptr) return nullptr;
  return e->conn.lock();
}

void SessionRegistry::Forget(const std::string& token) {
  std::unique_ptr<ConnectionSlot> slot;  // destroyed after the lock
  absl::MutexLock l(&mu_);
  if (auto it = tokens_.find(token); it != tokens_.end()) {
    slot = std::move(it->second.slot);
    tokens_.erase(it);
  }
}

size_t SessionRegistry::size() {
  absl::MutexLock l(&mu_);
  return tokens_.size();
}

}  // namespace svm::transport
