#include "daemon/source/shared_mapping.h"

#include "absl/strings/str_split.h"
#include "common/proc_parse.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace svm::source {
namespace {

using MapsLine = proc::MapsLine;

absl::StatusOr<MapsLine> FindVma(pid_t pid, uint64_t addr) {
  const std::string file = absl::StrCat("/proc/", pid, "/maps");
  auto text = proc::ReadSmallFile(file);
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("cannot read ", file));
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipEmpty())) {
    auto m = proc::ParseMapsLine(line);
    if (!m.ok()) return absl::DataLossError(absl::StrCat(file, ": ", m.status().message()));
    if (addr < m->start || addr >= m->end) continue;
    return *std::move(m);
  }
  return absl::FailedPreconditionError(absl::StrFormat("0x%x is not mapped", addr));
}

struct Located {
  MapsLine vma;
  UniqueFd fd;
  struct stat st {};
  uint64_t offset = 0;  // of addr in the object
};

// The object mapped at [addr, addr + len) of pid, opened through map_files.
absl::StatusOr<Located> Locate(pid_t pid, uint64_t addr, uint64_t len, bool writable) {
  auto vma = FindVma(pid, addr);
  if (!vma.ok()) return vma.status();
  Located l;
  l.vma = *vma;
  if (len > l.vma.end - addr) {
    return absl::FailedPreconditionError("the range spans more than one mapping");
  }
  if (l.vma.perms[3] != 's') return absl::FailedPreconditionError("private mapping");
  if (l.vma.perms[0] != 'r') return absl::FailedPreconditionError("mapping is not readable");
  if (l.vma.inode == 0) return absl::FailedPreconditionError("not backed by a file-like object");
  const std::string link =
      absl::StrFormat("/proc/%d/map_files/%x-%x", pid, l.vma.start, l.vma.end);
  int fd = ::open(link.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("open ", link, ": ", std::strerror(errno),
                     errno == EPERM ? " (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)" : ""));
  }
  l.fd.Reset(fd);
  if (::fstat(fd, &l.st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("fstat ", link, ": ", std::strerror(errno)));
  }
  l.offset = l.vma.offset + (addr - l.vma.start);
  if (S_ISREG(l.st.st_mode) &&
      static_cast<uint64_t>(l.st.st_size) < l.offset + len) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the object is %u bytes, shorter than the export needs (%u)", l.st.st_size, l.offset + len));
  }
  return l;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMapping>> SharedMapping::Open(pid_t pid, uint64_t addr,
                                                                   uint64_t len, bool writable) {
  auto l = Locate(pid, addr, len, writable);
  if (!l.ok()) return l.status();
  std::unique_ptr<SharedMapping> m(new SharedMapping());
  void* p = ::mmap(nullptr, len, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED,
                   l->fd.get(), static_cast<off_t>(l->offset));
  if (p == MAP_FAILED) {
    return absl::FailedPreconditionError(
        absl::StrCat("map ", l->vma.path, " again: ", std::strerror(errno)));
  }
  m->data_ = p;
  m->len_ = len;
  m->offset_ = l->offset;
  m->dev_ = l->st.st_dev;
  m->ino_ = l->st.st_ino;
  m->object_ = l->vma.path.empty() ? "(unnamed)" : l->vma.path;
  m->fd_ = std::move(l->fd);
  return m;
}

SharedMapping::~SharedMapping() {
  if (data_ != nullptr) ::munmap(data_, len_);
}

absl::Status SharedMapping::Validate(pid_t pid, uint64_t addr) const {
  auto l = Locate(pid, addr, len_, /*writable=*/false);
  if (!l.ok()) return l.status();
  if (l->st.st_dev != dev_ || l->st.st_ino != ino_) {
    return absl::FailedPreconditionError("the range maps another object now");
  }
  if (l->offset != offset_) {
    return absl::FailedPreconditionError("the range maps the object at another offset now");
  }
  return absl::OkStatus();
}

}  // namespace svm::source
