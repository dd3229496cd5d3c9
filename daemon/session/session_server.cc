#include "daemon/session/session_server.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "daemon/session/validate.h"
#include "daemon/transport/transport.h"
#include "daemon/source/mirror_source.h"

namespace svm::session {

namespace {

constexpr uint64_t kTagListen = 0;
constexpr uint64_t kTagStop = 1;
uint64_t SocketTag(uint64_t id) { return id << 1; }
uint64_t BellTag(uint64_t id) { return (id << 1) | 1; }

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// How many entries one session may have taken per pass: the others get a turn.
constexpr uint32_t kDrainBudget = 64;

}  // namespace

struct Server::Session {
  uint64_t id = 0;
  UniqueFd sock;
  PeerCred cred;
  bool hello_done = false;

  // The shared memory, mapped read-write by svmd.
  UniqueFd memfd;
  uint8_t* mem = nullptr;
  uint64_t mem_size = 0;
  abi::SessionHeader* hdr = nullptr;
  abi::Sqe* sq = nullptr;
  abi::Cqe* cq = nullptr;
  abi::Event* ev = nullptr;
  uint8_t* data = nullptr;
  UniqueFd sq_bell;  // the client rings; svmd waits on it edge-triggered
  UniqueFd cq_bell;  // svmd rings
  UniqueFd ev_bell;  // svmd rings: events

  // Watches (the server's thread): the session's watch id -> the backend's.
  // Session ids count up and are never reused.
  std::map<uint32_t, uint64_t> watches;
  uint32_t next_watch = 0;

  // The event ring: filled by the backend's callbacks.
  absl::Mutex ev_mu;
  uint32_t ev_tail ABSL_GUARDED_BY(ev_mu) = 0;
  bool ev_closed ABSL_GUARDED_BY(ev_mu) = false;
  // Watches that lost events to a full ring, with the newest lost sequence:
  // each gets one whole-range overflow event when there is room.
  std::map<uint32_t, uint64_t> ev_lost ABSL_GUARDED_BY(ev_mu);

  void PushEvent(const abi::Event& e) {
    {
      absl::MutexLock l(&ev_mu);
      if (ev_closed) return;
      const uint32_t entries = hdr->ev_entries;
      auto room = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ev_mu) {
        return ev_tail - hdr->ev.head.load(std::memory_order_acquire) < entries;
      };
      auto put = [&](const abi::Event& x) ABSL_EXCLUSIVE_LOCKS_REQUIRED(ev_mu) {
        ev[ev_tail & (entries - 1)] = x;
        ++ev_tail;
        hdr->ev.tail.store(ev_tail, std::memory_order_release);
      };
      for (auto it = ev_lost.begin(); it != ev_lost.end() && room();) {
        abi::Event o{};
        o.watch = it->first;
        o.kind = static_cast<uint32_t>(source::ChangeKind::kOverflow);
        o.seq = it->second;
        o.detected_ns = source::MonotonicNs();
        put(o);
        it = ev_lost.erase(it);
      }
      if (ev_lost.count(e.watch) == 0 && room()) {
        put(e);
      } else {
        uint64_t& seq = ev_lost[e.watch];
        seq = std::max(seq, e.seq);
        hdr->ev_lost.fetch_add(1, std::memory_order_relaxed);
      }
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (hdr->ev.need_wakeup.load(std::memory_order_relaxed) != 0 && hdr->ev.need_wakeup.exchange(0) != 0) {
      const uint64_t one = 1;
      ssize_t n = ::write(ev_bell.get(), &one, sizeof(one));
      (void)n;
    }
  }

  // The server's thread only.
  uint32_t sq_head = 0;  // svmd's own copy; the shared one is only published
  struct Handle {
    std::string name;
    uint64_t len;
  };
  std::vector<Handle> handles;
  SqeLimits limits;

  // The client counters: per handle, the import's name (empty: not an
  // import) and the values svmd last added to its figures.
  struct Counted {
    std::string name;
    uint64_t reads = 0;
    uint64_t pages = 0;
  };
  absl::Mutex ctr_mu;
  std::vector<Counted> counted ABSL_GUARDED_BY(ctr_mu);
  abi::ClientCounters* ctr = nullptr;

