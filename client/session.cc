#include "client/session.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace svm::internal {

namespace abi = session::abi;

namespace {

// What libsvm reads per ring entry: the data area is split into slots of
// this size, one per request in flight.
constexpr uint64_t kSlotSize = 256 << 10;
// How long a waiting thread polls the completion ring before it sleeps.
constexpr absl::Duration kSpin = absl::Microseconds(30);

// Counts forks in this process's children: a session belongs to the
// process that connected it.
std::atomic<uint64_t> g_forks{0};
void CountFork() { g_forks.fetch_add(1, std::memory_order_relaxed); }

absl::Status Errno(int err, const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(err)));
}

void CloseFds(int* fds, int n) {
  for (int i = 0; i < n; ++i) ::close(fds[i]);
}

// Reads the answer to a message: the expected type, or the daemon's error.
absl::Status Receive(int sock, void* buf, size_t cap, uint32_t want, int* fds, int* nfds,
                     size_t* len) {
  ssize_t n = abi::RecvMsg(sock, buf, cap, fds, nfds);
  if (n <= 0) return Errno(n == 0 ? ECONNRESET : static_cast<int>(-n), "svmd session");
  abi::MsgHeader h;
  if (static_cast<size_t>(n) < sizeof(h)) return absl::InternalError("svmd sent a short message");
  std::memcpy(&h, buf, sizeof(h));
  if (h.type == abi::kError && static_cast<size_t>(n) >= offsetof(abi::ErrorMsg, text)) {
    abi::ErrorMsg e{};
    std::memcpy(&e, buf, std::min(static_cast<size_t>(n), sizeof(e)));
    CloseFds(fds, *nfds);
    *nfds = 0;
    const size_t tl = std::min<size_t>(e.text_len, static_cast<size_t>(n) - offsetof(abi::ErrorMsg, text));
    return absl::Status(static_cast<absl::StatusCode>(e.code), std::string(e.text, tl));
  }
  if (h.type != want) {
    CloseFds(fds, *nfds);
    *nfds = 0;
    return absl::InternalError(absl::StrCat("svmd answered message type ", h.type));
  }
  *len = static_cast<size_t>(n);
  return absl::OkStatus();
}

}  // namespace

View::~View() {
  if (data_fd >= 0) ::close(data_fd);
  if (data != nullptr) ::munmap(const_cast<uint8_t*>(data), data_map);
  if (header != nullptr) ::munmap(const_cast<abi::CacheHeader*>(header), words_map);
}

absl::StatusOr<std::unique_ptr<Session>> Session::Connect(const std::string& path) {
  static std::atomic<uint64_t> next_id{1};
  static const int atfork = ::pthread_atfork(nullptr, nullptr, CountFork);
  (void)atfork;
  std::unique_ptr<Session> s(new Session());
  s->id_ = next_id.fetch_add(1);
  s->forks_ = g_forks.load(std::memory_order_relaxed);
  s->sock_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s->sock_ < 0) return Errno(errno, "socket");
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sun.sun_path)) return absl::InvalidArgumentError("session socket path too long");
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  if (::connect(s->sock_, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) != 0) {
    return Errno(errno, absl::StrCat("connect to svmd's session socket ", path));
  }
  abi::HelloMsg hello{};
  hello.h.type = abi::kHello;
  hello.h.len = sizeof(hello);
  hello.magic = abi::kMagic;
  hello.version = abi::kVersion;
  if (int err = abi::SendMsg(s->sock_, &hello, sizeof(hello), nullptr, 0); err != 0) {
    return Errno(err, "svmd session hello");
  }
  alignas(8) char buf[abi::kMaxMsg];
  int fds[4];
  int nfds = 0;
  size_t len = 0;
  if (auto st = Receive(s->sock_, buf, sizeof(buf), abi::kHelloOk, fds, &nfds, &len); !st.ok()) {
    return st;
  }
  if (nfds != 4 || len != sizeof(abi::HelloOkMsg)) {
    CloseFds(fds, nfds);
    return absl::InternalError("svmd's session answer is malformed");
  }
  abi::HelloOkMsg ok;
  std::memcpy(&ok, buf, sizeof(ok));
  s->sq_bell_ = fds[1];
  s->cq_bell_ = fds[2];
  s->ev_bell_ = fds[3];
  ::fcntl(s->ev_bell_, F_SETFL, ::fcntl(s->ev_bell_, F_GETFL) | O_NONBLOCK);
  ::fcntl(s->cq_bell_, F_SETFL, ::fcntl(s->cq_bell_, F_GETFL) | O_NONBLOCK);
  void* m = ::mmap(nullptr, ok.memory_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  ::close(fds[0]);
  if (m == MAP_FAILED) return Errno(errno, "map the session memory");
  // A child that touched the rings would corrupt its parent's session.
  ::madvise(m, ok.memory_size, MADV_DONTFORK);
  s->mem_ = static_cast<uint8_t*>(m);
  s->mem_size_ = ok.memory_size;
  s->hdr_ = reinterpret_cast<abi::SessionHeader*>(s->mem_);
  const abi::SessionHeader& h = *s->hdr_;
  if (h.magic != abi::kMagic || h.version != abi::kVersion || ok.version != abi::kVersion ||
      h.size != ok.memory_size || h.data_offset + h.data_size > h.size ||
      h.ctr_offset + uint64_t{h.ctr_entries} * sizeof(abi::ClientCounters) > h.size ||
      h.sq_offset + uint64_t{h.sq_entries} * sizeof(abi::Sqe) > h.size ||
      h.cq_offset + uint64_t{h.cq_entries} * sizeof(abi::Cqe) > h.size ||
      h.ev_offset + uint64_t{h.ev_entries} * sizeof(abi::Event) > h.size || h.ev_entries == 0 ||
      (h.ev_entries & (h.ev_entries - 1)) != 0) {
    return absl::InternalError("svmd's session memory is malformed");
  }
  s->sq_ = reinterpret_cast<abi::Sqe*>(s->mem_ + h.sq_offset);
  s->cq_ = reinterpret_cast<const abi::Cqe*>(s->mem_ + h.cq_offset);
  s->data_ = s->mem_ + h.data_offset;
  s->ev_ = reinterpret_cast<const abi::Event*>(s->mem_ + h.ev_offset);
  s->ctr_ = reinterpret_cast<abi::ClientCounters*>(s->mem_ + h.ctr_offset);
  s->ctr_entries_ = h.ctr_entries;
  s->slot_size_ = std::min<uint64_t>(kSlotSize, h.data_size);
  // Never more requests in flight than either ring holds.
  const uint64_t slots =
      std::min<uint64_t>({h.data_size / s->slot_size_, h.sq_entries, h.cq_entries});
  absl::MutexLock l(&s->mu_);
  s->slots_.resize(slots);
  return s;
}

