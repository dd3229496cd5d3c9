#include <cstdio>
#include <cstdlib>

#include "common/check.h"

namespace svm {

void CheckFailed(const char* file, int line, const char* cond) {
  std::fprintf(stderr, "svm: check failed at %s:%d: %s\n", file, line, cond);
  std::abort();
}

}  // namespace svm
