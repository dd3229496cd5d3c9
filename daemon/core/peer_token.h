// The pre-shared peer token (--peer-token-file), replaceable while svmd
// runs: SIGHUP re-reads the file and Set()s the new one. Each peer call
// reads it once, when it is checked (exporter) or issued (importer), so a
// new token applies to calls from then on; data connections, imports and
// sessions already set up are not re-checked and stay up.
#ifndef SVM_DAEMON_CORE_PEER_TOKEN_H_
#define SVM_DAEMON_CORE_PEER_TOKEN_H_

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace svm::core {

class PeerToken {
 public:
  explicit PeerToken(std::string token = "") : token_(std::move(token)) {}
  // "" when peers are not authenticated by token.
  std::string Get() const {
    absl::MutexLock l(&mu_);
    return token_;
  }
  void Set(std::string token) {
    absl::MutexLock l(&mu_);
    token_ = std::move(token);
  }

 private:
  mutable absl::Mutex mu_;  // guards token_; never held across a call
  std::string token_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_PEER_TOKEN_H_