bool Session::forked() const { return g_forks.load(std::memory_order_relaxed) != forks_; }

absl::Status Session::ForkedError() {
  return absl::FailedPreconditionError(
      "this svm client was connected by the parent process; connect again after fork()");
}

Session::~Session() {
  if (forked()) {
    // A forked child's copy: the threads and mappings are the parent's.
    // Close the descriptors only (the parent's session is untouched).
    if (pager_.joinable()) pager_.detach();
    for (int fd : {uffd_, pager_stop_, ev_bell_, sock_, sq_bell_, cq_bell_}) {
      if (fd >= 0) ::close(fd);
    }
    absl::MutexLock l(&open_mu_);
    for (auto& [name, v] : views_) v->data = nullptr, v->header = nullptr;  // not mapped here
    views_.clear();
    return;
  }
  if (pager_.joinable()) {
    const uint64_t one = 1;
    (void)!::write(pager_stop_, &one, sizeof(one));
    pager_.join();
  }
  {
    absl::MutexLock l(&ranges_mu_);
    for (auto& [b, r] : ranges_) RetireMapping(*r);
    ranges_.clear();
  }
  {
    absl::MutexLock l(&open_mu_);
    views_.clear();
  }
  for (int fd : {uffd_, pager_stop_, ev_bell_}) {
    if (fd >= 0) ::close(fd);
  }
  if (mem_ != nullptr) ::munmap(mem_, mem_size_);
  for (int fd : {sock_, sq_bell_, cq_bell_}) {
    if (fd >= 0) ::close(fd);
  }
}

