// The object behind a shared mapping of another process (memfd, shmem,
// tmpfs, hugetlbfs, a regular file), mapped a second time into svmd so that
// the zero-copy path can register it with the RDMA device: importers then
// read the exporter's live pages with one-sided READs.
//
// The object is opened through /proc/PID/map_files (CAP_SYS_ADMIN or
// CAP_CHECKPOINT_RESTORE) and mapped shared, read-only by default: svmd
// never writes it. (Kernels before 6.2 pin even a read-only RDMA
// registration with FOLL_FORCE | FOLL_WRITE, which a read-only shared
// mapping refuses with EFAULT; for them the caller asks for a writable
// mapping.) The mapping follows the object, not the exporting process's page
// tables, so the export table re-validates it whenever the process's range
// changes (Validate) and withdraws it when the range no longer maps the same
// object at the same offset, or the object is a device that is no longer
// bound to its driver (device-dax disabled). Validate never opens the
// object; Open opens it only after that check. OpenObject maps an object a
// client handed over instead, checked by the kernel through the client's
// svm_shim range fd: no capability needed.
#ifndef SVM_DAEMON_SOURCE_SHARED_MAPPING_H_
#define SVM_DAEMON_SOURCE_SHARED_MAPPING_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/fd.h"

namespace svm::source {

class SharedMapping {
 public:
  // FAILED_PRECONDITION naming the reason when [addr, addr + len) of pid is
  // not one readable shared mapping of a file-like object that covers it.
  static absl::StatusOr<std::unique_ptr<SharedMapping>> Open(pid_t pid, uint64_t addr, uint64_t len,
                                                             bool writable = false);
  // The zero-copy path without CAP_SYS_ADMIN: the object a client handed
  // svmd beside its svm_shim range fd (kDeposit), mapped only on the
  // kernel's word that range_fd's range is a shared mapping of that very
  // object (RangeObjectOffset, shim_source.h), at the offset the kernel
  // reports; never on the client's. Keeps both descriptors: Validate asks
  // the kernel again through range_fd, and opens nothing under /proc.
  // FAILED_PRECONDITION naming the reason when the range does not map it.
  static absl::StatusOr<std::unique_ptr<SharedMapping>> OpenObject(UniqueFd object, UniqueFd range_fd,
                                                                   uint64_t len, bool writable = false);
  ~SharedMapping();
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;

  // The export's first byte, and its length. The mapping around it runs
  // from the object's page boundary below to the one above (page_size()).
  void* data() const { return at_.data; }
  uint64_t len() const { return len_; }
  // The size of the pages behind the object: a hugetlbfs object's huge page
  // size (2 MiB, 1 GiB), else the base page size. A registration of data()
  // pins (or, ODP, faults) whole pages of this size.
  uint64_t page_size() const { return at_.page_size; }

  // Where the object is mapped in svmd (MapAligned, shared_mapping.cc).
  struct Placement {
    void* base = nullptr;  // at a multiple of page_size in the object
    uint64_t span = 0;     // whole pages of page_size
    void* data = nullptr;  // base + the export's offset within its first page
    uint64_t page_size = 0;
  };
  // The object as /proc/PID/maps names it, e.g. "/memfd:buf (deleted)".
  const std::string& object() const { return object_; }
  // Device memory (ZONE_DEVICE): device-dax, or a file on a filesystem
  // mounted -o dax. Such pages must not be pinned long-term: the kernel
  // forbids it for fsdax (FOLL_LONGTERM), and device-dax frees its pages at
  // unbind without waiting for pins (6.1: unpinning afterwards oopses), so
  // only an ODP registration (no pins; follows mmu notifiers) may cover it.
  bool dax() const { return dax_; }

  // OK when pid's range still maps this object at the same offset, readable
  // and shared, and the object is still long enough; else why not.
  absl::Status Validate(pid_t pid, uint64_t addr) const;

 private:
  SharedMapping() = default;

  UniqueFd fd_;
  UniqueFd range_fd_;  // OpenObject: the range fd the kernel checks the object against
  Placement at_;
  uint64_t len_ = 0;
  uint64_t offset_ = 0;  // of the export's first byte in the object
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  std::string object_;
  bool dax_ = false;
};

}  // namespace svm::source

#endif  // SVM_DAEMON_SOURCE_SHARED_MAPPING_H_