  absl::Mutex cq_mu;
  uint32_t cq_tail ABSL_GUARDED_BY(cq_mu) = 0;
  // Taken from the ring and not yet posted (running, or waiting for room).
  uint32_t inflight ABSL_GUARDED_BY(cq_mu) = 0;
  std::deque<abi::Cqe> waiting ABSL_GUARDED_BY(cq_mu);
  bool closed ABSL_GUARDED_BY(cq_mu) = false;

  // The data area registered on the channels reads land through; goes
  // before the mapping (after every read's completion: they hold this).
  std::unique_ptr<transport::LandingAreas> areas;

  ~Session() {
    areas.reset();
    if (mem != nullptr) ::munmap(mem, mem_size);
  }

  // Takes one more entry in flight if what is in flight plus what sits in
  // the completion ring unreaped stays within the ring's size, so a client
  // that does not drain stops being served. One lock per entry.
  bool TryTake() {
    absl::MutexLock l(&cq_mu);
    const uint32_t used = std::min(cq_tail - hdr->cq.head.load(std::memory_order_acquire), hdr->cq_entries);
    if (inflight + used >= hdr->cq_entries) return false;
    ++inflight;
    return true;
  }
  // Posts a completion (or keeps it until the client makes room) and rings
  // the client when it sleeps.
  void Complete(const abi::Cqe& c) {
    {
      absl::MutexLock l(&cq_mu);
      if (closed) return;
      waiting.push_back(c);
      if (!FlushLocked()) return;
    }
    Ring();
  }
  // Moves waiting completions into the ring; true when it moved any.
  bool FlushLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(cq_mu) {
    const uint32_t entries = hdr->cq_entries;
    bool moved = false;
    while (!waiting.empty()) {
      const uint32_t head = hdr->cq.head.load(std::memory_order_acquire);
      // A head the client moved past the tail reads as a full ring: the
      // client loses its own completions, nothing else.
      if (cq_tail - head >= entries) break;
      cq[cq_tail & (entries - 1)] = waiting.front();
      waiting.pop_front();
      ++cq_tail;
      --inflight;
      hdr->cq.tail.store(cq_tail, std::memory_order_release);
      moved = true;
    }
    hdr->cq.overflow.store(waiting.empty() ? 0 : 1, std::memory_order_release);
    return moved;
  }
  void Flush() {
    bool moved;
    {
      absl::MutexLock l(&cq_mu);
      if (closed) return;
      moved = FlushLocked();
    }
    if (moved) Ring();
  }
  void Ring() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (hdr->cq.need_wakeup.load(std::memory_order_relaxed) != 0 &&
        hdr->cq.need_wakeup.exchange(0) != 0) {
      const uint64_t one = 1;
      // Never blocks in practice (the counter would have to near 2^64).
      ssize_t n = ::write(cq_bell.get(), &one, sizeof(one));
      (void)n;
    }
  }
  bool HasWork() const {
    if (!hello_done) return false;
    return hdr->sq.tail.load(std::memory_order_acquire) != sq_head;
  }
};

absl::StatusOr<std::unique_ptr<Server>> Server::Start(Backend* backend, ServerOptions opts) {
  if ((opts.sq_entries & (opts.sq_entries - 1)) != 0 || (opts.cq_entries & (opts.cq_entries - 1)) != 0) {
    return absl::InvalidArgumentError("ring sizes must be powers of two");
  }
  std::unique_ptr<Server> s(new Server(backend, std::move(opts)));
  auto fd = UnixListen(s->opts_.path, s->opts_.mode, 128, SOCK_SEQPACKET);
  if (!fd.ok()) return fd.status();
  s->listen_ = std::move(*fd);
  ::fcntl(s->listen_.get(), F_SETFL, ::fcntl(s->listen_.get(), F_GETFL) | O_NONBLOCK);
  s->epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  s->stop_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->epoll_.valid() || !s->stop_.valid()) return ErrnoStatus(errno, "session server");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kTagListen;
  ::epoll_ctl(s->epoll_.get(), EPOLL_CTL_ADD, s->listen_.get(), &ev);
  ev.data.u64 = kTagStop;
  ::epoll_ctl(s->epoll_.get(), EPOLL_CTL_ADD, s->stop_.get(), &ev);
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

Server::~Server() {
  const uint64_t one = 1;
  if (::write(stop_.get(), &one, sizeof(one)) < 0) spdlog::warn("session server: cannot stop");
  if (thread_.joinable()) thread_.join();
  ::unlink(opts_.path.c_str());
}

size_t Server::sessions() const {
  absl::MutexLock l(&mu_);
  return count_;
}

