// The tcp data path: one TCP connection per importer/exporter pair, framed
// as in frame.h. Each connection has a reader thread; the exporter side
// also has a writer thread so that invalidations can be queued without
// blocking the thread that detected them.
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/check.h"
#include "common/fd.h"
#include "common/net.h"
#include "common/log.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/frame.h"
#include "daemon/transport/listener.h"
#include "daemon/transport/session_registry.h"
#include "daemon/transport/thread_count.h"
#include "daemon/transport/transport.h"
#include "svm/v1/transport.pb.h"

namespace svm::transport {
namespace {

constexpr size_t kPage = source::kPageSize;
// An importer that lets this much pile up unread is dropped (it recovers by
// reconnecting and invalidating everything).
constexpr size_t kMaxQueuedBytes = 256u << 20;
constexpr absl::Duration kHelloTimeout = absl::Seconds(5);
// A read's pieces (Capabilities::fetch_piece_pages): 256 KiB, a session
// request's whole slot, so a session read is one FETCH and one answer
// frame (128 KiB pieces cost a frame, a copy setup and often a wakeup
// more per slot, measured slower in tests/bench/README.md, "The native
// fresh-read path").
constexpr uint32_t kPiecePages = 64;
// After an answer, both ends of a connection poll their socket this long
// (yielding the CPU between tries) before they sleep: the next request, or
// the answer to one already sent, usually comes sooner, and a sleeping
// thread's wakeup costs more than the answer itself. Idle connections cost
// nothing: the poll ends 50 µs after the last answer.
constexpr std::chrono::microseconds kSpinAfterAnswer{50};

void SetTimeouts(int fd, absl::Duration send, absl::Duration recv) {
  auto tv = [](absl::Duration d) {
    timeval t{};
    t.tv_sec = absl::ToInt64Seconds(d);
    t.tv_usec = absl::ToInt64Microseconds(d - absl::Seconds(t.tv_sec));
    return t;
  };
  timeval s = tv(send), r = tv(recv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &s, sizeof(s));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, sizeof(r));
}

class TcpTransport;

// A frame queued to be sent. A FETCH_RESP with pages is one buffer that is
// not zeroed first (the copy out of the exporting process fills it); the
// other frames are small vectors (MergeInvalFrame rewrites a queued INVAL).
struct OutFrame {
  std::vector<uint8_t> small;
  std::unique_ptr<uint8_t[]> big;
  size_t big_len = 0;
  size_t big_cap = 0;
  bool fetch_resp = false;

  const uint8_t* data() const { return big ? big.get() : small.data(); }
  size_t size() const { return big ? big_len : small.size(); }
};

OutFrame Small(std::vector<uint8_t> bytes) {
  OutFrame f;
  f.fetch_resp = bytes.size() >= sizeof(FrameHeader) &&
                 bytes[offsetof(FrameHeader, type)] == static_cast<uint8_t>(FrameType::kFetchResp);
  f.small = std::move(bytes);
  return f;
}

// ---------------------------------------------------------------- exporter
// States: kAwaitHello (only a HELLO with a live token is accepted) ->
// kServing (FETCH and INVAL_ACK) -> kClosed (socket shut down, backend told).
class ServerConn final : public Subscriber, public std::enable_shared_from_this<ServerConn> {
 public:
  ServerConn(TcpTransport* t, UniqueFd fd, uint64_t id, ExportBackend* backend)
      : transport_(t), fd_(std::move(fd)), id_(id), backend_(backend) {}

  uint64_t id() const override { return id_; }
  const std::string& node() const override { return node_; }

  bool PushInvalidation(const InvalRecord& r) override {
    const InvalPayload p = ToInvalPayload(r);
    {
      absl::MutexLock l(&mu_);
      if (closed_) return false;
      if (!out_.empty() && !out_.back().big && MergeInvalFrame(out_.back().small, p)) return true;
    }
    return Enqueue(Small(MakeFrame(FrameType::kInval, 0, &p, sizeof(p))));
  }

  void Close() override {
    absl::MutexLock l(&mu_);
    CloseLocked();
  }
  uint64_t PendingFetches() const override { return QueuedFetches(); }

  void Run(ThreadCount* threads);

