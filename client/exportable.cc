#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/range_fd.h"
#include "svm/client.h"

namespace svm {
namespace {

// This process's ExportableMemory allocations: start -> (length, memfd).
struct Allocations {
  absl::Mutex mu;
  std::map<uintptr_t, std::pair<size_t, int>> by_start ABSL_GUARDED_BY(mu);
};
Allocations& Live() {
  static Allocations* const a = new Allocations;  // never destroyed: used until exit
  return *a;
}

}  // namespace

namespace internal {
int ExportableObjectFd(uint64_t addr, uint64_t len) {
  Allocations& a = Live();
  absl::MutexLock l(&a.mu);
  auto it = a.by_start.upper_bound(static_cast<uintptr_t>(addr));
  if (it == a.by_start.begin()) return -1;
  --it;
  const uint64_t start = it->first, size = it->second.first;
  if (addr < start || len > size || addr - start > size - len) return -1;
  return it->second.second;
}
}  // namespace internal

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
  {
    Allocations& a = Live();
    absl::MutexLock l(&a.mu);
    a.by_start[reinterpret_cast<uintptr_t>(p)] = {len, fd};
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
  if (data_ != nullptr) {
    Allocations& a = Live();
    absl::MutexLock l(&a.mu);
    a.by_start.erase(reinterpret_cast<uintptr_t>(data_));
  }
  if (data_ != nullptr) ::munmap(data_, len_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  fd_ = -1;
}

}  // namespace svm
