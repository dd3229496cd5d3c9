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
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/check.h"
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
// An idle connection sends a keepalive this often, so a peer whose QP is
// gone is noticed when transport retries exhaust even when nothing else is
// sent. (rxe on 6.1 was not seen to exhaust them within 7 s: a peer
// process's death is noticed through the liveness socket instead.)
constexpr absl::Duration kKeepalive = absl::Seconds(1);
constexpr absl::Duration kLivenessHelloTimeout = absl::Seconds(2);
constexpr absl::Duration kBeginLifetime = absl::Seconds(30);

enum WrKind : uint64_t { kWrRecv = 1, kWrSend = 2, kWrWrite = 3, kWrRead = 4 };
uint64_t WrId(WrKind k, uint64_t i) { return (uint64_t{k} << 56) | i; }

// FETCH payload: the tcp one plus the offset in the importer's receive area
// the pages are to be written to.
struct RdmaFetch {
  FetchPayload f;
  uint64_t offset;
};
static_assert(sizeof(RdmaFetch) == 32);

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

// The device and protection domain every connection uses; shared so a
// connection outliving the transport keeps them alive.
struct Nic {
  std::unique_ptr<Device> device;
  PdPtr pd;  // released before the device is closed
  // Data buffers: kAuto (ODP when the device passed the data check), kOdp
  // (checked usable at start-up) or kPinned (--rdma-registration pinned).
  Mode data_mode = Mode::kAuto;
};

// One side of a data connection: the queue pair, its buffers and the thread
// that drives it. Verbs objects are touched only by that thread once it runs
// (and by the creating thread before). Other threads queue messages and wake
// it through an eventfd.
class Conn {
 public:
  virtual ~Conn() = default;
  const Endpoint& local() const { return qp_->local(); }

 protected:
  explicit Conn(std::shared_ptr<Nic> nic) : nic_(std::move(nic)) {}

  // Buffers, registrations, CQ and QP (RESET). data_len: the importer's
  // receive area or the exporter's staging buffers.
  absl::Status Init(size_t data_len, Access data_access);
  // RTR/RTS towards remote, then the receives are posted (not allowed in RESET).
  absl::Status ConnectQp(const Endpoint& remote);
  // Runs until the connection closes; calls OnClosed() last.
  void Loop();

  // Queues a message (or a WRITE or READ) behind everything queued; false
  // once closed.
  struct OutItem {
    std::vector<uint8_t> msg;  // a SEND when not empty
    uint32_t staging = 0;      // a WRITE of staging buffer `staging`...
    size_t len = 0;
    uint64_t remote_addr = 0;  // ...to here
    uint32_t rkey = 0;
    bool read = false;         // a READ from there into slot `staging` instead
  };
  bool Enqueue(OutItem item) {
    absl::MutexLock l(&mu_);
    return EnqueueLocked(std::move(item));
  }
  bool EnqueueLocked(OutItem item) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return false;
    out_.push_back(std::move(item));
    if (out_.size() > kMaxQueued) {
      spdlog::warn("rdma data connection to {} has {} messages unsent; dropping it", peer_name_,
                   out_.size());
      CloseLocked(absl::ResourceExhaustedError("too many unsent messages"));
      return false;
    }
    Wake();
    return true;
  }
  void CloseLocked(absl::Status why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return;
    closed_ = true;
    close_reason_ = std::move(why);
    // The peer sees EOF on the liveness socket (the fd is closed only with
    // this object, so the number cannot be reused under the watcher).
    if (liveness_.valid()) ::shutdown(liveness_.get(), SHUT_RDWR);
    Wake();
  }
  // Blocks until the liveness socket ends (EOF, error, or unexpected bytes:
  // it carries nothing after the HELLO) or the connection closes, then
  // closes the connection.
  void WatchLiveness() {
    int fd;
    {
      absl::MutexLock l(&mu_);
      fd = liveness_.get();
    }
    char b[64];
    ssize_t n;
    do {
      n = ::recv(fd, b, sizeof(b), 0);
    } while (n < 0 && errno == EINTR);
    absl::MutexLock l(&mu_);
    CloseLocked(absl::UnavailableError(n > 0 ? "unexpected bytes on the liveness connection"
                                             : "the peer closed the liveness connection"));
  }
  void Wake() {
    uint64_t one = 1;
    (void)!::write(wake_fd_.get(), &one, sizeof(one));
  }

  // Role hooks, all on the connection thread.
  virtual absl::Status OnMessage(const FrameHeader& h, const uint8_t* payload, size_t len) = 0;
  virtual void OnWriteDone(uint32_t /*staging*/) {}
  virtual void OnReadDone(uint32_t /*slot*/) {}
  // After each batch of completions (deadlines, deferred work).
  virtual absl::Status Tick() { return absl::OkStatus(); }
  virtual bool established() const = 0;
  // The connection is closed (QP in ERR): last call of the thread.
  virtual void OnClosed(const absl::Status& why) = 0;

  std::shared_ptr<Nic> nic_;
  std::string peer_name_ = "?";
  UniqueFd wake_fd_;
  // Memory before its registrations, registrations before the QP: the
  // reverse is teardown order (QP, CQ, MRs, memory).
  MemPtr recv_mem_{nullptr, Unmap{0}};
  MemPtr send_mem_{nullptr, Unmap{0}};
  MemPtr data_mem_{nullptr, Unmap{0}};
  std::optional<Registration> recv_mr_, send_mr_, data_mr_;
  std::unique_ptr<Poller> poller_;
  std::unique_ptr<Qp> qp_;

  mutable absl::Mutex mu_;  // guards out_, closed_, close_reason_ and the subclasses' shared state
  std::deque<OutItem> out_ ABSL_GUARDED_BY(mu_);
  UniqueFd liveness_ ABSL_GUARDED_BY(mu_);  // set once, closed with the object
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status close_reason_ ABSL_GUARDED_BY(mu_);

 private:
  absl::Status Flush() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status OnCompletion(const ibv_wc& wc);

  // Connection thread only.
  uint32_t send_inflight_ = 0;
  uint64_t send_seq_ = 0;
  absl::Time last_send_ = absl::Now();
};