 private:
  bool Enqueue(OutFrame frame) {
    absl::MutexLock l(&mu_);
    return EnqueueLocked(std::move(frame));
  }
  bool EnqueueLocked(OutFrame frame) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return false;
    queued_bytes_ += frame.size();
    if (frame.fetch_resp) ++queued_fetches_;
    out_.push_back(std::move(frame));
    if (queued_bytes_ > kMaxQueuedBytes) {
      spdlog::warn("data connection to {} has {} MiB unsent; dropping it", node_, queued_bytes_ >> 20);
      CloseLocked();
      return false;
    }
    return true;
  }
  // A response: written by the calling thread (the reader) when nothing is
  // queued or being written and no further request is waiting to be read,
  // saving the hop to the writer thread; queued otherwise (the writer sends
  // it while the reader copies the next one), so the order on the
  // connection stays the order of calls. more: the reader holds another
  // request already. A small response is written at once otherwise (a
  // request that arrives meanwhile waits no longer than the write); a
  // large one only when the socket holds no request either.
  void SendOrEnqueue(OutFrame frame, bool more) {
    int waiting = more ? 1 : 0;
    if (!more && frame.size() > kInlineCheckBytes && ::ioctl(fd_.get(), FIONREAD, &waiting) != 0) {
      waiting = 1;
    }
    {
      absl::MutexLock l(&mu_);
      if (closed_) return;
      if (!out_.empty() || writing_ || waiting > 0) {
        EnqueueLocked(std::move(frame));
        return;
      }
      writing_ = true;
    }
    absl::Status st = WriteFull(fd_.get(), frame.data(), frame.size());
    absl::MutexLock l(&mu_);
    writing_ = false;
    RecycleLocked(frame);
    if (!st.ok()) {
      spdlog::warn("data connection to {}: {}", node_, st.message());
      CloseLocked();
    }
  }
  // Responses up to this size are written by the reader without asking
  // the socket whether another request waits.
  static constexpr size_t kInlineCheckBytes = 64 << 10;
  // Answer buffers are reused, up to kSpares of at most kSpareMax bytes: a
  // new buffer of a piece's size is a fresh mapping to malloc (or memory it
  // trimmed), whose pages fault in again on every answer.
  static constexpr size_t kSpares = 4;
  static constexpr size_t kSpareMax = (256 << 10) + 64;
  OutFrame AnswerFrame(size_t n) {
    OutFrame f;
    {
      absl::MutexLock l(&mu_);
      for (auto it = spares_.begin(); it != spares_.end(); ++it) {
        if (it->second >= n) {
          f.big = std::move(it->first);
          f.big_cap = it->second;
          spares_.erase(it);
          break;
        }
      }
    }
    if (!f.big) {
      f.big.reset(new uint8_t[n]);  // not zeroed: the copy fills it
      f.big_cap = n;
    }
    f.big_len = n;
    f.fetch_resp = true;
    return f;
  }
  void RecycleLocked(OutFrame& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!f.big || f.big_cap > kSpareMax || spares_.size() >= kSpares) return;
    spares_.emplace_back(std::move(f.big), f.big_cap);
  }
  uint64_t QueuedFetches() const {
    absl::MutexLock l(&mu_);
    return queued_fetches_;
  }
  void CloseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return;
    closed_ = true;
    ::shutdown(fd_.get(), SHUT_RDWR);
  }
  void ReaderLoop();
  void WriterLoop();
  absl::Status HandleHello(const FrameHeader& h, const std::vector<uint8_t>& payload);

  TcpTransport* const transport_;
  UniqueFd fd_;
  const uint64_t id_;
  ExportBackend* const backend_;
  std::string node_ = "?";  // set once by the reader before serving
  // This connection's place under --max-data-connections-per-peer, taken
  // from its token at the HELLO; given back when the connection (its two
  // threads done) is destroyed.
  std::unique_ptr<ConnectionSlot> slot_;

  mutable absl::Mutex mu_;  // guards the outbound queue and closed_
  std::deque<OutFrame> out_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<std::unique_ptr<uint8_t[]>, size_t>> spares_ ABSL_GUARDED_BY(mu_);
  size_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t queued_fetches_ ABSL_GUARDED_BY(mu_) = 0;  // FETCH_RESP frames in out_
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // A thread is writing a frame to the socket (the writer, or the reader
  // answering directly); the other waits.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
};

// ---------------------------------------------------------------- importer
class ClientConn final : public PeerChannel {
 public:
  ClientConn(UniqueFd fd, ImportBackend* backend, std::string peer)
      : PeerChannel(Capabilities{.fetch_piece_pages = kPiecePages}),
        fd_(std::move(fd)),
        wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        backend_(backend),
        peer_(std::move(peer)) {}
  ~ClientConn() override {
    Close();
    // The last reference can be dropped by a callback on the reader itself.
    if (reader_.joinable()) {
      if (reader_.get_id() == std::this_thread::get_id()) {
        reader_.detach();
      } else {
        reader_.join();
      }
    }
  }

  absl::Status Handshake(const std::string& token);
  void StartReader() { reader_ = std::thread([this] { ReaderLoop(); }); }

