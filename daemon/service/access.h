// Who may export what: the rule ptrace_may_access(PTRACE_MODE_ATTACH_REALCREDS)
// applies, evaluated on the client's SO_PEERCRED credentials, so a client can
// export exactly the memory it could attach to with ptrace.
#ifndef SVM_DAEMON_SERVICE_ACCESS_H_
#define SVM_DAEMON_SERVICE_ACCESS_H_

#include "absl/status/status.h"
#include "common/net.h"

namespace svm::service {

absl::Status CheckMayExport(const PeerCred& caller, pid_t target);

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_ACCESS_H_
