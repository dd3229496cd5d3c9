// The procfs mirror source: needs no kernel module.
//  - reads: process_vm_readv;
//  - mapping changes: /proc/PID/pagemap polled every poll_interval; a page
//    whose presence, frame (PFN, readable as root) or file/anon state
//    changed is reported, and /proc/PID/maps is compared for protection and
//    mapping changes;
//  - exit: a pidfd becomes readable.
// It cannot see a munmap + mmap that happens to reuse the same frame, so it
// asks the daemon to scrub remotely held pages (NeedsScrub).
#ifndef SVM_DAEMON_SOURCE_PROCFS_SOURCE_H_
#define SVM_DAEMON_SOURCE_PROCFS_SOURCE_H_

#include <memory>

#include "daemon/source/mirror_source.h"

namespace svm::source {

std::unique_ptr<MirrorSource> CreateProcfsSource(const SourceOptions& opts);

// Process access checks shared by the sources and the service.
struct ProcIds {
  uid_t uid[4];  // real, effective, saved, filesystem
  gid_t gid[4];
};
absl::StatusOr<ProcIds> ReadProcIds(pid_t pid);
// Whether [addr, addr+len) is entirely covered by mappings of pid.
absl::Status CheckMapped(pid_t pid, uint64_t addr, uint64_t len);

}  // namespace svm::source

#endif  // SVM_DAEMON_SOURCE_PROCFS_SOURCE_H_
