#include "daemon/source/shim_source.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/fd.h"
#include "common/log.h"
#include "daemon/source/procfs_source.h"
#include "driver-shim/include/uapi/linux/svm_shim.h"

namespace svm::source {
namespace {

absl::Status CheckMappedThrough(int range_fd, pid_t pid, uint64_t addr, uint64_t len);

ChangeKind KindOf(uint64_t shim_kind) {
  switch (shim_kind) {
    case SVM_SHIM_EV_UNMAP: return ChangeKind::kUnmap;
    case SVM_SHIM_EV_CLEAR: return ChangeKind::kUnmap;
    case SVM_SHIM_EV_PROTECTION: return ChangeKind::kProtection;
    case SVM_SHIM_EV_MIGRATE: return ChangeKind::kRemap;
    case SVM_SHIM_EV_RELEASE: return ChangeKind::kExit;
    case SVM_SHIM_EV_OVERFLOW: return ChangeKind::kOverflow;
    default: return ChangeKind::kOther;  // COW write-protection, others
  }
}

class ShimSource;

class ShimRange final : public MirrorRange {
 public:
  ShimRange(ShimSource* src, pid_t pid, uint64_t addr, uint64_t len, UniqueFd fd, ChangeSink sink)
      : src_(src), pid_(pid), addr_(addr), len_(len), fd_(std::move(fd)), sink_(std::move(sink)) {}
  ~ShimRange() override;

  absl::Status Read(uint64_t offset, absl::Span<uint8_t> dst) override;
  bool NeedsScrub() const override { return false; }
  absl::StatusOr<std::map<uint64_t, uint64_t>> MappedPageSizes() override;

  int fd() const { return fd_.get(); }
  // Called by the event thread (under the source's lock) when fd is ready.
  void Drain();