  void FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done) override;
  bool alive() const override {
    absl::MutexLock l(&mu_);
    return !closed_;
  }
  void Close() override {
    absl::MutexLock l(&mu_);
    if (!closed_) ::shutdown(fd_.get(), SHUT_RDWR);
    closed_ = true;
  }
  const char* path() const override { return "tcp"; }

 private:
  // One FetchVAsync: completed (done run) by the reader once every op has
  // its result; by the caller when the connection was already closed.
  struct Batch {
    absl::Span<FetchOp> ops;
    FetchDone done;
    absl::Time deadline;
    absl::Duration timeout;
    size_t left = 0;  // ops without a result
  };
  // One FETCH on the wire.
  struct Pending {
    std::shared_ptr<Batch> batch;
    size_t op = 0;
  };
  void ReaderLoop();
  // A FETCH_RESP whose header was read: its pages go straight into the
  // waiting fetch's dst. Returns a connection-ending error only.
  absl::Status ReceiveFetchResp(const FrameHeader& h, std::vector<FetchDone>* finished);
  // Gives op `it` its result; the batch's done is collected in finished
  // when it was the last (run by the caller without mu_).
  void CompleteLocked(std::map<uint64_t, Pending>::iterator it, absl::StatusOr<uint64_t> result,
                      std::vector<FetchDone>* finished) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The reader's reads: n bytes (what RecvFrameStart received and did not
  // use first), waiting for them at most until the oldest outstanding fetch
  // is overdue (DEADLINE_EXCEEDED then; OUT_OF_RANGE on a clean EOF before
  // any byte). A fetch is overdue once its timeout has passed both since it
  // was issued and since the peer last sent a byte: answers arrive in order
  // on one stream, so a peer that is still sending (a large read on a slow
  // link, or the fetches queued before this one) is alive and answering,
  // and only a peer silent for a whole timeout is not.
  absl::Status Recv(void* buf, size_t n);
  // Sleeps until the socket is readable, a fetch with an earlier deadline
  // is added, or the time Recv may wait is up (DEADLINE_EXCEEDED when a
  // fetch is overdue already).
  absl::Status WaitReadable();
  // The next frame's header. When the frame is the answer to the oldest
  // outstanding fetch (answers come in the order of the FETCHes: the
  // exporter serves one connection's requests in order), its pages are
  // received with the header in one system call, straight into that
  // fetch's buffer, and the fetch is completed (*done true: the frame was
  // that answer, completed when the status is OK). Any other
  // frame's bytes received that way are kept for Recv, which returns them
  // first; a fetch's buffer they passed through is written again by its own
  // answer before that fetch completes.
  absl::Status RecvFrameStart(FrameHeader* h, bool* done, std::vector<FetchDone>* finished);
  absl::Status Send(const std::vector<uint8_t>& frame) {
    absl::MutexLock l(&send_mu_);
    return WriteFull(fd_.get(), frame.data(), frame.size());
  }

  UniqueFd fd_;
  UniqueFd wake_;  // eventfd: a fetch with an earlier deadline than the reader waits for
  ImportBackend* const backend_;
  const std::string peer_;
  std::thread reader_;
  absl::Mutex send_mu_;  // serialises whole frames on the socket
  mutable absl::Mutex mu_;  // guards everything below
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  // (deadline, timeout) of the batches with ops pending, the oldest first.
  std::multiset<std::pair<absl::Time, absl::Duration>> deadlines_ ABSL_GUARDED_BY(mu_);
  absl::Time last_byte_ = absl::InfinitePast();  // the reader's: when the peer last sent a byte
  absl::Time reader_waits_until_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::vector<uint8_t> discard_;  // the reader's: bytes nobody waits for
  // The reader's: bytes received and not yet consumed (stash_[stash_at_,
  // end)), and whether the socket was found empty since it last polled (the
  // next read waits first, instead of a recv that fails with EAGAIN).
  std::vector<uint8_t> stash_;
  size_t stash_at_ = 0;
  bool drained_ = true;
  // Until then, the reader polls the socket instead of sleeping
  // (kSpinAfterAnswer).
  absl::Time spin_until_ = absl::InfinitePast();
  // The timeout of the newest batch. With no fetch outstanding the reader
  // sleeps at most this long, so a batch with the same timeout issued while
  // it sleeps has a deadline after the reader's wakeup, and needs no
  // eventfd write (zero before the first batch: the reader sleeps until
  // woken).
  absl::Duration idle_timeout_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

class TcpTransport final : public Transport {
 public:
  TcpTransport() : Transport(Capabilities{}) {}
  ~TcpTransport() override { Stop(); }
  const char* name() const override { return "tcp"; }

  absl::Status Start(const HostPort& listen, ExportBackend* backend) override {
    backend_ = backend;
    auto l = Listener::Start(listen, "data", [this](UniqueFd fd) { Accept(std::move(fd)); });
    if (!l.ok()) return l.status();
    listener_ = std::move(*l);
    v1::TcpEndpoint e;
    e.set_port(listener_->port());
    endpoint_ = PackEndpoint(e);
    return absl::OkStatus();
  }

