// Capabilities, not inspection (DESIGN.md section 6): libsvm attaches the
// shim to the range it exports with its own rights, so the kernel checks
// the ptrace rule on the client, and hands the range fd to svmd over the
// session socket. svmd then needs no right of its own to the process.
// Internal to libsvm; not installed.
#ifndef SVM_CLIENT_RANGE_FD_H_
#define SVM_CLIENT_RANGE_FD_H_

#include <sys/types.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "client/session.h"

namespace svm::internal {

// Attaches /dev/svm_shim to [addr, addr + len) of pid (0: this process)
// and deposits the range fd with svmd; returns the token for
// ExportRequest.range_token. 0 when this process cannot attach itself (no
// shim, /dev/svm_shim not open to it, or an argument svmd explains better):
// svmd then checks the right and attaches on its own. PERMISSION_DENIED when
// the kernel refuses the attach (the caller may not ptrace pid); svmd is not
// asked then. object_fd (>= 0): the object the range maps, deposited beside
// the range fd for the zero-copy path (svmd has the kernel check it).
absl::StatusOr<uint64_t> DepositRange(Session& session, pid_t pid, uint64_t addr, uint64_t len,
                                      int object_fd = -1);

// The memfd of the svm::ExportableMemory of this process that holds all of
// [addr, addr + len), or -1: what DepositRange hands over for the zero-copy
// path without svmd opening /proc/PID/map_files (CAP_SYS_ADMIN).
int ExportableObjectFd(uint64_t addr, uint64_t len);

}  // namespace svm::internal

#endif  // SVM_CLIENT_RANGE_FD_H_