absl::Status Conn::Init(size_t data_len, Access data_access) {
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return ErrnoStatus(errno, "eventfd");
  wake_fd_.Reset(efd);
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
  auto rmr = rdma::Register(dev, nic_->pd.get(), recv_mem_.get(), kRecvDepth * kMsgSize,
                            Access::kLocal, Mode::kPinned);
  if (!rmr.ok()) return rmr.status();
  recv_mr_.emplace(std::move(*rmr));
  auto smr = rdma::Register(dev, nic_->pd.get(), send_mem_.get(), kSendWindow * kMsgSize,
                            Access::kLocal, Mode::kPinned);
  if (!smr.ok()) return smr.status();
  send_mr_.emplace(std::move(*smr));
  auto dmr = rdma::Register(dev, nic_->pd.get(), data_mem_.get(), data_len, data_access, nic_->data_mode);
  if (!dmr.ok()) return dmr.status();
  data_mr_.emplace(std::move(*dmr));
  auto poller = Poller::Create(dev, static_cast<int>(kRecvDepth + kSendWindow + kStaging + 16));
  if (!poller.ok()) return poller.status();
  poller_ = std::move(*poller);
  rdma::QpCaps caps;
  caps.max_send_wr = kSendWindow + kStaging + kSlots + 4;
  caps.max_recv_wr = kRecvDepth;
  auto qp = Qp::Create(dev, nic_->pd.get(), *poller_, caps);
  if (!qp.ok()) return qp.status();
  qp_ = std::move(*qp);
  return absl::OkStatus();
}