  std::string listen_address() const override { return listener_ ? listener_->address() : ""; }

  // tcp reads nothing one-sided: protection keys do not apply (every fetch
  // is checked against the connection's subscriptions).
  absl::StatusOr<SessionOffer> PrepareSession(const std::string& node, const std::string& /*importer*/,
                                              std::unique_ptr<ConnectionSlot> slot,
                                              const std::string& /*protection*/) override {
    if (!listener_) return absl::FailedPreconditionError("tcp transport not started");
    // The slot waits with the token: an offer nobody takes up costs only
    // the registry's entry, and counts until it expires.
    auto token = sessions_.Issue(node, std::move(slot));
    if (!token.ok()) return token.status();
    return SessionOffer{*std::move(token), endpoint_};
  }

  SessionRegistry& sessions() { return sessions_; }

  std::shared_ptr<Subscriber> FindSubscriber(const std::string& token) override {
    return sessions_.Find(token);
  }

  absl::StatusOr<std::unique_ptr<PeerChannel>> Connect(const std::string& peer_host,
                                                       const SessionOffer& offer,
                                                       ImportBackend* backend,
                                                       const std::string& /*begin*/) override {
    v1::TcpEndpoint e;
    if (!UnpackEndpoint(offer.endpoint, &e)) {
      return absl::FailedPreconditionError("peer offered no tcp endpoint");
    }
    if (e.port() == 0 || e.port() > 65535) {
      return absl::InvalidArgumentError(absl::StrCat("peer offered tcp port ", e.port()));
    }
    HostPort hp{peer_host, static_cast<uint16_t>(e.port())};
    auto fd = TcpConnect(hp, absl::Seconds(2));
    if (!fd.ok()) return fd.status();
    auto conn = std::make_unique<ClientConn>(std::move(*fd), backend,
                                             absl::StrCat(peer_host, ":", hp.port));
    if (auto st = conn->Handshake(offer.token); !st.ok()) return st;
    conn->StartReader();
    return conn;
  }

  void Stop() override {
    if (stopped_.exchange(true)) return;
    if (listener_) listener_->Stop();
    std::vector<std::shared_ptr<ServerConn>> conns;
    {
      absl::MutexLock l(&mu_);
      for (auto& [id, c] : conns_) conns.push_back(c);
    }
    for (auto& c : conns) c->Close();
    threads_.WaitZero();
  }

  void Unregister(uint64_t id) {
    absl::MutexLock l(&mu_);
    conns_.erase(id);
  }

 private:
  // On the listener's thread.
  void Accept(UniqueFd fd) {
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof(one));
    std::shared_ptr<ServerConn> conn;
    {
      absl::MutexLock l(&mu_);
      conn = std::make_shared<ServerConn>(this, std::move(fd), next_conn_id_++, backend_);
      conns_[conn->id()] = conn;
    }
    conn->Run(&threads_);
  }

  ExportBackend* backend_ = nullptr;
  std::string endpoint_;  // this transport's packed TcpEndpoint, set by Start
  std::atomic<bool> stopped_{false};
  ThreadCount threads_;
  SessionRegistry sessions_;
  absl::Mutex mu_;  // guards conns_, next_conn_id_
  std::map<uint64_t, std::shared_ptr<ServerConn>> conns_ ABSL_GUARDED_BY(mu_);
  uint64_t next_conn_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::unique_ptr<Listener> listener_;  // last: stopped (joined) first
};

void ServerConn::Run(ThreadCount* threads) {
  threads->Inc();
  threads->Inc();
  auto self = shared_from_this();
  std::thread([self, threads] {
    self->ReaderLoop();
    threads->Dec();
  }).detach();
  std::thread([self, threads] {
    self->WriterLoop();
    threads->Dec();
  }).detach();
}

absl::Status ServerConn::HandleHello(const FrameHeader& h, const std::vector<uint8_t>& payload) {
  if (h.type != static_cast<uint8_t>(FrameType::kHello)) {
    return absl::PermissionDeniedError("first frame is not HELLO");
  }
  std::string token(payload.begin(), payload.end());
  auto node = transport_->sessions().Claim(token, shared_from_this(), &slot_);
  if (!node.ok()) {
    return absl::PermissionDeniedError("HELLO with an unknown or used session token");
  }
  if (slot_) slot_->Bind();
  node_ = *std::move(node);
  Enqueue(Small(MakeFrame(FrameType::kHello, 0, nullptr, 0)));
  return absl::OkStatus();
}

