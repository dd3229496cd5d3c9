#include "daemon/transport/rdma/rdma_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <set>
#include <optional>
#include <thread>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/check.h"
#include "common/executor.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/net.h"
#include "daemon/coherence/coherence.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/frame.h"
#include "daemon/transport/listener.h"
#include "daemon/transport/rdma/verbs.h"
#include "daemon/transport/session_registry.h"
#include "daemon/transport/thread_count.h"
#include "svm/v1/transport.pb.h"

namespace svm::transport {
namespace {

using rdma::Access;
using rdma::Device;
using rdma::Endpoint;
using rdma::Mode;
using rdma::PdPtr;
using rdma::Poller;
using rdma::Qp;
using rdma::Registration;

constexpr size_t kPage = source::kPageSize;
// A FETCH on the wire moves at most one slot (longer Fetch() calls are split).
constexpr uint32_t kSlotPages = 256;
constexpr size_t kSlotBytes = kSlotPages * kPage;
constexpr uint32_t kSlots = 8;      // importer: fetches in flight per connection
constexpr uint32_t kStaging = 2;    // exporter: responses being written per connection
constexpr uint32_t kRecvDepth = 64;  // receive buffers posted by each side
// SENDs in flight are bounded by the peer's receive queue depth; RNR retry 7
// on the QP is the backstop when the peer is slow to repost.
constexpr uint32_t kSendWindow = kRecvDepth;
constexpr size_t kMsgSize = 512;  // header + the largest payload (error text is truncated)
constexpr size_t kMaxQueued = 1u << 16;  // messages; an importer this far behind is dropped
constexpr absl::Duration kHelloTimeout = absl::Seconds(10);
// Why an exporter refuses a HELLO whose token it cannot accept.
constexpr char kRefusedToken[] = "HELLO with an unknown or used session token";
// An idle connection sends a keepalive this often, so a peer whose QP is
// gone is noticed when transport retries exhaust even when nothing else is
// sent. (rxe on 6.1 was not seen to exhaust them within 7 s: a peer
// process's death is noticed through the liveness socket instead.)
constexpr absl::Duration kKeepalive = absl::Seconds(1);
constexpr absl::Duration kLivenessHelloTimeout = absl::Seconds(2);
constexpr absl::Duration kBeginLifetime = absl::Seconds(30);

// Copy workers (all exporter connections of a transport share them): a copy
// blocked in the backend takes one; the pool grows up to this many.
constexpr int kCopyWorkers = 16;
// Importer side: the workers that run ImportBackend::OnInvalidation, one
// task per connection at a time (see DeliveryWorkers).
constexpr int kDeliveryWorkers = 16;
// A completion context serves connections while the CQ entries they can
// have outstanding (receive queue + send queue) fit this budget; its CQ has
// twice as many, for the flushed completions of connections being closed.
constexpr int kContextCqBudget = 4096;
// The completion context's sweep: keepalives, handshake deadlines.
constexpr absl::Duration kSweep = absl::Milliseconds(250);

// Work request ids: kind (8 bits) | connection id (32 bits) | index (24
// bits). Completions are dispatched by the connection id, never by QP
// number: a closed connection's flushed completions may still sit in the
// shared CQ when its QP number is reused.
enum WrKind : uint64_t { kWrRecv = 1, kWrSend = 2, kWrWrite = 3, kWrRead = 4 };
uint64_t WrId(WrKind k, uint64_t conn, uint64_t i) {
  return (uint64_t{k} << 56) | ((conn & 0xffffffffu) << 24) | (i & 0xffffff);
}
uint64_t WrKindOf(uint64_t wr_id) { return wr_id >> 56; }
uint64_t WrConnOf(uint64_t wr_id) { return (wr_id >> 24) & 0xffffffffu; }
uint64_t WrIndexOf(uint64_t wr_id) { return wr_id & 0xffffff; }

using RdmaFetch = RdmaFetchPayload;

// A message fits one receive buffer (error text is cut to fit).
std::vector<uint8_t> MakeMsg(FrameType type, uint64_t id, const void* fixed, size_t fixed_len,
                             const void* tail = nullptr, size_t tail_len = 0) {
  return MakeFrame(type, id, fixed, fixed_len, tail, tail_len, kMsgSize);
}

// The opaque endpoint bytes of BeginConnect and SessionOffer: a queue pair
// as svm.v1.RdmaEndpoint (with the exporter's liveness port; 0 from the
// importer).
std::string EncodeEndpoint(const Endpoint& e, uint16_t liveness_port) {
  v1::RdmaEndpoint m;
  m.set_qpn(e.qpn);
  m.set_psn(e.psn);
  m.set_gid(std::string(reinterpret_cast<const char*>(e.gid.data()), e.gid.size()));
  m.set_gid_index(e.gid_index);
  m.set_mtu(e.mtu);
  m.set_liveness_port(liveness_port);
  return PackEndpoint(m);
}

// FAILED_PRECONDITION when bytes are not an rdma endpoint at all,
// INVALID_ARGUMENT when the queue pair it describes is not a valid one.
absl::StatusOr<Endpoint> DecodeEndpoint(std::string_view bytes, uint32_t* liveness_port) {
  v1::RdmaEndpoint m;
  if (!UnpackEndpoint(bytes, &m)) return absl::FailedPreconditionError("no rdma endpoint");
  Endpoint e;
  if (m.gid().size() != e.gid.size()) {
    return absl::InvalidArgumentError(absl::StrFormat("rdma endpoint: %u-byte gid", m.gid().size()));
  }
  e.qpn = m.qpn();
  e.psn = m.psn();
  std::memcpy(e.gid.data(), m.gid().data(), e.gid.size());
  e.gid_index = m.gid_index();
  e.mtu = m.mtu();
  if (auto st = e.Validate(); !st.ok()) return st;
  *liveness_port = m.liveness_port();
  return e;
}

struct Unmap {
  size_t len;
  void operator()(uint8_t* p) const { ::munmap(p, len); }
};
using MemPtr = std::unique_ptr<uint8_t, Unmap>;

absl::StatusOr<MemPtr> MapMemory(size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return ErrnoStatus(errno, absl::StrFormat("map %u bytes", len));
  return MemPtr(static_cast<uint8_t*>(p), Unmap{len});
}

class Conn;
class CompletionContext;

// Importer side: invalidations are handed to the backend off the completion
// thread (which other connections share). Process-wide and never destroyed:
// an importer's channel may outlive its transport, and a task may drop the
// last reference to its connection.
Executor& DeliveryWorkers() {
  static Executor* const workers = new Executor(1, kDeliveryWorkers);
  return *workers;
}

// A protection domain: what the queue pairs in it can reach. Exporter: one
// per peer protection key ("peer KEY", Nic::DomainFor), holding every data
// connection of that peer and the registrations of the regions opened for
// it (Region::RemoteFor); importer: one per exporter ("link ADDRESS"),
// holding the connections to it, their buffers and the landing areas
// registered on them (a reconnection to the same exporter finds the
// areas it registered before usable). So no peer's queue pair can touch
// memory registered for another peer, whatever rkey it presents. Holders
// keep the Nic (and so the device) alive longer than the domain, and their
// registrations and queue pairs shorter.
struct Domain {
  PdPtr pd;
};

// The device, the protection domains in use, and the completion contexts
// serving its connections; shared so a connection outliving the transport
// keeps them alive. Declaration order is teardown order reversed: contexts
// (their CQs) go first, then the PD, then the device. Every registered
// connection holds a reference, so the contexts are empty by then.
struct Nic {
  ~Nic();
  // A context with room for a connection that can have cqe completions
  // outstanding (reserved until Release); a new one when all are full.
  absl::StatusOr<CompletionContext*> AcquireContext(int cqe);
  // The domain of a peer protection key: made on first use, freed with its
  // last holder (connections, registrations).
  absl::StatusOr<std::shared_ptr<Domain>> DomainFor(const std::string& key);
  // A domain of its own (an importer's connection to an exporter it was
  // not told the address of: BeginConnect without one).
  absl::StatusOr<std::shared_ptr<Domain>> NewDomain() const;

  std::unique_ptr<Device> device;
  // Holds only the probe registrations RegisterRegion makes: no queue pair
  // is ever created in it. Released before the device is closed.
  PdPtr pd;
  // Data buffers: kAuto (ODP when the device passed the data check), kOdp
  // (checked usable at start-up) or kPinned (--rdma-registration pinned).
  Mode data_mode = Mode::kAuto;
  uint8_t ack_timeout = 14;  // every QP's (verbs exponent; RdmaOptions::ack_timeout)
  absl::Mutex contexts_mu;  // guards contexts (not what they serve)
  std::vector<std::unique_ptr<CompletionContext>> contexts ABSL_GUARDED_BY(contexts_mu);
  absl::Mutex domains_mu;
  std::map<std::string, std::weak_ptr<Domain>> domains ABSL_GUARDED_BY(domains_mu);
};

// ------------------------------------------------------ completion context
// One CQ, its completion channel and one thread, serving many connections
// of a device (UCX's uct iface progress, SPDK's poll group): the thread
// sleeps on the channel, an eventfd and the connections' liveness sockets
// (Poller::Harvest), dispatches each
// completion to its connection by the connection id in its wr_id, and
// services the connections that asked for it (Wake) plus, every kSweep, all
// of them (keepalives, deadlines). It only dispatches: work that may block
// (an exporter's page copy) runs on workers, and posting is done by
// whichever thread queues the work (under the connection's mutex).
//
// Lifetimes: a registered connection is held (shared_ptr) until its close
// has finished (Conn::Service returned true); it holds the Nic, which owns
// the context, so a context outlives every connection on it. The last
// reference to the Nic may be dropped on a context's own thread (a finished
// connection released there): the context's destructor then detaches the
// thread, and the loop returns without touching the context again.
class CompletionContext {
 public:
  static absl::StatusOr<std::unique_ptr<CompletionContext>> Create(const Device& dev, int budget);
  ~CompletionContext();

  Poller& poller() { return *poller_; }
  bool OnThread() const { return std::this_thread::get_id() == thread_.get_id(); }
  // Reserves room for cqe outstanding completions; false when full.
  bool TryReserve(int cqe) {
    absl::MutexLock l(&mu_);
    if (locked_.reserved + cqe > budget_) return false;
    locked_.reserved += cqe;
    return true;
  }
  void Release(int cqe) {
    absl::MutexLock l(&mu_);
    locked_.reserved -= cqe;
  }
  // Serves conn from now on (its QP is on this context's CQ).
  void Add(std::shared_ptr<Conn> conn);
  // The thread also sleeps on fd (a connection's liveness socket) and calls
  // the connection's OnLivenessEvent when it is readable or hung up, until
  // Unwatch (the context's thread, once the connection is closed). The fd
  // stays open while the connection is registered.
  void Watch(uint64_t conn_id, int fd) {
    {
      absl::MutexLock l(&mu_);
      locked_.watched[conn_id] = fd;
    }
    Wake(conn_id);
  }
  void Unwatch(uint64_t conn_id) {
    absl::MutexLock l(&mu_);
    locked_.watched.erase(conn_id);
  }
  // Any thread: the connection is serviced on the next round.
  void Wake(uint64_t conn_id) {
    {
      absl::MutexLock l(&mu_);
      locked_.ready.push_back(conn_id);
    }
    uint64_t one = 1;
    (void)!::write(wake_fd_.get(), &one, sizeof(one));
  }

 private:
  CompletionContext() = default;
  void Loop();
  std::shared_ptr<Conn> Find(uint64_t id) {
    absl::MutexLock l(&mu_);
    auto it = locked_.conns.find(id);
    return it == locked_.conns.end() ? nullptr : it->second;
  }

