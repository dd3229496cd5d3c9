// Adapts the daemon's tables to the client data plane (daemon/session).
#ifndef SVM_DAEMON_SERVICE_SESSION_BACKEND_H_
#define SVM_DAEMON_SERVICE_SESSION_BACKEND_H_

#include <memory>
#include <string>

#include "daemon/core/daemon.h"
#include "daemon/service/range_deposits.h"
#include "daemon/session/session_server.h"

namespace svm::service {

// The session socket beside the control socket: /run/svm/svmd.sock ->
// /run/svm/svmd-session.sock (another name gets ".session" appended).
std::string SessionSocketPath(const std::string& control);

// deposits: where kDeposit puts clients' range fds (outlives the backend).
std::unique_ptr<session::Backend> CreateSessionBackend(core::Daemon* d, RangeDeposits* deposits);

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_SESSION_BACKEND_H_