absl::StatusOr<std::shared_ptr<View>> Session::Open(const std::string& name) {
  if (forked()) return ForkedError();
  absl::MutexLock l(&open_mu_);
  auto it = views_.find(name);
  if (it != views_.end() && !it->second->retired()) return it->second;
  int fds[4];
  int nfds = 0;
  abi::OpenOkMsg ok;
  if (auto st = Ask(abi::kOpen, name, &ok, fds, &nfds); !st.ok()) return st;
  auto v = std::make_shared<View>();
  v->handle = ok.handle;
  v->kind = static_cast<abi::HandleKind>(ok.kind);
  v->len = ok.len;
  if (v->kind == abi::kImport) {
    if (nfds != 2) {
      CloseFds(fds, nfds);
      return absl::InternalError("svmd sent no cache with an import");
    }
    const uint64_t pages = (ok.len + abi::kPageSize - 1) / abi::kPageSize;
    v->data_map = pages * abi::kPageSize;
    v->words_map = abi::WordsFileSize(pages);
    // MAP_PRIVATE, read only: the pages are the shared cache's own (nothing
    // is ever written through it, so nothing is copied), and userfaultfd
    // accepts a private mapping of a read-only descriptor (VM_MAYWRITE).
    void* d = v->data_map ? ::mmap(nullptr, v->data_map, PROT_READ, MAP_PRIVATE, fds[0], 0) : nullptr;
    void* w = ::mmap(nullptr, v->words_map, PROT_READ, MAP_SHARED, fds[1], 0);
    v->data_fd = fds[0];
    CloseFds(fds + 1, nfds - 1);
    // A child must not touch the cache through these mappings: it would
    // fault holes in as zero pages, outside svmd's bookkeeping.
    if (d != MAP_FAILED && d != nullptr) ::madvise(d, v->data_map, MADV_DONTFORK);
    if (d == MAP_FAILED || w == MAP_FAILED) {
      if (d != MAP_FAILED && d != nullptr) ::munmap(d, v->data_map);
      if (w != MAP_FAILED) ::munmap(w, v->words_map);
      return Errno(errno, "map the import's cache");
    }
    v->data = static_cast<const uint8_t*>(d);
    v->header = static_cast<const abi::CacheHeader*>(w);
    v->words = reinterpret_cast<const std::atomic<uint64_t>*>(static_cast<const uint8_t*>(w) + abi::kWordsOffset);
    // The view's own mapping does not fault through the pager: a Read must
    // never take SIGBUS. A copy that races a punch faults a zero page into
    // the shared cache; the version word rejects the copy, and svmd punches
    // such strays out again (SharedCache::PunchStrays).
  } else {
    CloseFds(fds, nfds);
  }
  views_[name] = v;
  return v;
}

void Session::Submit(const abi::Sqe& e) {
  sq_[sq_tail_ & (hdr_->sq_entries - 1)] = e;
  ++sq_tail_;
  hdr_->sq.tail.store(sq_tail_, std::memory_order_release);
}

bool Session::ReapLocked() {
  const uint32_t tail = hdr_->cq.tail.load(std::memory_order_acquire);
  bool moved = false;
  while (cq_head_ != tail) {
    const abi::Cqe c = cq_[cq_head_ & (hdr_->cq_entries - 1)];
    if (c.user_data < slots_.size() && slots_[c.user_data].state == SlotState::kBusy) {
      slots_[c.user_data].cqe = c;
      slots_[c.user_data].state = SlotState::kDone;
    }
    ++cq_head_;
    moved = true;
  }
  if (!moved) return false;
  hdr_->cq.head.store(cq_head_, std::memory_order_release);
  ++reaped_;
  cv_.SignalAll();
  // svmd holds completions that did not fit: there is room now.
  if (hdr_->cq.overflow.load(std::memory_order_acquire) != 0) {
    const uint64_t one = 1;
    (void)!::write(sq_bell_, &one, sizeof(one));
  }
  return true;
}

void Session::WaitFor(const std::function<bool()>& pred) {
  const absl::Time spin_until = absl::Now() + kSpin;
  int spins = 0;
  while (!pred() && !broken_) {
    if (ReapLocked()) continue;
    if (absl::Now() < spin_until) {
      mu_.Unlock();
      // A few pauses, then yields: on a machine with fewer free CPUs than
      // runnable threads, the thread that completes this read (svmd's) may
      // be waiting for this CPU.
      if (++spins < 32) {
        __builtin_ia32_pause();
      } else {
        ::sched_yield();
      }
      mu_.Lock();
      continue;
    }
    if (reaping_) {
      cv_.Wait(&mu_);
      continue;
    }
    // This thread sleeps on the doorbell; the others on cv_.
    reaping_ = true;
    const uint64_t seen = reaped_;
    mu_.Unlock();
    hdr_->cq.need_wakeup.store(1, std::memory_order_seq_cst);
    mu_.Lock();
    if (reaped_ == seen && hdr_->cq.tail.load(std::memory_order_acquire) == cq_head_) {
      mu_.Unlock();
      pollfd p[2] = {{cq_bell_, POLLIN, 0}, {sock_, POLLIN | POLLRDHUP, 0}};
      int n = ::poll(p, 2, -1);
      uint64_t v;
      if (n > 0 && (p[0].revents & POLLIN)) (void)!::read(cq_bell_, &v, sizeof(v));
      const bool gone = n > 0 && (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR));
      mu_.Lock();
      // svmd closed the session (or exited): nothing more will complete.
      if (gone) broken_ = true;
    }
    reaping_ = false;
    ReapLocked();
    cv_.SignalAll();
  }
}