  int budget_ = 0;  // CQ entries connections may reserve; set by Create
  std::unique_ptr<Poller> poller_;
  UniqueFd wake_fd_;
  absl::Mutex mu_;
  // Shared with the threads that add and wake connections.
  struct Locked {
    std::map<uint64_t, std::shared_ptr<Conn>> conns;  // by connection id
    std::vector<uint64_t> ready;                     // ids to service
    std::map<uint64_t, int> watched;                 // liveness sockets by id
    int reserved = 0;                                // CQ entries promised
    bool stopping = false;
  };
  Locked locked_ ABSL_GUARDED_BY(mu_);
  // The thread's only: set while it releases connections (see above).
  bool* destroyed_ = nullptr;
  std::thread thread_;  // last: started once everything above exists
};

absl::StatusOr<std::unique_ptr<CompletionContext>> CompletionContext::Create(const Device& dev,
                                                                             int budget) {
  auto ctx = std::unique_ptr<CompletionContext>(new CompletionContext());
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return ErrnoStatus(errno, "eventfd");
  ctx->wake_fd_.Reset(efd);
  // Twice the budget, within what the device allows.
  int cqe = 2 * budget;
  if (dev.caps().max_cqe > 0) cqe = std::min(cqe, dev.caps().max_cqe);
  ctx->budget_ = cqe / 2;
  auto poller = Poller::Create(dev, cqe);
  if (!poller.ok()) return poller.status();
  ctx->poller_ = std::move(*poller);
  ctx->thread_ = std::thread([c = ctx.get()] { c->Loop(); });
  return ctx;
}

CompletionContext::~CompletionContext() {
  if (OnThread()) {
    // Released by the last connection on this very thread: see Loop.
    *destroyed_ = true;
    thread_.detach();
    return;
  }
  {
    absl::MutexLock l(&mu_);
    locked_.stopping = true;
  }
  uint64_t one = 1;
  (void)!::write(wake_fd_.get(), &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<CompletionContext*> Nic::AcquireContext(int cqe) {
  absl::MutexLock l(&contexts_mu);
  for (auto& c : contexts) {
    if (c->TryReserve(cqe)) return c.get();
  }
  auto c = CompletionContext::Create(*device, kContextCqBudget);
  if (!c.ok()) return c.status();
  if (!(*c)->TryReserve(cqe)) return absl::ResourceExhaustedError("connection too large for a CQ");
  contexts.push_back(std::move(*c));
  SPDLOG_DEBUG("rdma completion context {} on {}", contexts.size(), device->name());
  return contexts.back().get();
}

absl::StatusOr<std::shared_ptr<Domain>> Nic::NewDomain() const {
  auto pd = device->AllocPd();
  if (!pd.ok()) return pd.status();
  auto d = std::make_shared<Domain>();
  d->pd = std::move(*pd);
  return d;
}

absl::StatusOr<std::shared_ptr<Domain>> Nic::DomainFor(const std::string& key) {
  absl::MutexLock l(&domains_mu);
  for (auto it = domains.begin(); it != domains.end();) {
    if (it->second.expired()) it = domains.erase(it);
    else ++it;
  }
  if (auto it = domains.find(key); it != domains.end()) {
    if (auto d = it->second.lock()) return d;
  }
  auto d = NewDomain();
  if (!d.ok()) return d.status();
  domains[key] = *d;
  return *d;
}

Nic::~Nic() {
  std::vector<std::unique_ptr<CompletionContext>> c;
  {
    absl::MutexLock l(&contexts_mu);
    c.swap(contexts);
  }
  c.clear();  // joins their threads (or detaches the calling one)
}

// ------------------------------------------------------------- work items
// What a connection posts on its send queue, in the order queued.
struct SendMsg {  // a SEND of one message (header + payload)
  std::vector<uint8_t> bytes;
};
struct WriteData {  // exporter: an RDMA WRITE of a staging buffer into the importer's area
  uint32_t staging = 0;
  size_t len = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
};
struct ReadData {  // importer: an RDMA READ of the exporter's region into a slot
  uint32_t slot = 0;
  size_t len = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  // Set: the READ lands at this offset of a landing area instead (the
  // caller's memory itself); the slot only tracks the READ.
  const Registration* local = nullptr;
  uint64_t local_offset = 0;
};
using WorkItem = std::variant<SendMsg, WriteData, ReadData>;

// A connection's life as its completion context sees it.
enum class ConnState {
  kOpen,      // serving; any thread may queue work and close it
  kClosing,   // closed: QP in ERR (nothing more is sent or accepted); waiting
              // for work still outside (exporter copies) before the backend
              // is told (the context's thread moves it on)
  kFinished,  // OnClosed ran; the context drops the connection
};

// One side of a data connection: the queue pair and its buffers, served by
// a completion context's thread. Its verbs objects are created by the
// creating thread; then receives are posted only by the context's thread,
// and the send queue by whichever thread queues work, under mu_.
class Conn : public std::enable_shared_from_this<Conn> {
 public:
  virtual ~Conn() {
    if (ctx_ != nullptr) ctx_->Release(cqe_);
  }
  const Endpoint& local() const { return qp_->local(); }
  uint64_t id() const { return conn_id_; }

  // --- the context's thread only
  // One completion of this connection's QP.
  absl::Status OnCompletion(const ibv_wc& wc);
  // Keepalive, deadlines, and the steps of a close. True once finished
  // (OnClosed ran): the context then drops the connection.
  bool Service(absl::Time now);
  // The context's thread: the liveness socket is readable or hung up. It
  // carries nothing after the HELLO: EOF, an error or unexpected bytes
  // close the connection.
  void OnLivenessEvent();
  // Any thread: closes the connection for why (no-op once closed).
  void Fail(absl::Status why) {
    absl::MutexLock l(&mu_);
    CloseLocked(std::move(why));
  }

 protected:
  Conn(std::shared_ptr<Nic> nic, std::shared_ptr<Domain> domain, uint64_t conn_id)
      : nic_(std::move(nic)), domain_(std::move(domain)), conn_id_(conn_id) {}

  // Buffers, registrations, a completion context and the QP (RESET).
  // data_len: the importer's receive area or the exporter's staging buffers.
  absl::Status Init(size_t data_len, Access data_access);
  // RTR/RTS towards remote, then the receives are posted; work queued from
  // now on is posted. The context serves the connection after Attach().
  absl::Status ConnectQp(const Endpoint& remote);
  void Attach() { ctx_->Add(shared_from_this()); }

  // Queues work behind everything queued and posts what the send window
  // allows; false once closed.
  bool Enqueue(WorkItem item) {
    absl::MutexLock l(&mu_);
    return EnqueueLocked(std::move(item));
  }
  bool EnqueueLocked(WorkItem item) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseLocked(absl::Status why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Attaches the liveness socket, watched by the context from now on.
  // False when one is attached already.
  bool SetLiveness(UniqueFd fd);
  void Wake() { ctx_->Wake(conn_id_); }

  // Role hooks, all on the context's thread.
  virtual absl::Status OnMessage(const FrameHeader& h, absl::Span<const uint8_t> payload) = 0;
  virtual void OnWriteDone(uint32_t /*staging*/) {}
  virtual void OnReadDone(uint32_t /*slot*/) {}
  // Each time the connection is serviced while open (deadlines, deferred work).
  virtual absl::Status Tick(absl::Time /*now*/) { return absl::OkStatus(); }
  // Keepalives are sent only once established.
  virtual bool established() const = 0;
  // Closed: may the backend be told now? (exporter: no copy outstanding)
  virtual bool Quiesced() { return true; }
  // The connection is closed (QP in ERR): the last call.
  virtual void OnClosed(const absl::Status& why) = 0;

  const std::shared_ptr<Nic> nic_;  // first: released last
  // Where the QP and every registration of this connection live; released
  // after them, before the Nic.
  const std::shared_ptr<Domain> domain_;
  const uint64_t conn_id_;
  std::string peer_name_ = "?";
  CompletionContext* ctx_ = nullptr;  // owned by nic_
  int cqe_ = 0;                       // reserved on ctx_
  // Memory before its registrations, registrations before the QP: the
  // reverse is teardown order (QP, MRs, memory).
  MemPtr recv_mem_{nullptr, Unmap{0}};
  MemPtr send_mem_{nullptr, Unmap{0}};
  MemPtr data_mem_{nullptr, Unmap{0}};
  std::optional<Registration> recv_mr_, send_mr_, data_mr_;
  std::unique_ptr<Qp> qp_;

  // LOCKING: mu_ guards locked_ and the subclasses' Locked parts; it is
  // taken by the context's thread, callers (Fetch, PushInvalidation) and
  // copy workers. Never held while calling a backend; the context's own
  // mutex may be taken under it (Wake), never the other way round.
  mutable absl::Mutex mu_;
  struct Locked {
    std::deque<WorkItem> out;  // queued, not posted yet
    bool qp_ready = false;     // connected: queued work may be posted
    bool closed = false;
    absl::Status close_reason;
    UniqueFd liveness;  // set once, closed with the object
    // The send window: SENDs posted and not completed, and the next send
    // buffer (sequence modulo kSendWindow).
    uint32_t send_inflight = 0;
    uint64_t send_seq = 0;
    absl::Time last_send = absl::Now();
  };
  Locked locked_ ABSL_GUARDED_BY(mu_);

 private:
  absl::Status FlushLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The context's thread only.
  struct CtxOwned {
    ConnState state = ConnState::kOpen;
  };
  CtxOwned ctx_owned_;
};

void CompletionContext::Add(std::shared_ptr<Conn> conn) {
  const uint64_t id = conn->id();
  {
    absl::MutexLock l(&mu_);
    locked_.conns[id] = std::move(conn);
  }
  Wake(id);
}

void CompletionContext::Loop() {
  ibv_wc wcs[32];
  absl::Time next_sweep = absl::Now() + kSweep;
  std::vector<pollfd> fds;
  std::vector<uint64_t> fd_conns;  // the connection of fds[i + 1]
  for (;;) {
    fds.assign(1, pollfd{wake_fd_.get(), POLLIN, 0});
    fd_conns.clear();
    {
      absl::MutexLock l(&mu_);
      for (auto& [id, fd] : locked_.watched) {
        fds.push_back(pollfd{fd, POLLIN | POLLRDHUP, 0});
        fd_conns.push_back(id);
      }
    }
    auto n = poller_->Harvest(wcs, 32, absl::MakeSpan(fds),
                              std::max(absl::ZeroDuration(), next_sweep - absl::Now()));
    uint64_t drained;
    (void)!::read(wake_fd_.get(), &drained, sizeof(drained));
    std::vector<std::shared_ptr<Conn>> touched;
    auto touch = [&](std::shared_ptr<Conn> c) {
      if (c && std::find(touched.begin(), touched.end(), c) == touched.end()) touched.push_back(std::move(c));
    };
    std::vector<uint64_t> ready;
    {
      absl::MutexLock l(&mu_);
      if (locked_.stopping) return;
      ready.swap(locked_.ready);
    }
    if (!n.ok()) {
      // The CQ itself failed: every connection on it is lost.
      spdlog::error("rdma completion queue: {}", n.status().message());
      absl::MutexLock l(&mu_);
      for (auto& [id, c] : locked_.conns) ready.push_back(id);
    }
    for (int i = 0; n.ok() && i < *n; ++i) {
      std::shared_ptr<Conn> c = Find(WrConnOf(wcs[i].wr_id));
      if (c == nullptr) continue;  // flushed after its connection finished
      if (absl::Status st = c->OnCompletion(wcs[i]); !st.ok()) c->Fail(st);
      touch(std::move(c));
    }
    if (!n.ok()) {
      for (uint64_t id : ready) {
        if (auto c = Find(id)) c->Fail(n.status());
      }
    }
    for (uint64_t id : ready) touch(Find(id));
    for (size_t i = 0; i < fd_conns.size(); ++i) {
      if (fds[i + 1].revents == 0) continue;
      if (auto c = Find(fd_conns[i])) {
        c->OnLivenessEvent();
        touch(std::move(c));
      }
    }
    const absl::Time now = absl::Now();
    if (now >= next_sweep) {
      next_sweep = now + kSweep;
      absl::MutexLock l(&mu_);
      for (auto& [id, c] : locked_.conns) {
        if (std::find(touched.begin(), touched.end(), c) == touched.end()) touched.push_back(c);
      }
    }
    std::vector<uint64_t> finished;
    for (auto& c : touched) {
      if (c->Service(now)) finished.push_back(c->id());
    }
    if (!finished.empty()) {
      absl::MutexLock l(&mu_);
      for (uint64_t id : finished) locked_.conns.erase(id);
    }
    // Releasing connections may release the Nic and with it this context.
    bool destroyed = false;
    destroyed_ = &destroyed;
    touched.clear();
    if (destroyed) return;
    destroyed_ = nullptr;
  }
}

// ---------------------------------------------------------------- Conn

absl::Status Conn::Init(size_t data_len, Access data_access) {
  const Device& dev = *nic_->device;
  auto recv = MapMemory(kRecvDepth * kMsgSize);
  if (!recv.ok()) return recv.status();
  recv_mem_ = std::move(*recv);
  auto send = MapMemory(kSendWindow * kMsgSize);
  if (!send.ok()) return send.status();
  send_mem_ = std::move(*send);
  auto data = MapMemory(data_len);
  if (!data.ok()) return data.status();
  data_mem_ = std::move(*data);
  // Message buffers are small and always touched: pinned. The data buffer is
  // ODP when the device passed the data check (kAuto), else pinned.
  auto rmr = rdma::Register(dev, domain_->pd.get(), recv_mem_.get(), kRecvDepth * kMsgSize,
                            Access::kLocal, Mode::kPinned);
  if (!rmr.ok()) return rmr.status();
  recv_mr_.emplace(std::move(*rmr));
  auto smr = rdma::Register(dev, domain_->pd.get(), send_mem_.get(), kSendWindow * kMsgSize,
                            Access::kLocal, Mode::kPinned);
  if (!smr.ok()) return smr.status();
  send_mr_.emplace(std::move(*smr));
  auto dmr = rdma::Register(dev, domain_->pd.get(), data_mem_.get(), data_len, data_access, nic_->data_mode);
  if (!dmr.ok()) return dmr.status();
  data_mr_.emplace(std::move(*dmr));
  if (data_mr_->mode() == Mode::kOdp && dev.caps().advise_mr == rdma::Capabilities::AdviseMr::kSupported) {
    // The buffer is written by the peer (receive area) or read by the NIC
    // (staging): map it now, not on the first fetch.
    if (auto st = rdma::Prefetch(domain_->pd.get(), *data_mr_, /*write=*/true, /*flush=*/true); !st.ok()) {
      spdlog::debug("prefetch of a data buffer: {}", st.message());
    }
  }
  rdma::QpCaps caps;
  caps.max_send_wr = kSendWindow + kStaging + kSlots + 4;
  caps.max_recv_wr = kRecvDepth;
  caps.ack_timeout = nic_->ack_timeout;
  const int cqe = static_cast<int>(caps.max_send_wr + caps.max_recv_wr);
  auto ctx = nic_->AcquireContext(cqe);
  if (!ctx.ok()) return ctx.status();
  ctx_ = *ctx;
  cqe_ = cqe;
  auto qp = Qp::Create(dev, domain_->pd.get(), ctx_->poller(), caps);
  if (!qp.ok()) return qp.status();
  qp_ = std::move(*qp);
  return absl::OkStatus();
}

absl::Status Conn::ConnectQp(const Endpoint& remote) {
  if (auto st = qp_->Connect(remote); !st.ok()) return st;
  for (uint32_t i = 0; i < kRecvDepth; ++i) {
    if (auto st = qp_->PostRecv(WrId(kWrRecv, conn_id_, i), *recv_mr_, i * kMsgSize, kMsgSize);
        !st.ok()) {
      return st;
    }
  }
  absl::MutexLock l(&mu_);
  locked_.qp_ready = true;
  if (auto st = FlushLocked(); !st.ok()) return st;
  return absl::OkStatus();
}

bool Conn::EnqueueLocked(WorkItem item) {
  Locked& s = locked_;
  if (s.closed) return false;
  s.out.push_back(std::move(item));
  if (s.out.size() > kMaxQueued) {
    spdlog::warn("rdma data connection to {} has {} messages unsent; dropping it", peer_name_,
                 s.out.size());
    CloseLocked(absl::ResourceExhaustedError("too many unsent messages"));
    return false;
  }
  if (auto st = FlushLocked(); !st.ok()) {
    CloseLocked(st);
    return false;
  }
  return true;
}

void Conn::CloseLocked(absl::Status why) {
  Locked& s = locked_;
  if (s.closed) return;
  s.closed = true;
  s.close_reason = std::move(why);
  s.out.clear();
  // The peer sees EOF on the liveness socket (the fd is closed only with
  // this object, so the number cannot be reused under the watcher).
  if (s.liveness.valid()) ::shutdown(s.liveness.get(), SHUT_RDWR);
  if (ctx_ != nullptr) Wake();
}

bool Conn::SetLiveness(UniqueFd fd) {
  absl::MutexLock l(&mu_);
  if (locked_.liveness.valid()) return false;
  locked_.liveness = std::move(fd);
  if (locked_.closed) {
    ::shutdown(locked_.liveness.get(), SHUT_RDWR);
    return true;
  }
  ctx_->Watch(conn_id_, locked_.liveness.get());
  return true;
}

void Conn::OnLivenessEvent() {
  absl::MutexLock l(&mu_);
  if (locked_.closed || !locked_.liveness.valid()) return;
  char b[64];
  ssize_t n;
  do {
    n = ::recv(locked_.liveness.get(), b, sizeof(b), MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  CloseLocked(absl::UnavailableError(n > 0 ? "unexpected bytes on the liveness connection"
                                           : "the peer closed the liveness connection"));
}

absl::Status Conn::FlushLocked() {
  Locked& s = locked_;
  if (!s.qp_ready || s.closed) return absl::OkStatus();
  // Posts one item: false when it has to wait (the send window is full).
  auto post = [&](WorkItem& item) -> absl::StatusOr<bool> {
    if (auto* m = std::get_if<SendMsg>(&item)) {
      if (s.send_inflight >= kSendWindow) return false;
      const size_t slot = s.send_seq % kSendWindow;
      std::memcpy(send_mem_.get() + slot * kMsgSize, m->bytes.data(), m->bytes.size());
      if (auto st = qp_->PostSend(WrId(kWrSend, conn_id_, slot), *send_mr_, slot * kMsgSize,
                                  m->bytes.size());
          !st.ok()) {
        return st;
      }
      ++s.send_seq;
      ++s.send_inflight;
      s.last_send = absl::Now();
      return true;
    }
    if (auto* w = std::get_if<WriteData>(&item)) {
      absl::Status st = qp_->PostWrite(WrId(kWrWrite, conn_id_, w->staging), *data_mr_,
                                       w->staging * kSlotBytes, w->len, w->remote_addr, w->rkey);
      if (!st.ok()) return st;
      return true;
    }
    auto& r = std::get<ReadData>(item);
    absl::Status st =
        r.local != nullptr
            ? qp_->PostRead(WrId(kWrRead, conn_id_, r.slot), *r.local, r.local_offset, r.len, r.remote_addr, r.rkey)
            : qp_->PostRead(WrId(kWrRead, conn_id_, r.slot), *data_mr_, r.slot * kSlotBytes, r.len, r.remote_addr,
                            r.rkey);
    if (!st.ok()) return st;
    return true;
  };
  while (!s.out.empty()) {
    absl::StatusOr<bool> posted = post(s.out.front());
    if (!posted.ok()) return posted.status();
    if (!*posted) break;
    s.out.pop_front();
  }
  return absl::OkStatus();
}

absl::Status Conn::OnCompletion(const ibv_wc& wc) {
  const uint64_t kind = WrKindOf(wc.wr_id);
  const uint64_t idx = WrIndexOf(wc.wr_id);
  if (wc.status != IBV_WC_SUCCESS) {
    return absl::UnavailableError(absl::StrCat("rdma completion ", rdma::DescribeCompletion(wc)));
  }
  switch (kind) {
    case kWrRecv: {
      uint8_t msg[kMsgSize];
      const size_t len = std::min<size_t>(wc.byte_len, kMsgSize);
      std::memcpy(msg, recv_mem_.get() + idx * kMsgSize, len);
      if (auto st = qp_->PostRecv(wc.wr_id, *recv_mr_, idx * kMsgSize, kMsgSize); !st.ok()) return st;
      auto m = SplitMessage(absl::MakeConstSpan(msg, len), kMsgSize);
      if (!m.ok()) return m.status();
      return OnMessage(m->header, m->payload);
    }
    case kWrSend: {
      absl::MutexLock l(&mu_);
      --locked_.send_inflight;
      return FlushLocked();  // the window opened
    }
    case kWrWrite:
      OnWriteDone(static_cast<uint32_t>(idx));
      return absl::OkStatus();
    case kWrRead:
      OnReadDone(static_cast<uint32_t>(idx));
      return absl::OkStatus();
  }
  return absl::InternalError(absl::StrFormat("completion with unknown wr_id 0x%x", wc.wr_id));
}

bool Conn::Service(absl::Time now) {
  ConnState& state = ctx_owned_.state;
  if (state == ConnState::kOpen) {
    bool closed;
    {
      absl::MutexLock l(&mu_);
      Locked& s = locked_;
      if (!s.closed && established() && s.out.empty() && now - s.last_send >= kKeepalive) {
        EnqueueLocked(SendMsg{MakeMsg(FrameType::kHello, 0, nullptr, 0)});
      }
      closed = s.closed;
    }
    if (!closed) {
      absl::Status st = Tick(now);
      if (st.ok()) return false;
      Fail(st);
    }
    // In ERR the QP neither sends nor accepts anything more (a late WRITE
    // into our buffers is refused); outstanding work is flushed.
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    (void)ibv_modify_qp(qp_->qp(), &a, IBV_QP_STATE);
    ctx_->Unwatch(conn_id_);  // shut down by the close: always readable now
    state = ConnState::kClosing;
  }
  if (state == ConnState::kClosing) {
    if (!Quiesced()) return false;  // woken again when it is
    absl::Status why;
    {
      absl::MutexLock l(&mu_);
      why = locked_.close_reason;
    }
    state = ConnState::kFinished;
    OnClosed(why);
  }
  return true;
}

class RdmaTransport;

// ---------------------------------------------------------------- exporter
// Connection states: awaiting HELLO (only a HELLO with this session's token
// is accepted; it and the liveness socket must arrive within 2 x
// kHelloTimeout) -> serving (FETCH, INVAL_ACK, keepalives) -> closed (QP in
// ERR; the backend is told once no copy is outstanding).
//
// A FETCH being served, by staging buffer (SPDK's request states).
enum class RequestState {
  kFree,     // the staging buffer holds nothing: the next queued FETCH may
             // take it (the context's thread)
  kCopying,  // a copy worker fills it through ExportBackend::ServeFetch,
             // outside every lock; the worker then queues the WRITE and the
             // response (-> kWriting) or an error response (-> kFree)
  kWriting,  // its RDMA WRITE, and the FETCH_RESP behind it, are queued or
             // posted; the WRITE's completion frees it (the context's thread)
};

class ServerConn final : public Conn, public Subscriber {
 public:
  ServerConn(std::shared_ptr<Nic> nic, std::shared_ptr<Domain> domain, RdmaTransport* t, uint64_t id,
             ExportBackend* backend, Executor* copiers, ThreadCount* threads, std::string node,
             std::string token, std::unique_ptr<ConnectionSlot> slot)
      : Conn(std::move(nic), std::move(domain), id),
        transport_(t),
        backend_(backend),
        copiers_(copiers),
        threads_(threads),
        node_(std::move(node)),
        session_token_(std::move(token)),
        slot_(std::move(slot)) {
    peer_name_ = node_;
  }

  absl::Status Setup(const Endpoint& importer) {
    if (auto st = Init(kStaging * kSlotBytes, Access::kLocal); !st.ok()) return st;
    if (auto st = ConnectQp(importer); !st.ok()) return st;
    // The queue pair and its buffers exist until this is destroyed.
    if (slot_) slot_->Bind();
    return absl::OkStatus();
  }
  // The context serves it from now on; counted in threads until finished.
  void Run() {
    threads_->Inc();
    Attach();
  }

  uint64_t id() const override { return Conn::id(); }
  const std::string& node() const override { return node_; }
  bool PushInvalidation(const InvalRecord& r) override {
    const InvalPayload p = ToInvalPayload(r);
    absl::MutexLock l(&mu_);
    if (locked_.closed) return false;
    // A storm collapses into the INVAL still waiting at the tail.
    if (!locked_.out.empty()) {
      if (auto* m = std::get_if<SendMsg>(&locked_.out.back()); m && MergeInvalFrame(m->bytes, p)) {
        return true;
      }
    }
    return EnqueueLocked(SendMsg{MakeMsg(FrameType::kInval, 0, &p, sizeof(p))});
  }
  void Close() override {
    absl::MutexLock l(&mu_);
    CloseLocked(absl::CancelledError("closed by this daemon"));
  }
  // The importer's liveness socket arrived: the context watches it until it
  // or the connection ends. False when one is already attached.
  bool AttachLiveness(UniqueFd fd) {
    if (!SetLiveness(std::move(fd))) return false;
    has_liveness_ = true;
    return true;
  }
  // FETCHes waiting for a staging buffer (the kStaging being served are
  // not counted: a fixed window per connection).
  uint64_t PendingFetches() const override { return waiting_fetches_.load(std::memory_order_relaxed); }

 private:
  absl::Status OnMessage(const FrameHeader& h, absl::Span<const uint8_t> payload) override;
  void OnWriteDone(uint32_t staging) override;
  absl::Status Tick(absl::Time now) override;
  bool established() const override { return owned_.established; }
  bool Quiesced() override {
    absl::MutexLock l(&mu_);
    return slocked_.copies == 0;
  }
  void OnClosed(const absl::Status& why) override;
  // Hands queued FETCHes to copy workers while staging buffers are free.
  absl::Status StartFetches();
  // On a copy worker.
  void Copy(uint32_t staging, uint64_t id, const RdmaFetch& f);
  std::shared_ptr<ServerConn> self() { return std::static_pointer_cast<ServerConn>(shared_from_this()); }

  RdmaTransport* const transport_;
  ExportBackend* const backend_;
  Executor* const copiers_;  // the transport's; outlives every copy (Stop waits for them)
  ThreadCount* const threads_;
  const std::string node_;
  // The token PrepareSession returned with this queue pair: the only one its
  // HELLO may present.
  const std::string session_token_;
  const absl::Time hello_deadline_ = absl::Now() + kHelloTimeout;
  std::atomic<bool> has_liveness_{false};
  // Owned_::fetches.size(), readable by the backend from other threads.
  std::atomic<uint64_t> waiting_fetches_{0};
  // This connection's place under --max-data-connections-per-peer: given
  // back when it is destroyed (its queue pair and buffers with it).
  const std::unique_ptr<ConnectionSlot> slot_;

  // The context's thread only.
  struct Owned {
    bool established = false;
    // The HELLO was refused: the answer saying so is on its way, then the
    // connection closes (Tick).
    bool refusing = false;
    std::string token;  // set by the HELLO that claimed it
    std::deque<std::pair<uint64_t, RdmaFetch>> fetches;  // waiting for a staging buffer
  };
  Owned owned_;
  // Shared with the copy workers, under mu_.
  struct Locked {
    RequestState staging[kStaging] = {};  // all kFree
    int copies = 0;                       // staging buffers in kCopying
  };
  Locked slocked_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------- importer
// A slot of the receive area (SPDK's request states, importer side).
enum class SlotState {
  kFree,       // on the free list; a Fetch or ReadRegion may take it (under mu_)
  kFetching,   // a FETCH naming it was queued; the exporter WRITEs its pages
               // here and then answers (the context's thread completes it)
  kReading,    // a one-sided READ into it was queued; its completion
               // completes it (the context's thread)
  kDone,       // completed: the caller copies the bytes out, then frees it
  kAbandoned,  // the caller gave up (timeout): never reused, since a late
               // WRITE may still land; the connection is closed
};

// A landing area (the importer's shared cache file): one ODP registration
// of svmd's mapping of it, REMOTE_WRITE for the exporters' WRITEs. ODP
// follows the mapping: a page punched out of the file (an invalidation,
// an eviction) is unmapped from the registration too, and the next WRITE
// into it faults a fresh page of the file in, which clients then see.
class LandingRegistration final : public LandingArea {
 public:
  LandingRegistration(std::shared_ptr<Nic> nic, std::shared_ptr<Domain> domain, Registration reg, LandingUse use)
      : nic_(std::move(nic)), domain_(std::move(domain)), reg_(std::move(reg)), use_(use) {}
  const Domain* domain() const { return domain_.get(); }
  const Registration& reg() const { return reg_; }
  LandingUse use() const { return use_; }

 private:
  std::shared_ptr<Nic> nic_;        // the device outlives the PD
  std::shared_ptr<Domain> domain_;  // the PD outlives the registration
  Registration reg_;
  LandingUse use_;
};

class ClientConn final : public Conn {
 public:
  ClientConn(std::shared_ptr<Nic> nic, std::shared_ptr<Domain> domain, uint64_t id)
      : Conn(std::move(nic), std::move(domain), id) {}

  absl::Status Prepare() {
    absl::Status st = Init(kSlots * kSlotBytes, Access::kRemoteReadWrite);
    absl::MutexLock l(&mu_);
    for (uint32_t i = 0; i < kSlots; ++i) clocked_.free_slots.push_back(kSlots - 1 - i);
    return st;
  }
  // Connects the QP, attaches to the context, exchanges HELLOs, then opens
  // the liveness socket to peer_host:liveness_port. channel: what the
  // backend's callbacks name.
  absl::Status Start(const Endpoint& remote, ImportBackend* backend, PeerChannel* channel,
                     const std::string& peer_host, uint16_t liveness_port, const std::string& token);

  void FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done);
  bool alive() const {
    absl::MutexLock l(&mu_);
    if (locked_.closed) return false;
    // The exporter's close may be waiting on the liveness socket before the
    // completion thread has seen it (e.g. this process was stopped and has
    // just resumed): a caller deciding whether to serve cached pages looks.
    if (locked_.liveness.valid()) {
      char b;
      const ssize_t n = ::recv(locked_.liveness.get(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return false;
    }
    return true;
  }
  void Close() {
    absl::MutexLock l(&mu_);
    CloseLocked(absl::CancelledError("closed by this daemon"));
  }
  // Closes the connection and waits until the backend was told; from a
  // callback (the channel destroyed on the context's thread or a delivery
  // worker) it only stops further callbacks.
  void CloseAndWait();
  // data_mr_ is set before the connection is handed out and never changes.
  const char* path() const { return data_mr_->mode() == Mode::kOdp ? "staged/odp" : "staged/pinned"; }
  absl::StatusOr<std::unique_ptr<LandingArea>> RegisterLanding(void* addr, size_t len, LandingUse use);
  bool SetRegion(uint64_t export_id, const RemoteRegion& r, uint64_t seq);
  void ReadRegionAsync(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst, absl::Duration timeout,
                       const LandingArea* area, ReadRegionDone done);

 private:
  // One ReadRegionAsync: its READs issued in slot-sized chunks as slots are
  // free, completed in order on the context's thread (copied out of the
  // slot, or landed in dst itself), done called once, without mu_.
  struct ZcRead {
    uint64_t export_id = 0;
    uint64_t offset = 0;
    absl::Span<uint8_t> dst;
    const Registration* land = nullptr;  // READs land in dst itself
    absl::Time deadline;
    absl::Duration timeout;
    uint64_t epoch = 0;                  // of the region every READ targets
    RemoteRegion r;
    uint64_t begin = 0, total = 0, issued = 0;  // aligned bytes of the region
    struct Piece {
      uint32_t slot = 0;
      uint64_t at = 0, len = 0;
      bool done = false;
    };
    std::deque<Piece> inflight;
    bool replaced = false;  // the region was dropped: nothing more is issued
    bool finished = false;
    uint64_t copied = 0;
    ReadRegionDone done;
    // How a read that ended without a lost connection went.
    absl::Status Outcome() const {
      return replaced && issued < total
                 ? absl::FailedPreconditionError("the zero-copy region was replaced during the read")
                 : absl::OkStatus();
    }
  };
  // Issues z's next pieces into free slots; false once it issues no more
  // (all issued, or its region was dropped).
  bool IssueZcLocked(const std::shared_ptr<ZcRead>& z) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends z's read of its region epoch; the caller runs done unlocked.
  void EndZcLocked(const std::shared_ptr<ZcRead>& z) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs what finished (done of reads completed off the context's thread).
  void RunFinishedZc();
  absl::Status OnMessage(const FrameHeader& h, absl::Span<const uint8_t> payload) override;
  void OnReadDone(uint32_t slot) override;
  bool established() const override { return hello_seen_; }
  // Closed: the backend hears OnChannelClosed after the last OnInvalidation.
  bool Quiesced() override {
    absl::MutexLock l(&mu_);
    return !clocked_.delivering;
  }
  void OnClosed(const absl::Status& why) override;
  void FlushAcksLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // On a delivery worker: hands the queued deliveries to the backend in
  // order until none is left or the connection closed.
  void Deliver();
  struct FetchResult {
    uint64_t id = 0;
    absl::Status status;
    uint64_t seq = 0;
  };
  // One FetchVAsync: its ops are cut into slot-sized FETCHes (chunks),
  // issued in order as slots are free, each copied out of its slot into
  // the op's dst as it completes.
  struct Batch {
    absl::Span<FetchOp> ops;
    FetchDone done;
    absl::Time deadline;
    absl::Duration timeout;
    size_t next_op = 0;  // the next chunk to issue: op and page within it
    uint32_t next_at = 0;
    size_t inflight = 0;  // chunks issued and not finished (copies included)
    bool ended = false;   // nothing more is issued: every op is issued, or one failed
    bool completed = false;
    std::vector<uint32_t> outstanding;  // chunks in flight per op
    std::vector<uint64_t> min_seq;
    std::vector<bool> failed;
  };
  struct Chunk {
    std::shared_ptr<Batch> batch;
    size_t op = 0;
    uint32_t at = 0, n = 0;  // pages [at, at + n) of the op
    uint32_t slot = 0;      // taken while in flight (bounds FETCHes in flight)
    bool direct = false;    // the exporter WRITEs into the op's area (dst itself), not the slot
    bool copying = false;  // the completing thread copies it out (without mu_)
  };
  // The op's area when it is this device's and covers dst page-aligned.
  const Registration* AreaCovering(const FetchOp& op) const;
  const Registration* AreaCovering(const LandingArea* area, absl::Span<const uint8_t> dst) const;
  // Issues chunks of the waiting batches while slots are free.
  void IssueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A chunk's answer (the context's thread or a delivery worker): copies
  // its pages out, frees its slot, issues the next; runs the batch's done
  // (without mu_) when it was the last.
  void CompleteLocked(const FetchResult& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Op i of b has its result (first failure wins).
  void FailOpLocked(Batch& b, size_t i, const absl::Status& st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends b: nothing more is issued; the ops not issued yet fail with st.
  void EndLocked(Batch& b, const absl::Status& st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs b's done (mu_ released around it) if nothing of it is in flight
  // and nothing more will be issued.
  void MaybeFinishLocked(const std::shared_ptr<Batch>& b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every chunk not being copied fails with st and its slot is abandoned
  // (a late WRITE may still land there); with_deadline_before: only those
  // of batches overdue at that time.
  void AbandonLocked(const absl::Status& st, std::optional<absl::Time> overdue_at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Tick(absl::Time now) override;
  void SetSlot(uint32_t slot, SlotState st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // A slot is freed once, by the caller that took it, and never after
    // it was abandoned.
    SVM_CHECK(st != SlotState::kFree || (clocked_.slots[slot] != SlotState::kFree &&
                                         clocked_.slots[slot] != SlotState::kAbandoned));
    clocked_.slots[slot] = st;
    if (st == SlotState::kFree) {
      clocked_.free_slots.push_back(slot);
      IssueLocked();
    }
  }

  ImportBackend* backend_ = nullptr;
  std::atomic<bool> hello_seen_{false};
  std::atomic<bool> reg_failed_logged_{false};  // a failed RegisterLanding was logged

  // Zero-copy: per export id, the exporter's registered region and its
  // state (epoch, READs in flight, the newest dropping invalidation: a
  // region described before it is stale).
  struct ZcRegion {
    coherence::ZeroCopyRegionState state;
    RemoteRegion remote;
  };
  // Acknowledgements not sent yet, in arrival order: one that dropped a
  // region waits until the READs issued against it completed (rule 5: the
  // exporter deregisters the old region once every importer acknowledged);
  // the ones behind it wait too (an acknowledgement covers every earlier
  // sequence of its export).
  struct HeldAck {
    uint64_t export_id, seq;
    std::optional<uint64_t> drain_epoch;  // READs of epochs up to it must complete
  };
  // What the delivery worker hands on, in arrival order: an invalidation
  // (to the backend), or a FETCH response that arrived behind one
  // (completed only once the invalidation before it was delivered, as on
  // the wire).
  struct InvalDelivery {
    InvalRecord rec;
    std::optional<uint64_t> drain_epoch;
  };
  using Delivery = std::variant<InvalDelivery, FetchResult>;
  // Shared by callers (Fetch, ReadRegion, SetRegion) and the context's
  // thread, under mu_.
  struct Locked {
    PeerChannel* channel = nullptr;  // null: no more backend callbacks
    bool established = false;        // the exporter answered the HELLO
    bool finished = false;           // OnClosed ran
    SlotState slots[kSlots] = {};
    std::vector<uint32_t> free_slots;
    std::map<uint64_t, Chunk> fetches;     // FETCHes in flight by request id
    std::deque<std::shared_ptr<Batch>> waiting;  // batches with chunks to issue
    std::set<std::shared_ptr<Batch>> batches;    // not completed
    // When the exporter last answered a FETCH (any batch's): a batch is
    // overdue once its timeout has passed both since it was issued and
    // since then (Tick), so a read that is making progress (a large one on
    // a slow link, or one queued behind others for slots) is not failed by
    // a deadline meant to detect a peer that stopped answering.
    absl::Time last_answer = absl::InfinitePast();
    std::map<uint32_t, std::shared_ptr<ZcRead>> reads;  // READs in flight by slot
    std::set<std::shared_ptr<ZcRead>> zc_reads;         // not finished
    std::deque<std::shared_ptr<ZcRead>> zc_waiting;     // with pieces to issue, waiting for slots
    std::vector<std::shared_ptr<ZcRead>> zc_finished;   // ended where done could not run: Tick runs it
    uint64_t next_id = 1;
    std::map<uint64_t, ZcRegion> zc;
    std::deque<HeldAck> held_acks;
    std::deque<Delivery> deliveries;  // not handed on yet
    bool delivering = false;          // a delivery task runs...
    std::thread::id delivery_thread;  // ...on this thread
  };
  Locked clocked_ ABSL_GUARDED_BY(mu_);
};

// What the importer's daemon holds: closes the connection when destroyed
// (OnChannelClosed has run by then, unless destroyed from a callback).
class RdmaChannel final : public PeerChannel {
 public:
  explicit RdmaChannel(std::shared_ptr<ClientConn> conn)
      : PeerChannel(Capabilities{.one_sided = true, .fetch_piece_pages = kSlotPages}), conn_(std::move(conn)) {}
  ~RdmaChannel() override { conn_->CloseAndWait(); }

  void FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done) override {
    conn_->FetchVAsync(ops, timeout, std::move(done));
  }
  bool alive() const override { return conn_->alive(); }
  void Close() override { conn_->Close(); }
  const char* path() const override { return conn_->path(); }
  bool SetRegion(uint64_t export_id, const RemoteRegion& r, uint64_t seq) override {
    return conn_->SetRegion(export_id, r, seq);
  }
  void ReadRegionAsync(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst, absl::Duration timeout,
                       const LandingArea* area, ReadRegionDone done) override {
    conn_->ReadRegionAsync(export_id, offset, dst, timeout, area, std::move(done));
  }
  absl::StatusOr<std::unique_ptr<LandingArea>> RegisterLanding(void* addr, size_t len,
                                                               LandingUse use = LandingUse::kFetches) override {
    return conn_->RegisterLanding(addr, len, use);
  }

 private:
  const std::shared_ptr<ClientConn> conn_;
};

// A zero-copy region: the export's object as mapped by this daemon,
// registered read-only for remote READs: once in the Nic's own PD (the
// probe, which no queue pair reaches) and once per protection key that
// asked for it, in that key's domain.
class Region final : public RegisteredRegion {
 public:
  Region(std::shared_ptr<Nic> nic, Registration reg) : nic_(std::move(nic)), reg_(std::move(reg)) {}
  RemoteRegion remote() const override { return Describe(reg_); }
  absl::StatusOr<RemoteRegion> RemoteFor(const std::string& key) override {
    absl::MutexLock l(&mu_);
    if (auto it = peers_.find(key); it != peers_.end()) return Describe(it->second.reg);
    auto domain = nic_->DomainFor(absl::StrCat("peer ", key));
    if (!domain.ok()) return domain.status();
    // The same memory, access and mode as the probe registration, which
    // succeeded.
    auto reg = rdma::Register(*nic_->device, (*domain)->pd.get(), reinterpret_cast<void*>(reg_.addr()),
                              reg_.length(), Access::kRemoteReadOnly, reg_.mode());
    if (!reg.ok()) return reg.status();
    if (reg->mode() == Mode::kOdp &&
        nic_->device->caps().advise_mr == rdma::Capabilities::AdviseMr::kSupported) {
      if (auto st = rdma::Prefetch((*domain)->pd.get(), *reg, /*write=*/false, /*flush=*/false); !st.ok()) {
        spdlog::debug("prefetch of a zero-copy region: {}", st.message());
      }
    }
    const RemoteRegion r = Describe(*reg);
    peers_.emplace(key, PerPeer{std::move(*domain), std::move(*reg)});
    return r;
  }

 private:
  static RemoteRegion Describe(const Registration& r) {
    return RemoteRegion{r.addr(), r.length(), r.rkey(), r.mode() == Mode::kOdp};
  }
  struct PerPeer {
    std::shared_ptr<Domain> domain;  // outlives the registration
    Registration reg;
  };

  std::shared_ptr<Nic> nic_;  // the PDs outlive the registrations
  Registration reg_;          // the probe, in nic_->pd: no queue pair reaches it
  absl::Mutex mu_;
  std::map<std::string, PerPeer> peers_ ABSL_GUARDED_BY(mu_);  // by protection key
};

class RdmaTransport final : public Transport {
 public:
  explicit RdmaTransport(std::shared_ptr<Nic> nic)
      : Transport(Capabilities{.one_sided = true}), nic_(std::move(nic)) {}
  ~RdmaTransport() override { Stop(); }
  const char* name() const override { return "rdma"; }

  // Listens for liveness sockets (queue pairs are set up through SetupData).
  absl::Status Start(const HostPort& listen, ExportBackend* backend) override {
    backend_ = backend;
    auto l = Listener::Start(listen, "liveness", [this](UniqueFd fd) {
      threads_.Inc();
      std::thread([this, fd = std::move(fd)]() mutable {
        ServeLiveness(std::move(fd));
        threads_.Dec();
      }).detach();
    });
    if (!l.ok()) return l.status();
    listener_ = std::move(*l);
    spdlog::info("rdma data path on {}, data buffers {}, liveness sockets on {}",
                 nic_->device->Describe(), nic_->device->caps().OdpUsable() ? "odp" : "pinned",
                 listener_->address());
    return absl::OkStatus();
  }
  std::string listen_address() const override { return listener_ ? listener_->address() : ""; }

  // The probe registration: proves the memory can be registered (and how)
  // before the export offers the zero-copy path; peers read their own
  // registrations of it (Region::RemoteFor), made and prefetched when they
  // describe the export.
  absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* addr, size_t len) override {
    auto reg = rdma::Register(*nic_->device, nic_->pd.get(), addr, len, Access::kRemoteReadOnly,
                              nic_->data_mode);
    if (!reg.ok()) return reg.status();
    return std::unique_ptr<RegisteredRegion>(new Region(nic_, std::move(*reg)));
  }

  std::optional<DeviceStatus> device_status() const override;

  absl::StatusOr<std::string> BeginConnect(const std::string& peer) override {
    auto domain = peer.empty() ? nic_->NewDomain() : nic_->DomainFor(absl::StrCat("link ", peer));
    if (!domain.ok()) return domain.status();
    auto conn = std::make_shared<ClientConn>(nic_, std::move(*domain), NextConnId());
    if (auto st = conn->Prepare(); !st.ok()) return st;
    std::string bytes = EncodeEndpoint(conn->local(), 0);
    absl::MutexLock l(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = begun_.begin(); it != begun_.end();) {
      if (it->second.expires < now) begun_.erase(it++);
      else ++it;
    }
    begun_[bytes] = Begun{std::move(conn), now + kBeginLifetime};
    return bytes;
  }

  void AbortConnect(const std::string& begin) override {
    std::shared_ptr<ClientConn> conn;  // destroyed outside the lock
    absl::MutexLock l(&mu_);
    if (auto it = begun_.find(begin); it != begun_.end()) {
      conn = std::move(it->second.conn);
      begun_.erase(it);
    }
  }

  absl::StatusOr<SessionOffer> PrepareSession(const std::string& node, const std::string& importer,
                                              std::unique_ptr<ConnectionSlot> slot,
                                              const std::string& protection) override {
    if (importer.empty()) {
      return absl::FailedPreconditionError("rdma setup without the importer's queue pair endpoint");
    }
    uint32_t unused_port = 0;
    auto remote = DecodeEndpoint(importer, &unused_port);
    if (!remote.ok()) return remote.status();
    if (stopped_ || !listener_) return absl::UnavailableError("not serving");
    auto token = sessions_.Issue(node);
    if (!token.ok()) return token.status();
    auto domain = nic_->DomainFor(absl::StrCat("peer ", protection));
    if (!domain.ok()) {
      sessions_.Forget(*token);
      return domain.status();
    }
    auto conn = std::make_shared<ServerConn>(nic_, std::move(*domain), this, NextConnId(), backend_,
                                             &copiers_, &threads_, node, *token, std::move(slot));
    if (auto st = conn->Setup(*remote); !st.ok()) {
      spdlog::warn("rdma data connection for {}: {}", node, st.message());
      sessions_.Forget(*token);
      return st;
    }
    {
      absl::MutexLock l(&mu_);
      conns_[conn->id()] = conn;
    }
    SessionOffer offer{*token, EncodeEndpoint(conn->local(), listener_->port())};
    conn->Run();
    return offer;
  }

  SessionRegistry& sessions() { return sessions_; }

  std::shared_ptr<Subscriber> FindSubscriber(const std::string& token) override {
    return sessions_.Find(token);
  }

  void Unregister(uint64_t id) {
    absl::MutexLock l(&mu_);
    conns_.erase(id);
  }

  absl::StatusOr<std::unique_ptr<PeerChannel>> Connect(const std::string& peer_host,
                                                       const SessionOffer& offer,
                                                       ImportBackend* backend,
                                                       const std::string& begin) override {
    std::shared_ptr<ClientConn> conn;
    {
      absl::MutexLock l(&mu_);
      auto it = begun_.find(begin);
      if (it == begun_.end()) {
        return absl::FailedPreconditionError("rdma connect without a matching BeginConnect");
      }
      conn = std::move(it->second.conn);
      begun_.erase(it);
    }
    uint32_t port = 0;
    auto remote = DecodeEndpoint(offer.endpoint, &port);
    if (!remote.ok()) {
      return absl::Status(remote.status().code(),
                          absl::StrCat("peer ", peer_host, " offered no usable rdma endpoint: ",
                                       remote.status().message()));
    }
    if (port == 0 || port > 65535) return absl::InvalidArgumentError("rdma setup without a liveness port");
    auto channel = std::make_unique<RdmaChannel>(conn);
    if (auto st = conn->Start(*remote, backend, channel.get(), peer_host, static_cast<uint16_t>(port),
                              offer.token);
        !st.ok()) {
      return st;
    }
    return channel;
  }

  void Stop() override {
    if (stopped_.exchange(true)) return;
    if (listener_) listener_->Stop();
    std::vector<std::shared_ptr<ServerConn>> conns;
    {
      absl::MutexLock l(&mu_);
      for (auto& [id, c] : conns_) conns.push_back(c);
      begun_.clear();
    }
    for (auto& c : conns) c->Close();
    conns.clear();
    // Every exporter connection has finished (its copies returned, the
    // backend told) and every liveness thread ended.
    threads_.WaitZero();
  }

 private:
  struct Begun {
    std::shared_ptr<ClientConn> conn;
    absl::Time expires;
  };

  // A liveness socket: HELLO with a claimed token, then handed to its
  // connection (its completion context watches it). Anything else is closed.
  void ServeLiveness(UniqueFd fd);
  uint64_t NextConnId() {
    absl::MutexLock l(&mu_);
    return next_conn_id_++;
  }

  std::shared_ptr<Nic> nic_;
  ExportBackend* backend_ = nullptr;
  std::atomic<bool> stopped_{false};
  ThreadCount threads_;
  SessionRegistry sessions_;
  absl::Mutex mu_;  // guards conns_, begun_, next_conn_id_
  std::map<uint64_t, std::shared_ptr<ServerConn>> conns_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Begun> begun_ ABSL_GUARDED_BY(mu_);
  uint64_t next_conn_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Page copies of FETCHes, off the completion contexts' threads. Joined
  // (after Stop waited for every copy) before the members above go.
  Executor copiers_{1, kCopyWorkers};
  std::unique_ptr<Listener> listener_;  // last: stopped (joined) first
};

void RdmaTransport::ServeLiveness(UniqueFd fd) {
  const auto ms = absl::ToInt64Milliseconds(kLivenessHelloTimeout);
  timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>(ms % 1000 * 1000)};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  FrameHeader h;
  std::vector<uint8_t> payload;
  absl::Status st = ReadFrame(fd.get(), &h, &payload, /*max_payload=*/kMaxTokenBytes);
  if (st.ok() && h.type != static_cast<uint8_t>(FrameType::kHello)) {
    st = absl::PermissionDeniedError("first frame is not a HELLO with a token");
  }
  std::shared_ptr<ServerConn> conn;
  if (st.ok()) {
    // Only ServerConns claim tokens of this registry.
    conn = std::dynamic_pointer_cast<ServerConn>(
        sessions_.Find(std::string(payload.begin(), payload.end())));
    if (conn == nullptr) st = absl::PermissionDeniedError("unknown or unclaimed session token");
  }
  if (!st.ok()) {
    spdlog::warn("liveness connection refused: {}", st.message());
    return;
  }
  timeval zero{};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof(zero));
  if (!conn->AttachLiveness(std::move(fd))) {
    spdlog::warn("second liveness connection for one session refused");
  }
}

absl::Status ServerConn::OnMessage(const FrameHeader& h, absl::Span<const uint8_t> payload) {
  const auto type = static_cast<FrameType>(h.type);
  Owned& o = owned_;
  if (o.refusing) return absl::OkStatus();  // closing once the refusal is sent
  if (!o.established) {
    if (type != FrameType::kHello) return absl::PermissionDeniedError("first message is not HELLO");
    auto hello = ParseRdmaHello(payload);
    if (!hello.ok()) {
      spdlog::warn("rdma data connection from {} refused: {}", node_, hello.status().message());
      return hello.status();
    }
    if (!TokensEqual(hello->token, session_token_) ||
        !transport_->sessions().Claim(hello->token, self()).ok()) {
      // Answered, then closed once the answer is sent (Tick): the importer
      // learns why now rather than at its HELLO timeout.
      spdlog::warn("rdma data connection from {} refused: {}", node_, kRefusedToken);
      o.refusing = true;
      const RdmaHelloAnswerPayload no{kRdmaProtocolVersion, kRdmaHelloRefused};
      Enqueue(SendMsg{MakeMsg(FrameType::kHello, 0, &no, sizeof(no))});
      return absl::OkStatus();
    }
    o.token = hello->token;
    o.established = true;
    spdlog::info("rdma data connection from {} established", node_);
    const RdmaHelloAnswerPayload answer{kRdmaProtocolVersion, 0};
    Enqueue(SendMsg{MakeMsg(FrameType::kHello, 0, &answer, sizeof(answer))});
    return absl::OkStatus();
  }
  switch (type) {
    case FrameType::kHello:  // keepalive
      return absl::OkStatus();
    case FrameType::kFetch: {
      auto f = ParseRdmaFetch(payload);
      if (!f.ok()) return f.status();
      if (auto full = backend_->AdmitFetch(*this, o.fetches.size()); !full.ok()) {
        Enqueue(SendMsg{MakeFetchError(h.id, full, kMsgSize)});  // --max-pending-fetches-per-peer
        return absl::OkStatus();
      }
      o.fetches.emplace_back(h.id, *f);
      waiting_fetches_.store(o.fetches.size(), std::memory_order_relaxed);
      return StartFetches();
    }
    case FrameType::kInvalAck: {
      if (payload.size() != sizeof(InvalAckPayload)) return absl::DataLossError("malformed INVAL_ACK");
      InvalAckPayload a;
      std::memcpy(&a, payload.data(), sizeof(a));
      backend_->OnAck(id(), a.export_id, a.seq);
      return absl::OkStatus();
    }
    default:
      return absl::DataLossError(absl::StrFormat("unexpected message type %u", h.type));
  }
}

absl::Status ServerConn::StartFetches() {
  Owned& o = owned_;
  while (!o.fetches.empty()) {
    uint32_t s = 0;
    {
      absl::MutexLock l(&mu_);
      if (locked_.closed) return absl::OkStatus();
      while (s < kStaging && slocked_.staging[s] != RequestState::kFree) ++s;
      if (s == kStaging) return absl::OkStatus();  // a WRITE completion or a copy frees one
    }
    auto [id, f] = o.fetches.front();
    o.fetches.pop_front();
    waiting_fetches_.store(o.fetches.size(), std::memory_order_relaxed);
    if (auto bad = CheckFetchPages(f.f.npages, kSlotPages); !bad.ok()) {
      Enqueue(SendMsg{MakeFetchError(id, bad, kMsgSize)});
      continue;
    }
    // Where the pages go is the importer's to say: its NIC checks the
    // target against the rkey's registration (a WRITE outside it fails and
    // the connection closes); nothing of this daemon's is at stake.
    {
      absl::MutexLock l(&mu_);
      slocked_.staging[s] = RequestState::kCopying;
      ++slocked_.copies;
    }
    copiers_->Submit([self = self(), s, id, f] { self->Copy(s, id, f); });
  }
  return absl::OkStatus();
}

void ServerConn::Copy(uint32_t s, uint64_t id, const RdmaFetch& f) {
  const size_t bytes = static_cast<size_t>(f.f.npages) * kPage;
  const uint64_t remote = f.addr;
  const uint32_t rkey = f.rkey;
  auto seq = backend_->ServeFetch(*this, f.f.export_id, f.f.first_page, f.f.npages,
                                  (f.f.flags & kFetchNoCache) == 0,
                                  absl::MakeSpan(data_mem_.get() + s * kSlotBytes, bytes));
  absl::MutexLock l(&mu_);
  --slocked_.copies;
  if (seq.ok()) {
    FetchRespPayload r{};
    r.seq = *seq;
    slocked_.staging[s] = RequestState::kWriting;
    // The WRITE is queued before the response on the same QP: RC places
    // its data in the importer's memory before the response's receive
    // completes there, so the importer acts on a completion that implies
    // the pages landed.
    EnqueueLocked(WriteData{s, bytes, remote, rkey});
    EnqueueLocked(SendMsg{MakeMsg(FrameType::kFetchResp, id, &r, sizeof(r))});
  } else {
    slocked_.staging[s] = RequestState::kFree;
    EnqueueLocked(SendMsg{MakeFetchError(id, seq.status(), kMsgSize)});
    Wake();  // a queued FETCH may take the buffer
  }
  if (locked_.closed) Wake();  // the close may finish now
}

void ServerConn::OnWriteDone(uint32_t staging) {
  {
    absl::MutexLock l(&mu_);
    slocked_.staging[staging] = RequestState::kFree;
  }
  if (auto st = StartFetches(); !st.ok()) {
    absl::MutexLock l(&mu_);
    CloseLocked(st);
  }
}

absl::Status ServerConn::Tick(absl::Time now) {
  if (owned_.refusing) {
    absl::MutexLock l(&mu_);
    if (locked_.out.empty() && locked_.send_inflight == 0) {
      return absl::PermissionDeniedError(kRefusedToken);
    }
  }
  if (!has_liveness_ && now > hello_deadline_ + kHelloTimeout) {
    return absl::DeadlineExceededError(owned_.established ? "no liveness connection from the importer"
                                                          : "no HELLO from the importer");
  }
  return StartFetches();  // a buffer freed by a failed copy
}

void ServerConn::OnClosed(const absl::Status& why) {
  if (absl::IsCancelled(why)) {
    spdlog::info("rdma data connection from {} closed: {}", node_, why.message());
  } else {
    spdlog::warn("rdma data connection from {} closed: {}", node_, why.message());
  }
  // Unreachable by its token first, then the backend forgets it.
  if (!owned_.token.empty()) transport_->sessions().Forget(owned_.token);
  backend_->OnSubscriberClosed(id());
  transport_->Unregister(id());
  threads_->Dec();  // last: Stop may return and the transport go
}

absl::Status ClientConn::Start(const Endpoint& remote, ImportBackend* backend, PeerChannel* channel,
                               const std::string& peer_host, uint16_t liveness_port,
                               const std::string& token) {
  backend_ = backend;
  peer_name_ = absl::StrCat(peer_host, ":", liveness_port);
  {
    absl::MutexLock l(&mu_);
    clocked_.channel = channel;
  }
  // Destroying a connection that did not start tells nobody.
  absl::Cleanup detach = [this] {
    absl::MutexLock l(&mu_);
    clocked_.channel = nullptr;
    CloseLocked(absl::UnavailableError("handshake failed"));
  };
  if (auto st = ConnectQp(remote); !st.ok()) return st;
  auto hello = MakeRdmaHello(
      RdmaHello{data_mr_->addr(), data_mr_->length(), data_mr_->rkey(), token}, kMsgSize);
  if (!hello.ok()) {
    // A token no exporter issued (e.g. empty): refused as the exporter would.
    return absl::UnavailableError(absl::StrCat("rdma data connection to ", peer_name_,
                                               " refused: ", hello.status().message()));
  }
  Attach();
  {
    absl::MutexLock l(&mu_);
    EnqueueLocked(SendMsg{*std::move(hello)});
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return clocked_.established || locked_.closed;
    };
    mu_.AwaitWithTimeout(absl::Condition(&ready), kHelloTimeout);
    if (!clocked_.established || locked_.closed) {
      std::string why = locked_.closed ? std::string(locked_.close_reason.message()) : "no HELLO";
      return absl::UnavailableError(
          absl::StrCat("rdma data connection to ", peer_name_, " refused: ", why));
    }
  }
  auto fd = TcpConnect({peer_host, liveness_port}, absl::Seconds(2));
  if (fd.ok()) {
    auto frame = MakeFrame(FrameType::kHello, 0, token.data(), token.size());
    if (auto st = WriteFull(fd->get(), frame.data(), frame.size()); !st.ok()) fd = st;
  }
  if (!fd.ok()) {
    return absl::UnavailableError(absl::StrCat("rdma data connection to ", peer_name_,
                                               ": liveness connection: ", fd.status().message()));
  }
  std::move(detach).Cancel();
  SetLiveness(std::move(*fd));
  return absl::OkStatus();
}

void ClientConn::CloseAndWait() {
  absl::MutexLock l(&mu_);
  CloseLocked(absl::CancelledError("closed by this daemon"));
  if (ctx_ == nullptr || ctx_->OnThread() ||
      clocked_.delivery_thread == std::this_thread::get_id()) {
    clocked_.channel = nullptr;
    return;
  }
  mu_.Await(absl::Condition(
      +[](Locked* c) { return c->finished || c->channel == nullptr; }, &clocked_));
}

// Only where the receive area is ODP (the device passed the data check):
// a pinned registration of the cache file would pin every page it maps at
// registration and keep those pages after a punch, so a WRITE after an
// invalidation would land in a page the file no longer holds; and
// registering a sparse file pinned would first fault in (allocate) all of
// it. Pinned devices keep the receive slots and the copy.
absl::StatusOr<std::unique_ptr<LandingArea>> ClientConn::RegisterLanding(void* addr, size_t len, LandingUse use) {
  if (data_mr_->mode() != Mode::kOdp) {
    // (A session's data area is never punched, but pinning it whole once
    // per session and exporter would cost its size in locked memory each.)
    return absl::FailedPreconditionError(
        use == LandingUse::kFetches
            ? "pinned registration: fetched pages land in the receive slots and are copied (a pinned "
              "registration keeps the pages a punch removes from the cache file)"
            : "pinned registration: zero-copy READs land in the receive slots and are copied");
  }
  if (reinterpret_cast<uintptr_t>(addr) % kPage != 0 || len % kPage != 0 || len == 0) {
    return absl::InvalidArgumentError("a landing area is whole pages");
  }
  // In the domain of this exporter's connections: no other exporter's queue
  // pair can WRITE into it. Memory only READs land in grants no remote
  // access at all.
  auto reg = rdma::Register(*nic_->device, domain_->pd.get(), addr, len,
                            use == LandingUse::kReads ? Access::kLocal : Access::kRemoteReadWrite, Mode::kOdp);
  if (!reg.ok()) {
    if (!reg_failed_logged_.exchange(true)) {
      spdlog::warn("rdma: {} land in receive slots and are copied: registering {} failed: {}",
                   use == LandingUse::kReads ? "zero-copy READs" : "fetched pages",
                   use == LandingUse::kReads ? "a session's data area" : "the shared cache", reg.status().message());
    }
    return reg.status();
  }
  return std::make_unique<LandingRegistration>(nic_, domain_, std::move(*reg), use);
}

const Registration* ClientConn::AreaCovering(const FetchOp& op) const {
  // The exporter WRITEs into it: only an area registered for that.
  const auto* area = dynamic_cast<const LandingRegistration*>(op.area);
  if (area == nullptr || area->use() != LandingUse::kFetches) return nullptr;
  return AreaCovering(op.area, op.dst);
}

const Registration* ClientConn::AreaCovering(const LandingArea* a, absl::Span<const uint8_t> dst) const {
  const auto* area = dynamic_cast<const LandingRegistration*>(a);
  if (area == nullptr || area->domain() != domain_.get() || dst.empty()) return nullptr;
  const uint64_t at = reinterpret_cast<uint64_t>(dst.data());
  const Registration& r = area->reg();
  if (at % kPage != 0 || at < r.addr() || at - r.addr() > r.length() || dst.size() > r.length() - (at - r.addr())) {
    return nullptr;
  }
  return &r;
}

// Staged fetches, pipelined and completed by the connection's own threads:
// every op is split into slot-sized FETCHes, as many in flight as there are
// free slots (the exporter's copy of one overlaps the WRITE of another);
// each is copied out as its answer arrives and its slot reused for the next.
// An op takes the oldest sequence of its parts (caching stays
// conservative). The first failure ends the batch: what was not issued yet
// is not (a read fails at its first error; a dead export answers nothing
// else).
void ClientConn::FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done) {
  auto b = std::make_shared<Batch>();
  b->ops = ops;
  b->done = std::move(done);
  b->timeout = timeout;
  b->deadline = absl::Now() + timeout;
  b->outstanding.assign(ops.size(), 0);
  b->min_seq.assign(ops.size(), UINT64_MAX);
  b->failed.assign(ops.size(), false);
  for (FetchOp& op : ops) {
    SVM_CHECK(op.dst.size() == static_cast<size_t>(op.npages) * kPage);
    op.result = absl::UnknownError("not fetched");
    op.transport_copied = 0;
  }
  absl::MutexLock l(&mu_);
  if (locked_.closed || clocked_.finished) {
    EndLocked(*b, absl::UnavailableError(absl::StrCat("data connection to ", peer_name_, " is closed")));
    clocked_.batches.insert(b);
    return MaybeFinishLocked(b);
  }
  clocked_.batches.insert(b);
  clocked_.waiting.push_back(b);
  IssueLocked();
  MaybeFinishLocked(b);  // a batch of no ops
}

void ClientConn::IssueLocked() {
  Locked& c = clocked_;
  while (!c.waiting.empty() && !c.free_slots.empty() && !locked_.closed) {
    std::shared_ptr<Batch> b = c.waiting.front();
    if (b->ended || b->next_op == b->ops.size()) {
      b->ended = true;
      c.waiting.pop_front();
      MaybeFinishLocked(b);
      continue;
    }
    FetchOp& op = b->ops[b->next_op];
    if (op.npages == 0) {
      FailOpLocked(*b, b->next_op, absl::InvalidArgumentError("a fetch of no pages"));
      ++b->next_op;
      continue;
    }
    Chunk ch;
    ch.batch = b;
    ch.op = b->next_op;
    ch.at = b->next_at;
    ch.n = std::min(kSlotPages, op.npages - b->next_at);
    ch.slot = c.free_slots.back();
    c.free_slots.pop_back();
    c.slots[ch.slot] = SlotState::kFetching;
    const uint64_t id = c.next_id++;
    RdmaFetch f{{op.export_id, op.first_page + ch.at, ch.n, op.track ? 0u : kFetchNoCache}, 0, 0, 0};
    if (const Registration* area = AreaCovering(op)) {
      // The pages land in dst itself, a page-aligned part of an ODP
      // registration (rxe on 7.2 misplaces transfers that start inside a
      // page of an ODP registration: tests/vm/rdma/README.md).
      ch.direct = true;
      f.addr = reinterpret_cast<uint64_t>(op.dst.data()) + static_cast<uint64_t>(ch.at) * kPage;
      f.rkey = area->rkey();
    } else {
      f.addr = data_mr_->addr() + static_cast<uint64_t>(ch.slot) * kSlotBytes;
      f.rkey = data_mr_->rkey();
    }
    ++b->outstanding[ch.op];
    ++b->inflight;
    b->next_at += ch.n;
    if (b->next_at == op.npages) {
      ++b->next_op;
      b->next_at = 0;
    }
    c.fetches.emplace(id, std::move(ch));
    EnqueueLocked(SendMsg{MakeMsg(FrameType::kFetch, id, &f, sizeof(f))});
  }
  // Zero-copy reads waiting for slots, oldest first.
  while (!c.zc_waiting.empty() && !c.free_slots.empty() && !locked_.closed) {
    std::shared_ptr<ZcRead> z = c.zc_waiting.front();
    if (IssueZcLocked(z)) break;  // took every free slot and wants more
    c.zc_waiting.pop_front();
    if (z->inflight.empty() && !z->finished) {
      // Its region was dropped before anything more was issued: done runs
      // on the context's thread (Tick), never under a caller's lock.
      EndZcLocked(z);
      c.zc_finished.push_back(std::move(z));
      Wake();
    }
  }
}

void ClientConn::FailOpLocked(Batch& b, size_t i, const absl::Status& st) {
  if (b.failed[i]) return;
  b.failed[i] = true;
  b.ops[i].result = st;
}

void ClientConn::EndLocked(Batch& b, const absl::Status& st) {
  if (!b.ended) {
    b.ended = true;
    // (An op partly issued fails too: it cannot be whole.)
    for (size_t i = b.next_op; i < b.ops.size(); ++i) FailOpLocked(b, i, st);
    b.next_op = b.ops.size();
    b.next_at = 0;
  }
}

void ClientConn::MaybeFinishLocked(const std::shared_ptr<Batch>& b) {
  if (b->completed || b->inflight > 0 || !(b->ended || b->next_op == b->ops.size())) return;
  b->completed = true;
  clocked_.batches.erase(b);
  for (size_t i = 0; i < b->ops.size(); ++i) {
    if (!b->failed[i]) b->ops[i].result = b->min_seq[i];
  }
  FetchDone done = std::move(b->done);
  mu_.Unlock();
  std::move(done)();
  done = nullptr;  // what it holds is released unlocked too
  mu_.Lock();
}

void ClientConn::CompleteLocked(const FetchResult& r) {
  Locked& c = clocked_;
  c.last_answer = absl::Now();
  auto it = c.fetches.find(r.id);
  if (it == c.fetches.end() || it->second.copying) return;  // abandoned (timed out)
  Chunk& ch = it->second;
  std::shared_ptr<Batch> b = ch.batch;
  if (!r.status.ok()) {
    FailOpLocked(*b, ch.op, r.status);
    EndLocked(*b, absl::CancelledError(absl::StrCat("not fetched: an earlier fetch of the batch failed: ",
                                                    r.status.message())));
  } else if (!b->failed[ch.op] && ch.direct) {
    // The exporter's WRITE placed the pages in dst before the response
    // that completed the chunk (RC order on one QP): nothing to copy.
    b->min_seq[ch.op] = std::min(b->min_seq[ch.op], r.seq);
  } else if (!b->failed[ch.op]) {
    // The data landed before the response that completed the chunk.
    c.slots[ch.slot] = SlotState::kDone;
    ch.copying = true;
    const Chunk copy = ch;
    mu_.Unlock();
    std::memcpy(b->ops[copy.op].dst.data() + static_cast<size_t>(copy.at) * kPage,
                data_mem_.get() + static_cast<size_t>(copy.slot) * kSlotBytes,
                static_cast<size_t>(copy.n) * kPage);
    mu_.Lock();
    it = c.fetches.find(r.id);
    b->min_seq[copy.op] = std::min(b->min_seq[copy.op], r.seq);
    b->ops[copy.op].transport_copied += static_cast<uint64_t>(copy.n) * kPage;
  }
  const uint32_t slot = it->second.slot;
  const size_t op = it->second.op;
  c.fetches.erase(it);
  --b->outstanding[op];
  --b->inflight;
  SetSlot(slot, SlotState::kFree);  // issues the next chunk
  MaybeFinishLocked(b);
}

void ClientConn::AbandonLocked(const absl::Status& st, std::optional<absl::Time> overdue_at) {
  Locked& c = clocked_;
  std::vector<std::shared_ptr<Batch>> touched;
  for (auto it = c.fetches.begin(); it != c.fetches.end();) {
    Chunk& ch = it->second;
    if (ch.copying || (overdue_at && ch.batch->deadline > *overdue_at)) {
      ++it;
      continue;
    }
    c.slots[ch.slot] = SlotState::kAbandoned;
    FailOpLocked(*ch.batch, ch.op, st);
    --ch.batch->outstanding[ch.op];
    --ch.batch->inflight;
    touched.push_back(ch.batch);
    it = c.fetches.erase(it);
  }
  for (const auto& b : c.batches) {
    if (!overdue_at || b->deadline <= *overdue_at) {
      EndLocked(*b, st);
      touched.push_back(b);
    }
  }
  for (auto& b : touched) MaybeFinishLocked(b);
}

absl::Status ClientConn::Tick(absl::Time now) {
  RunFinishedZc();
  bool overdue = false, zc_overdue = false;
  absl::Duration timeout;
  {
    absl::MutexLock l(&mu_);
    for (const auto& b : clocked_.batches) {
      if (b->deadline <= now && clocked_.last_answer + b->timeout <= now && !b->completed) {
        overdue = true;
        timeout = b->timeout;
      }
    }
    for (const auto& z : clocked_.zc_reads) {
      if (z->deadline <= now && !z->finished) {
        zc_overdue = true;
        timeout = z->timeout;
      }
    }
    if (zc_overdue) {
      // As for a fetch: the reads fail in OnClosed, once the QP is in ERR
      // (a READ into dst itself must not land after its caller moved on).
      CloseLocked(absl::UnavailableError("zero-copy read timed out"));
    }
  }
  if (zc_overdue) {
    spdlog::warn("peer {} did not complete a zero-copy read within {}; closing the rdma data connection",
                 peer_name_, absl::FormatDuration(timeout));
    return absl::UnavailableError("zero-copy read timed out");
  }
  {
    absl::MutexLock l(&mu_);
    if (!overdue) return absl::OkStatus();
    // Closed before any caller hears of the timeout (it may look at alive()).
    // The fetches fail only in OnClosed, once the QP is in ERR: a fetch's
    // pages may be landing in its dst itself (a landing area), and a WRITE
    // the exporter sends late must not land after the caller punched or
    // published those pages (invalidate, drain, then retire).
    CloseLocked(absl::UnavailableError(absl::StrCat("peer ", peer_name_, " did not answer within ",
                                                    absl::FormatDuration(timeout))));
  }
  spdlog::warn("peer {} did not answer a fetch within {}; closing the rdma data connection", peer_name_,
               absl::FormatDuration(timeout));
  return absl::UnavailableError("fetch timed out");
}

absl::Status ClientConn::OnMessage(const FrameHeader& h, absl::Span<const uint8_t> payload) {
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kHello: {
      absl::MutexLock l(&mu_);
      if (!clocked_.established) {
        // The exporter's answer names its protocol version (a version-1
        // exporter answers with nothing; it refuses our HELLO anyway).
        RdmaHelloAnswerPayload a{};
        if (payload.size() == sizeof(a)) std::memcpy(&a, payload.data(), sizeof(a));
        if (a.version != kRdmaProtocolVersion) {
          return absl::FailedPreconditionError(absl::StrFormat(
              "the exporter speaks rdma protocol version %u; this daemon speaks version %u "
              "(run the same svm release on both nodes)",
              a.version == 0 ? 1 : a.version, kRdmaProtocolVersion));
        }
        if (a.refused != 0) {
          return absl::PermissionDeniedError(
              "the exporter refused the HELLO: its session token is unknown or already used");
        }
      }
      clocked_.established = true;  // the exporter's answer, later keepalives
      hello_seen_ = true;
      return absl::OkStatus();
    }
    case FrameType::kFetchResp: {
      if (payload.size() < sizeof(FetchRespPayload)) return absl::DataLossError("malformed FETCH_RESP");
      FetchRespPayload r;
      std::memcpy(&r, payload.data(), sizeof(r));
      const size_t tail = payload.size() - sizeof(r);
      FetchResult res;
      res.id = h.id;
      if (r.code != 0) {
        res.status = FetchErrorStatus(
            r, absl::string_view(reinterpret_cast<const char*>(payload.data()) + sizeof(r), tail));
      } else if (tail != 0) {
        res.status = absl::DataLossError("FETCH_RESP with unexpected bytes");
      } else {
        res.seq = r.seq;
      }
      absl::MutexLock l(&mu_);
      if (clocked_.delivering) {
        clocked_.deliveries.push_back(std::move(res));  // behind an invalidation
      } else {
        CompleteLocked(res);
      }
      return absl::OkStatus();
    }
    case FrameType::kInval: {
      if (payload.size() != sizeof(InvalPayload)) return absl::DataLossError("malformed INVAL");
      InvalPayload p;
      std::memcpy(&p, payload.data(), sizeof(p));
      const InvalRecord rec = FromInvalPayload(p);
      absl::MutexLock l(&mu_);
      std::optional<uint64_t> drain;
      if (rec.kind != source::ChangeKind::kWrite) {
        // Anything but a store may have replaced or withdrawn the exporter's
        // registration: no READ is issued with it from now on (before the
        // invalidation is delivered), and the acknowledgement waits for the
        // ones in flight.
        ZcRegion& z = clocked_.zc[rec.export_id];
        const uint64_t epoch = z.state.Drop(rec.seq);
        if (!z.state.Drained(epoch)) drain = epoch;
      }
      clocked_.deliveries.push_back(InvalDelivery{rec, drain});
      if (!clocked_.delivering) {
        clocked_.delivering = true;
        DeliveryWorkers().Submit(
            [self = std::static_pointer_cast<ClientConn>(shared_from_this())] { self->Deliver(); });
      }
      return absl::OkStatus();
    }
    default:
      return absl::DataLossError(absl::StrFormat("unexpected message type %u", h.type));
  }
}

void ClientConn::Deliver() {
  absl::MutexLock l(&mu_);
  Locked& c = clocked_;
  c.delivery_thread = std::this_thread::get_id();
  for (;;) {
    if (c.deliveries.empty() || locked_.closed) {
      // Once closed nothing more is delivered: OnChannelClosed follows, and
      // the pending fetches fail.
      c.deliveries.clear();
      c.delivering = false;
      c.delivery_thread = std::thread::id();
      if (locked_.closed) Wake();  // the close may finish now
      return;
    }
    Delivery d = std::move(c.deliveries.front());
    c.deliveries.pop_front();
    if (auto* r = std::get_if<FetchResult>(&d)) {
      CompleteLocked(*r);
      continue;
    }
    const InvalDelivery& inv = std::get<InvalDelivery>(d);
    PeerChannel* channel = c.channel;
    mu_.Unlock();
    if (channel != nullptr) backend_->OnInvalidation(channel, inv.rec);
    mu_.Lock();
    c.held_acks.push_back(HeldAck{inv.rec.export_id, inv.rec.seq, inv.drain_epoch});
    FlushAcksLocked();
  }
}

void ClientConn::FlushAcksLocked() {
  Locked& c = clocked_;
  while (!c.held_acks.empty()) {
    const HeldAck& a = c.held_acks.front();
    if (a.drain_epoch && !c.zc[a.export_id].state.Drained(*a.drain_epoch)) break;
    InvalAckPayload ack{a.export_id, a.seq};
    EnqueueLocked(SendMsg{MakeMsg(FrameType::kInvalAck, 0, &ack, sizeof(ack))});
    c.held_acks.pop_front();
  }
}

bool ClientConn::SetRegion(uint64_t export_id, const RemoteRegion& r, uint64_t seq) {
  absl::MutexLock l(&mu_);
  ZcRegion& z = clocked_.zc[export_id];
  if (!z.state.Offer(seq)) return false;
  z.remote = r;
  return true;
}

// Zero-copy read: the whole pages covering the range are split into
// slot-sized READs, up to one per free slot in flight at once; each is
// copied out in order as it completes (and counted in copied). Only
// page-aligned READs are issued: rxe in Linux 7.2 serves a READ from an
// ODP region that does not start at a page boundary from the start of the
// page (tests/vm/rdma/README.md).
void ClientConn::ReadRegionAsync(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst,
                                 absl::Duration timeout, const LandingArea* area, ReadRegionDone done) {
  auto z = std::make_shared<ZcRead>();
  z->export_id = export_id;
  z->offset = offset;
  z->dst = dst;
  z->timeout = timeout;
  z->deadline = absl::Now() + timeout;
  // Whole pages inside a landing area of this connection's domain: the
  // READs land in dst itself (the caller's memory), nothing is copied.
  z->land = offset % kPage == 0 && dst.size() % kPage == 0 ? AreaCovering(area, dst) : nullptr;
  absl::Status refused;
  bool finish_now = false;
  {
    absl::MutexLock l(&mu_);
    Locked& c = clocked_;
    auto it = c.zc.find(export_id);
    if (locked_.closed) {
      refused = absl::UnavailableError(absl::StrCat("data connection to ", peer_name_, " is closed: ",
                                                    locked_.close_reason.message()));
    } else if (it == c.zc.end() || it->second.state.state() != coherence::RegionState::kUsable) {
      refused = absl::FailedPreconditionError("no zero-copy region for this export");
    } else if (offset > it->second.remote.len || dst.size() > it->second.remote.len - offset) {
      refused = absl::OutOfRangeError(absl::StrFormat("read of %u bytes at %u outside the %u-byte region",
                                                      dst.size(), offset, it->second.remote.len));
    } else {
      z->r = it->second.remote;
      // Every READ targets this epoch of the region; an invalidation that
      // drops it holds its acknowledgement until they have all completed.
      z->epoch = it->second.state.BeginRead();
      z->begin = offset / kPage * kPage;
      const uint64_t end = std::min<uint64_t>(z->r.len, (offset + dst.size() + kPage - 1) / kPage * kPage);
      z->total = dst.empty() ? 0 : end - z->begin;
      z->done = std::move(done);
      c.zc_reads.insert(z);
      if (IssueZcLocked(z)) {
        c.zc_waiting.push_back(z);
      } else if (z->inflight.empty()) {
        EndZcLocked(z);
        finish_now = true;
      }
    }
  }
  if (!refused.ok()) return std::move(done)(std::move(refused), 0);
  if (finish_now) {
    ReadRegionDone d = std::move(z->done);
    std::move(d)(z->Outcome(), z->copied);
  }
}

bool ClientConn::IssueZcLocked(const std::shared_ptr<ZcRead>& z) {
  Locked& c = clocked_;
  auto it = c.zc.find(z->export_id);
  // The region was dropped by an invalidation: nothing more is issued
  // against it; what is in flight completes (its memory stays registered
  // until this read acknowledges), then the caller takes another path.
  z->replaced = z->replaced || it == c.zc.end() || it->second.state.state() != coherence::RegionState::kUsable ||
                it->second.state.epoch() != z->epoch;
  while (z->issued < z->total && !z->replaced && !c.free_slots.empty() && !locked_.closed) {
    ZcRead::Piece& pc = z->inflight.emplace_back();
    pc.slot = c.free_slots.back();
    c.free_slots.pop_back();
    c.slots[pc.slot] = SlotState::kReading;
    pc.at = z->begin + z->issued;
    pc.len = std::min<uint64_t>(kSlotBytes, z->total - z->issued);
    c.reads[pc.slot] = z;
    ReadData rd{pc.slot, pc.len, z->r.addr + pc.at, z->r.rkey};
    if (z->land != nullptr) {
      rd.local = z->land;
      rd.local_offset = reinterpret_cast<uint64_t>(z->dst.data()) + (pc.at - z->offset) - z->land->addr();
    }
    EnqueueLocked(std::move(rd));
    z->issued += pc.len;
  }
  return z->issued < z->total && !z->replaced;
}

void ClientConn::EndZcLocked(const std::shared_ptr<ZcRead>& z) {
  Locked& c = clocked_;
  z->finished = true;
  if (auto it = c.zc.find(z->export_id); it != c.zc.end()) it->second.state.EndRead(z->epoch);
  FlushAcksLocked();
  c.zc_reads.erase(z);
}

void ClientConn::OnReadDone(uint32_t slot) {
  std::shared_ptr<ZcRead> z;
  absl::MutexLock l(&mu_);
  Locked& c = clocked_;
  auto it = c.reads.find(slot);
  if (it == c.reads.end()) return;  // abandoned
  z = it->second;
  for (ZcRead::Piece& pc : z->inflight) {
    if (pc.slot == slot) pc.done = true;
  }
  // Pieces complete in order: copied out (or already in dst), their slots
  // freed for the next pieces.
  while (!z->inflight.empty() && z->inflight.front().done && !z->finished) {
    const ZcRead::Piece pc = z->inflight.front();
    c.reads.erase(pc.slot);
    c.slots[pc.slot] = SlotState::kDone;
    if (z->land == nullptr) {
      // The part of [pc.at, pc.at + pc.len) the caller asked for.
      const uint64_t from = std::max(pc.at, z->offset);
      const uint64_t to = std::min(pc.at + pc.len, z->offset + z->dst.size());
      mu_.Unlock();
      std::memcpy(z->dst.data() + (from - z->offset),
                  data_mem_.get() + static_cast<size_t>(pc.slot) * kSlotBytes + (from - pc.at), to - from);
      mu_.Lock();
      z->copied += to - from;
    }
    z->inflight.pop_front();
    if (c.slots[pc.slot] == SlotState::kDone) SetSlot(pc.slot, SlotState::kFree);  // not abandoned meanwhile
  }
  if (z->finished) return;  // failed meanwhile (the connection closed)
  if (IssueZcLocked(z) || !z->inflight.empty()) return;
  // Everything read, or the region dropped and what was issued completed.
  EndZcLocked(z);
  c.zc_waiting.erase(std::remove(c.zc_waiting.begin(), c.zc_waiting.end(), z), c.zc_waiting.end());
  ReadRegionDone done = std::move(z->done);
  const absl::Status st = z->Outcome();
  const uint64_t copied = z->copied;
  mu_.Unlock();
  std::move(done)(st, copied);
  done = nullptr;
  mu_.Lock();
}

void ClientConn::RunFinishedZc() {
  std::vector<std::shared_ptr<ZcRead>> finished;
  {
    absl::MutexLock l(&mu_);
    finished.swap(clocked_.zc_finished);
  }
  for (auto& z : finished) std::move(z->done)(z->Outcome(), z->copied);
}

void ClientConn::OnClosed(const absl::Status& why) {
  PeerChannel* channel;
  {
    absl::MutexLock l(&mu_);
    // The QP is in ERR: nothing lands in a slot or a landing area any more.
    AbandonLocked(absl::UnavailableError(absl::StrCat("connection to ", peer_name_, " lost: ", why.message())),
                  std::nullopt);
    clocked_.waiting.clear();
    channel = clocked_.channel;
    // Zero-copy reads fail now, not before: the caller may reuse dst.
    for (auto& [slot, z] : clocked_.reads) clocked_.slots[slot] = SlotState::kAbandoned;
    clocked_.reads.clear();
    clocked_.zc_waiting.clear();
    std::vector<std::shared_ptr<ZcRead>> failed(clocked_.zc_reads.begin(), clocked_.zc_reads.end());
    for (auto& z : failed) EndZcLocked(z);
    mu_.Unlock();
    RunFinishedZc();
    const absl::Status lost = absl::UnavailableError(
        absl::StrCat("data connection to ", peer_name_, " is closed: ", why.message()));
    for (auto& z : failed) std::move(z->done)(lost, z->copied);
    failed.clear();
    mu_.Lock();
  }
  spdlog::info("rdma data connection to {} closed: {}", peer_name_, why.message());
  // Never handed out, or destroyed from a callback: nobody to tell.
  if (hello_seen_ && channel != nullptr) {
    backend_->OnChannelClosed(channel,
                              absl::IsUnavailable(why) ? why : absl::UnavailableError(why.message()));
  }
  absl::MutexLock l(&mu_);
  clocked_.finished = true;
}

std::optional<DeviceStatus> RdmaTransport::device_status() const {
  const Device& dev = *nic_->device;
  DeviceStatus s;
  s.device = dev.name();
  s.port = dev.port();
  ibv_port_attr pattr{};
  if (int rc = ibv_query_port(dev.context(), dev.port(), &pattr); rc != 0) {
    s.port_state = absl::StrCat("unknown (", std::strerror(rc), ")");
  } else {
    s.port_state = ibv_port_state_str(pattr.state);
  }
  char gid[INET6_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET6, dev.gid().raw, gid, sizeof(gid));
  s.gid = absl::StrFormat("gid[%d] %s (%s)", dev.gid_index(), gid, rdma::GidTypeName(dev.gid_type()));
  s.active_mtu = rdma::MtuBytes(dev.active_mtu());
  const rdma::Capabilities& caps = dev.caps();
  s.odp_rc_read = caps.odp && caps.odp_rc_read;
  switch (caps.odp_check) {
    case rdma::Capabilities::OdpCheck::kNotRun:
      s.odp_check = "not run";
      break;
    case rdma::Capabilities::OdpCheck::kPassed:
      s.odp_check = "passed";
      break;
    case rdma::Capabilities::OdpCheck::kFailed:
      s.odp_check = absl::StrCat("failed: ", caps.odp_check_detail);
      break;
  }
  const bool odp = nic_->data_mode == Mode::kOdp ||
                   (nic_->data_mode == Mode::kAuto && caps.OdpUsable());
  s.registration = odp ? "odp" : "pinned";
  return s;
}

}  // namespace

absl::StatusOr<RdmaRegistration> ParseRdmaRegistration(const std::string& s) {
  if (s == "auto") return RdmaRegistration::kAuto;
  if (s == "odp") return RdmaRegistration::kOdp;
  if (s == "pinned") return RdmaRegistration::kPinned;
  return absl::InvalidArgumentError(absl::StrCat("unknown rdma registration '", s,
                                                 "' (auto|odp|pinned)"));
}

absl::StatusOr<std::unique_ptr<Transport>> CreateRdmaTransport(const RdmaOptions& opts) {
  auto nic = std::make_shared<Nic>();
  auto dev = Device::Open(opts.device);
  if (!dev.ok()) return dev.status();
  nic->device = std::move(*dev);
  nic->ack_timeout = rdma::AckTimeoutExponent(opts.ack_timeout);
  switch (opts.registration) {
    case RdmaRegistration::kPinned:
      // No ODP data check: nothing will be registered ODP.
      nic->data_mode = Mode::kPinned;
      spdlog::info("rdma data buffers are registered pinned (--rdma-registration pinned)");
      break;
    case RdmaRegistration::kOdp:
      if (absl::Status st = nic->device->VerifyOdp(); !st.ok()) {
        return absl::Status(st.code(), absl::StrCat("--rdma-registration odp: odp is not usable on ",
                                                    nic->device->name(), ": ", st.message()));
      }
      nic->data_mode = Mode::kOdp;
      break;
    case RdmaRegistration::kAuto:
      // Decides Mode::kAuto for the data buffers (logged when it fails).
      if (absl::Status st = nic->device->VerifyOdp(); !st.ok()) {
        spdlog::info("rdma data buffers are registered pinned ({})", st.message());
      }
      break;
  }
  auto pd = nic->device->AllocPd();
  if (!pd.ok()) return pd.status();
  nic->pd = std::move(*pd);
  return std::unique_ptr<Transport>(new RdmaTransport(std::move(nic)));
}

}  // namespace svm::transport
