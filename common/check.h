// Invariant checks: a broken invariant is a bug, so crash loudly with the
// place and the condition (absl's CHECK macros are newer than Debian 12's abseil).
#ifndef SVM_COMMON_CHECK_H_
#define SVM_COMMON_CHECK_H_

namespace svm {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond);
}  // namespace svm

#define SVM_CHECK(cond)                                  \
  do {                                                   \
    if (!(cond)) ::svm::CheckFailed(__FILE__, __LINE__, #cond); \
  } while (0)

#endif  // SVM_COMMON_CHECK_H_
