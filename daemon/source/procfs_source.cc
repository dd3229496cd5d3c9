#include "daemon/source/procfs_source.h"

#include "absl/strings/str_split.h"
#include "common/proc_parse.h"

#include "daemon/source/shim_source.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/check.h"
#include "common/fd.h"
#include "common/log.h"

namespace svm::source {

uint64_t MonotonicNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

const char* ChangeKindName(ChangeKind k) {
  switch (k) {
    case ChangeKind::kUnmap: return "unmap";
    case ChangeKind::kRemap: return "remap";
    case ChangeKind::kWrite: return "write";
    case ChangeKind::kProtection: return "protection";
    case ChangeKind::kExit: return "exit";
    case ChangeKind::kUnexport: return "unexport";
    case ChangeKind::kReconnect: return "reconnect";
    case ChangeKind::kOverflow: return "overflow";
    case ChangeKind::kOther: return "other";
  }
  return "unknown";
}

namespace {

constexpr uint64_t kPmPresent = 1ull << 63;
constexpr uint64_t kPmSwapped = 1ull << 62;
constexpr uint64_t kPmFile = 1ull << 61;
constexpr uint64_t kPmPfnMask = (1ull << 55) - 1;

struct Vma {
  uint64_t start = 0, end = 0, pgoff = 0, inode = 0;  // pgoff: file offset in bytes
  std::string perms, dev;
  bool operator==(const Vma&) const = default;
};

absl::StatusOr<std::vector<Vma>> ReadVmas(pid_t pid, uint64_t addr, uint64_t len) {
  auto text = proc::ReadSmallFile(absl::StrCat("/proc/", pid, "/maps"));
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
  std::vector<Vma> out;
  size_t lines = 0;
  const uint64_t end = addr + len;
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipEmpty())) {
    auto m = proc::ParseMapsLine(line);
    if (!m.ok()) return absl::DataLossError(absl::StrCat("process ", pid, ": ", m.status().message()));
    ++lines;
    if (m->end <= addr || m->start >= end) continue;
    Vma v;
    v.start = m->start;
    v.end = m->end;
    v.pgoff = m->offset;
    v.inode = m->inode;
    v.perms = m->perms;
    v.dev = absl::StrFormat("%02x:%02x", m->dev_major, m->dev_minor);
    out.push_back(std::move(v));
  }
  // A process being torn down (or a zombie) lists no mappings at all: that
  // is not "everything was unmapped", the exit is reported by the pidfd.
  if (lines == 0) return absl::NotFoundError(absl::StrCat("process ", pid, " has no address space"));
  return out;
}

int PidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

class ProcfsSource;

class ProcfsRange final : public MirrorRange {
 public:
  ProcfsRange(ProcfsSource* src, pid_t pid, uint64_t addr, uint64_t len, UniqueFd pidfd,
              UniqueFd pagemap, ChangeSink sink)
      : src_(src), pid_(pid), addr_(addr), npages_(len / kPageSize), pidfd_(std::move(pidfd)),
        pagemap_(std::move(pagemap)), sink_(std::move(sink)) {}
  ~ProcfsRange() override;

  absl::Status Read(uint64_t offset, absl::Span<uint8_t> dst) override;
  bool NeedsScrub() const override { return true; }
  void Refresh() override;

  // Takes the first snapshot, the baseline later polls compare against.
  absl::Status Baseline();
  // Called by the poller thread only (under the source's lock).
  void Poll();

 private:
  absl::Status ReadPagemap(std::vector<uint64_t>* out);
  void Emit(uint64_t first, uint64_t n, ChangeKind kind, uint64_t now);

  ProcfsSource* const src_;
  const pid_t pid_;
  const uint64_t addr_;
  const uint64_t npages_;
  UniqueFd pidfd_;
  UniqueFd pagemap_;
  ChangeSink sink_;
  // Poller-thread state.
  std::vector<uint64_t> entries_;
  std::vector<Vma> vmas_;
  bool exited_ = false;
};

class ProcfsSource final : public MirrorSource {
 public:
  explicit ProcfsSource(const SourceOptions& opts) : opts_(opts) {
    poller_ = std::thread([this] { Loop(); });
  }
  ~ProcfsSource() override {
    {
      absl::MutexLock l(&mu_);
      stopping_ = true;
    }
    poller_.join();
  }

  const char* name() const override { return "procfs"; }

