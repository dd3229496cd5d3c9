#include "daemon/transport/listener.h"

#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace svm::transport {

absl::StatusOr<std::unique_ptr<Listener>> Listener::Start(const HostPort& listen, std::string what,
                                                          OnAccept on_accept) {
  auto fd = TcpListen(listen);
  if (!fd.ok()) return fd.status();
  auto port = LocalPort(fd->get());
  if (!port.ok()) return port.status();
  std::unique_ptr<Listener> l(new Listener(std::move(*fd), *port, absl::StrCat(listen.host, ":", *port),
                                           std::move(what), std::move(on_accept)));
  l->thread_ = std::thread([p = l.get()] { p->Loop(); });
  return l;
}

void Listener::Stop() {
  if (stopped_.exchange(true)) return;
  // Wakes accept4() with EINVAL; the loop then sees stopped_.
  ::shutdown(fd_.get(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
}

void Listener::Loop() {
  for (;;) {
    int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopped_) return;
      if (errno == EMFILE || errno == ENFILE) {
        spdlog::error("{} listener: {}", what_, std::strerror(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      spdlog::error("{} listener stopped accepting: {}", what_, std::strerror(errno));
      return;
    }
    on_accept_(UniqueFd(fd));
  }
}

}  // namespace svm::transport
