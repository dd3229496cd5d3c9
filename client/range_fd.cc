#include "client/range_fd.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "driver-shim/include/uapi/linux/svm_shim.h"

namespace svm::internal {

absl::StatusOr<uint64_t> DepositRange(Session& session, pid_t pid, uint64_t addr, uint64_t len,
                                      int object_fd) {
  if (pid == 0) pid = ::getpid();
  const int dev = ::open("/dev/svm_shim", O_RDWR | O_CLOEXEC);
  if (dev < 0) return 0;  // no shim, or not in its group: svmd decides
  svm_shim_attach a{};
  a.flags = SVM_SHIM_ATTACH_PID;
  a.target = static_cast<uint64_t>(pid);
  a.start = addr;
  a.length = len;
  a.queue_len = 4096;  // as svmd's own attach
  const int fd = ::ioctl(dev, SVM_SHIM_IOC_ATTACH, &a);
  const int err = errno;
  ::close(dev);
  if (fd < 0) {
    if (err == EPERM || err == EACCES) {
      return absl::PermissionDeniedError(absl::StrCat(
          "the kernel refused to attach svm_shim to process ", pid, " (", std::strerror(err),
          "): this process may not ptrace it"));
    }
    return 0;  // a bad range or a gone process: svmd says which
  }
  auto token = session.Deposit(fd, object_fd);
  ::close(fd);  // svmd holds its own copy now
  return token;
}

}  // namespace svm::internal
