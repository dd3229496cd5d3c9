// The gRPC edge of svmd: the Control service on a unix socket (clients are
// identified by SO_PEERCRED, taken when svmd accepts the connection itself
// and hands it to gRPC), and the Peer service on TCP.
#ifndef SVM_DAEMON_SERVICE_SERVER_H_
#define SVM_DAEMON_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/fd.h"
#include "common/net.h"
#include "daemon/core/daemon.h"
#include "daemon/service/range_deposits.h"
#include "daemon/session/session_server.h"

namespace svm::service {

// Credentials of control connections, keyed by the descriptor gRPC names
// them by ("fd:N" as the call's peer).
class ClientRegistry {
 public:
  void Set(int fd, PeerCred cred) {
    absl::MutexLock l(&mu_);
    creds_[fd] = cred;
  }
  absl::StatusOr<PeerCred> Lookup(const std::string& grpc_peer) const;

 private:
  mutable absl::Mutex mu_;
  std::map<int, PeerCred> creds_ ABSL_GUARDED_BY(mu_);
};

absl::Status ToAbsl(const grpc::Status& s);
grpc::Status ToGrpc(const absl::Status& s);

struct ServerOptions {
  mode_t socket_mode = 0660;
  std::string socket_group = "svm";  // applied when the group exists
  // The peer port's credentials (PeerTls::ServerCredentials); null: plain
  // TCP, peers unauthenticated and unencrypted.
  std::shared_ptr<grpc::ServerCredentials> peer_credentials;
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(core::Daemon* daemon, ServerOptions opts);
  ~Server();
  std::string peer_address() const { return peer_address_; }
  void Shutdown();

 private:
  Server() = default;
  void AcceptLoop();
  // The health status of both servers (overall and per service).
  void SetServing(bool serving);

  core::Daemon* daemon_ = nullptr;
  ClientRegistry clients_;
  // Clients' range fds between their deposit (session socket) and their
  // Export (control socket).
  RangeDeposits deposits_;
  std::unique_ptr<grpc::Service> control_service_;
  std::unique_ptr<grpc::Service> peer_service_;
  std::unique_ptr<grpc::Server> control_server_;
  std::unique_ptr<grpc::Server> peer_server_;
  UniqueFd unix_fd_;
  std::thread acceptor_;
  // The client data plane: sessions on a socket beside the control socket.
  std::unique_ptr<session::Backend> session_backend_;
  std::unique_ptr<session::Server> sessions_;
  std::string peer_address_;
  bool shut_down_ = false;
  bool owns_socket_ = false;
};

std::unique_ptr<grpc::Service> CreateControlService(core::Daemon* d, ClientRegistry* clients,
                                                    std::string* peer_address,
                                                    RangeDeposits* deposits);
std::unique_ptr<grpc::Service> CreatePeerService(core::Daemon* d);

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_SERVER_H_