void Server::Loop() {
  absl::Time spin_until = absl::InfinitePast();
  std::vector<epoll_event> events(64);
  for (;;) {
    bool worked = false;
    std::vector<uint64_t> broken;
    for (auto& [id, s] : live_) {
      if (!s->hello_done) continue;
      bool ok = true;
      if (s->HasWork()) worked |= Drain(*s, &ok);
      if (!ok) broken.push_back(id);
      // A client that made room gets what was waiting.
      if (s->hdr->cq.overflow.load(std::memory_order_acquire) != 0) s->Flush();
    }
    for (uint64_t id : broken) Close(id);
    int timeout = 0;
    if (worked) {
      spin_until = absl::Now() + opts_.spin;
    } else if (absl::Now() < spin_until) {
      // Polling: give the CPU to whoever else is runnable on it (on a busy
      // machine it is often the thread this one waits for: the client, or
      // the one that completes a read).
      ::sched_yield();
    } else {
      // Sleep: every ring says so first, then is checked once more.
      for (auto& [id, s] : live_) {
        if (s->hello_done) s->hdr->sq.need_wakeup.store(1, std::memory_order_seq_cst);
      }
      bool pending = false;
      for (auto& [id, s] : live_) pending |= s->HasWork();
      timeout = pending ? 0 : -1;
    }
    int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout);
    if (timeout != 0) {
      for (auto& [id, s] : live_) {
        if (s->hello_done) s->hdr->sq.need_wakeup.store(0, std::memory_order_relaxed);
      }
      spin_until = absl::Now() + opts_.spin;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::error("session server: epoll_wait: {}", std::strerror(errno));
      return;
    }
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = events[i].data.u64;
      if (tag == kTagStop) {
        std::vector<uint64_t> ids;
        for (auto& [id, s] : live_) ids.push_back(id);
        for (uint64_t id : ids) Close(id);
        return;
      }
      if (tag == kTagListen) {
        Accept();
        continue;
      }
      const uint64_t id = tag >> 1;
      auto it = live_.find(id);
      if (it == live_.end()) continue;
      if ((tag & 1) == 0) {
        if ((events[i].events & (EPOLLHUP | EPOLLERR)) != 0 || !OnSocket(*it->second)) Close(id);
      }
      // A doorbell: the rings are drained at the top of the loop.
    }
  }
}

void Server::Accept() {
  for (;;) {
    int fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN) spdlog::warn("session socket: accept: {}", std::strerror(errno));
      return;
    }
    UniqueFd sock(fd);
    if (live_.size() >= backend_->MaxSessions() + opts_.hello_slack) {
      spdlog::warn("session socket closed unanswered: {} sockets are open (--max-sessions {} "
                   "and {} waiting for their hello)",
                   live_.size(), backend_->MaxSessions(), opts_.hello_slack);
      continue;
    }
    auto cred = GetPeerCred(fd);
    if (!cred.ok()) continue;
    auto s = std::make_shared<Session>();
    s->id = next_id_++;
    s->sock = std::move(sock);
    s->cred = *cred;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = SocketTag(s->id);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s->sock.get(), &ev) != 0) continue;
    live_[s->id] = std::move(s);
    absl::MutexLock l(&mu_);
    count_ = live_.size();
  }
}

void Server::Close(uint64_t id) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  Session& s = *it->second;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s.sock.get(), nullptr);
  if (s.sq_bell.valid()) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s.sq_bell.get(), nullptr);
  {
    absl::MutexLock l(&s.cq_mu);
    s.closed = true;
  }
  // After Unwatch returns no callback runs: nothing refers to the session
  // but reads in flight, which hold it until they finish.
  for (const auto& [id, w] : s.watches) backend_->Unwatch(w);
  backend_->SessionClosed(s.id);
  {
    absl::MutexLock l(&mu_);
    harvest_.erase(s.id);
  }
  Harvest(s);  // what the client counted stays counted
  {
    absl::MutexLock l(&s.ev_mu);
    s.ev_closed = true;
  }
  live_.erase(it);
  absl::MutexLock l(&mu_);
  count_ = live_.size();
}

void Server::HarvestClientCounters() {
  std::vector<std::shared_ptr<Session>> all;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [id, s] : harvest_) all.push_back(s);
  }
  for (const auto& s : all) Harvest(*s);
}