absl::Status Conn::ConnectQp(const Endpoint& remote) {
  if (auto st = qp_->Connect(remote); !st.ok()) return st;
  for (uint32_t i = 0; i < kRecvDepth; ++i) {
    if (auto st = qp_->PostRecv(WrId(kWrRecv, i), *recv_mr_, i * kMsgSize, kMsgSize); !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

absl::Status Conn::Flush() {
  while (!out_.empty()) {
    OutItem& it = out_.front();
    if (it.read) {
      if (auto st = qp_->PostRead(WrId(kWrRead, it.staging), *data_mr_, it.staging * kSlotBytes,
                                  it.len, it.remote_addr, it.rkey);
          !st.ok()) {
        return st;
      }
    } else if (it.msg.empty()) {
      if (auto st = qp_->PostWrite(WrId(kWrWrite, it.staging), *data_mr_, it.staging * kSlotBytes,
                                   it.len, it.remote_addr, it.rkey);
          !st.ok()) {
        return st;
      }
    } else {
      if (send_inflight_ >= kSendWindow) return absl::OkStatus();
      const size_t slot = send_seq_ % kSendWindow;
      std::memcpy(send_mem_.get() + slot * kMsgSize, it.msg.data(), it.msg.size());
      if (auto st = qp_->PostSend(WrId(kWrSend, slot), *send_mr_, slot * kMsgSize, it.msg.size());
          !st.ok()) {
        return st;
      }
      ++send_seq_;
      ++send_inflight_;
      last_send_ = absl::Now();
    }
    out_.pop_front();
  }
  return absl::OkStatus();
}

absl::Status Conn::OnCompletion(const ibv_wc& wc) {
  const uint64_t kind = wc.wr_id >> 56;
  const uint64_t idx = wc.wr_id & ((uint64_t{1} << 56) - 1);
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
      return OnMessage(m->header, m->payload.data(), m->payload.size());
    }
    case kWrSend:
      --send_inflight_;
      return absl::OkStatus();
    case kWrWrite:
      OnWriteDone(static_cast<uint32_t>(idx));
      return absl::OkStatus();
    case kWrRead:
      OnReadDone(static_cast<uint32_t>(idx));
      return absl::OkStatus();
  }
  return absl::InternalError(absl::StrFormat("completion with unknown wr_id 0x%x", wc.wr_id));
}

void Conn::Loop() {
  absl::Status why;
  ibv_wc wcs[32];
  for (;;) {
    {
      absl::MutexLock l(&mu_);
      if (!closed_ && established() && out_.empty() && absl::Now() - last_send_ >= kKeepalive) {
        out_.push_back(OutItem{MakeMsg(FrameType::kHello, 0, nullptr, 0)});
      }
      if (closed_) break;
      if (auto st = Flush(); !st.ok()) {
        CloseLocked(st);
        break;
      }
    }
    auto n = poller_->Harvest(wcs, 32, wake_fd_.get(), kKeepalive);
    uint64_t drained;
    (void)!::read(wake_fd_.get(), &drained, sizeof(drained));
    absl::Status st = n.status();
    for (int i = 0; st.ok() && i < *n; ++i) st = OnCompletion(wcs[i]);
    if (st.ok()) st = Tick();
    if (!st.ok()) {
      absl::MutexLock l(&mu_);
      CloseLocked(st);
    }
  }
  {
    absl::MutexLock l(&mu_);
    why = close_reason_;
    out_.clear();
  }
  // In ERR the QP neither sends nor accepts anything more (a late WRITE
  // into our buffers is refused); outstanding work is flushed.
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_ERR;
  (void)ibv_modify_qp(qp_->qp(), &a, IBV_QP_STATE);
  OnClosed(why);
}

class RdmaTransport;

// ---------------------------------------------------------------- exporter
// States: awaiting HELLO (only a HELLO with this session's token is
// accepted; it and the liveness socket must arrive within 2 x kHelloTimeout)
// -> serving (FETCH, INVAL_ACK, keepalives)
// -> closed (QP in ERR, backend told).
class ServerConn final : public Conn, public Subscriber, public std::enable_shared_from_this<ServerConn> {
 public:
  ServerConn(std::shared_ptr<Nic> nic, RdmaTransport* t, uint64_t id, ExportBackend* backend,
             std::string node, std::string token)
      : Conn(std::move(nic)),
        transport_(t),
        id_(id),
        backend_(backend),
        node_(std::move(node)),
        session_token_(std::move(token)) {
    peer_name_ = node_;
  }

  absl::Status Setup(const Endpoint& importer) {
    if (auto st = Init(kStaging * kSlotBytes, Access::kLocal); !st.ok()) return st;
    return ConnectQp(importer);
  }
  void Run(ThreadCount* threads);

  uint64_t id() const override { return id_; }
  const std::string& node() const override { return node_; }
  bool PushInvalidation(const InvalRecord& r) override {
    const InvalPayload p = ToInvalPayload(r);
    absl::MutexLock l(&mu_);
    if (closed_) return false;
    // A storm collapses into the INVAL still waiting at the tail.
    if (!out_.empty() && !out_.back().read && MergeInvalFrame(out_.back().msg, p)) return true;
    return EnqueueLocked(OutItem{MakeMsg(FrameType::kInval, 0, &p, sizeof(p))});
  }
  void Close() override {
    absl::MutexLock l(&mu_);
    CloseLocked(absl::CancelledError("closed by this daemon"));
  }
  // The importer's liveness socket arrived: watch it on the calling thread
  // until it or the connection ends. False when one is already attached.
  bool AttachLiveness(UniqueFd fd) {
    {
      absl::MutexLock l(&mu_);
      if (liveness_.valid()) return false;
      liveness_ = std::move(fd);
      if (closed_) ::shutdown(liveness_.get(), SHUT_RDWR);
    }
    has_liveness_ = true;
    WatchLiveness();
    return true;
  }

 private:
  absl::Status OnMessage(const FrameHeader& h, const uint8_t* payload, size_t len) override;
  void OnWriteDone(uint32_t staging) override { staging_busy_[staging] = false; }
  absl::Status Tick() override;
  bool established() const override { return established_; }
  void OnClosed(const absl::Status& why) override;
  absl::Status Serve(uint64_t id, const RdmaFetch& f);

  RdmaTransport* const transport_;
  const uint64_t id_;
  ExportBackend* const backend_;
  const std::string node_;
  // The token PrepareSession returned with this queue pair: the only one its
  // HELLO may present.
  const std::string session_token_;
  const absl::Time hello_deadline_ = absl::Now() + kHelloTimeout;
  std::atomic<bool> has_liveness_{false};
  // Connection thread only.
  bool established_ = false;
  std::string token_;  // set by the HELLO that claimed it
  uint64_t area_addr_ = 0, area_len_ = 0;
  uint32_t area_rkey_ = 0;
  bool staging_busy_[kStaging] = {};
  std::deque<std::pair<uint64_t, RdmaFetch>> fetches_;  // waiting for a staging buffer
};

// ---------------------------------------------------------------- importer
class ClientConn final : public Conn, public PeerChannel {
 public:
  explicit ClientConn(std::shared_ptr<Nic> nic)
      : Conn(std::move(nic)), PeerChannel(Capabilities{.one_sided = true}) {}
  ~ClientConn() override {
    Close();
    if (liveness_thread_.joinable()) liveness_thread_.join();
    // The last reference can be dropped by a callback on the thread itself.
    if (thread_.joinable()) {
      if (thread_.get_id() == std::this_thread::get_id()) {
        thread_.detach();
      } else {
        thread_.join();
      }
    }
  }

  absl::Status Prepare() {
    absl::Status st = Init(kSlots * kSlotBytes, Access::kRemoteReadWrite);
    absl::MutexLock l(&mu_);
    for (uint32_t i = 0; i < kSlots; ++i) free_slots_.push_back(kSlots - 1 - i);
    return st;
  }
  // Connects the QP, starts the thread, exchanges HELLOs, then opens the
  // liveness socket to peer_host:liveness_port.
  absl::Status Start(const Endpoint& remote, ImportBackend* backend, const std::string& peer_host,
                     uint16_t liveness_port, const std::string& token);

  absl::StatusOr<uint64_t> Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                 bool track, absl::Span<uint8_t> dst,
                                 absl::Duration timeout) override;
  bool alive() const override {
    absl::MutexLock l(&mu_);
    return !closed_;
  }
  void Close() override {
    absl::MutexLock l(&mu_);
    CloseLocked(absl::CancelledError("closed by this daemon"));
  }
  // data_mr_ is set before the connection is handed out and never changes.
  const char* path() const override {
    return data_mr_->mode() == Mode::kOdp ? "staged/odp" : "staged/pinned";
  }
  bool SetRegion(uint64_t export_id, const RemoteRegion& r, uint64_t seq) override;
  absl::Status ReadRegion(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst,
                          absl::Duration timeout) override;

 private:
  struct Pending {
    uint32_t slot = 0;
    bool done = false;
    absl::Status status;
    uint64_t seq = 0;
  };
  absl::StatusOr<uint64_t> FetchChunk(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                      bool track, absl::Span<uint8_t> dst, absl::Time deadline,
                                      absl::Duration timeout);
  absl::Status OnMessage(const FrameHeader& h, const uint8_t* payload, size_t len) override;
  void OnReadDone(uint32_t slot) override;
  bool established() const override { return hello_seen_; }
  void OnClosed(const absl::Status& why) override;

  ImportBackend* backend_ = nullptr;
  std::thread thread_;
  std::thread liveness_thread_;
  std::atomic<bool> hello_seen_{false};
  // Guarded by mu_ (Conn's).
  bool established_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<uint32_t> free_slots_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Pending*> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Zero-copy: per export id, the exporter's registered region and its
  // state (epoch, READs in flight, the newest dropping invalidation: a
  // region described before it is stale).
  struct ZcRegion {
    coherence::ZeroCopyRegionState state;
    RemoteRegion remote;
  };
  std::map<uint64_t, ZcRegion> zc_ ABSL_GUARDED_BY(mu_);
  // Acknowledgements not sent yet, in arrival order: one that dropped a
  // region waits until the READs issued against it completed (rule 5: the
  // exporter deregisters the old region once every importer acknowledged);
  // the ones behind it wait too (an acknowledgement covers every earlier
  // sequence of its export).
  struct HeldAck {
    uint64_t export_id, seq;
    std::optional<uint64_t> drain_epoch;  // READs of epochs up to it must complete
  };
  std::deque<HeldAck> held_acks_ ABSL_GUARDED_BY(mu_);
  void FlushAcksLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // READs in flight by slot.
  std::map<uint32_t, Pending*> reads_ ABSL_GUARDED_BY(mu_);
};

