// libsvm: the C++ client library for svmd.
//
// Consistency (see DESIGN.md section 3): Read returns live data, each page
// as of one instant during the call. An importer's cached pages are dropped
// as soon as an invalidation for them arrives (mapping changes: munmap,
// mremap, madvise, exit, ...); stores by the exporting process become
// visible to importers at Sync points: Sync returns after every importer
// acknowledged the invalidation of each page written since the last Sync.
//
// Results (ExportInfo, ImportInfo, Invalidation, SyncResult, DaemonStatus)
// are libsvm's own structs, in svm/types.h: no installed header names a
// generated protobuf type.
#ifndef SVM_CLIENT_CLIENT_H_
#define SVM_CLIENT_CLIENT_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "svm/types.h"

namespace svm {
inline namespace abi1 {

struct ReadOptions {
  // Bypass the importer's mirror cache (neither use nor fill it).
  bool fresh = false;
};

// One read of a batch (Client::ReadV).
struct ReadOp {
  std::string name;
  uint64_t offset = 0;
  absl::Span<uint8_t> dst;
  ReadOptions opts;
};

struct ReadResult {
  uint64_t len = 0;
  uint64_t seq = 0;  // exporter's invalidation sequence the data is valid for
  uint64_t pages_from_cache = 0;
  uint64_t pages_fetched = 0;
};

// A registered watch: every invalidation of the name after Watch() returned
// is delivered, in order.
class WatchStream {
 public:
  virtual ~WatchStream() = default;
  // The next invalidation; DEADLINE_EXCEEDED when none came within timeout;
  // another error when the stream ended (daemon gone, name withdrawn).
  virtual absl::StatusOr<Invalidation> Next(absl::Duration timeout) = 0;
};

// Memory the zero-copy path can export: a shared mapping of an anonymous
// memfd (shmem). Export() it like any memory; on a node whose svmd runs the
// rdma transport, importers then read it with one-sided RDMA READs (no
// exporter CPU per read) instead of the staged path private memory takes.
// Unmapped and closed on destruction (unexport it first).
class ExportableMemory {
 public:
  // len is rounded up to whole pages; the memory starts zeroed.
  static absl::StatusOr<ExportableMemory> Allocate(size_t len, const std::string& name = "svm");
  ExportableMemory(ExportableMemory&& o) noexcept;
  ExportableMemory& operator=(ExportableMemory&& o) noexcept;
  ~ExportableMemory();

  uint8_t* data() const { return data_; }
  size_t size() const { return len_; }
  // The memfd: for ftruncate (the range then behaves like a truncated file
  // mapping: importers' reads of pages past the end fail) or fd passing.
  int fd() const { return fd_; }

 private:
  ExportableMemory(uint8_t* data, size_t len, int fd) : data_(data), len_(len), fd_(fd) {}
  void Release();
  uint8_t* data_ = nullptr;
  size_t len_ = 0;
  int fd_ = -1;
};

struct MapOptions {
  // Pages fetched per fault beyond the one touched, when faults run
  // sequentially (the first fault of a run fetches one page).
  size_t readahead_pages = 16;
};

// A read-only mapping of an import in this process (Client::Map). Pages
// come from the importer's shared cache; a missing page faults to svmd,
// which fetches it through the coherence core and installs it. An
// invalidation removes the page from every mapping (the next access faults
// again), so an access never sees a page version that was invalidated
// before the access began. A page that cannot be had (the exporting process
// exited, the range is not mapped there) raises SIGBUS in the accessing
// thread, as a truncated file mapping would. Unmapped on destruction;
// destroy every Mapping before the Client it came from. Map() needs
// userfaultfd(2) (unprivileged on Linux 5.11 and later) and an importer
// cache (svmd --cache-mb > 0).
class Mapping {
 public:
  virtual ~Mapping() = default;
  virtual const uint8_t* data() const = 0;
  virtual size_t size() const = 0;
  // Faults [offset, offset + len) in ahead of use, in one batch.
  virtual absl::Status Prefetch(uint64_t offset, uint64_t len) = 0;
  // Faults taken and pages fetched by them (read-ahead included).
  virtual uint64_t faults() const = 0;
  virtual uint64_t pages_fetched() const = 0;
};

struct ExportOptions {
  // The peer identities (TLS certificate DNS/URI subject alternative name,
  // or common name) that may import the export; empty: every peer the
  // daemon authenticates. Others get PERMISSION_DENIED and learn nothing of
  // the export (not its size, not an rkey).
  std::vector<std::string> allow;
};

class Client {
 public:
  // target: "unix:/run/svm/svmd.sock". Opens a session (the data plane)
  // on the daemon's session socket beside it. Allows the daemon to read
  // this process's memory (PR_SET_PTRACER), which exporting one's own
  // memory needs.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const std::string& target);
  virtual ~Client() = default;

  // Exports [addr, addr + len) of this process.
  virtual absl::StatusOr<ExportInfo> Export(const std::string& name, const void* addr, size_t len,
                                            const ExportOptions& opts = {}) = 0;
  // Exports memory of another process; the caller must be allowed to ptrace it.
  virtual absl::StatusOr<ExportInfo> ExportPid(const std::string& name, pid_t pid, uint64_t addr,
                                               uint64_t len, const ExportOptions& opts = {}) = 0;
  virtual absl::Status Unexport(const std::string& name) = 0;
  virtual absl::StatusOr<std::vector<ExportInfo>> ListExports() = 0;

  // Imports export `name` of the daemon at peer (HOST:PORT) as `as` (default: name).
  virtual absl::StatusOr<ImportInfo> Import(const std::string& peer, const std::string& name,
                                            const std::string& as = "") = 0;
  virtual absl::StatusOr<std::vector<ImportInfo>> ListImports() = 0;

  // Reads dst.size() bytes at offset of an import (or of a local export).
  // Pages of an import that are in its importer's cache are copied in this
  // process, without a message to svmd; the rest travel through the
  // session's rings (never through gRPC). Safe to call from several threads.
  virtual absl::StatusOr<ReadResult> Read(const std::string& name, uint64_t offset,
                                          absl::Span<uint8_t> dst, ReadOptions opts = {}) = 0;
  // Several reads at once: every missing range of every op is in flight
  // together. One result per op, in order.
  virtual std::vector<absl::StatusOr<ReadResult>> ReadV(absl::Span<const ReadOp> ops) = 0;
  // Maps import `name` read-only into this process (see Mapping).
  virtual absl::StatusOr<std::unique_ptr<Mapping>> Map(const std::string& name,
                                                      MapOptions opts = {}) = 0;
  virtual absl::StatusOr<std::unique_ptr<WatchStream>> Watch(const std::string& name) = 0;
  virtual absl::StatusOr<SyncResult> Sync(const std::string& name) = 0;
  virtual absl::StatusOr<DaemonStatus> Status() = 0;
};

}  // namespace abi1
}  // namespace svm

#endif  // SVM_CLIENT_CLIENT_H_
