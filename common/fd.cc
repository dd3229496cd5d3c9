#include "common/fd.h"

#include <cerrno>
#include <sys/socket.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace svm {

absl::Status ErrnoStatus(int err, absl::string_view what) {
  return absl::Status(absl::ErrnoToStatusCode(err), absl::StrCat(what, ": ", std::strerror(err)));
}

absl::Status WriteFull(int fd, const void* buf, size_t len) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == ENOTSOCK) n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "write");
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status ReadFull(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::read(fd, p + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read");
    }
    if (n == 0) {
      return done == 0 ? absl::OutOfRangeError("end of stream")
                       : absl::DataLossError("connection closed mid-message");
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace svm