  absl::StatusOr<std::unique_ptr<MirrorRange>> Attach(pid_t pid, uint64_t addr, uint64_t len,
                                                      ChangeSink sink) override {
    UniqueFd pidfd(PidfdOpen(pid));
    if (!pidfd.valid()) {
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
      return ErrnoStatus(errno, absl::StrCat("pidfd_open ", pid));
    }
    UniqueFd pagemap(::open(absl::StrCat("/proc/", pid, "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
    if (!pagemap.valid()) {
      if (errno == EACCES || errno == EPERM) {
        return absl::PermissionDeniedError(absl::StrCat(
            "the daemon may not access process ", pid,
            " (it needs ptrace access: run it as root or let the process call PR_SET_PTRACER)"));
      }
      if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
      return ErrnoStatus(errno, absl::StrCat("open /proc/", pid, "/pagemap"));
    }
    if (auto st = CheckMapped(pid, addr, len); !st.ok()) return st;
    auto range = std::make_unique<ProcfsRange>(this, pid, addr, len, std::move(pidfd),
                                               std::move(pagemap), std::move(sink));
    if (auto st = range->Baseline(); !st.ok()) return st;
    absl::MutexLock l(&mu_);
    ranges_.push_back(range.get());
    return range;
  }

  void PollNow(ProcfsRange* r) {
    absl::MutexLock l(&mu_);
    r->Poll();
  }

  void Remove(ProcfsRange* r) {
    absl::MutexLock l(&mu_);
    ranges_.erase(std::remove(ranges_.begin(), ranges_.end(), r), ranges_.end());
  }

 private:
  void Loop() {
    absl::MutexLock l(&mu_);
    while (!stopping_) {
      for (ProcfsRange* r : ranges_) r->Poll();
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), opts_.poll_interval);
    }
  }

  const SourceOptions opts_;
  absl::Mutex mu_;  // guards ranges_ and serialises polls with Remove()
  std::vector<ProcfsRange*> ranges_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread poller_;
};

ProcfsRange::~ProcfsRange() { src_->Remove(this); }

void ProcfsRange::Refresh() { src_->PollNow(this); }

absl::Status ProcfsRange::ReadPagemap(std::vector<uint64_t>* out) {
  out->resize(npages_);
  const size_t bytes = npages_ * sizeof(uint64_t);
  const off_t off = static_cast<off_t>(addr_ / kPageSize * sizeof(uint64_t));
  size_t done = 0;
  auto* p = reinterpret_cast<char*>(out->data());
  while (done < bytes) {
    ssize_t n = ::pread(pagemap_.get(), p + done, bytes - done, off + static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("read /proc/", pid_, "/pagemap"));
    }
    if (n == 0) return absl::NotFoundError(absl::StrCat("process ", pid_, " has no address space"));
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status ProcfsRange::Baseline() {
  if (auto st = ReadPagemap(&entries_); !st.ok()) return st;
  auto v = ReadVmas(pid_, addr_, npages_ * kPageSize);
  if (!v.ok()) return v.status();
  vmas_ = std::move(*v);
  return absl::OkStatus();
}

void ProcfsRange::Emit(uint64_t first, uint64_t n, ChangeKind kind, uint64_t now) {
  sink_(Change{first, n, kind, now});
}

namespace {

// Classifies the change of one page's pagemap entry; kOther means none that
// can invalidate a copy (swap-out and swap-in keep the content; a page
// appearing where there was none cannot have been copied).
ChangeKind Classify(uint64_t before, uint64_t after) {
  if (before & kPmPresent) {
    if (!(after & (kPmPresent | kPmSwapped))) return ChangeKind::kUnmap;
    if ((after & kPmPresent) &&
        (((before ^ after) & kPmPfnMask) != 0 || ((before ^ after) & kPmFile) != 0)) {
      return ChangeKind::kRemap;
    }
    return ChangeKind::kOther;
  }
  if (before & kPmSwapped) {
    if (!(after & (kPmPresent | kPmSwapped))) return ChangeKind::kUnmap;
    if ((after & kPmSwapped) && before != after) return ChangeKind::kRemap;
  }
  return ChangeKind::kOther;
}

}  // namespace

void ProcfsRange::Poll() {
  if (exited_) return;
  const uint64_t now = MonotonicNs();
  pollfd p{pidfd_.get(), POLLIN, 0};
  if (::poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) {
    exited_ = true;
    Emit(0, npages_, ChangeKind::kExit, now);
    return;
  }
  std::vector<uint64_t> fresh;
  if (!ReadPagemap(&fresh).ok()) return;  // exit is reported through the pidfd
  auto vmas = ReadVmas(pid_, addr_, npages_ * kPageSize);
  if (!vmas.ok()) return;

  // Per page: the kind of change, kOther for none. Maps differences are
  // computed only when the VMA list changed, which is rare.
  std::vector<ChangeKind> kinds(npages_, ChangeKind::kOther);
  for (uint64_t i = 0; i < npages_; ++i) kinds[i] = Classify(entries_[i], fresh[i]);
  if (*vmas != vmas_) {
    auto find = [](const std::vector<Vma>& list, uint64_t a) -> const Vma* {
      for (const Vma& v : list) {
        if (a >= v.start && a < v.end) return &v;
      }
      return nullptr;
    };
    for (uint64_t i = 0; i < npages_; ++i) {
      const uint64_t a = addr_ + i * kPageSize;
      const Vma* o = find(vmas_, a);
      const Vma* n = find(*vmas, a);
      if (o == nullptr) continue;
      if (n == nullptr) {
        kinds[i] = ChangeKind::kUnmap;
      } else if (o->inode != n->inode || o->dev != n->dev ||
                 // maps prints the file offset in bytes, and 0 for anonymous memory
                 (o->inode != 0 && o->pgoff + (a - o->start) != n->pgoff + (a - n->start))) {
        kinds[i] = ChangeKind::kRemap;
      } else if (o->perms != n->perms && kinds[i] == ChangeKind::kOther) {
        kinds[i] = ChangeKind::kProtection;
      }
    }
    vmas_ = std::move(*vmas);
  }
  entries_ = std::move(fresh);

  // Report runs of equally classified pages.
  uint64_t i = 0;
  while (i < npages_) {
    if (kinds[i] == ChangeKind::kOther) {
      ++i;
      continue;
    }
    uint64_t j = i + 1;
    while (j < npages_ && kinds[j] == kinds[i]) ++j;
    Emit(i, j - i, kinds[i], now);
    i = j;
  }
}

absl::Status ProcfsRange::Read(uint64_t offset, absl::Span<uint8_t> dst) {
  size_t done = 0;
  while (done < dst.size()) {
    iovec local{dst.data() + done, dst.size() - done};
    iovec remote{reinterpret_cast<void*>(addr_ + offset + done), dst.size() - done};
    ssize_t n = ::process_vm_readv(pid_, &local, 1, &remote, 1, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid_, " exited"));
      if (errno == EPERM) {
        return absl::PermissionDeniedError(absl::StrCat("the daemon may not read process ", pid_));
      }
      if (errno == EFAULT || errno == ENOMEM) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "page %u of the range is not mapped (or not readable) in process %d",
            (offset + done) / kPageSize, pid_));
      }
      return ErrnoStatus(errno, "process_vm_readv");
    }
    if (n == 0) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "page %u of the range is not mapped in process %d", (offset + done) / kPageSize, pid_));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<MirrorSource> CreateProcfsSource(const SourceOptions& opts) {
  return std::make_unique<ProcfsSource>(opts);
}