void Server::Harvest(Session& s) {
  struct Delta {
    std::string name;
    uint64_t reads, pages;
  };
  std::vector<Delta> out;
  {
    absl::MutexLock l(&s.ctr_mu);
    for (size_t h = 0; h < s.counted.size(); ++h) {
      Session::Counted& c = s.counted[h];
      if (c.name.empty()) continue;
      // Written by the client: a value below what was added before (a
      // client that lies, or wrote garbage) adds nothing until it passes it.
      const uint64_t reads = s.ctr[h].reads.load(std::memory_order_relaxed);
      const uint64_t pages = s.ctr[h].pages_from_cache.load(std::memory_order_relaxed);
      Delta d{c.name, reads > c.reads ? reads - c.reads : 0, pages > c.pages ? pages - c.pages : 0};
      c.reads = std::max(c.reads, reads);
      c.pages = std::max(c.pages, pages);
      if (d.reads != 0 || d.pages != 0) out.push_back(std::move(d));
    }
  }
  for (const Delta& d : out) backend_->CountClientHits(d.name, d.reads, d.pages);
}

bool Server::OnSocket(Session& s) {
  alignas(8) char buf[abi::kMaxMsg];
  for (;;) {
    int fds[4];
    int nfds = 0;
    ssize_t n = abi::RecvMsg(s.sock.get(), buf, sizeof(buf), fds, &nfds, MSG_DONTWAIT);
    // Only a deposit carries a descriptor; the others are closed unread.
    std::vector<UniqueFd> received;
    for (int i = 0; i < nfds; ++i) received.emplace_back(fds[i]);
    if (n == -EAGAIN) return true;
    if (n <= 0) return false;
    auto m = ParseClientMsg(buf, static_cast<size_t>(n));
    if (!m.ok()) {
      SendError(s, m.status());
      return false;
    }
    bool ok = true;
    if (m->type == abi::kHello) {
      ok = s.hello_done ? SendError(s, absl::FailedPreconditionError("hello sent twice")) && false
                        : OnHello(s);
    } else if (!s.hello_done) {
      SendError(s, absl::FailedPreconditionError("hello first"));
      ok = false;
    } else if (m->type == abi::kWatch) {
      ok = OnWatch(s, m->name);
    } else if (m->type == abi::kUnwatch) {
      OnUnwatch(s, m->watch);
    } else if (m->type == abi::kDeposit) {
      ok = OnDeposit(s, std::move(received));
    } else {
      ok = OnOpen(s, m->name);
    }
    if (!ok) return false;
  }
}

bool Server::SendError(Session& s, const absl::Status& st) {
  abi::ErrorMsg e{};
  e.h.type = abi::kError;
  e.code = static_cast<uint32_t>(st.code());
  const size_t tl = std::min(st.message().size(), sizeof(e.text));
  e.text_len = static_cast<uint32_t>(tl);
  std::memcpy(e.text, st.message().data(), tl);
  e.h.len = static_cast<uint32_t>(offsetof(abi::ErrorMsg, text) + tl);
  return abi::SendMsg(s.sock.get(), &e, e.h.len, nullptr, 0) == 0;
}

