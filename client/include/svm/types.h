// libsvm's result types: what Client returns about exports, imports,
// invalidations, Sync and the daemon. Plain structs owned by libsvm, so a
// program using libsvm depends neither on the protobuf version libsvm was
// built with nor on its generated headers (docs/operations.md, "libsvm API
// and ABI").
//
// Compatibility: within a 0.x minor version, fields keep their names,
// types and meaning; a later version may add fields (at the end of a
// struct) and enumerators, so do not aggregate-initialise these structs
// positionally and handle unknown InvalidationKind values. Everything here
// lives in the inline namespace svm::abi1: a program that links objects
// built against an incompatible libsvm fails to link instead of misreading
// memory.
#ifndef SVM_CLIENT_TYPES_H_
#define SVM_CLIENT_TYPES_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/time/time.h"

namespace svm {
inline namespace abi1 {

// Why a range of pages stopped being valid. The values are those of the
// control API (svm.v1.InvalidationKind) and of svm_invalidation.kind in
// the C API (svm/svm.h).
enum class InvalidationKind : uint32_t {
  kUnspecified = 0,
  kUnmap = 1,       // pages left the mapping (munmap, MADV_DONTNEED, ...)
  kRemap = 2,       // a page is now backed by another frame or object
  kWrite = 3,       // content changed (found by Sync or by a scrub)
  kProtection = 4,  // protection changed (mprotect)
  kExit = 5,        // the exporting process exited
  kUnexport = 6,    // the export was withdrawn
  kReconnect = 7,   // the connection to the exporter was lost
  kOverflow = 8,    // events were collapsed: the whole range
  kOther = 9,
};

// "unmap", "remap", ..., "other" (svmctl watch --verbose); "unspecified"
// for kUnspecified and for values this libsvm does not know.
std::string_view InvalidationKindName(InvalidationKind kind);

// One invalidation of [first_page, first_page + npages) of an export
// (WatchStream::Next).
struct Invalidation {
  std::string name;  // the watched import or export
  uint64_t first_page = 0;
  uint64_t npages = 0;
  uint64_t seq = 0;  // the exporter's invalidation sequence number of this event
  InvalidationKind kind = InvalidationKind::kUnspecified;
  // CLOCK_MONOTONIC (ns) on the exporter's host when the change was detected.
  uint64_t detected_ns = 0;
  // CLOCK_MONOTONIC (ns) on this node when its svmd received the event (0
  // for an export's own events).
  uint64_t received_ns = 0;
};

// An export of this node (Client::Export, ExportPid, ListExports).
struct ExportInfo {
  std::string name;
  pid_t pid = 0;  // the exporting process
  uint64_t addr = 0;
  uint64_t len = 0;
  uint64_t page_size = 0;
  std::string source;  // how changes are detected: "procfs" or "shim"
  // Data paths offered, in preference order, e.g. "staged/pinned,tcp" (the
  // rdma transport's path with its registration, then tcp).
  std::string path;
  uint64_t seq = 0;          // current invalidation sequence
  uint32_t subscribers = 0;  // importers
  bool gone = false;         // the exporting process exited
  std::vector<std::string> allow;  // ExportOptions::allow; empty: every authenticated peer
  // The size of the pages the zero-copy registration covers (2 MiB for a
  // hugetlbfs memfd); 0 while the export has none.
  uint64_t zero_copy_page_size = 0;
  // ListExports only: the bytes of the export the process maps now, by the
  // size of the page that maps them (4096; 2 MiB for a transparent or
  // hugetlbfs huge page; 1 GiB), ascending; unmapped pages are not counted.
  // The shim source fills it; the procfs source cannot see page sizes.
  struct PageSizeBytes {
    uint64_t page_size = 0;
    uint64_t bytes = 0;
  };
  std::vector<PageSizeBytes> mapped;
};

// An import of this node (Client::Import, ListImports).
struct ImportInfo {
  std::string name;  // local name
  std::string remote_name;
  std::string peer;  // HOST:PORT of the exporter's peer listener
  uint64_t len = 0;
  uint64_t page_size = 0;
  // The data connection's path: "tcp", "staged/odp" or "staged/pinned"
  // (the importer's registration of its receive area).
  std::string path;
  std::string state;  // "connected", "disconnected", "gone"
  uint64_t seq = 0;   // highest invalidation sequence received
  uint64_t cached_pages = 0;
  uint64_t invalidations = 0;
  // Set when an RDMA connection to the peer could not be set up and the
  // link fell back to tcp: why (the last attempt's error).
  std::string fallback_reason;
};

// What Client::Sync did: returned once every importer acknowledged.
struct SyncResult {
  uint64_t pages_invalidated = 0;
  uint64_t seq = 0;
  uint32_t subscribers_acked = 0;
};

// The RDMA device the daemon's rdma transport runs on.
struct RdmaDeviceStatus {
  std::string device;      // e.g. "rxe0"
  uint32_t port = 0;
  std::string port_state;  // queried live, as ibv_port_state_str(): "active", "down", ...
  std::string gid;         // "gid[1] ::ffff:10.77.0.1 (RoCE v2)"
  uint32_t active_mtu = 0;  // bytes
  bool odp_rc_read = false;  // the device reports on-demand paging for RC RDMA READ
  std::string odp_check;     // the start-up ODP data check: "passed", "not run", "failed: WHY"
  std::string registration;  // data buffers: "odp" or "pinned"
  std::string liveness_listen;  // the rdma transport's TCP liveness listener
};

// The daemon's configuration and state (Client::Status).
struct DaemonStatus {
  std::string node;
  std::string version;
  pid_t pid = 0;
  std::string control;      // the control socket's path
  std::string peer_listen;  // actual address, port resolved
  std::string data_listen;
  std::string source;
  std::string transport;                // configured: "auto", "rdma" or "tcp"
  std::vector<std::string> transports;  // running, in preference order
  std::optional<RdmaDeviceStatus> rdma;  // set when the rdma transport runs
  std::string rdma_unavailable;          // otherwise: why not
  uint32_t exports = 0;
  uint32_t imports = 0;
  uint32_t peers = 0;  // peers whose links are up
  absl::Duration uptime;
  std::map<std::string, uint64_t> counters;
  std::string sync_detection;
  std::string session_socket;  // the client data plane's socket
};

}  // namespace abi1
}  // namespace svm

#endif  // SVM_CLIENT_TYPES_H_