std::vector<Session::Result> Session::Run(absl::Span<const Op> ops) {
  std::vector<Result> results(ops.size());
  if (forked()) {
    for (Result& r : results) r.status = ForkedError();
    return results;
  }
  std::vector<int> slot_of(ops.size(), -1);
  // Whether op i may still complete in the cache: cleared when a copy from
  // the cache failed its check, so its second submission copies.
  std::vector<bool> in_cache(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    in_cache[i] = ops[i].view != nullptr && ops[i].dst != nullptr && !ops[i].fresh && !ops[i].fill;
  }
  std::deque<size_t> todo;  // ops to submit, in order
  for (size_t i = 0; i < ops.size(); ++i) todo.push_back(i);
  std::vector<size_t> mine;  // ops in flight
  size_t done = 0;
  absl::MutexLock l(&mu_);
  while (done < ops.size()) {
    bool submitted = false;
    while (!todo.empty() && !broken_) {
      int s = -1;
      for (size_t i = 0; i < slots_.size(); ++i) {
        if (slots_[i].state == SlotState::kFree) {
          s = static_cast<int>(i);
          break;
        }
      }
      if (s < 0) break;
      const size_t i = todo.front();
      todo.pop_front();
      const Op& op = ops[i];
      slots_[s].state = SlotState::kBusy;
      abi::Sqe e{};
      e.user_data = static_cast<uint64_t>(s);
      e.opcode = abi::kOpRead;
      e.flags = op.fresh ? abi::kFresh : op.fill ? abi::kFill : in_cache[i] ? abi::kInCache : 0;
      e.handle = op.handle;
      e.offset = op.offset;
      e.len = std::min(op.len, slot_size_);
      e.data_offset = static_cast<uint64_t>(s) * slot_size_;
      Submit(e);
      slot_of[i] = s;
      mine.push_back(i);
      submitted = true;
    }
    if (submitted) {
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (hdr_->sq.need_wakeup.load(std::memory_order_relaxed) != 0) {
        const uint64_t one = 1;
        (void)!::write(sq_bell_, &one, sizeof(one));
      }
    }
    if (broken_) {
      for (size_t i : todo) results[i].status = absl::UnavailableError("svmd closed the session");
      for (size_t i : mine) {
        results[i].status = absl::UnavailableError("svmd closed the session");
        slots_[slot_of[i]].state = SlotState::kFree;
      }
      return results;
    }
    if (mine.empty()) {
      // Every slot belongs to other threads' reads.
      WaitFor([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        for (const Slot& s : slots_) {
          if (s.state == SlotState::kFree) return true;
        }
        return false;
      });
      continue;
    }
    WaitFor([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (size_t i : mine) {
        if (slots_[slot_of[i]].state == SlotState::kDone) return true;
      }
      return false;
    });
    for (size_t k = 0; k < mine.size();) {
      const size_t i = mine[k];
      const int s = slot_of[i];
      if (slots_[s].state != SlotState::kDone) {
        ++k;
        continue;
      }
      const abi::Cqe c = slots_[s].cqe;
      const uint8_t* src = data_ + static_cast<uint64_t>(s) * slot_size_;
      Result& r = results[i];
      bool again = false;
      // The slot stays this thread's until it is freed: copy without the lock.
      mu_.Unlock();
      if (c.status == 0 && (c.flags & abi::kDoneInCache) != 0 && in_cache[i]) {
        // svmd left the bytes in the shared cache: each page is copied
        // from there checked against its version word, as a cache hit is.
        // Any page that fails the check sends the op round again, copied
        // by svmd this time.
        if (CopyFromCache(*ops[i].view, ops[i].offset, ops[i].dst, std::min(ops[i].len, slot_size_))) {
          r.seq = c.seq;
          r.pages_from_cache = c.pages_from_cache;
          r.pages_fetched = c.pages_fetched;
        } else {
          in_cache[i] = false;
          again = true;
        }
      } else if (c.status == 0 && (c.flags & abi::kDoneInCache) != 0) {
        r.status = absl::InternalError("svmd completed a read in the cache that did not ask for it");
      } else if (c.status == 0) {
        if (ops[i].dst != nullptr) std::memcpy(ops[i].dst, src, std::min(ops[i].len, slot_size_));
        r.seq = c.seq;
        r.pages_from_cache = c.pages_from_cache;
        r.pages_fetched = c.pages_fetched;
      } else {
        const size_t ml = std::min<uint64_t>(c.msg_len, slot_size_);
        r.status = absl::Status(static_cast<absl::StatusCode>(c.status),
                                std::string(reinterpret_cast<const char*>(src), ml));
      }
      mu_.Lock();
      slots_[s].state = SlotState::kFree;
      cv_.SignalAll();
      mine[k] = mine.back();
      mine.pop_back();
      if (again) {
        ++retried_;
        todo.push_back(i);
      } else {
        ++done;
      }
    }
  }
  return results;
}