bool Server::OnHello(Session& s) {
  if (auto st = backend_->SessionOpening(s.cred, s.id); !st.ok()) return SendError(s, st) && false;
  const uint64_t sq_off = AlignUp(sizeof(abi::SessionHeader), 4096);
  const uint64_t cq_off = AlignUp(sq_off + uint64_t{opts_.sq_entries} * sizeof(abi::Sqe), 4096);
  const uint64_t ev_off = AlignUp(cq_off + uint64_t{opts_.cq_entries} * sizeof(abi::Cqe), 4096);
  const uint64_t ctr_off = AlignUp(ev_off + uint64_t{opts_.ev_entries} * sizeof(abi::Event), 4096);
  const uint64_t data_off = AlignUp(ctr_off + uint64_t{opts_.max_handles} * sizeof(abi::ClientCounters), 4096);
  const uint64_t size = data_off + opts_.data_size;
  UniqueFd mfd(::memfd_create("svm-session", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!mfd.valid() || ::ftruncate(mfd.get(), static_cast<off_t>(size)) != 0 ||
      ::fcntl(mfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return SendError(s, ErrnoStatus(errno, "session memory")) && false;
  }
  void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd.get(), 0);
  if (m == MAP_FAILED) return SendError(s, ErrnoStatus(errno, "map the session memory")) && false;
  s.memfd = std::move(mfd);
  s.mem = static_cast<uint8_t*>(m);
  s.mem_size = size;
  s.hdr = new (s.mem) abi::SessionHeader{};
  s.hdr->magic = abi::kMagic;
  s.hdr->version = abi::kVersion;
  s.hdr->sq_entries = opts_.sq_entries;
  s.hdr->cq_entries = opts_.cq_entries;
  s.hdr->sq_offset = sq_off;
  s.hdr->cq_offset = cq_off;
  s.hdr->data_offset = data_off;
  s.hdr->ev_offset = ev_off;
  s.hdr->ev_entries = opts_.ev_entries;
  s.hdr->ctr_offset = ctr_off;
  s.hdr->ctr_entries = opts_.max_handles;
  s.hdr->data_size = opts_.data_size;
  s.hdr->size = size;
  s.sq = reinterpret_cast<abi::Sqe*>(s.mem + sq_off);
  s.cq = reinterpret_cast<abi::Cqe*>(s.mem + cq_off);
  s.ev = reinterpret_cast<abi::Event*>(s.mem + ev_off);
  s.data = s.mem + data_off;
  s.areas = std::make_unique<transport::LandingAreas>(s.data, opts_.data_size / 4096 * 4096,
                                                      transport::LandingUse::kReads);
  s.ctr = reinterpret_cast<abi::ClientCounters*>(s.mem + ctr_off);
  s.limits.data_size = opts_.data_size;
  s.sq_bell = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  s.cq_bell = UniqueFd(::eventfd(0, EFD_CLOEXEC));
  s.ev_bell = UniqueFd(::eventfd(0, EFD_CLOEXEC));
  if (!s.sq_bell.valid() || !s.cq_bell.valid() || !s.ev_bell.valid()) {
    return SendError(s, ErrnoStatus(errno, "session doorbells")) && false;
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLET;
  ev.data.u64 = BellTag(s.id);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s.sq_bell.get(), &ev) != 0) return false;
  abi::HelloOkMsg ok{};
  ok.h.type = abi::kHelloOk;
  ok.h.len = sizeof(ok);
  ok.version = abi::kVersion;
  ok.memory_size = size;
  const int fds[4] = {s.memfd.get(), s.sq_bell.get(), s.cq_bell.get(), s.ev_bell.get()};
  if (abi::SendMsg(s.sock.get(), &ok, sizeof(ok), fds, 4) != 0) return false;
  s.hello_done = true;
  absl::MutexLock l(&mu_);
  harvest_[s.id] = live_.at(s.id);
  return true;
}

bool Server::OnOpen(Session& s, const std::string& name) {
  if (s.handles.size() >= opts_.max_handles) {
    return SendError(s, absl::ResourceExhaustedError(
                            absl::StrCat("a session may open ", opts_.max_handles, " handles")));
  }
  auto o = backend_->Open(name, s.cred);
  if (!o.ok()) return SendError(s, o.status());
  abi::OpenOkMsg ok{};
  ok.h.type = abi::kOpenOk;
  ok.h.len = sizeof(ok);
  ok.handle = static_cast<uint32_t>(s.handles.size());
  ok.kind = o->kind;
  ok.len = o->len;
  s.handles.push_back({name, o->len});
  {
    absl::MutexLock l(&s.ctr_mu);
    s.counted.push_back({o->kind == abi::kImport ? name : std::string()});
  }
  s.limits.handle_len.push_back(o->len);
  const int fds[2] = {o->data.get(), o->words.get()};
  const int nfds = o->kind == abi::kImport ? 2 : 0;
  return abi::SendMsg(s.sock.get(), &ok, sizeof(ok), fds, nfds) == 0;
}

bool Server::OnDeposit(Session& s, std::vector<UniqueFd> fds) {
  if (fds.empty() || fds.size() > 2) {
    return SendError(s, absl::InvalidArgumentError(absl::StrCat(
                            "a deposit carries one or two descriptors, not ", fds.size())));
  }
  auto token = backend_->Deposit(s.cred, s.id, std::move(fds[0]),
                                 fds.size() == 2 ? std::move(fds[1]) : UniqueFd());
  if (!token.ok()) return SendError(s, token.status());
  abi::DepositOkMsg ok{};
  ok.h.type = abi::kDepositOk;
  ok.h.len = sizeof(ok);
  ok.token = *token;
  return abi::SendMsg(s.sock.get(), &ok, sizeof(ok), nullptr, 0) == 0;
}

