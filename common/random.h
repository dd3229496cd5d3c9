// Randomness for identifiers and secrets: getrandom(2), the kernel's CSPRNG,
// never a user-space generator seeded a byte at a time.
#ifndef SVM_COMMON_RANDOM_H_
#define SVM_COMMON_RANDOM_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace svm {

// Fills buf; crashes if the kernel cannot (it blocks only before the
// kernel's pool is initialised at boot).
void RandomBytes(void* buf, size_t len);
uint64_t RandomU64();
// len random bytes as 2 * len lowercase hex digits.
std::string RandomHex(size_t len);

}  // namespace svm

#endif  // SVM_COMMON_RANDOM_H_
