#include "daemon/source/shared_mapping.h"

#include "absl/strings/str_split.h"
#include "common/proc_parse.h"
#include "daemon/source/shim_source.h"

#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <linux/magic.h>

#include <climits>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
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
  UniqueFd fd;  // only when opened
  struct stat st {};
  uint64_t offset = 0;  // of addr in the object
  bool dax = false;     // device-dax, or a file in DAX state (fsdax)
};

// Whether the object's pages are device (ZONE_DEVICE) memory: a character
// device on the dax bus, or a file the kernel reports in DAX state.
bool IsDax(const std::string& link, const struct stat& st) {
  if (S_ISCHR(st.st_mode)) {
    char subsystem[PATH_MAX];
    const std::string p = absl::StrFormat("/sys/dev/char/%u:%u/subsystem", major(st.st_rdev),
                                          minor(st.st_rdev));
    const ssize_t n = ::readlink(p.c_str(), subsystem, sizeof(subsystem) - 1);
    if (n <= 0) return false;
    subsystem[n] = '\0';
    return absl::EndsWith(subsystem, "/bus/dax");
  }
  struct statx sx {};
  return ::statx(AT_FDCWD, link.c_str(), 0, STATX_BASIC_STATS, &sx) == 0 &&
         (sx.stx_attributes_mask & STATX_ATTR_DAX) != 0 && (sx.stx_attributes & STATX_ATTR_DAX) != 0;
}

// OK when the object can be mapped again: a device file must still exist
// and, when it sits on a bus, be bound to its driver. An unbound device
// (device-dax after `daxctl disable-device`) is torn down; a fresh open and
// mmap of it is exactly what a CPU access never does, and some kernels do
// not survive it (6.1's device_dax check_vma).
absl::Status CheckLive(const struct stat& st) {
  if (!S_ISCHR(st.st_mode)) return absl::OkStatus();
  const unsigned maj = major(st.st_rdev), min = minor(st.st_rdev);
  const std::string dev = absl::StrFormat("/sys/dev/char/%u:%u", maj, min);
  char subsystem[PATH_MAX];
  const ssize_t n = ::readlink((dev + "/subsystem").c_str(), subsystem, sizeof(subsystem) - 1);
  if (n < 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("device %u:%u is gone (%s)", maj, min, std::strerror(errno)));
  }
  subsystem[n] = '\0';
  struct stat ds {};
  if (std::strstr(subsystem, "/bus/") != nullptr && ::stat((dev + "/driver").c_str(), &ds) != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("device %u:%u has no driver bound (disabled)", maj, min));
  }
  return absl::OkStatus();
}

