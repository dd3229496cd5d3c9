// The tcp data path: one TCP connection per importer/exporter pair, framed
// as in frame.h. Each connection has a reader thread; the exporter side
// also has a writer thread so that invalidations can be queued without
// blocking the thread that detected them.
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <map>
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
      if (!out_.empty() && MergeInvalFrame(out_.back(), p)) return true;
    }
    return Enqueue(MakeFrame(FrameType::kInval, 0, &p, sizeof(p)));
  }

  void Close() override {
    absl::MutexLock l(&mu_);
    CloseLocked();
  }

  void Run(ThreadCount* threads);

 private:
  bool Enqueue(std::vector<uint8_t> frame) {
    absl::MutexLock l(&mu_);
    return EnqueueLocked(std::move(frame));
  }
  bool EnqueueLocked(std::vector<uint8_t> frame) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return false;
    queued_bytes_ += frame.size();
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
  // connection stays the order of calls.
  void SendOrEnqueue(std::vector<uint8_t> frame) {
    int waiting = 0;
    if (::ioctl(fd_.get(), FIONREAD, &waiting) != 0) waiting = 1;
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
    if (!st.ok()) {
      spdlog::warn("data connection to {}: {}", node_, st.message());
      CloseLocked();
    }
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

  absl::Mutex mu_;  // guards the outbound queue and closed_
  std::deque<std::vector<uint8_t>> out_ ABSL_GUARDED_BY(mu_);
  size_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // A thread is writing a frame to the socket (the writer, or the reader
  // answering directly); the other waits.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
};

// ---------------------------------------------------------------- importer
class ClientConn final : public PeerChannel {
 public:
  ClientConn(UniqueFd fd, ImportBackend* backend, std::string peer)
      : PeerChannel(Capabilities{}), fd_(std::move(fd)), backend_(backend), peer_(std::move(peer)) {}
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

  absl::StatusOr<uint64_t> Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                 bool track, absl::Span<uint8_t> dst,
                                 absl::Duration timeout) override {
    FetchOp op{export_id, first_page, npages, track, dst};
    FetchV(absl::MakeSpan(&op, 1), timeout);
    return op.result;
  }
  void FetchV(absl::Span<FetchOp> ops, absl::Duration timeout) override;
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
  // One FETCH on the wire, owned by the FetchV that sent it.
  struct Pending {
    absl::Span<uint8_t> dst;
    // The reader is receiving the response's pages straight into dst
    // (without mu_): the caller that gave up waits for it to stop before
    // dst may go away.
    bool receiving = false;
    bool done = false;
    absl::Status status;
    uint64_t seq = 0;
  };
  void ReaderLoop();
  // A FETCH_RESP whose header was read: its pages go straight into the
  // waiting fetch's dst. Returns a connection-ending error only.
  absl::Status ReceiveFetchResp(const FrameHeader& h);
  absl::Status Send(const std::vector<uint8_t>& frame) {
    absl::MutexLock l(&send_mu_);
    return WriteFull(fd_.get(), frame.data(), frame.size());
  }

  UniqueFd fd_;
  ImportBackend* const backend_;
  const std::string peer_;
  std::thread reader_;
  absl::Mutex send_mu_;  // serialises whole frames on the socket
  mutable absl::Mutex mu_;  // guards pending_, next_id_, closed_
  std::map<uint64_t, Pending*> pending_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> discard_;  // the reader's: bytes nobody waits for
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

  absl::StatusOr<SessionOffer> PrepareSession(const std::string& node,
                                              const std::string& /*importer*/) override {
    if (!listener_) return absl::FailedPreconditionError("tcp transport not started");
    auto token = sessions_.Issue(node);
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
  auto node = transport_->sessions().Claim(token, shared_from_this());
  if (!node.ok()) {
    return absl::PermissionDeniedError("HELLO with an unknown or used session token");
  }
  node_ = *std::move(node);
  Enqueue(MakeFrame(FrameType::kHello, 0, nullptr, 0));
  return absl::OkStatus();
}

