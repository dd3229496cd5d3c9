// libFuzzer target: proc::ParseMapsLine on arbitrary lines (a process names
// its own mappings, so /proc/PID/maps content is not trusted).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "common/proc_parse.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto m = svm::proc::ParseMapsLine(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  if (m.ok()) {
    // What every caller relies on.
    if (m->start >= m->end || m->perms.size() != 4) std::abort();
    (void)m->shared();
    (void)m->readable();
  }
  return 0;
}
