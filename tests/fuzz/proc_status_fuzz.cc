// libFuzzer target: proc::ParseStatus on arbitrary /proc/PID/status text.
#include <cstddef>
#include <cstdint>

#include "common/proc_parse.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto st = svm::proc::ParseStatus(absl::string_view(reinterpret_cast<const char*>(data), size));
  (void)st;
  return 0;
}
