// RAII ownership of file descriptors and errno-to-Status conversion.
#ifndef SVM_COMMON_FD_H_
#define SVM_COMMON_FD_H_

#include <unistd.h>

#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace svm {

// Converts errno at the call site into a Status carrying what was attempted.
absl::Status ErrnoStatus(int err, absl::string_view what);

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) Reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release() { return std::exchange(fd_, -1); }
  void Reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// Full-length write/read on a blocking descriptor, retrying EINTR and short
// transfers. ReadFull returns OUT_OF_RANGE on a clean EOF before any byte.
absl::Status WriteFull(int fd, const void* buf, size_t len);
absl::Status ReadFull(int fd, void* buf, size_t len);

}  // namespace svm

#endif  // SVM_COMMON_FD_H_