void ServerConn::ReaderLoop() {
  const int fd = fd_.get();
  FrameHeader h;
  std::vector<uint8_t> payload;
  std::string token;
  SetTimeouts(fd, absl::Seconds(5), kHelloTimeout);
  absl::Status st = ReadFrame(fd, &h, &payload);
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
    st = ReadFrame(fd, &h, &payload);
    if (!st.ok()) break;
    switch (static_cast<FrameType>(h.type)) {
      case FrameType::kFetch: {
        if (payload.size() != sizeof(FetchPayload)) {
          st = absl::DataLossError("malformed FETCH");
          break;
        }
        FetchPayload f;
        std::memcpy(&f, payload.data(), sizeof(f));
        std::vector<uint8_t> frame;
        if (auto bad = CheckFetchPages(f.npages, kMaxFetchPages); !bad.ok()) {
          frame = MakeFetchError(h.id, bad);
        } else {
          // The pages are copied once, into the frame that is sent.
          FetchRespPayload r{};
          frame = MakeFrame(FrameType::kFetchResp, h.id, &r, sizeof(r));
          const size_t at = frame.size();
          const size_t bytes = static_cast<size_t>(f.npages) * kPage;
          frame.resize(at + bytes);
          auto seq = backend_->ServeFetch(f.export_id, f.first_page, f.npages,
                                          (f.flags & kFetchNoCache) == 0, absl::MakeSpan(frame).subspan(at));
          if (seq.ok()) {
            FrameHeader fh;
            std::memcpy(&fh, frame.data(), sizeof(fh));
            fh.payload_len = static_cast<uint32_t>(sizeof(r) + bytes);
            std::memcpy(frame.data(), &fh, sizeof(fh));
            r.seq = *seq;
            std::memcpy(frame.data() + sizeof(fh), &r, sizeof(r));
          } else {
            frame = MakeFetchError(h.id, seq.status());
          }
        }
        SendOrEnqueue(std::move(frame));
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
    std::vector<uint8_t> frame;
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
      writing_ = true;
    }
    absl::Status st = WriteFull(fd_.get(), frame.data(), frame.size());
    absl::MutexLock l(&mu_);
    writing_ = false;
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

void ClientConn::FetchV(absl::Span<FetchOp> ops, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::vector<Pending> ps(ops.size());
  std::vector<uint64_t> ids(ops.size(), 0);
  std::vector<uint8_t> frames;  // every FETCH, sent with one write
  {
    absl::MutexLock l(&mu_);
    if (closed_) {
      for (FetchOp& op : ops) {
        op.result = absl::UnavailableError(absl::StrCat("data connection to ", peer_, " is closed"));
      }
      return;
    }
    for (size_t i = 0; i < ops.size(); ++i) {
      SVM_CHECK(ops[i].dst.size() == static_cast<size_t>(ops[i].npages) * kPage);
      ps[i].dst = ops[i].dst;
      ids[i] = next_id_++;
      pending_[ids[i]] = &ps[i];
      FetchPayload f{ops[i].export_id, ops[i].first_page, ops[i].npages,
                     ops[i].track ? 0u : kFetchNoCache};
      auto frame = MakeFrame(FrameType::kFetch, ids[i], &f, sizeof(f));
      frames.insert(frames.end(), frame.begin(), frame.end());
    }
  }
  absl::Status sent = Send(frames);
  if (!sent.ok()) Close();
  absl::MutexLock l(&mu_);
  auto all_done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const Pending& p : ps) {
      if (!p.done) return false;
    }
    return true;
  };
  bool done = sent.ok() && mu_.AwaitWithDeadline(absl::Condition(&all_done), deadline);
  if (!done && sent.ok()) {
    mu_.Unlock();
    spdlog::warn("peer {} did not answer a fetch within {}; closing the data connection", peer_,
                 absl::FormatDuration(timeout));
    Close();
    mu_.Lock();
  }
  // Closed: the reader stops receiving into any dst at once (the socket is
  // shut down); none may be written once this returns.
  auto quiet = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const Pending& p : ps) {
      if (p.receiving) return false;
    }
    return true;
  };
  mu_.Await(absl::Condition(&quiet));
  for (size_t i = 0; i < ops.size(); ++i) {
    pending_.erase(ids[i]);
    const Pending& p = ps[i];
    if (!sent.ok()) {
      ops[i].result = absl::UnavailableError(absl::StrCat("send to ", peer_, ": ", sent.message()));
    } else if (!p.done) {
      ops[i].result = absl::UnavailableError(
          absl::StrCat("peer ", peer_, " did not answer within ", absl::FormatDuration(timeout)));
    } else if (!p.status.ok()) {
      ops[i].result = p.status;
    } else {
      ops[i].result = p.seq;
    }
  }
}

