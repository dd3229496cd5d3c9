// The accept loop of both transports: tcp accepts its data connections on
// it, rdma the importers' liveness sockets.
#ifndef SVM_DAEMON_TRANSPORT_LISTENER_H_
#define SVM_DAEMON_TRANSPORT_LISTENER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/fd.h"
#include "common/net.h"

namespace svm::transport {

class Listener {
 public:
  // Runs on the accept thread for each accepted socket (SOCK_CLOEXEC); must
  // not block for long: hand the socket to a thread of its own.
  using OnAccept = std::function<void(UniqueFd)>;

  // Binds listen (port 0: a free one) and starts the accept thread. what
  // names the listener in logs ("data", "liveness").
  static absl::StatusOr<std::unique_ptr<Listener>> Start(const HostPort& listen, std::string what,
                                                         OnAccept on_accept);
  ~Listener() { Stop(); }

  uint16_t port() const { return port_; }
  // "host:port" with the port actually bound.
  const std::string& address() const { return address_; }
  // Stops accepting and joins the accept thread (no on_accept runs after
  // it returns). Idempotent.
  void Stop();

 private:
  Listener(UniqueFd fd, uint16_t port, std::string address, std::string what, OnAccept on_accept)
      : fd_(std::move(fd)),
        port_(port),
        address_(std::move(address)),
        what_(std::move(what)),
        on_accept_(std::move(on_accept)) {}
  void Loop();

  UniqueFd fd_;
  const uint16_t port_;
  const std::string address_;
  const std::string what_;
  const OnAccept on_accept_;
  std::atomic<bool> stopped_{false};
  std::thread thread_;  // last: started once everything above is set
};

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_LISTENER_H_
