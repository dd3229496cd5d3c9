// Socket helpers. Every function returns an owned descriptor or a Status
// that names the address involved.
#ifndef SVM_COMMON_NET_H_
#define SVM_COMMON_NET_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/fd.h"
#include "common/numbers.h"

namespace svm {

// Listening TCP socket on host:port (port 0: the kernel chooses).
absl::StatusOr<UniqueFd> TcpListen(const HostPort& addr, int backlog = 64);
// Connects with a bounded wait; TCP_NODELAY set.
absl::StatusOr<UniqueFd> TcpConnect(const HostPort& addr, absl::Duration timeout);
// The local port a socket is bound to.
absl::StatusOr<uint16_t> LocalPort(int fd);
// Listening unix stream socket; an existing stale socket file is replaced.
// type: SOCK_STREAM or SOCK_SEQPACKET.
absl::StatusOr<UniqueFd> UnixListen(const std::string& path, mode_t mode, int backlog = 64,
                                    int type = SOCK_STREAM);

struct PeerCred {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};
absl::StatusOr<PeerCred> GetPeerCred(int fd);

}  // namespace svm

#endif  // SVM_COMMON_NET_H_