// The size of the pages behind the object, which its mappings must be
// aligned to: a hugetlbfs file's huge page size (mmap refuses an offset
// inside a huge page), else the base page size.
uint64_t ObjectPageSize(int fd) {
  struct statfs fs {};
  if (::fstatfs(fd, &fs) == 0 && static_cast<uint64_t>(fs.f_type) == HUGETLBFS_MAGIC &&
      fs.f_bsize > 0) {
    return static_cast<uint64_t>(fs.f_bsize);
  }
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Maps [offset, offset + len) of fd into m, from the boundary of the
// object's page below offset to the one above its end (a hugetlbfs object
// maps only whole huge pages), so that m->data() is the export's first byte.
absl::Status MapAligned(SharedMapping::Placement& m, int fd, uint64_t offset, uint64_t len,
                        bool writable) {
  m.page_size = ObjectPageSize(fd);
  const uint64_t lead = offset % m.page_size;
  const uint64_t span = (lead + len + m.page_size - 1) / m.page_size * m.page_size;
  void* p = ::mmap(nullptr, span, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd,
                   static_cast<off_t>(offset - lead));
  if (p == MAP_FAILED) return absl::FailedPreconditionError(std::strerror(errno));
  m.base = p;
  m.span = span;
  m.data = static_cast<uint8_t*>(p) + lead;
  return absl::OkStatus();
}

// The object mapped at [addr, addr + len) of pid, found through map_files
// (stat follows the link without opening the object); opened only when
// open is set, and only when it is live.
absl::StatusOr<Located> Locate(pid_t pid, uint64_t addr, uint64_t len, bool open, bool writable) {
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
  auto needs = [](int err) {
    return err == EPERM ? " (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)" : "";
  };
  if (::stat(link.c_str(), &l.st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("stat ", link, ": ", std::strerror(errno), needs(errno)));
  }
  if (auto st = CheckLive(l.st); !st.ok()) return st;
  l.dax = IsDax(link, l.st);
  l.offset = l.vma.offset + (addr - l.vma.start);
  if (S_ISREG(l.st.st_mode) &&
      static_cast<uint64_t>(l.st.st_size) < l.offset + len) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the object is %u bytes, shorter than the export needs (%u)", l.st.st_size, l.offset + len));
  }
  if (!open) return l;
  int fd = ::open(link.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("open ", link, ": ", std::strerror(errno), needs(errno)));
  }
  l.fd.Reset(fd);
  struct stat opened {};
  if (::fstat(fd, &opened) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("fstat ", link, ": ", std::strerror(errno)));
  }
  if (opened.st_dev != l.st.st_dev || opened.st_ino != l.st.st_ino) {
    return absl::FailedPreconditionError("the range was remapped while it was opened");
  }
  return l;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMapping>> SharedMapping::Open(pid_t pid, uint64_t addr,
                                                                   uint64_t len, bool writable) {
  auto l = Locate(pid, addr, len, /*open=*/true, writable);
  if (!l.ok()) return l.status();
  std::unique_ptr<SharedMapping> m(new SharedMapping());
  if (auto st = MapAligned(m->at_, l->fd.get(), l->offset, len, writable); !st.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("map ", l->vma.path, " again: ", st.message()));
  }
  m->len_ = len;
  m->offset_ = l->offset;
  m->dev_ = l->st.st_dev;
  m->ino_ = l->st.st_ino;
  m->object_ = l->vma.path.empty() ? "(unnamed)" : l->vma.path;
  m->dax_ = l->dax;
  m->fd_ = std::move(l->fd);
  return m;
}

absl::StatusOr<std::unique_ptr<SharedMapping>> SharedMapping::OpenObject(UniqueFd object,
                                                                         UniqueFd range_fd,
                                                                         uint64_t len,
                                                                         bool writable) {
  auto offset = RangeObjectOffset(range_fd.get(), object.get());
  if (!offset.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("the deposited object: ", offset.status().message()));
  }
  struct stat st {};
  if (::fstat(object.get(), &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("fstat the deposited object: ", std::strerror(errno)));
  }
  if (auto live = CheckLive(st); !live.ok()) return live;
  if (S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) < *offset + len) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the object is %u bytes, shorter than the export needs (%u)", st.st_size, *offset + len));
  }
  const std::string self = absl::StrCat("/proc/self/fd/", object.get());
  char name[PATH_MAX] = {};
  const ssize_t n = ::readlink(self.c_str(), name, sizeof(name) - 1);
  std::unique_ptr<SharedMapping> m(new SharedMapping());
  if (auto st = MapAligned(m->at_, object.get(), *offset, len, writable); !st.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("map the deposited object: ", st.message()));
  }
  m->len_ = len;
  m->offset_ = *offset;
  m->dev_ = st.st_dev;
  m->ino_ = st.st_ino;
  m->object_ = n > 0 ? std::string(name, static_cast<size_t>(n)) : "(deposited object)";
  m->dax_ = IsDax(self, st);
  m->fd_ = std::move(object);
  m->range_fd_ = std::move(range_fd);
  return m;
}

SharedMapping::~SharedMapping() {
  if (at_.base != nullptr) ::munmap(at_.base, at_.span);
}

absl::Status SharedMapping::Validate(pid_t pid, uint64_t addr) const {
  if (range_fd_.valid()) {  // OpenObject: the kernel's word again, nothing under /proc
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) {
      return absl::FailedPreconditionError(absl::StrCat("fstat the object: ", std::strerror(errno)));
    }
    if (auto live = CheckLive(st); !live.ok()) return live;
    auto offset = RangeObjectOffset(range_fd_.get(), fd_.get());
    if (absl::IsInvalidArgument(offset.status())) {
      return absl::FailedPreconditionError("the range maps another object now");
    }
    if (!offset.ok()) return absl::FailedPreconditionError(offset.status().message());
    if (*offset != offset_) {
      return absl::FailedPreconditionError("the range maps the object at another offset now");
    }
    return absl::OkStatus();
  }
  auto l = Locate(pid, addr, len_, /*open=*/false, /*writable=*/false);
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