// A zero-copy region: the export's object as mapped by this daemon,
// registered read-only for remote READs.
class Region final : public RegisteredRegion {
 public:
  Region(std::shared_ptr<Nic> nic, Registration reg) : nic_(std::move(nic)), reg_(std::move(reg)) {}
  RemoteRegion remote() const override {
    return RemoteRegion{reg_.addr(), reg_.length(), reg_.rkey(), reg_.mode() == Mode::kOdp};
  }

 private:
  std::shared_ptr<Nic> nic_;  // the PD outlives the registration
  Registration reg_;
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

  absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* addr, size_t len) override {
    auto reg = rdma::Register(*nic_->device, nic_->pd.get(), addr, len, Access::kRemoteReadOnly,
                              nic_->data_mode);
    if (!reg.ok()) return reg.status();
    return std::unique_ptr<RegisteredRegion>(new Region(nic_, std::move(*reg)));
  }

  std::optional<DeviceStatus> device_status() const override;

  absl::StatusOr<std::string> BeginConnect() override {
    auto conn = std::make_unique<ClientConn>(nic_);
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
    std::unique_ptr<ClientConn> conn;  // destroyed outside the lock
    absl::MutexLock l(&mu_);
    if (auto it = begun_.find(begin); it != begun_.end()) {
      conn = std::move(it->second.conn);
      begun_.erase(it);
    }
  }

  absl::StatusOr<SessionOffer> PrepareSession(const std::string& node,
                                              const std::string& importer) override {
    if (importer.empty()) {
      return absl::FailedPreconditionError("rdma setup without the importer's queue pair endpoint");
    }
    uint32_t unused_port = 0;
    auto remote = DecodeEndpoint(importer, &unused_port);
    if (!remote.ok()) return remote.status();
    if (stopped_ || !listener_) return absl::UnavailableError("not serving");
    auto token = sessions_.Issue(node);
    if (!token.ok()) return token.status();
    std::shared_ptr<ServerConn> conn;
    {
      absl::MutexLock l(&mu_);
      conn = std::make_shared<ServerConn>(nic_, this, next_conn_id_++, backend_, node, *token);
    }
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
    conn->Run(&threads_);
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
    std::unique_ptr<ClientConn> conn;
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
    if (auto st = conn->Start(*remote, backend, peer_host, static_cast<uint16_t>(port), offer.token);
        !st.ok()) {
      return st;
    }
    return conn;
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
    threads_.WaitZero();
  }

 private:
  struct Begun {
    std::unique_ptr<ClientConn> conn;
    absl::Time expires;
  };

  // A liveness socket: HELLO with a claimed token, then watched until it or
  // its connection ends. Anything else is closed.
  void ServeLiveness(UniqueFd fd);

  std::shared_ptr<Nic> nic_;
  ExportBackend* backend_ = nullptr;
  std::atomic<bool> stopped_{false};
  ThreadCount threads_;
  SessionRegistry sessions_;
  absl::Mutex mu_;  // guards conns_, begun_, next_conn_id_
  std::map<uint64_t, std::shared_ptr<ServerConn>> conns_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Begun> begun_ ABSL_GUARDED_BY(mu_);
  uint64_t next_conn_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::unique_ptr<Listener> listener_;  // last: stopped (joined) first
};

