// What svmd checks in a request before acting on it, as functions of the
// request alone (no daemon, no server), so that the services and the fuzz
// targets (tests/fuzz/control_request_fuzz.cc, peer_request_fuzz.cc) run the
// same code.
//
// Control service (local clients): Validate*Request() are the checks each
// call makes before it looks anything up; a request that fails one is
// answered with that status and nothing else happens. The caller's right
// to the memory (CheckMayExport) and the state-dependent checks (a local
// export of that name, an import of that name) come after, in the service.
//
// Peer service (other svmd daemons): names are looked up, not validated (an
// unknown name is NOT_FOUND, as before); the access list decides
// (CheckAllowed), and everything a peer sent that reaches the log goes
// through LogSafe().
#ifndef SVM_DAEMON_SERVICE_REQUESTS_H_
#define SVM_DAEMON_SERVICE_REQUESTS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "svm/v1/control.pb.h"

namespace svm::service {

// One gRPC read answers with its bytes; gRPC clients take 4 MiB messages by
// default. (libsvm reads through its session, without this limit.)
inline constexpr uint64_t kMaxReadBytes = 1ull << 20;

// An export or import name: 1 to 128 of [A-Za-z0-9._-], starting with a
// letter or digit. INVALID_ARGUMENT otherwise.
absl::Status ValidateName(const std::string& name);

// An export's access list: at most 64 identities as certificates carry them
// (DNS names, URIs, common names): 1-255 printable characters, no spaces or
// commas (svmctl's separator). INVALID_ARGUMENT otherwise.
absl::Status ValidateAllow(const google::protobuf::RepeatedPtrField<std::string>& allow);

// Export: name, len > 0, addr and len page multiples, no overflow, pid >= 0
// (0: the caller), the access list.
absl::Status ValidateExportRequest(const v1::ExportRequest& req);
// Import: name, the local name (as) when given, peer HOST:PORT with a port.
absl::Status ValidateImportRequest(const v1::ImportRequest& req);
// Read: name, 0 < len <= kMaxReadBytes, offset + len does not overflow.
absl::Status ValidateReadRequest(const v1::ReadRequest& req);
// Unexport, Watch and Sync carry a name only: ValidateName.

// Whether a peer proving the identities `peer` may see an export with
// access list `allow`: OK when allow is empty or names one of them,
// PERMISSION_DENIED otherwise. An empty peer (no TLS) passes only an empty
// list. Identities compare byte for byte.
absl::Status CheckAllowed(absl::Span<const std::string> allow, absl::Span<const std::string> peer);

// Text a peer chose (a name, an identity, a node), fit for one log line:
// printable ASCII only (anything else C-escaped, so no line breaks or
// terminal controls reach the log), cut to max_len bytes of input.
std::string LogSafe(absl::string_view text, size_t max_len = 256);

// The warning a refusal by an access list logs: "peer ADDR (IDENTITY,...)
// refused export 'WHAT': WHY" ("unauthenticated" for a peer without
// identities); the peer's identities and WHAT through LogSafe, so the line
// is one printable line whatever the peer sent.
std::string RefusalLogLine(absl::string_view peer, absl::Span<const std::string> names,
                           absl::string_view what, absl::string_view why);

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_REQUESTS_H_
