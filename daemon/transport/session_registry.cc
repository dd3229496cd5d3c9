#include "daemon/transport/session_registry.h"

#include "common/random.h"

namespace svm::transport {

absl::StatusOr<std::string> SessionRegistry::Issue(const std::string& node) {
  for (;;) {
    std::string token(kTokenBytes, '\0');
    RandomBytes(token.data(), token.size());
    absl::MutexLock l(&mu_);
    const absl::Time now = now_();
    for (auto it = tokens_.begin(); it != tokens_.end();) {
      if (!it->second.claimed && it->second.expires < now) {
        it = tokens_.erase(it);
      } else {
        ++it;
      }
    }
    if (tokens_.contains(token)) continue;  // 2^-128: draw again rather than alias a session
    tokens_.emplace(token, Entry{node, now + lifetime_, false, {}});
    return token;
  }
}

absl::StatusOr<std::string> SessionRegistry::Claim(const std::string& token,
                                                   std::shared_ptr<Subscriber> conn) {
  absl::MutexLock l(&mu_);
  auto it = tokens_.find(token);
  if (it == tokens_.end() || it->second.claimed || it->second.expires < now_()) {
    return absl::PermissionDeniedError("unknown, expired or used session token");
  }
  it->second.claimed = true;
  it->second.conn = std::move(conn);
  return it->second.node;
}

std::shared_ptr<Subscriber> SessionRegistry::Find(const std::string& token) {
  absl::MutexLock l(&mu_);
  auto it = tokens_.find(token);
  if (it == tokens_.end()) return nullptr;
  return it->second.conn.lock();
}

void SessionRegistry::Forget(const std::string& token) {
  absl::MutexLock l(&mu_);
  tokens_.erase(token);
}

size_t SessionRegistry::size() {
  absl::MutexLock l(&mu_);
  return tokens_.size();
}

}  // namespace svm::transport