void RdmaTransport::ServeLiveness(UniqueFd fd) {
  const auto ms = absl::ToInt64Milliseconds(kLivenessHelloTimeout);
  timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>(ms % 1000 * 1000)};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  FrameHeader h;
  std::vector<uint8_t> payload;
  absl::Status st = ReadFrame(fd.get(), &h, &payload, /*max_payload=*/64);
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

void ServerConn::Run(ThreadCount* threads) {
  threads->Inc();
  std::thread([self = shared_from_this(), threads]() mutable {
    self->Loop();
    self.reset();
    threads->Dec();
  }).detach();
}

absl::Status ServerConn::OnMessage(const FrameHeader& h, const uint8_t* payload, size_t len) {
  const auto type = static_cast<FrameType>(h.type);
  if (!established_) {
    if (type != FrameType::kHello) return absl::PermissionDeniedError("first message is not HELLO");
    auto hello = ParseRdmaHello(absl::MakeConstSpan(payload, len));
    if (!hello.ok()) return hello.status();
    if (hello->token != session_token_ ||
        !transport_->sessions().Claim(hello->token, shared_from_this()).ok()) {
      return absl::PermissionDeniedError("HELLO with an unknown or used session token");
    }
    token_ = hello->token;
    area_addr_ = hello->area_addr;
    area_len_ = hello->area_len;
    area_rkey_ = hello->rkey;
    established_ = true;
    spdlog::info("rdma data connection from {} established", node_);
    Enqueue(OutItem{MakeMsg(FrameType::kHello, 0, nullptr, 0)});
    return absl::OkStatus();
  }
  switch (type) {
    case FrameType::kHello:  // keepalive
      return absl::OkStatus();
    case FrameType::kFetch: {
      if (len != sizeof(RdmaFetch)) return absl::DataLossError("malformed FETCH");
      RdmaFetch f;
      std::memcpy(&f, payload, sizeof(f));
      fetches_.emplace_back(h.id, f);
      return absl::OkStatus();
    }
    case FrameType::kInvalAck: {
      if (len != sizeof(InvalAckPayload)) return absl::DataLossError("malformed INVAL_ACK");
      InvalAckPayload a;
      std::memcpy(&a, payload, sizeof(a));
      backend_->OnAck(id_, a.export_id, a.seq);
      return absl::OkStatus();
    }
    default:
      return absl::DataLossError(absl::StrFormat("unexpected message type %u", h.type));
  }
}

