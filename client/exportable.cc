#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "svm/client.h"

namespace svm {

absl::StatusOr<ExportableMemory> ExportableMemory::Allocate(size_t len, const std::string& name) {
  const long page = ::sysconf(_SC_PAGESIZE);
  if (len == 0) return absl::InvalidArgumentError("allocate: zero length");
  len = (len + static_cast<size_t>(page) - 1) / static_cast<size_t>(page) * static_cast<size_t>(page);
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, "memfd_create");
  if (::ftruncate(fd, static_cast<off_t>(len)) != 0) {
    int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("size the memfd to ", len, " bytes"));
  }
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("map ", len, " bytes of the memfd"));
  }
  return ExportableMemory(static_cast<uint8_t*>(p), len, fd);
}

ExportableMemory::ExportableMemory(ExportableMemory&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), len_(std::exchange(o.len_, 0)), fd_(std::exchange(o.fd_, -1)) {}

ExportableMemory& ExportableMemory::operator=(ExportableMemory&& o) noexcept {
  if (this != &o) {
    Release();
    data_ = std::exchange(o.data_, nullptr);
    len_ = std::exchange(o.len_, 0);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

ExportableMemory::~ExportableMemory() { Release(); }

void ExportableMemory::Release() {
  if (data_ != nullptr) ::munmap(data_, len_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  fd_ = -1;
}

}  // namespace svm