void ServerConn::ReaderLoop() {
  const int fd = fd_.get();
  FrameHeader h;
  std::vector<uint8_t> payload;
  std::string token;
  FrameReader reader(fd);
  SetTimeouts(fd, absl::Seconds(5), kHelloTimeout);
  absl::Status st = reader.Next(&h, &payload);
  if (st.ok()) {
    st = HandleHello(h, payload);
    // Only the connection that claimed the token may Forget() it below.
    if (st.ok()) token.assign(payload.begin(), payload.end());
  }
  if (st.ok()) {
    SetTimeouts(fd, absl::Seconds(5), absl::ZeroDuration());
    spdlog::info("data connection from {} established", node_);
  }
  while (st.ok()) {
    st = reader.Next(&h, &payload);
    if (!st.ok()) break;
    switch (static_cast<FrameType>(h.type)) {
      case FrameType::kFetch: {
        if (payload.size() != sizeof(FetchPayload)) {
          st = absl::DataLossError("malformed FETCH");
          break;
        }
        FetchPayload f;
        std::memcpy(&f, payload.data(), sizeof(f));
        OutFrame frame;
        if (auto bad = CheckFetchPages(f.npages, kMaxFetchPages); !bad.ok()) {
          frame = Small(MakeFetchError(h.id, bad));
        } else if (auto full = backend_->AdmitFetch(*this, QueuedFetches()); !full.ok()) {
          frame = Small(MakeFetchError(h.id, full));  // --max-pending-fetches-per-peer
        } else {
          // The pages are copied once, into the frame that is sent.
          const size_t at = sizeof(FrameHeader) + sizeof(FetchRespPayload);
          const size_t bytes = static_cast<size_t>(f.npages) * kPage;
          frame = AnswerFrame(at + bytes);
          auto seq = backend_->ServeFetch(*this, f.export_id, f.first_page, f.npages,
                                          (f.flags & kFetchNoCache) == 0,
                                          absl::MakeSpan(frame.big.get() + at, bytes));
          if (seq.ok()) {
            FrameHeader fh;
            fh.type = static_cast<uint8_t>(FrameType::kFetchResp);
            fh.id = h.id;
            fh.payload_len = static_cast<uint32_t>(sizeof(FetchRespPayload) + bytes);
            FetchRespPayload r{};
            r.seq = *seq;
            std::memcpy(frame.big.get(), &fh, sizeof(fh));
            std::memcpy(frame.big.get() + sizeof(fh), &r, sizeof(r));
          } else {
            frame = Small(MakeFetchError(h.id, seq.status()));
          }
        }
        SendOrEnqueue(std::move(frame), reader.buffered() > 0);
        // The importer's next request often follows at once (a client
        // reading one piece after another): poll briefly before sleeping.
        reader.SpinFor(kSpinAfterAnswer);
        break;
      }
      case FrameType::kInvalAck: {
        if (payload.size() != sizeof(InvalAckPayload)) {
          st = absl::DataLossError("malformed INVAL_ACK");
          break;
        }
        InvalAckPayload a;
        std::memcpy(&a, payload.data(), sizeof(a));
        backend_->OnAck(id_, a.export_id, a.seq);
        break;
      }
      default:
        st = absl::DataLossError(absl::StrFormat("unexpected frame type %u", h.type));
    }
  }
  if (!absl::IsOutOfRange(st)) {
    spdlog::warn("data connection from {} closed: {}", node_, st.message());
  } else {
    spdlog::info("data connection from {} closed by the peer", node_);
  }
  Close();
  // Unreachable by its token first, then the backend forgets it.
  if (!token.empty()) transport_->sessions().Forget(token);
  backend_->OnSubscriberClosed(id_);
  transport_->Unregister(id_);
}

void ServerConn::WriterLoop() {
  for (;;) {
    OutFrame frame;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](ServerConn* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
            return c->closed_ || (!c->out_.empty() && !c->writing_);
          },
          this));
      if (closed_) return;
      frame = std::move(out_.front());
      out_.pop_front();
      queued_bytes_ -= frame.size();
      if (frame.fetch_resp) --queued_fetches_;
      writing_ = true;
    }
    absl::Status st = WriteFull(fd_.get(), frame.data(), frame.size());
    absl::MutexLock l(&mu_);
    writing_ = false;
    RecycleLocked(frame);
    if (!st.ok()) {
      spdlog::warn("data connection to {}: {}", node_, st.message());
      CloseLocked();
      return;
    }
  }
}

absl::Status ClientConn::Handshake(const std::string& token) {
  SetTimeouts(fd_.get(), absl::Seconds(2), kHelloTimeout);
  auto hello = MakeFrame(FrameType::kHello, 0, token.data(), token.size());
  if (auto st = Send(hello); !st.ok()) return absl::UnavailableError(st.message());
  FrameHeader h;
  std::vector<uint8_t> payload;
  auto st = ReadFrame(fd_.get(), &h, &payload);
  if (!st.ok() || h.type != static_cast<uint8_t>(FrameType::kHello)) {
    return absl::UnavailableError(
        absl::StrCat("data connection to ", peer_, " refused: ", st.ok() ? "no HELLO" : st.message()));
  }
  SetTimeouts(fd_.get(), absl::Seconds(2), absl::ZeroDuration());
  return absl::OkStatus();
}