absl::Status ServerConn::Tick() {
  if (!has_liveness_ && absl::Now() > hello_deadline_ + kHelloTimeout) {
    return absl::DeadlineExceededError(established_ ? "no liveness connection from the importer"
                                                    : "no HELLO from the importer");
  }
  while (!fetches_.empty()) {
    uint32_t s = 0;
    while (s < kStaging && staging_busy_[s]) ++s;
    if (s == kStaging) break;
    auto [id, f] = fetches_.front();
    fetches_.pop_front();
    const size_t bytes = static_cast<size_t>(f.f.npages) * kPage;
    if (auto bad = CheckFetchPages(f.f.npages, kSlotPages); !bad.ok()) {
      Enqueue(OutItem{MakeFetchError(id, bad, kMsgSize)});
      continue;
    }
    if (f.offset > area_len_ || bytes > area_len_ - f.offset) {
      return absl::DataLossError("FETCH names a target outside the importer's area");
    }
    auto seq = backend_->ServeFetch(f.f.export_id, f.f.first_page, f.f.npages,
                                    (f.f.flags & kFetchNoCache) == 0,
                                    absl::MakeSpan(data_mem_.get() + s * kSlotBytes, bytes));
    if (seq.ok()) {
      FetchRespPayload r{};
      r.seq = *seq;
      staging_busy_[s] = true;
      // The WRITE is queued before the response: RC lands it first.
      absl::MutexLock l(&mu_);
      EnqueueLocked(OutItem{{}, s, bytes, area_addr_ + f.offset, area_rkey_});
      EnqueueLocked(OutItem{MakeMsg(FrameType::kFetchResp, id, &r, sizeof(r))});
    } else {
      Enqueue(OutItem{MakeFetchError(id, seq.status(), kMsgSize)});
    }
  }
  return absl::OkStatus();
}

void ServerConn::OnClosed(const absl::Status& why) {
  if (absl::IsCancelled(why)) {
    spdlog::info("rdma data connection from {} closed: {}", node_, why.message());
  } else {
    spdlog::warn("rdma data connection from {} closed: {}", node_, why.message());
  }
  // Unreachable by its token first, then the backend forgets it.
  if (!token_.empty()) transport_->sessions().Forget(token_);
  backend_->OnSubscriberClosed(id_);
  transport_->Unregister(id_);
}

absl::Status ClientConn::Start(const Endpoint& remote, ImportBackend* backend,
                               const std::string& peer_host, uint16_t liveness_port,
                               const std::string& token) {
  backend_ = backend;
  peer_name_ = absl::StrCat(peer_host, ":", liveness_port);
  if (auto st = ConnectQp(remote); !st.ok()) return st;
  auto hello = MakeRdmaHello(
      RdmaHello{data_mr_->addr(), data_mr_->length(), data_mr_->rkey(), token}, kMsgSize);
  if (!hello.ok()) return hello.status();
  {
    absl::MutexLock l(&mu_);
    EnqueueLocked(OutItem{*std::move(hello)});
    thread_ = std::thread([this] { Loop(); });
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return established_ || closed_; };
    mu_.AwaitWithTimeout(absl::Condition(&ready), kHelloTimeout);
    if (!established_ || closed_) {
      std::string why = closed_ ? std::string(close_reason_.message()) : "no HELLO";
      CloseLocked(absl::UnavailableError("handshake failed"));
      return absl::UnavailableError(
          absl::StrCat("rdma data connection to ", peer_name_, " refused: ", why));
    }
  }
  auto fd = TcpConnect({peer_host, liveness_port}, absl::Seconds(2));
  if (fd.ok()) {
    auto frame = MakeFrame(FrameType::kHello, 0, token.data(), token.size());
    if (auto st = WriteFull(fd->get(), frame.data(), frame.size()); !st.ok()) fd = st;
  }
  absl::MutexLock l(&mu_);
  if (!fd.ok()) {
    CloseLocked(absl::UnavailableError("no liveness connection"));
    return absl::UnavailableError(absl::StrCat("rdma data connection to ", peer_name_,
                                               ": liveness connection: ", fd.status().message()));
  }
  liveness_ = std::move(*fd);
  if (closed_) ::shutdown(liveness_.get(), SHUT_RDWR);
  liveness_thread_ = std::thread([this] { WatchLiveness(); });
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ClientConn::Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                           bool track, absl::Span<uint8_t> dst,
                                           absl::Duration timeout) {
  SVM_CHECK(dst.size() == static_cast<size_t>(npages) * kPage);
  const absl::Time deadline = absl::Now() + timeout;
  uint64_t min_seq = UINT64_MAX;
  uint32_t done = 0;
  do {
    const uint32_t n = std::min(kSlotPages, npages - done);
    auto seq = FetchChunk(export_id, first_page + done, n, track,
                          dst.subspan(static_cast<size_t>(done) * kPage, static_cast<size_t>(n) * kPage),
                          deadline, timeout);
    if (!seq.ok()) return seq.status();
    // Split fetches report the oldest sequence: caching stays conservative.
    min_seq = std::min(min_seq, *seq);
    done += n;
  } while (done < npages);
  return min_seq;
}

