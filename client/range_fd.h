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
// asked then.
absl::StatusOr<uint64_t> DepositRange(Session& session, pid_t pid, uint64_t addr, uint64_t len);

}  // namespace svm::internal

#endif  // SVM_CLIENT_RANGE_FD_H_