 private:
  ShimSource* const src_;
  const pid_t pid_;
  const uint64_t addr_, len_;
  UniqueFd fd_;
  ChangeSink sink_;
  bool released_ = false;  // event-thread state
};

class ShimSource final : public MirrorSource {
 public:
  ShimSource(UniqueFd dev, UniqueFd epoll, UniqueFd wake)
      : dev_(std::move(dev)), epoll_(std::move(epoll)), wake_(std::move(wake)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~ShimSource() override {
    uint64_t one = 1;
    (void)::write(wake_.get(), &one, sizeof(one));
    thread_.join();
  }
  const char* name() const override { return "shim"; }

  absl::StatusOr<std::unique_ptr<MirrorRange>> Attach(pid_t pid, uint64_t addr, uint64_t len,
                                                      ChangeSink sink) override {
    // The shim mirrors ranges that are not mapped yet; an export promises
    // memory that exists.
    if (auto st = CheckMapped(pid, addr, len); !st.ok()) return st;
    UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd.valid()) {
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid, " does not exist"));
      return ErrnoStatus(errno, absl::StrCat("pidfd_open ", pid));
    }
    // The shim attaches by pid (the kernel does not export pidfd lookup to
    // modules); the pidfd taken before proves afterwards that the pid still
    // names the same process.
    svm_shim_attach a{};
    a.flags = SVM_SHIM_ATTACH_PID;
    a.target = static_cast<uint64_t>(pid);
    a.start = addr;
    a.length = len;
    a.queue_len = 4096;
    int rfd = ::ioctl(dev_.get(), SVM_SHIM_IOC_ATTACH, &a);
    if (rfd < 0) {
      if (errno == EPERM || errno == EACCES) {
        return absl::PermissionDeniedError(
            absl::StrCat("the shim refused to attach to process ", pid, " (ptrace access denied)"));
      }
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid, " exited"));
      return ErrnoStatus(errno, absl::StrCat("SVM_SHIM_IOC_ATTACH pid ", pid));
    }
    UniqueFd range_fd(rfd);
    if (::syscall(SYS_pidfd_send_signal, pidfd.get(), 0, nullptr, 0) != 0) {
      return absl::NotFoundError(absl::StrCat("process ", pid, " exited while attaching"));
    }
    return Watch(std::move(range_fd), pid, addr, len, std::move(sink));
  }

  bool AcceptsRangeFds() const override { return true; }

  absl::StatusOr<std::unique_ptr<MirrorRange>> Adopt(UniqueFd range_fd, pid_t pid, uint64_t addr,
                                                     uint64_t len, ChangeSink sink) override {
    // As Attach: an export promises memory that exists. Asked of the range
    // fd itself (svmd may not read the process's /proc/PID/maps).
    if (auto st = CheckMappedThrough(range_fd.get(), pid, addr, len); !st.ok()) return st;
    return Watch(std::move(range_fd), pid, addr, len, std::move(sink));
  }

  // Starts delivering the range fd's events to sink.
  absl::StatusOr<std::unique_ptr<MirrorRange>> Watch(UniqueFd range_fd, pid_t pid, uint64_t addr,
                                                     uint64_t len, ChangeSink sink) {
    const int rfd = range_fd.get();
    ::fcntl(rfd, F_SETFL, ::fcntl(rfd, F_GETFL) | O_NONBLOCK);
    auto range = std::make_unique<ShimRange>(this, pid, addr, len, std::move(range_fd), std::move(sink));
    absl::MutexLock l(&mu_);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = rfd;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, rfd, &ev) != 0) {
      return ErrnoStatus(errno, "epoll_ctl");
    }
    ranges_[rfd] = range.get();
    return range;
  }

  // Stops watching a released range fd (called with mu_ held, from Drain).
  void Forget(int fd) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    ranges_.erase(fd);
  }

  void Remove(ShimRange* r) {
    absl::MutexLock l(&mu_);
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, r->fd(), nullptr);
    ranges_.erase(r->fd());
  }

 private:
  void Loop() {
    epoll_event evs[32];
    {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = wake_.get();
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev);
    }
    for (;;) {
      int n = ::epoll_wait(epoll_.get(), evs, 32, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        spdlog::error("shim event loop: {}", std::strerror(errno));
        return;
      }
      absl::MutexLock l(&mu_);
      for (int i = 0; i < n; ++i) {
        if (evs[i].data.fd == wake_.get()) return;
        auto it = ranges_.find(evs[i].data.fd);
        if (it != ranges_.end()) it->second->Drain();
      }
    }
  }

  UniqueFd dev_, epoll_, wake_;
  std::thread thread_;
  absl::Mutex mu_;  // guards ranges_; held while events are dispatched
  std::map<int, ShimRange*> ranges_ ABSL_GUARDED_BY(mu_);
};

ShimRange::~ShimRange() { src_->Remove(this); }

void ShimRange::Drain() {
  svm_shim_event evs[64];
  for (;;) {
    ssize_t n = ::read(fd_.get(), evs, sizeof(evs));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) spdlog::warn("shim events of pid {}: {}", pid_, std::strerror(errno));
      return;
    }
    if (n == 0) {  // released and drained: no more events will come
      if (!released_) {
        released_ = true;
        sink_(Change{0, len_ / kPageSize, ChangeKind::kExit, MonotonicNs()});
      }
      src_->Forget(fd_.get());
      return;
    }
    const uint64_t now = MonotonicNs();
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(svm_shim_event); ++i) {
      const auto& e = evs[i];
      const ChangeKind kind = KindOf(e.kind);
      if (kind == ChangeKind::kExit) released_ = true;
      const uint64_t first = (std::max<uint64_t>(e.start, addr_) - addr_) / kPageSize;
      const uint64_t last = (std::min<uint64_t>(e.end, addr_ + len_) - addr_ + kPageSize - 1) / kPageSize;
      if (kind == ChangeKind::kOverflow || kind == ChangeKind::kExit) {
        sink_(Change{0, len_ / kPageSize, kind, now});
      } else if (last > first) {
        sink_(Change{first, last - first, kind, now});
      }
    }
    if (static_cast<size_t>(n) < sizeof(evs)) return;
  }
}