absl::StatusOr<uint64_t> ClientConn::FetchChunk(uint64_t export_id, uint64_t first_page,
                                                uint32_t npages, bool track, absl::Span<uint8_t> dst,
                                                absl::Time deadline, absl::Duration timeout) {
  Pending p;
  uint64_t id = 0;
  absl::MutexLock l(&mu_);
  auto slot_or_closed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return closed_ || !free_slots_.empty();
  };
  bool ok = mu_.AwaitWithDeadline(absl::Condition(&slot_or_closed), deadline);
  if (closed_) {
    return absl::UnavailableError(absl::StrCat("data connection to ", peer_name_, " is closed"));
  }
  if (ok) {
    p.slot = free_slots_.back();
    free_slots_.pop_back();
    id = next_id_++;
    pending_[id] = &p;
    RdmaFetch f{{export_id, first_page, npages, track ? 0u : kFetchNoCache},
                static_cast<uint64_t>(p.slot) * kSlotBytes};
    EnqueueLocked(OutItem{MakeMsg(FrameType::kFetch, id, &f, sizeof(f))});
    ok = mu_.AwaitWithDeadline(absl::Condition(&p.done), deadline);
    pending_.erase(id);
  }
  if (!ok) {
    // The slot is not returned: a late WRITE may still land in it until the
    // connection (closed now) is gone.
    spdlog::warn("peer {} did not answer a fetch within {}; closing the rdma data connection",
                 peer_name_, absl::FormatDuration(timeout));
    CloseLocked(absl::UnavailableError("fetch timed out"));
    return absl::UnavailableError(
        absl::StrCat("peer ", peer_name_, " did not answer within ", absl::FormatDuration(timeout)));
  }
  if (!p.status.ok()) {
    free_slots_.push_back(p.slot);
    return p.status;
  }
  // The data landed before the response that completed p.
  mu_.Unlock();
  std::memcpy(dst.data(), data_mem_.get() + static_cast<size_t>(p.slot) * kSlotBytes, dst.size());
  mu_.Lock();
  free_slots_.push_back(p.slot);
  return p.seq;
}

absl::Status ClientConn::OnMessage(const FrameHeader& h, const uint8_t* payload, size_t len) {
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kHello: {
      absl::MutexLock l(&mu_);
      established_ = true;  // the exporter's answer, later keepalives
      hello_seen_ = true;
      return absl::OkStatus();
    }
    case FrameType::kFetchResp: {
      if (len < sizeof(FetchRespPayload)) return absl::DataLossError("malformed FETCH_RESP");
      FetchRespPayload r;
      std::memcpy(&r, payload, sizeof(r));
      const size_t tail = len - sizeof(r);
      absl::MutexLock l(&mu_);
      auto it = pending_.find(h.id);
      if (it == pending_.end()) return absl::OkStatus();  // the caller gave up (timed out)
      Pending* p = it->second;
      if (r.code != 0) {
        p->status =
            FetchErrorStatus(r, absl::string_view(reinterpret_cast<const char*>(payload) + sizeof(r), tail));
      } else if (tail != 0) {
        p->status = absl::DataLossError("FETCH_RESP with unexpected bytes");
      } else {
        p->seq = r.seq;
      }
      p->done = true;
      return absl::OkStatus();
    }
    case FrameType::kInval: {
      if (len != sizeof(InvalPayload)) return absl::DataLossError("malformed INVAL");
      InvalPayload p;
      std::memcpy(&p, payload, sizeof(p));
      const InvalRecord rec = FromInvalPayload(p);
      std::optional<uint64_t> drain;
      if (rec.kind != source::ChangeKind::kWrite) {
        // Anything but a store may have replaced or withdrawn the exporter's
        // registration: no READ is issued with it from now on, and the
        // acknowledgement waits for the ones in flight.
        absl::MutexLock l(&mu_);
        ZcRegion& z = zc_[rec.export_id];
        const uint64_t epoch = z.state.Drop(rec.seq);
        if (!z.state.Drained(epoch)) drain = epoch;
      }
      backend_->OnInvalidation(this, rec);
      absl::MutexLock l(&mu_);
      held_acks_.push_back(HeldAck{p.export_id, p.seq, drain});
      FlushAcksLocked();
      return absl::OkStatus();
    }
    default:
      return absl::DataLossError(absl::StrFormat("unexpected message type %u", h.type));
  }
}

void ClientConn::FlushAcksLocked() {
  while (!held_acks_.empty()) {
    const HeldAck& a = held_acks_.front();
    if (a.drain_epoch && !zc_[a.export_id].state.Drained(*a.drain_epoch)) break;
    InvalAckPayload ack{a.export_id, a.seq};
    EnqueueLocked(OutItem{MakeMsg(FrameType::kInvalAck, 0, &ack, sizeof(ack))});
    held_acks_.pop_front();
  }
}

bool ClientConn::SetRegion(uint64_t export_id, const RemoteRegion& r, uint64_t seq) {
  absl::MutexLock l(&mu_);
  ZcRegion& z = zc_[export_id];
  if (!z.state.Offer(seq)) return false;
  z.remote = r;
  return true;
}

