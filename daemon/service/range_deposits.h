// Range fds that clients handed svmd over the session socket (kDeposit,
// daemon/session/abi.h), kept until the ExportRequest naming their token
// takes them or the depositing session ends.
//
// A deposit is the client's proof of its right to the memory: the kernel
// checked the ptrace rule on the client when it attached the range, so
// svmd needs no CAP_SYS_PTRACE to export it (DESIGN.md section 6). A token
// is only good for the process that deposited it (SO_PEERCRED of both
// sockets), and a forged descriptor is refused when it arrives.
//
// LOCKING: mu_ guards the map; it is never held across a system call on a
// deposited fd.
#ifndef SVM_DAEMON_SERVICE_RANGE_DEPOSITS_H_
#define SVM_DAEMON_SERVICE_RANGE_DEPOSITS_H_

#include <cstdint>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/fd.h"
#include "common/net.h"
#include "daemon/source/shim_source.h"

namespace svm::service {

class RangeDeposits {
 public:
  // Deposits a session may hold at once (each pins a range fd).
  static constexpr size_t kMaxPerSession = 64;

  struct Deposit {
    UniqueFd fd;
    source::RangeFdInfo info;  // as checked when deposited
    // The object the range maps (a memfd), for the zero-copy path; checked
    // by the kernel when deposited (source::RangeObjectOffset). May be invalid.
    UniqueFd object;
  };

  // INVALID_ARGUMENT "not a svm_shim range fd" for anything else;
  // RESOURCE_EXHAUSTED past kMaxPerSession. The token is never 0. object
  // (optional): INVALID_ARGUMENT unless the kernel says fd's range is a
  // shared mapping of it; dropped (the export is served staged) when the
  // loaded svm_shim cannot tell.
  absl::StatusOr<uint64_t> Add(const PeerCred& who, uint64_t session, UniqueFd fd,
                               UniqueFd object = UniqueFd());
  // The deposit of token, removed; NOT_FOUND when there is none for this
  // caller (another process's token is as unknown as a made-up one).
  absl::StatusOr<Deposit> Take(uint64_t token, const PeerCred& who);
  void DropSession(uint64_t session);

 private:
  struct Entry {
    Deposit d;
    pid_t pid = 0;  // of the depositing process
    uint64_t session = 0;
  };
  absl::Mutex mu_;
  std::map<uint64_t, Entry> by_token_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_RANGE_DEPOSITS_H_