void ClientConn::FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done) {
  if (ops.empty()) return std::move(done)();
  auto b = std::make_shared<Batch>();
  b->ops = ops;
  b->timeout = timeout;
  b->deadline = absl::Now() + timeout;
  b->left = ops.size();
  std::vector<uint8_t> frames;  // every FETCH, sent with one write
  bool wake = false;
  bool closed;
  // Held from the ids to the write: the FETCHes are on the wire in the
  // order of their ids, which is the order the reader expects answers in.
  absl::MutexLock s(&send_mu_);
  {
    absl::MutexLock l(&mu_);
    closed = closed_;
    if (!closed) {
      // The reader fails whatever is pending once closed, these included.
      b->done = std::move(done);
      frames.reserve(ops.size() * (sizeof(FrameHeader) + sizeof(FetchPayload)));
      for (size_t i = 0; i < ops.size(); ++i) {
        SVM_CHECK(ops[i].dst.size() == static_cast<size_t>(ops[i].npages) * kPage);
        const uint64_t id = next_id_++;
        pending_[id] = Pending{b, i};
        FetchPayload f{ops[i].export_id, ops[i].first_page, ops[i].npages,
                       ops[i].track ? 0u : kFetchNoCache};
        FrameHeader h;
        h.type = static_cast<uint8_t>(FrameType::kFetch);
        h.id = id;
        h.payload_len = sizeof(f);
        const auto* hp = reinterpret_cast<const uint8_t*>(&h);
        const auto* fp = reinterpret_cast<const uint8_t*>(&f);
        frames.insert(frames.end(), hp, hp + sizeof(h));
        frames.insert(frames.end(), fp, fp + sizeof(f));
      }
      deadlines_.emplace(b->deadline, b->timeout);
      idle_timeout_ = b->timeout;
      // The reader sleeps until a later deadline (or none): it must look again.
      wake = b->deadline < reader_waits_until_;
    }
  }
  if (closed) {
    // Closed already: completed here, unlocked.
    for (FetchOp& op : ops) {
      op.result = absl::UnavailableError(absl::StrCat("data connection to ", peer_, " is closed"));
    }
    return std::move(done)();
  }
  if (wake) {
    uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof(one));
  }
  // A failed send closes the connection: the reader then fails every
  // pending fetch, these included.
  if (absl::Status sent = WriteFull(fd_.get(), frames.data(), frames.size()); !sent.ok()) {
    spdlog::warn("send to {}: {}; closing the data connection", peer_, sent.message());
    Close();
  }
}

void ClientConn::CompleteLocked(std::map<uint64_t, Pending>::iterator it, absl::StatusOr<uint64_t> result,
                                std::vector<FetchDone>* finished) {
  Batch& b = *it->second.batch;
  b.ops[it->second.op].result = std::move(result);
  if (--b.left == 0) {
    deadlines_.erase(deadlines_.find({b.deadline, b.timeout}));
    finished->push_back(std::move(b.done));
  }
  pending_.erase(it);
}

absl::Status ClientConn::Recv(void* buf, size_t n) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t got = 0;
  if (stash_at_ < stash_.size()) {
    got = std::min(n, stash_.size() - stash_at_);
    std::memcpy(p, stash_.data() + stash_at_, got);
    stash_at_ += got;
    if (stash_at_ == stash_.size()) {
      stash_.clear();
      stash_at_ = 0;
    }
  }
  while (got < n) {
    if (drained_) {
      if (auto st = WaitReadable(); !st.ok()) return st;
      continue;
    }
    const ssize_t r = ::recv(fd_.get(), p + got, n - got, MSG_DONTWAIT);
    if (r > 0) {
      // Less than asked for: the socket is empty now.
      if (static_cast<size_t>(r) < n - got) drained_ = true;
      got += static_cast<size_t>(r);
      last_byte_ = absl::Now();
      continue;
    }
    if (r == 0) {
      return got == 0 ? absl::OutOfRangeError("end of stream") : absl::DataLossError("connection closed mid-frame");
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return ErrnoStatus(errno, "recv");
    drained_ = true;
  }
  return absl::OkStatus();
}