absl::Status ShimRange::Read(uint64_t offset, absl::Span<uint8_t> dst) {
  size_t done = 0;
  int busy = 0;
  while (done < dst.size()) {
    svm_shim_read r{};
    r.addr = addr_ + offset + done;
    r.length = std::min<uint64_t>(dst.size() - done, SVM_SHIM_MAX_READ_BYTES);
    r.buf = reinterpret_cast<uint64_t>(dst.data() + done);
    if (::ioctl(fd_.get(), SVM_SHIM_IOC_READ, &r) != 0) {
      if (errno == EINTR) continue;
      if (errno == EBUSY && ++busy < 5) continue;  // invalidated for a whole second: try again
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid_, " exited"));
      if (errno == EFAULT) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "a page at offset %u of the range is not mapped (or not readable) in process %d",
            offset + done, pid_));
      }
      return ErrnoStatus(errno, "SVM_SHIM_IOC_READ");
    }
    done += r.length;
  }
  return absl::OkStatus();
}

// A SNAPSHOT without faulting, in chunks: each valid entry carries the order
// of the page that maps it (the shim reports a huge page's order in every
// one of its base pages).
absl::StatusOr<std::map<uint64_t, uint64_t>> ShimRange::MappedPageSizes() {
  std::map<uint64_t, uint64_t> out;
  const uint64_t pages = len_ / kPageSize;
  std::vector<uint64_t> entries(std::min<uint64_t>(pages, SVM_SHIM_MAX_SNAPSHOT_PAGES));
  int busy = 0;
  for (uint64_t first = 0; first < pages;) {
    svm_shim_snapshot s{};
    s.addr = addr_ + first * kPageSize;
    s.npages = std::min<uint64_t>(pages - first, entries.size());
    s.entries = reinterpret_cast<uint64_t>(entries.data());
    if (::ioctl(fd_.get(), SVM_SHIM_IOC_SNAPSHOT, &s) != 0) {
      if (errno == EINTR || (errno == EBUSY && ++busy < 5)) continue;
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid_, " exited"));
      return ErrnoStatus(errno, "SVM_SHIM_IOC_SNAPSHOT");
    }
    for (uint64_t i = 0; i < s.npages; ++i) {
      if (!(entries[i] & SVM_SHIM_PAGE_VALID)) continue;
      const uint64_t order = (entries[i] & SVM_SHIM_PAGE_ORDER_MASK) >> SVM_SHIM_PAGE_ORDER_SHIFT;
      if (order >= 64 - 12) continue;  // no such page; never counted as one
      out[kPageSize << order] += kPageSize;
    }
    first += s.npages;
  }
  return out;
}


