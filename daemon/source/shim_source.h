// The shim mirror source: /dev/svm_shim (driver-shim/). Reads go through
// the shim's consistent read (hmm_range_fault inside the notifier
// read_begin/read_retry loop); every mapping change arrives as a notifier
// event on the range fd, so nothing is polled and no content scrub is
// needed. This file is the only place that calls the shim's ioctls.
#ifndef SVM_DAEMON_SOURCE_SHIM_SOURCE_H_
#define SVM_DAEMON_SOURCE_SHIM_SOURCE_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "daemon/source/mirror_source.h"

namespace svm::source {

inline constexpr char kShimDevice[] = "/dev/svm_shim";

// Fails (with what to do) when the device is missing or speaks another version.
absl::StatusOr<std::unique_ptr<MirrorSource>> CreateShimSource(const SourceOptions& opts);

// What a svm_shim range fd is attached to (SVM_SHIM_IOC_RANGE_INFO).
struct RangeFdInfo {
  pid_t pid = 0;  // 0: the process exited
  uint64_t start = 0;
  uint64_t len = 0;
};
// Checks that fd, received from an untrusted client, is a svm_shim range fd
// (the kernel names its file "anon_inode:[svm_shim_range]" and it answers
// RANGE_INFO), else INVALID_ARGUMENT "not a svm_shim range fd". Never
// reads, writes or blocks on fd otherwise; works without the module loaded.
absl::StatusOr<RangeFdInfo> InspectRangeFd(int fd);

// The kernel's word (SVM_SHIM_IOC_RANGE_OBJECT) that the range of range_fd
// (checked with InspectRangeFd) is one readable shared mapping of the very
// object object_fd refers to, covering the range: the byte offset of the
// range's start in the object. INVALID_ARGUMENT when it is not (another
// file, a private or anonymous mapping, one that ends inside the range,
// nothing mapped), NOT_FOUND when the process exited, FAILED_PRECONDITION
// when the loaded svm_shim predates the check.
absl::StatusOr<uint64_t> RangeObjectOffset(int range_fd, int object_fd);

}  // namespace svm::source

#endif  // SVM_DAEMON_SOURCE_SHIM_SOURCE_H_