absl::Status ClientConn::WaitReadable() {
  const absl::Time now = absl::Now();
  absl::Time until = absl::InfiniteFuture();
  bool idle = false;
  {
    absl::MutexLock l(&mu_);
    if (!deadlines_.empty()) {
      const auto& [deadline, timeout] = *deadlines_.begin();
      until = std::max(deadline, last_byte_ + timeout);
    } else if (idle_timeout_ > absl::ZeroDuration()) {
      // Nothing outstanding: a bounded sleep, so that the next batch (whose
      // deadline is at least this far away) need not wake this thread.
      until = now + idle_timeout_;
      idle = true;
    }
    reader_waits_until_ = until;
  }
  if (!idle && now >= until) {
    return absl::DeadlineExceededError("a fetch is overdue");
  }
  int ms = -1;
  if (until != absl::InfiniteFuture()) {
    ms = static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(until - now, absl::Milliseconds(1))),
                                            INT32_MAX));
  }
  pollfd fds[2] = {{fd_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
  if (::poll(fds, 2, ms) < 0 && errno != EINTR) return ErrnoStatus(errno, "poll");
  if (fds[1].revents != 0) {
    uint64_t drained;
    (void)!::read(wake_.get(), &drained, sizeof(drained));
  }
  if (fds[0].revents != 0) drained_ = false;
  return absl::OkStatus();
}

absl::Status ClientConn::RecvFrameStart(FrameHeader* h, bool* done, std::vector<FetchDone>* finished) {
  *done = false;
  if (stash_at_ < stash_.size()) return Recv(h, sizeof(*h));
  uint64_t id = 0;
  absl::Span<uint8_t> dst;
  alignas(8) uint8_t head[sizeof(FrameHeader) + sizeof(FetchRespPayload)];
  ssize_t r;
  for (;;) {
    while (drained_) {
      if (absl::Now() < spin_until_) {
        ::sched_yield();
        drained_ = false;
        break;
      }
      if (auto st = WaitReadable(); !st.ok()) return st;
    }
    {
      absl::MutexLock l(&mu_);
      id = 0;
      dst = {};
      if (!pending_.empty()) {
        id = pending_.begin()->first;
        const Pending& p = pending_.begin()->second;
        dst = p.batch->ops[p.op].dst;
      }
    }
    iovec iov[2] = {{head, sizeof(head)}, {dst.data(), dst.size()}};
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = dst.empty() ? 1 : 2;
    do {
      r = ::recvmsg(fd_.get(), &m, MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    if (r >= 0) break;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return ErrnoStatus(errno, "recv");
    drained_ = true;
  }
  if (r == 0) return absl::OutOfRangeError("end of stream");
  last_byte_ = absl::Now();
  const size_t got = static_cast<size_t>(r);
  if (got < sizeof(head) + dst.size()) drained_ = true;
  const size_t in_head = std::min(got, sizeof(head));
  const size_t in_dst = got - in_head;
  if (in_head == sizeof(head) && !dst.empty()) {
    std::memcpy(h, head, sizeof(*h));
    FetchRespPayload resp;
    std::memcpy(&resp, head + sizeof(*h), sizeof(resp));
    if (CheckFrameHeader(*h).ok() && h->type == static_cast<uint8_t>(FrameType::kFetchResp) && h->id == id &&
        resp.code == 0 && h->payload_len == sizeof(resp) + dst.size()) {
      // Only this thread completes fetches while the connection is open:
      // the fetch is still pending and its buffer valid.
      *done = true;
      if (in_dst < dst.size()) {
        absl::Status st = Recv(dst.data() + in_dst, dst.size() - in_dst);
        if (absl::IsOutOfRange(st)) st = absl::DataLossError("connection closed mid-frame");
        if (!st.ok()) return st;
      }
      absl::MutexLock l(&mu_);
      CompleteLocked(pending_.find(id), resp.seq, finished);
      // Nothing more is expected but invalidations: the next read waits
      // first rather than trying the socket (answers still due are
      // usually there already, and are read at once).
      if (pending_.empty()) drained_ = true;
      spin_until_ = absl::Now() + absl::FromChrono(kSpinAfterAnswer);
      return absl::OkStatus();
    }
  }
  // Another frame: what was received is read again from the stash.
  stash_.assign(head, head + in_head);
  stash_.insert(stash_.end(), dst.data(), dst.data() + in_dst);
  stash_at_ = 0;
  return Recv(h, sizeof(*h));
}

absl::Status ClientConn::ReceiveFetchResp(const FrameHeader& h, std::vector<FetchDone>* finished) {
  if (h.payload_len < sizeof(FetchRespPayload)) return absl::DataLossError("malformed FETCH_RESP");
  FetchRespPayload r;
  if (auto st = Recv(&r, sizeof(r)); !st.ok()) return st;
  const size_t tail = h.payload_len - sizeof(r);
  absl::Span<uint8_t> dst;
  {
    absl::MutexLock l(&mu_);
    auto it = pending_.find(h.id);
    if (it != pending_.end()) dst = it->second.batch->ops[it->second.op].dst;
  }
  // Only this thread completes fetches while the connection is open, so
  // the op stays pending (and dst valid) while its pages are received.
  if (r.code == 0 && tail == dst.size() && tail > 0) {
    // The pages land in the caller's buffer with no copy in between.
    if (auto st = Recv(dst.data(), tail); !st.ok()) return st;
    absl::MutexLock l(&mu_);
    CompleteLocked(pending_.find(h.id), r.seq, finished);
    return absl::OkStatus();
  }
  // Nobody waits for these bytes (an unknown id), or they are an error's
  // text, or a size nobody asked for.
  discard_.resize(tail);
  if (tail > 0) {
    if (auto st = Recv(discard_.data(), tail); !st.ok()) return st;
  }
  absl::MutexLock l(&mu_);
  auto it = pending_.find(h.id);
  if (it == pending_.end()) return absl::OkStatus();
  if (r.code != 0) {
    CompleteLocked(it,
                   FetchErrorStatus(r, absl::string_view(reinterpret_cast<const char*>(discard_.data()), tail)),
                   finished);
  } else {
    CompleteLocked(it,
                   absl::DataLossError(absl::StrFormat("FETCH_RESP carries %u bytes, %u expected", tail,
                                                       it->second.batch->ops[it->second.op].dst.size())),
                   finished);
  }
  return absl::OkStatus();
}

void ClientConn::ReaderLoop() {
  FrameHeader h;
  std::vector<uint8_t> payload;
  std::vector<FetchDone> finished;
  absl::Status st;
  while (st.ok()) {
    // Completions run here, on the reader, without any lock held.
    for (FetchDone& d : finished) std::move(d)();
    finished.clear();
    // The header first: a FETCH_RESP's pages are received into the
    // fetch's buffer, everything else is read whole.
    bool done = false;
    st = RecvFrameStart(&h, &done, &finished);
    if (!done && absl::IsDataLoss(st)) st = absl::DataLossError("connection closed mid-header");
    if (done || !st.ok()) continue;
    st = CheckFrameHeader(h);
    if (!st.ok()) break;
    if (static_cast<FrameType>(h.type) == FrameType::kFetchResp) {
      st = ReceiveFetchResp(h, &finished);
      continue;
    }
    payload.resize(h.payload_len);
    if (h.payload_len > 0) {
      st = Recv(payload.data(), h.payload_len);
      if (absl::IsOutOfRange(st)) st = absl::DataLossError("connection closed mid-frame");
      if (!st.ok()) break;
    }
    switch (static_cast<FrameType>(h.type)) {
      case FrameType::kInval: {
        if (payload.size() != sizeof(InvalPayload)) {
          st = absl::DataLossError("malformed INVAL");
          break;
        }
        InvalPayload p;
        std::memcpy(&p, payload.data(), sizeof(p));
        backend_->OnInvalidation(this, FromInvalPayload(p));
        InvalAckPayload a{p.export_id, p.seq};
        if (auto s = Send(MakeFrame(FrameType::kInvalAck, 0, &a, sizeof(a))); !s.ok()) st = s;
        break;
      }
      default:
        st = absl::DataLossError(absl::StrFormat("unexpected frame type %u", h.type));
    }
  }
  const bool overdue = absl::IsDeadlineExceeded(st);
  absl::Duration overdue_timeout;
  {
    absl::MutexLock l(&mu_);
    closed_ = true;
    ::shutdown(fd_.get(), SHUT_RDWR);
    for (auto& [id, p] : pending_) {
      if (p.batch->deadline <= absl::Now()) overdue_timeout = p.batch->timeout;
    }
    while (!pending_.empty()) {
      auto it = pending_.begin();
      const bool late = it->second.batch->deadline <= absl::Now();
      CompleteLocked(it,
                     overdue && late
                         ? absl::UnavailableError(absl::StrCat("peer ", peer_, " did not answer within ",
                                                               absl::FormatDuration(it->second.batch->timeout)))
                         : absl::UnavailableError(absl::StrCat("connection to ", peer_, " lost")),
                     &finished);
    }
  }
  if (overdue) {
    spdlog::warn("peer {} did not answer a fetch within {}; closing the data connection", peer_,
                 absl::FormatDuration(overdue_timeout));
    st = absl::UnavailableError(absl::StrCat("peer ", peer_, " did not answer a fetch within ",
                                             absl::FormatDuration(overdue_timeout)));
  }
  for (FetchDone& d : finished) std::move(d)();
  absl::Status why = absl::IsOutOfRange(st) ? absl::UnavailableError("closed by the peer") : st;
  spdlog::info("data connection to {} closed: {}", peer_, why.message());
  backend_->OnChannelClosed(this, why);
}

}  // namespace

std::unique_ptr<Transport> CreateTcpTransport() { return std::make_unique<TcpTransport>(); }

}  // namespace svm::transport