// Every page of [addr, addr + len) lies in a readable mapping: a SNAPSHOT
// without faulting marks pages outside one with SVM_SHIM_PAGE_ERROR.
absl::Status CheckMappedThrough(int range_fd, pid_t pid, uint64_t addr, uint64_t len) {
  const uint64_t pages = len / kPageSize;
  std::vector<uint64_t> entries(std::min<uint64_t>(pages, SVM_SHIM_MAX_SNAPSHOT_PAGES));
  for (uint64_t first = 0; first < pages;) {
    svm_shim_snapshot s{};
    s.addr = addr + first * kPageSize;
    s.npages = std::min<uint64_t>(pages - first, entries.size());
    s.entries = reinterpret_cast<uint64_t>(entries.data());
    if (::ioctl(range_fd, SVM_SHIM_IOC_SNAPSHOT, &s) != 0) {
      if (errno == EINTR || errno == EBUSY) continue;
      if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid, " exited"));
      return ErrnoStatus(errno, "SVM_SHIM_IOC_SNAPSHOT");
    }
    for (uint64_t i = 0; i < s.npages; ++i) {
      if (entries[i] & SVM_SHIM_PAGE_ERROR) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "range 0x%x+0x%x is not mapped readable in process %d (first hole at 0x%x)", addr, len,
            pid, addr + (first + i) * kPageSize));
      }
    }
    first += s.npages;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RangeFdInfo> InspectRangeFd(int fd) {
  // Only the shim names an anonymous inode so; another file (a pipe,
  // /dev/null, a memfd, another driver's anon inode) is never ioctl'ed.
  constexpr char kName[] = "anon_inode:[svm_shim_range]";
  char link[64] = {};
  const std::string path = absl::StrCat("/proc/self/fd/", fd);
  const ssize_t n = ::readlink(path.c_str(), link, sizeof(link) - 1);
  if (n < 0) return ErrnoStatus(errno, absl::StrCat("readlink ", path));
  if (std::string_view(link, static_cast<size_t>(n)) != kName) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a svm_shim range fd (it is ", absl::CHexEscape(absl::string_view(link, static_cast<size_t>(n))), ")"));
  }
  svm_shim_range_info ri{};
  if (::ioctl(fd, SVM_SHIM_IOC_RANGE_INFO, &ri) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a svm_shim range fd (SVM_SHIM_IOC_RANGE_INFO: ", std::strerror(errno),
        errno == ENOTTY ? "; is the loaded svm_shim older than this svmd?" : "", ")"));
  }
  RangeFdInfo info;
  info.pid = static_cast<pid_t>(ri.pid);
  info.start = ri.start;
  info.len = ri.length;
  return info;
}

absl::StatusOr<uint64_t> RangeObjectOffset(int range_fd, int object_fd) {
  svm_shim_range_object ro{};
  ro.fd = static_cast<uint64_t>(object_fd);
  if (::ioctl(range_fd, SVM_SHIM_IOC_RANGE_OBJECT, &ro) != 0) {
    const int err = errno;
    switch (err) {
      case ENXIO:
        return absl::InvalidArgumentError(
            "the range is not a shared mapping of that object (the kernel says so)");
      case ESRCH:
        return absl::NotFoundError("the process of the range exited");
      case ENOTTY:
        return absl::FailedPreconditionError(
            "the loaded svm_shim cannot check what a range maps (SVM_SHIM_IOC_RANGE_OBJECT); "
            "it is older than this svmd");
      default:
        return ErrnoStatus(err, "SVM_SHIM_IOC_RANGE_OBJECT");
    }
  }
  return ro.offset;
}

absl::StatusOr<std::unique_ptr<MirrorSource>> CreateShimSource(const SourceOptions&) {
  UniqueFd dev(::open(kShimDevice, O_RDWR | O_CLOEXEC));
  if (!dev.valid()) {
    return ErrnoStatus(errno, absl::StrCat("open ", kShimDevice, " (is svm_shim.ko loaded?)"));
  }
  svm_shim_query q{};
  if (::ioctl(dev.get(), SVM_SHIM_IOC_QUERY, &q) != 0) return ErrnoStatus(errno, "SVM_SHIM_IOC_QUERY");
  if (q.version != SVM_SHIM_VERSION) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "svm_shim speaks version %u, this svmd version %u", q.version, SVM_SHIM_VERSION));
  }
  const uint64_t need = SVM_SHIM_FEAT_ATTACH_PID | SVM_SHIM_FEAT_READ | SVM_SHIM_FEAT_EVENTS;
  if ((q.features & need) != need) {
    return absl::FailedPreconditionError(absl::StrFormat("svm_shim lacks features 0x%x", need & ~q.features));
  }
  if (q.page_size != kPageSize) {
    return absl::FailedPreconditionError(absl::StrFormat("kernel page size %u is not supported", q.page_size));
  }
  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!ep.valid() || !wake.valid()) return ErrnoStatus(errno, "epoll/eventfd");
  return std::unique_ptr<MirrorSource>(new ShimSource(std::move(dev), std::move(ep), std::move(wake)));
}

}  // namespace svm::source