// Zero-copy read: the whole pages covering the range are split into
// slot-sized READs, up to one per free slot in flight at once; each is
// copied out in order as it completes. Only page-aligned READs are issued:
// rxe in Linux 7.2 serves a READ from an ODP region that does not start at
// a page boundary from the start of the page (tests/vm/rdma/README.md).
absl::Status ClientConn::ReadRegion(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst,
                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  struct Chunk {
    Pending p;
    uint64_t at = 0, len = 0;  // aligned bytes [at, at + len) of the region
  };
  std::deque<Chunk> inflight;
  size_t issued = 0;
  absl::MutexLock l(&mu_);
  auto it = zc_.find(export_id);
  if (it == zc_.end() || it->second.state.state() != coherence::RegionState::kUsable) {
    return absl::FailedPreconditionError("no zero-copy region for this export");
  }
  ZcRegion& z = it->second;
  const RemoteRegion r = z.remote;
  if (offset > r.len || dst.size() > r.len - offset) {
    return absl::OutOfRangeError(absl::StrFormat(
        "read of %u bytes at %u outside the %u-byte region", dst.size(), offset, r.len));
  }
  // Every READ below targets this epoch of the region; an invalidation that
  // drops it holds its acknowledgement until they have all completed.
  const uint64_t epoch = z.state.BeginRead();
  absl::Cleanup end_read = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    z.state.EndRead(epoch);
    FlushAcksLocked();
  };
  auto closed_msg = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::UnavailableError(absl::StrCat("data connection to ", peer_name_, " is closed: ",
                                               close_reason_.message()));
  };
  const uint64_t begin = offset / kPage * kPage;
  const uint64_t end = std::min<uint64_t>(r.len, (offset + dst.size() + kPage - 1) / kPage * kPage);
  const uint64_t total = dst.empty() ? 0 : end - begin;
  bool replaced = false;
  while ((issued < total && !replaced) || !inflight.empty()) {
    if (closed_) {
      for (auto& c : inflight) reads_.erase(c.p.slot);
      return closed_msg();
    }
    // The region was dropped by an invalidation: nothing more is issued
    // against it; what is in flight completes (its memory stays registered
    // until this read acknowledges), then the caller takes another path.
    replaced = replaced || z.state.state() != coherence::RegionState::kUsable ||
               z.state.epoch() != epoch;
    // Issue as many as there are free slots.
    while (issued < total && !replaced && !free_slots_.empty()) {
      Chunk& c = inflight.emplace_back();
      c.p.slot = free_slots_.back();
      free_slots_.pop_back();
      c.at = begin + issued;
      c.len = std::min<uint64_t>(kSlotBytes, total - issued);
      reads_[c.p.slot] = &c.p;
      OutItem item;
      item.staging = c.p.slot;
      item.len = c.len;
      item.remote_addr = r.addr + c.at;
      item.rkey = r.rkey;
      item.read = true;
      EnqueueLocked(std::move(item));
      issued += c.len;
    }
    auto progress = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return closed_ || (!inflight.empty() && inflight.front().p.done) ||
             (inflight.empty() && !free_slots_.empty());
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&progress), deadline)) {
      for (auto& c : inflight) reads_.erase(c.p.slot);
      spdlog::warn("peer {} did not complete a zero-copy read within {}; closing the rdma data connection",
                   peer_name_, absl::FormatDuration(timeout));
      CloseLocked(absl::UnavailableError("zero-copy read timed out"));
      return absl::UnavailableError(absl::StrCat("peer ", peer_name_, " did not complete a read within ",
                                                 absl::FormatDuration(timeout)));
    }
    if (closed_ || inflight.empty() || !inflight.front().p.done) continue;
    Chunk& c = inflight.front();
    reads_.erase(c.p.slot);
    // The part of [c.at, c.at + c.len) the caller asked for.
    const uint64_t from = std::max(c.at, offset);
    const uint64_t to = std::min(c.at + c.len, offset + dst.size());
    mu_.Unlock();
    std::memcpy(dst.data() + (from - offset),
                data_mem_.get() + static_cast<size_t>(c.p.slot) * kSlotBytes + (from - c.at), to - from);
    mu_.Lock();
    free_slots_.push_back(c.p.slot);
    inflight.pop_front();
  }
  if (replaced && issued < total) {
    return absl::FailedPreconditionError("the zero-copy region was replaced during the read");
  }
  return absl::OkStatus();
}

void ClientConn::OnReadDone(uint32_t slot) {
  absl::MutexLock l(&mu_);
  if (auto it = reads_.find(slot); it != reads_.end()) it->second->done = true;
}

void ClientConn::OnClosed(const absl::Status& why) {
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, p] : pending_) {
      p->status = absl::UnavailableError(absl::StrCat("connection to ", peer_name_, " lost"));
      p->done = true;
    }
  }
  spdlog::info("rdma data connection to {} closed: {}", peer_name_, why.message());
  if (!hello_seen_) return;  // never handed out: nobody to tell
  backend_->OnChannelClosed(this, absl::IsUnavailable(why) ? why : absl::UnavailableError(why.message()));
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