bool Session::CopyFromCache(const View& v, uint64_t offset, uint8_t* dst, uint64_t len) {
  if (v.kind != abi::kImport || v.data == nullptr || offset > v.len || len > v.len - offset) return false;
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  const int64_t now = static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  // Past the importer's lease the cache may not serve (as for a hit).
  if (now >= v.header->lease_until_ns.load(std::memory_order_acquire)) return false;
  const uint64_t end = offset + len;
  for (uint64_t p = offset / abi::kPageSize; p * abi::kPageSize < end; ++p) {
    const uint64_t a = std::max(offset, p * abi::kPageSize);
    const uint64_t b = std::min(end, (p + 1) * abi::kPageSize);
    uint64_t version;
    if (!abi::TryCopyPage(&v.words[p], v.data + a, dst + (a - offset), b - a, &version)) return false;
  }
  return true;
}

absl::Status Session::Ask(uint32_t type, const std::string& name, abi::OpenOkMsg* ok, int* fds,
                          int* nfds) {
  abi::OpenMsg m{};
  if (name.empty() || name.size() > abi::kMaxName) return absl::InvalidArgumentError("bad name");
  m.h.type = type;
  m.name_len = static_cast<uint32_t>(name.size());
  std::memcpy(m.name, name.data(), name.size());
  m.h.len = static_cast<uint32_t>(offsetof(abi::OpenMsg, name) + name.size());
  if (int err = abi::SendMsg(sock_, &m, m.h.len, nullptr, 0); err != 0) return Errno(err, "svmd session");
  alignas(8) char buf[abi::kMaxMsg];
  size_t len = 0;
  if (auto st = Receive(sock_, buf, sizeof(buf), abi::kOpenOk, fds, nfds, &len); !st.ok()) return st;
  if (len != sizeof(*ok)) {
    CloseFds(fds, *nfds);
    *nfds = 0;
    return absl::InternalError("svmd's answer is malformed");
  }
  std::memcpy(ok, buf, sizeof(*ok));
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Session::Deposit(int range_fd, int object_fd) {
  if (forked()) return ForkedError();
  absl::MutexLock l(&open_mu_);
  abi::DepositMsg m{};
  m.h.type = abi::kDeposit;
  m.h.len = sizeof(m);
  const int deposit[2] = {range_fd, object_fd};
  if (int err = abi::SendMsg(sock_, &m, sizeof(m), deposit, object_fd >= 0 ? 2 : 1); err != 0) {
    return Errno(err, "svmd session");
  }
  alignas(8) char buf[abi::kMaxMsg];
  size_t len = 0;
  int fds[4];
  int nfds = 0;
  auto st = Receive(sock_, buf, sizeof(buf), abi::kDepositOk, fds, &nfds, &len);
  CloseFds(fds, nfds);
  if (!st.ok()) return st;
  abi::DepositOkMsg ok;
  if (len != sizeof(ok)) return absl::InternalError("svmd's answer is malformed");
  std::memcpy(&ok, buf, sizeof(ok));
  return ok.token;
}

absl::StatusOr<uint32_t> Session::Watch(const std::string& name) {
  if (forked()) return ForkedError();
  absl::MutexLock l(&open_mu_);
  int fds[4];
  int nfds = 0;
  abi::OpenOkMsg ok;
  if (auto st = Ask(abi::kWatch, name, &ok, fds, &nfds); !st.ok()) return st;
  CloseFds(fds, nfds);
  absl::MutexLock el(&ev_mu_);
  ev_queues_[ok.handle];  // events that already arrived are kept
  ev_next_id_ = std::max(ev_next_id_, ok.handle + 1);
  return ok.handle;
}

void Session::DrainEventsLocked() {
  const uint32_t tail = hdr_->ev.tail.load(std::memory_order_acquire);
  if (tail == ev_head_) return;
  while (ev_head_ != tail) {
    const abi::Event e = ev_[ev_head_ & (hdr_->ev_entries - 1)];
    ++ev_head_;
    if (auto it = ev_queues_.find(e.watch); it != ev_queues_.end()) {
      it->second.push_back(e);
    } else if (e.watch >= ev_next_id_) {
      ev_queues_[e.watch].push_back(e);  // its Watch() is reading the answer
    }
  }
  hdr_->ev.head.store(ev_head_, std::memory_order_release);
  ev_cv_.SignalAll();
}

absl::StatusOr<abi::Event> Session::NextEvent(uint32_t watch, absl::Duration timeout) {
  if (forked()) return ForkedError();
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock l(&ev_mu_);
  for (;;) {
    DrainEventsLocked();
    auto it = ev_queues_.find(watch);
    if (it == ev_queues_.end()) return absl::FailedPreconditionError("the watch has ended");
    auto& q = it->second;
    if (!q.empty()) {
      abi::Event e = q.front();
      q.pop_front();
      return e;
    }
    if (ev_broken_) return absl::UnavailableError("svmd closed the session");
    const absl::Time now = absl::Now();
    if (now >= deadline) return absl::DeadlineExceededError("no invalidation within the timeout");
    if (ev_sleeping_) {
      ev_cv_.WaitWithDeadline(&ev_mu_, deadline);
      continue;
    }
    // This thread sleeps on the doorbell; the others on ev_cv_.
    ev_sleeping_ = true;
    hdr_->ev.need_wakeup.store(1, std::memory_order_seq_cst);
    if (hdr_->ev.tail.load(std::memory_order_acquire) == ev_head_) {
      ev_mu_.Unlock();
      pollfd p[2] = {{ev_bell_, POLLIN, 0}, {sock_, POLLIN | POLLRDHUP, 0}};
      const int ms = static_cast<int>(std::min<int64_t>(
          absl::ToInt64Milliseconds(absl::Ceil(deadline - now, absl::Milliseconds(1))), INT32_MAX));
      int n = ::poll(p, 2, ms);
      uint64_t v;
      if (n > 0 && (p[0].revents & POLLIN)) (void)!::read(ev_bell_, &v, sizeof(v));
      const bool gone = n > 0 && (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR));
      ev_mu_.Lock();
      if (gone) ev_broken_ = true;
    }
    ev_sleeping_ = false;
    ev_cv_.SignalAll();
  }
}

