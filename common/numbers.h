#ifndef SVM_COMMON_NUMBERS_H_
#define SVM_COMMON_NUMBERS_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace svm {

// Parses decimal or 0x-prefixed hexadecimal; rejects signs, junk and overflow.
absl::StatusOr<uint64_t> ParseU64(absl::string_view text);

struct HostPort {
  std::string host;
  uint16_t port = 0;
};
// "HOST:PORT" or "[V6]:PORT"; port 0 is allowed (bind to any).
absl::StatusOr<HostPort> ParseHostPort(absl::string_view text);

}  // namespace svm

#endif  // SVM_COMMON_NUMBERS_H_