absl::StatusOr<ProcIds> ReadProcIds(pid_t pid) {
  auto text = proc::ReadSmallFile(absl::StrCat("/proc/", pid, "/status"));
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
  auto st = proc::ParseStatus(*text);
  if (!st.ok() || !st->has_ids) {
    return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
  }
  ProcIds ids{};
  for (int i = 0; i < 4; ++i) {
    ids.uid[i] = st->uid[i];
    ids.gid[i] = st->gid[i];
  }
  return ids;
}

absl::Status CheckMapped(pid_t pid, uint64_t addr, uint64_t len) {
  auto vmas = ReadVmas(pid, addr, len);
  if (!vmas.ok()) return vmas.status();
  uint64_t cursor = addr;
  for (const Vma& v : *vmas) {  // /proc/PID/maps lists VMAs in address order
    if (v.start > cursor) break;
    cursor = std::max(cursor, v.end);
  }
  if (cursor < addr + len) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "range 0x%x+0x%x is not mapped in process %d (first hole at 0x%x)", addr, len, pid, cursor));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MirrorSource>> CreateMirrorSource(absl::string_view which,
                                                                 const SourceOptions& opts) {
  const bool shim_present = ::access(kShimDevice, F_OK) == 0;
  if (which == "procfs") return CreateProcfsSource(opts);
  if (which == "shim") {
    if (!shim_present) {
      return absl::FailedPreconditionError(
          "--source shim: /dev/svm_shim does not exist (load svm_shim.ko, see driver-shim/)");
    }
    return CreateShimSource(opts);
  }
  if (which == "auto") {
    if (!shim_present) return CreateProcfsSource(opts);
    auto shim = CreateShimSource(opts);
    if (shim.ok()) return shim;
    spdlog::warn("/dev/svm_shim is present but unusable ({}); using procfs", shim.status().message());
    return CreateProcfsSource(opts);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown source '", which, "' (auto|shim|procfs)"));
}

}  // namespace svm::source
