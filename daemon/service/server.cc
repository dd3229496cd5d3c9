#include "daemon/service/server.h"

#include <grp.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server_posix.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "daemon/service/session_backend.h"

namespace svm::service {

absl::StatusOr<PeerCred> ClientRegistry::Lookup(const std::string& grpc_peer) const {
  int fd = -1;
  if (!absl::StartsWith(grpc_peer, "fd:") || !absl::SimpleAtoi(grpc_peer.substr(3), &fd)) {
    return absl::InternalError(absl::StrCat("cannot identify the client (peer '", grpc_peer, "')"));
  }
  absl::MutexLock l(&mu_);
  auto it = creds_.find(fd);
  if (it == creds_.end()) return absl::InternalError("cannot identify the client");
  return it->second;
}

absl::Status ToAbsl(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(core::Daemon* daemon, ServerOptions opts) {
  std::unique_ptr<Server> s(new Server());
  s->daemon_ = daemon;
  const auto& o = daemon->options();
  // Both servers answer grpc.health.v1.Health (overall "" and each svm
  // service by its full name) and list their services through server
  // reflection, so standard tools (grpcurl, grpc_cli, load balancers) can
  // probe and explore them. Process-wide settings, read by BuildAndStart.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  s->peer_service_ = CreatePeerService(daemon);
  grpc::ServerBuilder pb;
  int port = 0;
  pb.AddListeningPort(absl::StrCat(o.peer_listen.host.find(':') != std::string::npos
                                       ? absl::StrCat("[", o.peer_listen.host, "]")
                                       : o.peer_listen.host,
                                   ":", o.peer_listen.port),
                      opts.peer_credentials ? opts.peer_credentials
                                            : grpc::InsecureServerCredentials(),
                      &port);
  pb.RegisterService(s->peer_service_.get());
  s->peer_server_ = pb.BuildAndStart();
  if (!s->peer_server_ || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for peers on ", o.peer_listen.host,
                                               ":", o.peer_listen.port));
  }
  s->peer_address_ = absl::StrCat(o.peer_listen.host, ":", port);

  s->control_service_ = CreateControlService(daemon, &s->clients_, &s->peer_address_, &s->deposits_);
  grpc::ServerBuilder cb;
  cb.RegisterService(s->control_service_.get());
  s->control_server_ = cb.BuildAndStart();
  if (!s->control_server_) return absl::InternalError("cannot start the control server");
  s->SetServing(true);

  auto fd = UnixListen(o.control, opts.socket_mode);
  if (!fd.ok()) return fd.status();
  s->unix_fd_ = std::move(*fd);
  s->owns_socket_ = true;
  if (!opts.socket_group.empty()) {
    if (group* g = ::getgrnam(opts.socket_group.c_str()); g != nullptr) {
      if (::chown(o.control.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
        spdlog::warn("cannot give {} to group {}: {}", o.control, opts.socket_group, std::strerror(errno));
      }
    }
  }
  s->session_backend_ = CreateSessionBackend(daemon, &s->deposits_);
  session::ServerOptions so;
  so.path = SessionSocketPath(o.control);
  so.mode = opts.socket_mode;
  auto sessions = session::Server::Start(s->session_backend_.get(), so);
  if (!sessions.ok()) return sessions.status();
  s->sessions_ = std::move(*sessions);
  daemon->SetBeforeScrape([p = s->sessions_.get()] { p->HarvestClientCounters(); });
  if (!opts.socket_group.empty()) {
    if (group* g = ::getgrnam(opts.socket_group.c_str()); g != nullptr) {
      if (::chown(so.path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
        spdlog::warn("cannot give {} to group {}: {}", so.path, opts.socket_group, std::strerror(errno));
      }
    }
  }
  s->acceptor_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

void Server::AcceptLoop() {
  for (;;) {
    int fd = ::accept4(unix_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);  // gRPC needs non-blocking
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE) {
        spdlog::error("control socket: {}", std::strerror(errno));
        ::usleep(100000);
        continue;
      }
      return;  // shut down
    }
    auto cred = GetPeerCred(fd);
    if (!cred.ok()) {
      spdlog::warn("control connection without credentials: {}", cred.status().message());
      ::close(fd);
      continue;
    }
    clients_.Set(fd, *cred);
    grpc::AddInsecureChannelFromFd(control_server_.get(), fd);
  }
}

void Server::SetServing(bool serving) {
  const std::pair<grpc::Server*, const char*> servers[] = {
      {peer_server_.get(), "svm.v1.Peer"}, {control_server_.get(), "svm.v1.Control"}};
  for (const auto& [srv, service] : servers) {
    grpc::HealthCheckServiceInterface* h = srv ? srv->GetHealthCheckService() : nullptr;
    if (h == nullptr) continue;
    h->SetServingStatus(service, serving);
    h->SetServingStatus(serving);  // overall (""): every service of the server
  }
}

void Server::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Health watchers (and checks racing the shutdown) see NOT_SERVING first.
  SetServing(false);
  // Start() may have failed part way: stop only what was started.
  if (unix_fd_.valid()) ::shutdown(unix_fd_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  const auto deadline = std::chrono::system_clock::now() + std::chrono::milliseconds(500);
  if (control_server_) control_server_->Shutdown(deadline);
  if (peer_server_) peer_server_->Shutdown(deadline);
  if (sessions_) daemon_->SetBeforeScrape(nullptr);  // returns after a harvest in progress
  sessions_.reset();  // before the daemon: its reads finish into session memory
  // Never remove a socket another daemon is listening on.
  if (owns_socket_) ::unlink(daemon_->options().control.c_str());
}

Server::~Server() { Shutdown(); }

}  // namespace svm::service
