// Parsers of what a session's client sends: socket messages and ring
// entries. Everything a client writes is untrusted input; these functions
// are pure (no I/O) so that they can be fuzzed (tests/fuzz/session_fuzz.cc).
#ifndef SVM_DAEMON_SESSION_VALIDATE_H_
#define SVM_DAEMON_SESSION_VALIDATE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/session/abi.h"

namespace svm::session {

// A request taken from the submission ring, checked.
struct ReadRequest {
  uint64_t user_data = 0;
  uint32_t handle = 0;
  uint64_t offset = 0;
  uint64_t len = 0;
  uint64_t data_offset = 0;
  bool fresh = false;
  bool fill = false;
  bool in_cache = false;  // kInCache: the bytes may stay in the shared cache
  bool nop = false;
};

struct SqeLimits {
  uint64_t data_size = 0;              // of the session's data area
  std::vector<uint64_t> handle_len;    // the length of each open handle's import or export
};

// The largest read one entry may ask for: the data area bounds it anyway.
inline constexpr uint64_t kMaxEntryLen = 64ull << 20;

// Checks one entry: a known opcode, no unknown flags, an open handle, a
// range inside the import and inside the data area (no overflow).
absl::StatusOr<ReadRequest> ParseSqe(const abi::Sqe& e, const SqeLimits& lim);

// A message from the client on the session socket.
struct ClientMsg {
  abi::MsgType type;
  std::string name;  // kOpen, kWatch
  uint32_t watch = 0;  // kUnwatch
};
absl::StatusOr<ClientMsg> ParseClientMsg(const void* buf, size_t len);

}  // namespace svm::session

#endif  // SVM_DAEMON_SESSION_VALIDATE_H_