bool Server::OnWatch(Session& s, const std::string& name) {
  if (s.watches.size() >= opts_.max_watches) {
    return SendError(s, absl::ResourceExhaustedError(
                            absl::StrCat("a session may hold ", opts_.max_watches, " watches")));
  }
  if (s.next_watch == UINT32_MAX) {
    return SendError(s, absl::ResourceExhaustedError("the session has used up its watch ids"));
  }
  // Ids are consumed only by watches that exist: the client knows the next.
  const uint32_t watch = s.next_watch;
  Session* target = &s;  // Close() unwatches before the session can go
  auto id = backend_->Watch(name, [target, watch](const abi::Event& e) {
    abi::Event x = e;
    x.watch = watch;
    target->PushEvent(x);
  });
  if (!id.ok()) return SendError(s, id.status());
  s.watches[watch] = *id;
  ++s.next_watch;
  abi::OpenOkMsg ok{};
  ok.h.type = abi::kOpenOk;
  ok.h.len = sizeof(ok);
  ok.handle = watch;
  return abi::SendMsg(s.sock.get(), &ok, sizeof(ok), nullptr, 0) == 0;
}

void Server::OnUnwatch(Session& s, uint32_t watch) {
  auto it = s.watches.find(watch);
  if (it == s.watches.end()) return;  // already gone, or never was: nothing to undo
  // After Unwatch returns no callback of this watch runs.
  backend_->Unwatch(it->second);
  s.watches.erase(it);
  absl::MutexLock l(&s.ev_mu);
  s.ev_lost.erase(watch);
}

bool Server::Drain(Session& s, bool* ok) {
  const uint32_t entries = s.hdr->sq_entries;
  const uint32_t tail = s.hdr->sq.tail.load(std::memory_order_acquire);
  if (tail - s.sq_head > entries) {
    spdlog::warn("session of pid {}: submission ring corrupted (tail {} head {}); closing it",
                 s.cred.pid, tail, s.sq_head);
    *ok = false;
    return false;
  }
  bool took = false;
  for (uint32_t budget = kDrainBudget; budget > 0 && s.sq_head != tail; --budget) {
    if (!s.TryTake()) break;  // the client must drain completions first
    abi::Sqe e;
    std::memcpy(&e, &s.sq[s.sq_head & (entries - 1)], sizeof(e));  // read once
    ++s.sq_head;
    s.hdr->sq.head.store(s.sq_head, std::memory_order_release);
    took = true;
    auto r = ParseSqe(e, s.limits);
    abi::Cqe c{};
    c.user_data = e.user_data;
    if (!r.ok() || r->nop) {
      if (!r.ok()) {
        c.status = static_cast<uint32_t>(r.status().code());
        // The message goes to the entry's data range only when it is valid.
        if (e.data_offset < s.limits.data_size && e.len <= s.limits.data_size - e.data_offset) {
          const size_t ml = std::min<size_t>(r.status().message().size(), e.len);
          std::memcpy(s.data + e.data_offset, r.status().message().data(), ml);
          c.msg_len = static_cast<uint32_t>(ml);
        }
      }
      s.Complete(c);
      continue;
    }
    auto self = live_.at(s.id);
    uint8_t* dst = s.data + r->data_offset;
    const uint64_t len = r->len;
    backend_->Read(s.handles[r->handle].name, r->offset, absl::MakeSpan(dst, len), r->fresh, r->fill,
                   r->in_cache, s.areas.get(),
                   [self, dst, len, user_data = e.user_data](absl::StatusOr<ReadDone> done) {
                     abi::Cqe c{};
                     c.user_data = user_data;
                     if (done.ok()) {
                       c.flags = done->in_cache ? uint32_t{abi::kDoneInCache} : 0u;
                       c.seq = done->seq;
                       c.pages_from_cache = static_cast<uint32_t>(done->pages_from_cache);
                       c.pages_fetched = static_cast<uint32_t>(done->pages_fetched);
                     } else {
                       c.status = static_cast<uint32_t>(done.status().code());
                       const size_t ml = std::min<size_t>(done.status().message().size(), len);
                       std::memcpy(dst, done.status().message().data(), ml);
                       c.msg_len = static_cast<uint32_t>(ml);
                     }
                     self->Complete(c);
                   });
  }
  return took;
}

}  // namespace svm::session
