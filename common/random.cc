#include "common/random.h"

#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/escaping.h"
#include "common/check.h"

namespace svm {

void RandomBytes(void* buf, size_t len) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    const ssize_t n = ::getrandom(p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    SVM_CHECK(n > 0);  // getrandom(2) cannot fail with valid arguments
    p += n;
    len -= static_cast<size_t>(n);
  }
}

uint64_t RandomU64() {
  uint64_t v;
  RandomBytes(&v, sizeof(v));
  return v;
}

std::string RandomHex(size_t len) {
  std::string raw(len, '\0');
  RandomBytes(raw.data(), len);
  return absl::BytesToHexString(raw);
}

}  // namespace svm
