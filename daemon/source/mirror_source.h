// The mirror-source seam: how the daemon sees a process's memory. Two
// implementations share this interface: procfs (no kernel module:
// process_vm_readv, /proc/PID/pagemap polling, pidfd) and the driver shim
// (/dev/svm_shim: hmm_range_fault and an mmu interval notifier).
#ifndef SVM_DAEMON_SOURCE_MIRROR_SOURCE_H_
#define SVM_DAEMON_SOURCE_MIRROR_SOURCE_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/fd.h"

namespace svm::source {

inline constexpr uint64_t kPageSize = 4096;

// Values match svm.v1.InvalidationKind.
enum class ChangeKind : uint32_t {
  kUnmap = 1,
  kRemap = 2,
  kWrite = 3,
  kProtection = 4,
  kExit = 5,
  kUnexport = 6,
  kReconnect = 7,
  kOverflow = 8,
  kOther = 9,
};
const char* ChangeKindName(ChangeKind k);

// Pages [first_page, first_page + npages) of a range stopped being valid.
struct Change {
  uint64_t first_page = 0;
  uint64_t npages = 0;
  ChangeKind kind = ChangeKind::kOther;
  uint64_t detected_ns = 0;  // CLOCK_MONOTONIC when the source saw it
};

// Receives the changes of one attached range, on the source's own thread.
// It must not block for long and must not call back into the range.
using ChangeSink = std::function<void(const Change&)>;

// One attached range of one process. Destroying it detaches: no sink call
// starts after the destructor returns.
class MirrorRange {
 public:
  virtual ~MirrorRange() = default;

  // Copies dst.size() bytes at offset (within the range) as a CPU read by
  // the process would see them, each page from one consistent instant.
  // A page that is not mapped fails the whole read (FAILED_PRECONDITION);
  // an exited process gives NOT_FOUND.
  virtual absl::Status Read(uint64_t offset, absl::Span<uint8_t> dst) = 0;

  // True when the source can miss mapping changes that keep the page frame
  // (frame reuse after munmap + mmap): the daemon then compares the content
  // of pages held by importers periodically, not only at Sync.
  virtual bool NeedsScrub() const = 0;

  // Reports pending mapping changes now rather than at the next poll, so a
  // content comparison that follows sees them classified by their cause.
  virtual void Refresh() {}

  // Bytes of the range mapped now, by the size of the page that maps them
  // (page size -> bytes); unmapped pages are not counted. UNIMPLEMENTED
  // when the source cannot see page sizes (procfs).
  virtual absl::StatusOr<std::map<uint64_t, uint64_t>> MappedPageSizes() {
    return absl::UnimplementedError("this source cannot see page sizes");
  }
};

struct SourceOptions {
  absl::Duration poll_interval = absl::Milliseconds(10);
};

class MirrorSource {
 public:
  virtual ~MirrorSource() = default;
  virtual const char* name() const = 0;

  // Attaches to [addr, addr + len) of pid. The caller has validated
  // alignment, overflow and permission; the source checks the range is
  // mapped and that the daemon can access the process.
  virtual absl::StatusOr<std::unique_ptr<MirrorRange>> Attach(pid_t pid, uint64_t addr,
                                                              uint64_t len, ChangeSink sink) = 0;

  // Whether Adopt works: the source mirrors through svm_shim range fds.
  virtual bool AcceptsRangeFds() const { return false; }
  // Mirrors [addr, addr + len) through a range fd a client attached (and
  // so proved its right to): svmd itself needs no right to the process.
  // The fd was checked by InspectRangeFd (shim_source.h) and names pid's
  // range [addr, addr + len) exactly; the source checks it is mapped.
  virtual absl::StatusOr<std::unique_ptr<MirrorRange>> Adopt(UniqueFd /*range_fd*/, pid_t /*pid*/,
                                                             uint64_t /*addr*/, uint64_t /*len*/,
                                                             ChangeSink /*sink*/) {
    return absl::FailedPreconditionError(absl::StrCat("the ", name(), " source takes no range fds"));
  }
};

// which: "auto" (shim when /dev/svm_shim exists, else procfs), "shim", "procfs".
absl::StatusOr<std::unique_ptr<MirrorSource>> CreateMirrorSource(absl::string_view which,
                                                                 const SourceOptions& opts);

// CLOCK_MONOTONIC in nanoseconds.
uint64_t MonotonicNs();

}  // namespace svm::source

#endif  // SVM_DAEMON_SOURCE_MIRROR_SOURCE_H_