void Session::ForgetWatch(uint32_t watch) {
  if (forked()) return;
  {
    absl::MutexLock l(&ev_mu_);
    ev_queues_.erase(watch);
  }
  abi::UnwatchMsg m{};
  m.h.type = abi::kUnwatch;
  m.h.len = sizeof(m);
  m.watch = watch;
  absl::MutexLock l(&open_mu_);
  // No answer; a failure means svmd is gone, which ends the watch too.
  (void)abi::SendMsg(sock_, &m, sizeof(m), nullptr, 0);
}

absl::Status Session::StartPager() {
  if (uffd_ >= 0) return absl::OkStatus();
  // Kernel-mode faults too (a mapped page handed to write(2) or send(2))
  // where the process may handle them (CAP_SYS_PTRACE, or
  // vm.unprivileged_userfaultfd = 1); otherwise user-mode faults only, and
  // a system call that touches a page not yet fetched fails with EFAULT
  // (docs: Prefetch first).
  bool user_mode_only = false;
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0 && errno == EPERM) {
    user_mode_only = true;
    fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  }
  if (fd < 0) return Errno(errno, "userfaultfd");
  // Minor faults (a page present in the cache file but not yet mapped
  // here) let the pager check the page's version word before the page is
  // mapped: a page some Read faulted in while it was being punched (a
  // stray, all zeros, version 0) is then fetched instead of shown.
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MINOR_SHMEM;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) {
    // Kernels before 5.14: no minor faults on shmem. The API handshake is
    // one-shot per descriptor, so start again.
    ::close(fd);
    fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0)));
    if (fd < 0) return Errno(errno, "userfaultfd");
    api = uffdio_api{};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID;
    if (::ioctl(fd, UFFDIO_API, &api) != 0) {
      ::close(fd);
      return Errno(errno, "userfaultfd features");
    }
  }
  minor_faults_ = (api.features & UFFD_FEATURE_MINOR_SHMEM) != 0;
  pager_stop_ = ::eventfd(0, EFD_CLOEXEC);
  uffd_ = fd;
  pager_ = std::thread([this] { PagerLoop(); });
  return absl::OkStatus();
}

absl::Status Session::Register(const std::shared_ptr<MappedRange>& r) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(r->base);
  reg.range.len = r->len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | (minor_faults_ ? UFFDIO_REGISTER_MODE_MINOR : 0);
  if (::ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) return Errno(errno, "register the mapping for faults");
  absl::MutexLock l(&ranges_mu_);
  ranges_[reinterpret_cast<uintptr_t>(r->base)] = r;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<MappedRange>> Session::MapRange(std::shared_ptr<View> view,
                                                               size_t readahead) {
  if (forked()) return ForkedError();
  if (view->kind != abi::kImport) {
    return absl::FailedPreconditionError("only imports can be mapped (read a local export instead)");
  }
  {
    absl::MutexLock l(&open_mu_);
    if (auto st = StartPager(); !st.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("Map() needs userfaultfd: ", st.message()));
    }
  }
  if (view->data_map == 0) return absl::FailedPreconditionError("the import is empty");
  void* m = ::mmap(nullptr, view->data_map, PROT_READ, MAP_PRIVATE, view->data_fd, 0);
  if (m == MAP_FAILED) return Errno(errno, "map the import");
  ::madvise(m, view->data_map, MADV_DONTFORK);
  auto r = std::make_shared<MappedRange>();
  r->view = std::move(view);
  r->base = static_cast<const uint8_t*>(m);
  r->len = r->view->data_map;
  r->readahead = readahead;
  if (auto st = Register(r); !st.ok()) {
    ::munmap(m, r->len);
    return st;
  }
  return r;
}

void Session::UnmapRange(const std::shared_ptr<MappedRange>& r) {
  if (forked()) return;  // the mapping is the parent's (not inherited)
  {
    absl::MutexLock l(&ranges_mu_);
    ranges_.erase(reinterpret_cast<uintptr_t>(r->base));
  }
  RetireMapping(*r);
}