absl::Status ClientConn::ReceiveFetchResp(const FrameHeader& h) {
  const int fd = fd_.get();
  if (h.payload_len < sizeof(FetchRespPayload)) return absl::DataLossError("malformed FETCH_RESP");
  FetchRespPayload r;
  auto mid_frame = [](absl::Status st) {
    return absl::IsOutOfRange(st) ? absl::DataLossError("connection closed mid-frame") : st;
  };
  if (auto st = ReadFull(fd, &r, sizeof(r)); !st.ok()) return mid_frame(st);
  const size_t tail = h.payload_len - sizeof(r);
  Pending* p = nullptr;
  {
    absl::MutexLock l(&mu_);
    auto it = pending_.find(h.id);
    if (it != pending_.end() && !it->second->done) p = it->second;
    if (p != nullptr && r.code == 0 && tail == p->dst.size()) {
      p->receiving = true;
      mu_.Unlock();
      // The pages land in the caller's buffer with no copy in between.
      absl::Status st = ReadFull(fd, p->dst.data(), tail);
      mu_.Lock();
      p->receiving = false;
      if (!st.ok()) return mid_frame(st);
      p->seq = r.seq;
      p->done = true;
      return absl::OkStatus();
    }
  }
  // Nobody waits for these bytes (the caller gave up), or they are an
  // error's text, or a size nobody asked for.
  discard_.resize(tail);
  if (tail > 0) {
    if (auto st = ReadFull(fd, discard_.data(), tail); !st.ok()) return mid_frame(st);
  }
  absl::MutexLock l(&mu_);
  auto it = pending_.find(h.id);
  if (it == pending_.end() || it->second->done) return absl::OkStatus();
  p = it->second;
  if (r.code != 0) {
    p->status = FetchErrorStatus(r, absl::string_view(reinterpret_cast<const char*>(discard_.data()), tail));
  } else {
    p->status = absl::DataLossError(
        absl::StrFormat("FETCH_RESP carries %u bytes, %u expected", tail, p->dst.size()));
  }
  p->done = true;
  return absl::OkStatus();
}

void ClientConn::ReaderLoop() {
  FrameHeader h;
  std::vector<uint8_t> payload;
  absl::Status st;
  while (st.ok()) {
    // The header first: a FETCH_RESP's pages are received into the
    // fetch's buffer, everything else is read whole.
    st = ReadFrameHeader(fd_.get(), &h);
    if (!st.ok()) break;
    if (static_cast<FrameType>(h.type) == FrameType::kFetchResp) {
      st = ReceiveFetchResp(h);
      continue;
    }
    payload.resize(h.payload_len);
    if (h.payload_len > 0) {
      st = ReadFull(fd_.get(), payload.data(), h.payload_len);
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
  {
    absl::MutexLock l(&mu_);
    closed_ = true;
    ::shutdown(fd_.get(), SHUT_RDWR);
    for (auto& [id, p] : pending_) {
      p->status = absl::UnavailableError(absl::StrCat("connection to ", peer_, " lost"));
      p->done = true;
    }
  }
  absl::Status why = absl::IsOutOfRange(st) ? absl::UnavailableError("closed by the peer") : st;
  spdlog::info("data connection to {} closed: {}", peer_, why.message());
  backend_->OnChannelClosed(this, why);
}

}  // namespace

std::unique_ptr<Transport> CreateTcpTransport() { return std::make_unique<TcpTransport>(); }

}  // namespace svm::transport