// Unregistering first and unmapping after would leave a window in which a
// fault the pager has not resolved is woken (UFFDIO_UNREGISTER wakes the
// range), retried on a mapping of the cache file that no longer reports
// faults, and filled by the file itself: a page that is not in the cache
// (a zero page, or a page whose version word says it is being replaced)
// would be shown to the faulting thread. So the mapping goes first: an
// inaccessible anonymous mapping replaces it in one step (MAP_FIXED), then
// the waiting faults are woken and retry on that (a system call gets
// EFAULT, as after munmap), then the placeholder goes.
void Session::RetireMapping(const MappedRange& r) {
  if (r.base == r.view->data) {  // the view's own mapping: not ours to unmap
    uffdio_range range{reinterpret_cast<uintptr_t>(r.base), r.len};
    ::ioctl(uffd_, UFFDIO_UNREGISTER, &range);
    return;
  }
  void* base = const_cast<uint8_t*>(r.base);
  void* p = ::mmap(base, r.len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
  uffdio_range wake{reinterpret_cast<uintptr_t>(r.base), r.len};
  ::ioctl(uffd_, UFFDIO_WAKE, &wake);
  ::munmap(p == MAP_FAILED ? base : p, r.len);
}

void Session::AppendFillOps(const View& view, uint64_t first, uint64_t n, std::vector<Op>* ops) const {
  const uint64_t pages = view.data_map / abi::kPageSize;
  if (first >= pages) return;
  n = std::min(n, pages - first);
  uint64_t off = first * abi::kPageSize;
  const uint64_t end = std::min((first + n) * abi::kPageSize, view.len);
  while (off < end) {
    Op op;
    op.handle = view.handle;
    op.offset = off;
    op.len = std::min(slot_size_, end - off);
    op.fill = true;
    ops->push_back(op);
    off += op.len;
  }
}

absl::Status Session::FetchPages(const View& view, uint64_t first, uint64_t n) {
  if (first >= view.data_map / abi::kPageSize) return absl::OutOfRangeError("past the end of the import");
  std::vector<Op> all;
  AppendFillOps(view, first, n, &all);
  // No dst: svmd installs the pages in the cache, which is what the caller
  // wants. At most 16 requests at once.
  constexpr size_t kBatch = 16;
  for (size_t i = 0; i < all.size(); i += kBatch) {
    for (const Result& r : Run(absl::MakeConstSpan(all).subspan(i, kBatch))) {
      if (!r.status.ok()) return r.status;
    }
  }
  return absl::OkStatus();
}

void Session::PagerLoop() {
  for (;;) {
    pollfd p[2] = {{uffd_, POLLIN, 0}, {pager_stop_, POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    // Every fault that is waiting is served in one batch: their fetches are
    // in flight together.
    uffd_msg msgs[64];
    ssize_t n = ::read(uffd_, msgs, sizeof(msgs));
    if (n <= 0) continue;
    std::vector<Fault> faults;
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      const auto& pf = msgs[i].arg.pagefault;
      if ((pf.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0 && MapIfCurrent(pf.address)) continue;
      faults.push_back(ResolveFault(pf.address, pf.feat.ptid));
    }
    ServeFaults(faults);
  }
}

bool Session::MapIfCurrent(uint64_t addr) {
  std::shared_ptr<MappedRange> r;
  {
    absl::MutexLock l(&ranges_mu_);
    auto it = ranges_.upper_bound(static_cast<uintptr_t>(addr));
    if (it == ranges_.begin()) return false;
    --it;
    if (addr >= it->first + it->second->len) return false;
    r = it->second;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(r->base);
  const uint64_t first = (addr - base) / abi::kPageSize;
  const uint64_t pages = r->len / abi::kPageSize;
  // The page and the current pages after it (up to the read-ahead), in one
  // call. A page whose word is 0 is not (or no longer) installed: it is
  // fetched like a missing one. svmd lands fetches in the cache file itself
  // (a page present in the file, word 0, until the install rule said yes),
  // so a page can be punched and be landing again between this check and
  // the map: the words are checked again after the map, before the thread
  // is woken, and a page whose word changed is unmapped and fetched.
  const std::atomic<uint64_t>* words = r->view->words;
  uint64_t seen[64];
  seen[0] = words[first].load(std::memory_order_acquire);
  if (seen[0] == 0) return false;
  uint64_t n = 1;
  const uint64_t limit =
      std::min<uint64_t>({pages, first + 1 + std::max<size_t>(r->readahead, 15), first + std::size(seen)});
  while (first + n < limit && (seen[n] = words[first + n].load(std::memory_order_acquire)) != 0) ++n;
  uffdio_continue c{};
  c.range.start = base + first * abi::kPageSize;
  c.range.len = n * abi::kPageSize;
  c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE;
  const bool ok = ::ioctl(uffd_, UFFDIO_CONTINUE, &c) == 0;
  const uint64_t mapped = ok ? n : c.mapped > 0 ? static_cast<uint64_t>(c.mapped) / abi::kPageSize : 0;
  if (mapped > 0) {
    for (uint64_t k = 0; k < mapped; ++k) {
      if (words[first + k].load(std::memory_order_acquire) != seen[k]) {
        // Replaced or landing again: unmapped (the next access faults),
        // and the faulting thread waits for the fetch.
        ::madvise(reinterpret_cast<void*>(c.range.start), mapped * abi::kPageSize, MADV_DONTNEED);
        return false;
      }
    }
    // The faulting page is the first one: mapped; its thread is woken.
    // A punch after this point unmaps it again.
    uffdio_range wake{c.range.start, abi::kPageSize};
    ::ioctl(uffd_, UFFDIO_WAKE, &wake);
    return true;
  }
  if (errno == EEXIST) {
    // Another thread's fault mapped it meanwhile.
    uffdio_range wake{c.range.start, abi::kPageSize};
    ::ioctl(uffd_, UFFDIO_WAKE, &wake);
    return true;
  }
  return false;  // gone meanwhile (punched): fetch it
}

Session::Fault Session::ResolveFault(uint64_t addr, uint32_t tid) {
  Fault f;
  f.page_addr = addr & ~(abi::kPageSize - 1);
  f.tid = tid;
  absl::MutexLock l(&ranges_mu_);
  auto it = ranges_.upper_bound(static_cast<uintptr_t>(addr));
  if (it == ranges_.begin()) return f;
  --it;
  if (addr >= it->first + it->second->len) return f;
  f.range = it->second;
  MappedRange& r = *f.range;
  f.page = (f.page_addr - reinterpret_cast<uintptr_t>(r.base)) / abi::kPageSize;
  // Sequential: the fault lands in or right after the last window.
  f.npages = 1;
  if (r.readahead > 0 && f.page >= r.last_page && f.page <= r.window_end) f.npages += r.readahead;
  r.last_page = f.page;
  r.window_end = f.page + f.npages;
  r.faults.fetch_add(1, std::memory_order_relaxed);
  return f;
}

void Session::ServeFaults(std::vector<Fault>& faults) {
  // A fault's fetch that failed for want of the peer is tried again twice.
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::vector<Op> ops;
    std::vector<size_t> owner;  // ops[i] serves faults[owner[i]]
    for (size_t k = 0; k < faults.size(); ++k) {
      Fault& f = faults[k];
      if (!f.range || f.done) continue;
      f.status = absl::OkStatus();
      AppendFillOps(*f.range->view, f.page, f.npages, &ops);
      owner.resize(ops.size(), k);
    }
    if (ops.empty()) break;
    const std::vector<Result> res = Run(ops);  // no dst: only the install matters
    for (size_t i = 0; i < ops.size(); ++i) {
      if (!res[i].status.ok() && faults[owner[i]].status.ok()) faults[owner[i]].status = res[i].status;
    }
    bool again = false;
    for (Fault& f : faults) {
      if (!f.range || f.done) continue;
      const bool transient = absl::IsUnavailable(f.status) || absl::IsDeadlineExceeded(f.status);
      if (f.status.ok() || !transient || attempt == 2) {
        f.done = true;
      } else {
        again = true;
      }
    }
    if (!again) break;
    ::usleep(50 * 1000);
  }
  for (const Fault& f : faults) {
    if (f.range && f.status.ok()) f.range->fetched.fetch_add(f.npages, std::memory_order_relaxed);
    if (f.range && !f.status.ok()) {
      // As for a page past the end of a truncated file; but only while the
      // mapping is still there (UnmapRange takes it out under ranges_mu_
      // before unregistering it, which wakes its faulting threads to meet
      // no mapping: EFAULT or SIGSEGV, as for any unmapped address).
      absl::MutexLock l(&ranges_mu_);
      auto it = ranges_.find(reinterpret_cast<uintptr_t>(f.range->base));
      if (it != ranges_.end() && it->second == f.range) {
        ::syscall(SYS_tgkill, ::getpid(), static_cast<pid_t>(f.tid), SIGBUS);
      }
    }
    // Installed: mapped now (with minor faults; it saves the thread a
    // second fault). Otherwise the thread retries: the page is there, or it
    // faults again (a fetch that raced an invalidation was not installed),
    // or takes its SIGBUS.
    if (f.range && f.status.ok() && minor_faults_ && MapIfCurrent(f.page_addr)) continue;
    uffdio_range wake{f.page_addr, abi::kPageSize};
    ::ioctl(uffd_, UFFDIO_WAKE, &wake);
  }
}

}  // namespace svm::internal
