// The transport seam end to end in one process, one test body for every
// transport (UCX's uct tests are the model): an exporter transport on
// 127.0.0.1:0 with a fake ExportBackend and an importer transport with a
// fake ImportBackend, connected through BeginConnect / PrepareSession /
// Connect exactly as svmd does over gRPC.
//
// Instances: Tcp (hermetic: loopback only; the unit tier everywhere) and
// Rdma (rxe0 in the VM tier, run by the vm_daemon_rdma_* entries). Every
// suite gates on the transport as the integration suites do
// (SVM_GATE_TRANSPORT): rdma skips without an active RDMA port, and fails
// instead under SVM_EXPECT_RDMA=1; with SVM_TEST_TRANSPORT set only that
// transport runs. Behaviour only one transport has lives in the suites at
// the end (tcp's wire format on a raw socket; rdma's one-sided reads).
#include <fcntl.h>
#include <linux/falloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/fd.h"
#include "common/net.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/frame.h"
#include "daemon/transport/rdma/rdma_transport.h"
#include "daemon/transport/transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "svm/v1/transport.pb.h"
#include "tests/integration/harness.h"

namespace svm::source {
// Readable kinds in failure messages.
void PrintTo(ChangeKind k, std::ostream* os) { *os << ChangeKindName(k); }
}  // namespace svm::source

namespace svm::transport {
namespace {

using source::ChangeKind;
using source::kPageSize;
using svm::testing::Scaled;

// The byte every byte of page `page` of export `id` carries.
uint8_t FillOf(uint64_t id, uint64_t page) { return static_cast<uint8_t>(id * 7 + page * 3 + 1); }

// ------------------------------------------------------------------ fakes

class FakeExportBackend final : public ExportBackend {
 public:
  struct Call {
    uint64_t export_id, first_page;
    uint32_t npages;
    bool track;
    uint64_t from;  // the asking connection's subscriber id
  };
  struct Ack {
    uint64_t sub, export_id, seq;
  };

  absl::StatusOr<uint64_t> ServeFetch(const transport::Subscriber& from, uint64_t export_id,
                                      uint64_t first_page, uint32_t npages, bool track,
                                      absl::Span<uint8_t> dst) override {
    std::function<void()> hook;
    {
      absl::MutexLock l(&mu_);
      calls_.push_back({export_id, first_page, npages, track, from.id()});
      hook = std::exchange(hook_, nullptr);
      if (block_) {
        ++blocked_;
        // Bounded so that a broken test cannot hang the suite.
        mu_.AwaitWithTimeout(absl::Condition(+[](bool* b) { return !*b; }, &block_), absl::Seconds(10));
      }
    }
    if (hook) hook();
    absl::MutexLock l(&mu_);
    if (auto it = errors_.find(export_id); it != errors_.end()) return it->second;
    EXPECT_EQ(dst.size(), npages * kPageSize);
    for (uint32_t i = 0; i < npages; ++i) {
      std::memset(dst.data() + i * kPageSize, FillOf(export_id, first_page + i), kPageSize);
    }
    return seq_;
  }
  // Refuses at max_pending (the daemon's --max-pending-fetches-per-peer).
  absl::Status AdmitFetch(const transport::Subscriber& /*from*/, uint64_t pending) override {
    uint64_t seen = max_pending_seen.load();
    while (pending > seen && !max_pending_seen.compare_exchange_weak(seen, pending)) {
    }
    if (pending < max_pending.load()) return absl::OkStatus();
    refused.fetch_add(1);
    return absl::ResourceExhaustedError("too many pending");
  }
  std::atomic<uint64_t> max_pending{UINT64_MAX};
  std::atomic<uint64_t> max_pending_seen{0};
  std::atomic<int> refused{0};  // FETCHes AdmitFetch refused
  void OnAck(uint64_t subscriber_id, uint64_t export_id, uint64_t seq) override {
    absl::MutexLock l(&mu_);
    acks_.push_back({subscriber_id, export_id, seq});
  }
  void OnSubscriberClosed(uint64_t subscriber_id) override {
    absl::MutexLock l(&mu_);
    closed_.push_back(subscriber_id);
  }

  // ---- test controls
  void SetSeq(uint64_t s) {
    absl::MutexLock l(&mu_);
    seq_ = s;
  }
  void FailExport(uint64_t id, absl::Status st) {
    absl::MutexLock l(&mu_);
    errors_[id] = std::move(st);
  }
  // Runs once, on the connection's thread, inside the next ServeFetch.
  void OnNextFetch(std::function<void()> hook) {
    absl::MutexLock l(&mu_);
    hook_ = std::move(hook);
  }
  void Block() {
    absl::MutexLock l(&mu_);
    block_ = true;
  }
  void Release() {
    absl::MutexLock l(&mu_);
    block_ = false;
  }
  bool WaitBlocked(int n, absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocked_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitAcks(size_t n, absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return acks_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosed(uint64_t sub, absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return std::find(closed_.begin(), closed_.end(), sub) != closed_.end();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosedCount(size_t n, absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  std::vector<Call> calls() {
    absl::MutexLock l(&mu_);
    return calls_;
  }
  std::vector<Ack> acks() {
    absl::MutexLock l(&mu_);
    return acks_;
  }
  std::vector<uint64_t> closed() {
    absl::MutexLock l(&mu_);
    return closed_;
  }

 private:
  absl::Mutex mu_;  // guards everything below
  std::vector<Call> calls_;
  std::vector<Ack> acks_;
  std::vector<uint64_t> closed_;
  std::map<uint64_t, absl::Status> errors_;
  std::function<void()> hook_;
  uint64_t seq_ = 0;
  bool block_ = false;
  int blocked_ = 0;
};

class FakeImportBackend final : public ImportBackend {
 public:
  void OnInvalidation(PeerChannel* ch, const InvalRecord& r) override {
    absl::MutexLock l(&mu_);
    invals_.push_back(r);
    channels_.push_back(ch);
    if (block_) {
      mu_.AwaitWithTimeout(absl::Condition(+[](bool* b) { return !*b; }, &block_), absl::Seconds(10));
    }
  }
  void OnChannelClosed(PeerChannel* ch, const absl::Status& why) override {
    absl::MutexLock l(&mu_);
    closed_.push_back({ch, why});
  }

  void Block() {
    absl::MutexLock l(&mu_);
    block_ = true;
  }
  void Release() {
    absl::MutexLock l(&mu_);
    block_ = false;
  }
  bool WaitInvals(size_t n, absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return invals_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  // Why ch was closed; DEADLINE_EXCEEDED when it was not within timeout.
  absl::StatusOr<absl::Status> WaitClosed(PeerChannel* ch,
                                          absl::Duration timeout = Scaled(absl::Seconds(5))) {
    absl::MutexLock l(&mu_);
    absl::Status why;
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (auto& c : closed_) {
        if (c.first == ch) {
          why = c.second;
          return true;
        }
      }
      return false;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&cond), timeout)) {
      return absl::DeadlineExceededError("not closed");
    }
    return why;
  }
  std::vector<InvalRecord> invals() {
    absl::MutexLock l(&mu_);
    return invals_;
  }
  std::vector<PeerChannel*> inval_channels() {
    absl::MutexLock l(&mu_);
    return channels_;
  }
  std::vector<std::pair<PeerChannel*, absl::Status>> closed() {
    absl::MutexLock l(&mu_);
    return closed_;
  }

 private:
  absl::Mutex mu_;  // guards everything below
  std::vector<InvalRecord> invals_;
  std::vector<PeerChannel*> channels_;
  std::vector<std::pair<PeerChannel*, absl::Status>> closed_;
  bool block_ = false;
};

// ------------------------------------------------------ the transports

struct TransportKind {
  std::string name;  // Transport::name(), and the instance's name
  std::function<absl::StatusOr<std::unique_ptr<Transport>>()> create;
  std::string path_prefix;  // what PeerChannel::path() starts with
  bool one_sided = false;   // capabilities().one_sided
  // A well-formed endpoint of some other transport: Connect must refuse it.
  std::function<std::string()> foreign_endpoint;
};

// Instances are named by the transport (gtest prints the parameter).
void PrintTo(const TransportKind& k, std::ostream* os) { *os << k.name; }

const TransportKind kTcp{
    "tcp",
    [] { return absl::StatusOr<std::unique_ptr<Transport>>(CreateTcpTransport()); },
    "tcp",
    false,
    [] {
      v1::RdmaEndpoint e;
      e.set_qpn(17);
      e.set_mtu(1024);
      e.set_gid(std::string(16, '\0'));
      e.set_liveness_port(1);
      return PackEndpoint(e);
    }};

const TransportKind kRdma{
    "rdma",
    [] { return CreateRdmaTransport(RdmaOptions{}); },
    "staged/",  // "staged/odp" or "staged/pinned": the registration of the receive area
    true,
    [] {
      v1::TcpEndpoint e;
      e.set_port(1);
      return PackEndpoint(e);
    }};

// A raw TCP client, for feeding a listener bytes no importer would send.
UniqueFd RawConnect(uint16_t port) {
  auto fd = TcpConnect(HostPort{"127.0.0.1", port}, absl::Seconds(2));
  EXPECT_TRUE(fd.ok()) << fd.status();
  if (!fd.ok()) return UniqueFd();
  timeval tv{3, 0};
  ::setsockopt(fd->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return std::move(*fd);
}

// Reads until EOF or error: true when the peer closed the connection
// (EOF or reset) within the socket's receive timeout.
bool PeerClosed(int fd) {
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n == 0) return true;
    if (n < 0) return errno == ECONNRESET;  // EAGAIN: timed out, still open
  }
}

uint16_t PortOf(const std::string& host_port) {
  uint32_t port = 0;
  EXPECT_TRUE(absl::SimpleAtoi(host_port.substr(host_port.rfind(':') + 1), &port)) << host_port;
  return static_cast<uint16_t>(port);
}

// ---------------------------------------------------------------- fixture

class TransportTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  void SetUp() override {
    SVM_GATE_TRANSPORT(GetParam().name);
    auto e = GetParam().create();
    ASSERT_TRUE(e.ok()) << e.status();
    exporter_ = std::move(*e);
    ASSERT_EQ(exporter_->name(), GetParam().name);
    ASSERT_TRUE(exporter_->Start(HostPort{"127.0.0.1", 0}, &exp_).ok());
    auto i = GetParam().create();
    ASSERT_TRUE(i.ok()) << i.status();
    importer_ = std::move(*i);
  }
  void TearDown() override {
    exp_.Release();
    imp_.Release();
    channels_.clear();
    if (exporter_) exporter_->Stop();
  }

  // The importer's first step and the exporter's answer (SetupData).
  struct Setup {
    std::string begin;
    SessionOffer offer;
  };
  absl::StatusOr<Setup> Prepare(const std::string& node, const std::string& protection = "") {
    auto begin = importer_->BeginConnect();
    if (!begin.ok()) return begin.status();
    auto offer = exporter_->PrepareSession(node, *begin, nullptr, protection);
    if (!offer.ok()) {
      importer_->AbortConnect(*begin);
      return offer.status();
    }
    return Setup{*std::move(begin), *std::move(offer)};
  }
  absl::StatusOr<std::unique_ptr<PeerChannel>> Connect(const SessionOffer& offer, const std::string& begin) {
    return importer_->Connect("127.0.0.1", offer, &imp_, begin);
  }

  // Opens a data connection; returns the channel (owned by the fixture)
  // and the exporter's view of it.
  PeerChannel* Open(const std::string& node, std::shared_ptr<Subscriber>* sub = nullptr,
                    std::string* token = nullptr, const std::string& protection = "") {
    auto setup = Prepare(node, protection);
    EXPECT_TRUE(setup.ok()) << setup.status();
    if (!setup.ok()) return nullptr;
    auto ch = Connect(setup->offer, setup->begin);
    EXPECT_TRUE(ch.ok()) << ch.status();
    if (!ch.ok()) return nullptr;
    if (sub) *sub = exporter_->FindSubscriber(setup->offer.token);
    if (token) *token = setup->offer.token;
    channels_.push_back(std::move(*ch));
    return channels_.back().get();
  }

  static bool PagesAre(const std::vector<uint8_t>& buf, uint64_t id, uint64_t first) {
    for (size_t i = 0; i < buf.size(); ++i) {
      const uint8_t want = FillOf(id, first + i / kPageSize);
      if (buf[i] != want) {
        ADD_FAILURE() << "byte " << i << " is " << int{buf[i]} << ", want " << int{want};
        return false;
      }
    }
    return true;
  }

  absl::StatusOr<uint64_t> Fetch(PeerChannel* ch, uint64_t id, uint64_t first, uint32_t n,
                                 std::vector<uint8_t>* out = nullptr, bool track = true,
                                 absl::Duration timeout = Scaled(absl::Seconds(10))) {
    std::vector<uint8_t> buf(n * kPageSize);
    auto r = ch->Fetch(id, first, n, track, absl::MakeSpan(buf), timeout);
    if (out) *out = std::move(buf);
    return r;
  }

  // Declaration order is teardown order, reversed: channels and transports
  // (which call the backends from their threads) go before the backends.
  FakeExportBackend exp_;
  FakeImportBackend imp_;
  std::unique_ptr<Transport> exporter_;
  std::unique_ptr<Transport> importer_;
  std::vector<std::unique_ptr<PeerChannel>> channels_;
};

std::string KindName(const ::testing::TestParamInfo<TransportKind>& info) { return info.param.name; }

// ------------------------------------------------- every transport

TEST_P(TransportTest, ListensOnAnEphemeralPortAndHandsOutOneTimeTokens) {
  const std::string addr = exporter_->listen_address();
  EXPECT_THAT(addr, ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(addr, "127.0.0.1:0");
  auto s = Prepare("n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FALSE(s->offer.endpoint.empty());
  EXPECT_GE(s->offer.token.size(), 16u);
  auto s2 = Prepare("n");
  ASSERT_TRUE(s2.ok()) << s2.status();
  EXPECT_NE(s->offer.token, s2->offer.token) << "tokens are one-time";
}

TEST_P(TransportTest, CapabilitiesAreWhatTheTransportDoes) {
  EXPECT_EQ(exporter_->capabilities().one_sided, GetParam().one_sided);
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  EXPECT_EQ(ch->capabilities().one_sided, GetParam().one_sided);
  EXPECT_EQ(ch->one_sided(), GetParam().one_sided);
  if (GetParam().one_sided) return;  // the rdma suite below covers the zero-copy path
  int x = 0;
  EXPECT_TRUE(absl::IsUnimplemented(exporter_->RegisterRegion(&x, sizeof(x)).status()));
  EXPECT_FALSE(ch->SetRegion(1, RemoteRegion{}, 1));
  std::vector<uint8_t> buf(8);
  EXPECT_TRUE(absl::IsFailedPrecondition(ch->ReadRegion(1, 0, absl::MakeSpan(buf), absl::Seconds(1))));
}

TEST_P(TransportTest, FetchReturnsTheBackendsBytesAndSeq) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("importer-1", &sub);
  ASSERT_NE(ch, nullptr);
  EXPECT_TRUE(ch->alive());
  EXPECT_THAT(ch->path(), ::testing::StartsWith(GetParam().path_prefix));
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->node(), "importer-1");

  exp_.SetSeq(42);
  std::vector<uint8_t> buf;
  auto seq = Fetch(ch, 9, 3, 2, &buf, /*track=*/true);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 42u);
  EXPECT_TRUE(PagesAre(buf, 9, 3));

  exp_.SetSeq(43);
  seq = Fetch(ch, 9, 0, 1, &buf, /*track=*/false);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 43u);
  EXPECT_TRUE(PagesAre(buf, 9, 0));

  auto calls = exp_.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].export_id, 9u);
  EXPECT_EQ(calls[0].first_page, 3u);
  EXPECT_EQ(calls[0].npages, 2u);
  EXPECT_TRUE(calls[0].track);
  EXPECT_FALSE(calls[1].track) << "track=false must reach the exporter (kFetchNoCache)";
}

TEST_P(TransportTest, FetchAtEverySizeUpToTheLargest) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.SetSeq(42);
  // 1 page, one rdma slot exactly, one more, and the largest fetch (split
  // into 4 on the rdma wire, one frame on tcp).
  for (uint32_t n : {1u, 256u, 257u, kMaxFetchPages}) {
    std::vector<uint8_t> buf;
    auto seq = Fetch(ch, 3, 10, n, &buf);
    ASSERT_TRUE(seq.ok()) << n << ": " << seq.status();
    EXPECT_EQ(*seq, 42u);
    EXPECT_TRUE(PagesAre(buf, 3, 10)) << n << " pages";
  }
}

TEST_P(TransportTest, ConcurrentFetchesGetTheirOwnReplies) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  // More threads than rdma has slots, of different sizes.
  std::atomic<int> bad{0};
  std::atomic<int> done{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 16; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        const uint32_t n = 1 + t % 3;
        std::vector<uint8_t> buf(n * kPageSize);
        auto r = ch->Fetch(100 + t, i, n, true, absl::MakeSpan(buf), Scaled(absl::Seconds(20)));
        ++done;
        if (!r.ok()) {
          ++bad;
          continue;
        }
        for (size_t k = 0; k < buf.size(); ++k) {
          if (buf[k] != FillOf(100 + t, i + k / kPageSize)) {
            ++bad;
            break;
          }
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(exp_.calls().size(), static_cast<size_t>(done.load()));
  EXPECT_EQ(done.load(), 160);
}

TEST_P(TransportTest, BackendErrorsKeepCodeAndMessage) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.FailExport(1, absl::NotFoundError("no such export (it was withdrawn)"));
  exp_.FailExport(2, absl::OutOfRangeError("pages 9+1 are beyond the export's 4 pages"));
  exp_.FailExport(3, absl::FailedPreconditionError("export 'x' gone"));
  exp_.FailExport(4, absl::PermissionDeniedError(""));

  auto r = Fetch(ch, 1, 0, 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(), "no such export (it was withdrawn)");
  r = Fetch(ch, 2, 9, 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r.status().message(), "pages 9+1 are beyond the export's 4 pages");
  r = Fetch(ch, 3, 0, 2);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(r.status().message(), "export 'x' gone");
  r = Fetch(ch, 4, 0, 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied);

  // An error reply is an answer, not a broken connection.
  EXPECT_TRUE(ch->alive());
  std::vector<uint8_t> buf;
  ASSERT_TRUE(Fetch(ch, 5, 0, 1, &buf).ok());
  EXPECT_TRUE(PagesAre(buf, 5, 0));
}

TEST_P(TransportTest, AnEmptyFetchIsRefusedByTheExporter) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  std::vector<uint8_t> none;
  auto r = ch->Fetch(1, 0, 0, true, absl::MakeSpan(none), Scaled(absl::Seconds(5)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(exp_.calls().empty()) << "the backend must not see it";
  EXPECT_TRUE(ch->alive());
  EXPECT_TRUE(Fetch(ch, 1, 0, 1).ok());
}

TEST_P(TransportTest, InvalidationsArriveInOrderWithResponsesAndAreAcked) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);

  // An invalidation queued while a fetch is being served reaches the
  // importer before that fetch's reply.
  exp_.OnNextFetch([&] {
    EXPECT_TRUE(sub->PushInvalidation({7, 2, 3, 5, ChangeKind::kUnmap, 1234}));
  });
  ASSERT_TRUE(Fetch(ch, 7, 0, 1).ok());
  auto inv = imp_.invals();
  ASSERT_EQ(inv.size(), 1u) << "INVAL queued before FETCH_RESP must be delivered before it";
  EXPECT_EQ(inv[0].export_id, 7u);
  EXPECT_EQ(inv[0].first_page, 2u);
  EXPECT_EQ(inv[0].npages, 3u);
  EXPECT_EQ(inv[0].seq, 5u);
  EXPECT_EQ(inv[0].kind, ChangeKind::kUnmap);
  EXPECT_EQ(inv[0].detected_ns, 1234u);
  EXPECT_EQ(imp_.inval_channels()[0], ch);

  // Alternating exports: consecutive INVALs of one export may be collapsed
  // while queued (MergeInvalFrame); these must each arrive.
  for (uint64_t s = 6; s <= 9; ++s) {
    ASSERT_TRUE(sub->PushInvalidation({s % 2 ? 8u : 7u, s, 1, s, ChangeKind::kWrite, 0}));
  }
  ASSERT_TRUE(imp_.WaitInvals(5));
  inv = imp_.invals();
  ASSERT_EQ(inv.size(), 5u);
  for (size_t i = 0; i < inv.size(); ++i) EXPECT_EQ(inv[i].seq, 5 + i) << "out of order";
  EXPECT_EQ(inv[1].kind, ChangeKind::kWrite);

  ASSERT_TRUE(exp_.WaitAcks(5));
  auto acks = exp_.acks();
  ASSERT_EQ(acks.size(), 5u);
  for (size_t i = 0; i < acks.size(); ++i) {
    EXPECT_EQ(acks[i].sub, sub->id());
    EXPECT_EQ(acks[i].export_id, i == 0 || (5 + i) % 2 == 0 ? 7u : 8u);
    EXPECT_EQ(acks[i].seq, 5 + i);
  }
}

TEST_P(TransportTest, AnInvalidationBurstArrivesInOrderAndIsAcked) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  for (uint64_t s = 8; s < 40; ++s) {
    InvalRecord r;
    r.export_id = 5;
    r.seq = s;
    ASSERT_TRUE(sub->PushInvalidation(r));
  }
  // The burst may arrive collapsed into fewer INVALs (MergeInvalFrame):
  // each delivered one is newer than the one before, the last is seq 39,
  // and the acknowledgements follow in the same order.
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  auto last_seq = [](const std::vector<uint64_t>& v) { return v.empty() ? 0 : v.back(); };
  std::vector<uint64_t> seqs, acks;
  do {
    seqs.clear();
    acks.clear();
    for (auto& r : imp_.invals()) seqs.push_back(r.seq);
    for (auto& a : exp_.acks()) acks.push_back(a.seq);
    if (last_seq(seqs) == 39 && last_seq(acks) == 39) break;
    absl::SleepFor(absl::Milliseconds(5));
  } while (absl::Now() < deadline);
  ASSERT_EQ(last_seq(seqs), 39u);
  ASSERT_EQ(last_seq(acks), 39u);
  for (size_t i = 1; i < seqs.size(); ++i) EXPECT_GT(seqs[i], seqs[i - 1]) << "invalidations in order";
  for (size_t i = 1; i < acks.size(); ++i) EXPECT_GT(acks[i], acks[i - 1]) << "acks in order";
  std::printf("# 32 invalidations arrived as %zu\n", seqs.size());
  EXPECT_TRUE(ch->alive());
}

TEST_P(TransportTest, AckIsSentOnlyAfterTheImporterDroppedThePages) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  imp_.Block();
  ASSERT_TRUE(sub->PushInvalidation({3, 0, 1, 1, ChangeKind::kRemap, 0}));
  ASSERT_TRUE(imp_.WaitInvals(1));
  EXPECT_FALSE(exp_.WaitAcks(1, absl::Milliseconds(100)))
      << "acknowledged while OnInvalidation was still running";
  imp_.Release();
  EXPECT_TRUE(exp_.WaitAcks(1));
}

// An importer whose OnInvalidation is slow holds up its own connection
// (responses behind the invalidation wait for it, as on the wire) and the
// acknowledgement, nothing else: a fetch on another connection of the same
// importer transport is answered meanwhile (rdma: connections share a
// completion thread, which therefore must not run the callback).
TEST_P(TransportTest, ASlowInvalidationCallbackStallsOnlyItsConnection) {
  std::shared_ptr<Subscriber> sub_a;
  PeerChannel* a = Open("a", &sub_a);
  PeerChannel* b = Open("b");
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(sub_a, nullptr);
  imp_.Block();
  ASSERT_TRUE(sub_a->PushInvalidation({3, 0, 1, 1, ChangeKind::kRemap, 0}));
  ASSERT_TRUE(imp_.WaitInvals(1));
  std::vector<uint8_t> pages;
  // Unscaled: answered in milliseconds even under TCG, and shorter than
  // the fake backend's own bound on a blocked callback (10 s).
  auto rb = Fetch(b, 2, 4, 2, &pages, true, absl::Seconds(5));
  ASSERT_TRUE(rb.ok()) << "another connection waited for OnInvalidation: " << rb.status();
  EXPECT_TRUE(PagesAre(pages, 2, 4));
  EXPECT_TRUE(exp_.acks().empty()) << "acknowledged while OnInvalidation was still running";
  imp_.Release();
  EXPECT_TRUE(exp_.WaitAcks(1));
  EXPECT_TRUE(Fetch(a, 2, 7, 1).ok());
}

TEST_P(TransportTest, InvalidationsGoOnlyToTheirConnection) {
  std::shared_ptr<Subscriber> sub_a, sub_b;
  PeerChannel* a = Open("a", &sub_a);
  PeerChannel* b = Open("b", &sub_b);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(sub_a, sub_b);
  EXPECT_NE(sub_a->id(), sub_b->id());
  ASSERT_TRUE(sub_b->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  ASSERT_TRUE(exp_.WaitAcks(1));
  EXPECT_EQ(exp_.acks()[0].sub, sub_b->id());
  ASSERT_EQ(imp_.inval_channels().size(), 1u);
  EXPECT_EQ(imp_.inval_channels()[0], b);
}

// The exporter serves a fetch only to a connection subscribed to the
// export (ExportTable::ServeFetch): the transport names the connection the
// request arrived on, the one that claimed the session's token.
TEST_P(TransportTest, FetchesNameTheConnectionTheyArriveOn) {
  std::shared_ptr<Subscriber> sub_a, sub_b;
  PeerChannel* a = Open("a", &sub_a);
  PeerChannel* b = Open("b", &sub_b);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(Fetch(b, 5, 0, 1).ok());
  ASSERT_TRUE(Fetch(a, 5, 1, 1).ok());
  auto calls = exp_.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].from, sub_b->id());
  EXPECT_EQ(calls[1].from, sub_a->id());
}

// The rdma exporter answers a HELLO it refuses (frame.h, kRdmaHelloRefused)
// before it closes the queue pair, so the importer fails at once and says
// why, instead of at its HELLO timeout with "no HELLO". tcp's exporter
// closes the socket, which the importer sees at once too.
void ExpectRefusedByTheExporter(const std::string& transport, const absl::Status& st) {
  if (transport != "rdma") return;
  EXPECT_THAT(st.message(), ::testing::HasSubstr("session token is unknown or already used")) << st;
}

TEST_P(TransportTest, AForgedTokenIsRefused) {
  auto setup = Prepare("n");
  ASSERT_TRUE(setup.ok()) << setup.status();
  SessionOffer bad = setup->offer;
  bad.token.back() ^= 1;
  auto ch = Connect(bad, setup->begin);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  ExpectRefusedByTheExporter(GetParam().name, ch.status());
  EXPECT_EQ(exporter_->FindSubscriber(bad.token), nullptr);
  auto setup2 = Prepare("n");
  ASSERT_TRUE(setup2.ok()) << setup2.status();
  SessionOffer empty = setup2->offer;
  empty.token.clear();
  ch = Connect(empty, setup2->begin);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  EXPECT_EQ(exporter_->FindSubscriber(""), nullptr);
}

TEST_P(TransportTest, UsedTokenIsRefusedAndTheFirstConnectionKeepsIt) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* first = Open("n", &sub, &token);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(sub, nullptr);

  auto again = Prepare("n");
  ASSERT_TRUE(again.ok()) << again.status();
  again->offer.token = token;
  auto ch = Connect(again->offer, again->begin);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  ExpectRefusedByTheExporter(GetParam().name, ch.status());

  // The refused connection is torn down on the exporter (its
  // OnSubscriberClosed), and that must not touch the first connection's
  // session.
  ASSERT_TRUE(exp_.WaitClosedCount(1));
  EXPECT_NE(exp_.closed()[0], sub->id()) << "the wrong connection was closed";
  const absl::Time until = absl::Now() + absl::Milliseconds(100);
  while (absl::Now() < until) {
    ASSERT_EQ(exporter_->FindSubscriber(token), sub)
        << "a refused reuse of a token unbound the connection that owns it";
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE(first->alive());
  EXPECT_TRUE(Fetch(first, 1, 0, 1).ok());
  ASSERT_TRUE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  EXPECT_TRUE(imp_.WaitInvals(1));
}

TEST_P(TransportTest, TokenOfAClosedConnectionIsRefused) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* first = Open("n", &sub, &token);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(sub, nullptr);
  first->Close();
  ASSERT_TRUE(exp_.WaitClosed(sub->id()));
  auto again = Prepare("n");
  ASSERT_TRUE(again.ok()) << again.status();
  again->offer.token = token;
  auto ch = Connect(again->offer, again->begin);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  ExpectRefusedByTheExporter(GetParam().name, ch.status());
}

TEST_P(TransportTest, ImporterCloseIsSeenByTheExporter) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* ch = Open("n", &sub, &token);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  ch->Close();
  EXPECT_FALSE(ch->alive());
  EXPECT_EQ(Fetch(ch, 1, 0, 1).status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(exp_.WaitClosed(sub->id()));
  EXPECT_TRUE(imp_.WaitClosed(ch).ok());
  EXPECT_FALSE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  EXPECT_EQ(exporter_->FindSubscriber(token), nullptr);
}

TEST_P(TransportTest, ExporterCloseFailsPendingFetch) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  exp_.Block();
  auto pending = std::async(std::launch::async, [&] {
    return Fetch(ch, 1, 0, 1, nullptr, true, Scaled(absl::Seconds(10)));
  });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  const absl::Time start = absl::Now();
  sub->Close();  // e.g. Sync disconnecting an importer that stopped acknowledging
  ASSERT_EQ(pending.wait_for(absl::ToChronoSeconds(Scaled(absl::Seconds(2)))),
            std::future_status::ready)
      << "a pending fetch outlived its connection";
  auto r = pending.get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_LT(absl::Now() - start, Scaled(absl::Seconds(2)));
  auto why = imp_.WaitClosed(ch);
  ASSERT_TRUE(why.ok()) << why.status();
  EXPECT_FALSE(why->ok());
  EXPECT_FALSE(ch->alive());
  EXPECT_EQ(Fetch(ch, 1, 0, 1).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  exp_.Release();
  EXPECT_TRUE(exp_.WaitClosed(sub->id()));
}

TEST_P(TransportTest, ExporterStopFailsPendingFetch) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  auto later = Prepare("later");  // an offer the importer has not used yet
  ASSERT_TRUE(later.ok()) << later.status();
  exp_.Block();
  auto pending = std::async(std::launch::async, [&] {
    return Fetch(ch, 1, 0, 1, nullptr, true, Scaled(absl::Seconds(10)));
  });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  // Stop joins the connection threads, one of which is inside the backend:
  // run it aside and release the backend once the fetch has failed.
  auto stop = std::async(std::launch::async, [&] { exporter_->Stop(); });
  ASSERT_EQ(pending.wait_for(absl::ToChronoSeconds(Scaled(absl::Seconds(2)))),
            std::future_status::ready);
  EXPECT_EQ(pending.get().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(imp_.WaitClosed(ch).ok());
  exp_.Release();
  EXPECT_EQ(stop.wait_for(absl::ToChronoSeconds(Scaled(absl::Seconds(2)))), std::future_status::ready);
  stop.get();
  // Nothing serves any more.
  EXPECT_FALSE(Connect(later->offer, later->begin).ok());
}

TEST_P(TransportTest, FetchTimesOutWhenTheExporterDoesNotAnswer) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  exp_.Block();
  const absl::Duration timeout = absl::Milliseconds(500);
  const absl::Time start = absl::Now();
  auto r = Fetch(ch, 1, 0, 1, nullptr, true, timeout);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_GE(took, timeout - absl::Milliseconds(5));
  EXPECT_LT(took, timeout + Scaled(absl::Milliseconds(500))) << "took " << took;
  EXPECT_FALSE(ch->alive()) << "a timed-out connection must be closed";
  auto why = imp_.WaitClosed(ch);
  ASSERT_TRUE(why.ok()) << why.status();
  EXPECT_TRUE(absl::IsUnavailable(*why)) << *why;
  exp_.Release();
  EXPECT_TRUE(exp_.WaitClosed(sub->id())) << "the exporter learns that the importer gave up";
}

TEST_P(TransportTest, ConnectWithoutAnEndpointOfThisTransport) {
  for (const std::string& endpoint : {std::string(), std::string("garbage"),
                                      GetParam().foreign_endpoint()}) {
    auto begin = importer_->BeginConnect();
    ASSERT_TRUE(begin.ok()) << begin.status();
    auto ch = Connect(SessionOffer{"whatever", endpoint}, *begin);
    EXPECT_EQ(ch.status().code(), absl::StatusCode::kFailedPrecondition)
        << ch.status() << " for a " << endpoint.size() << "-byte endpoint";
  }
}

TEST_P(TransportTest, DestroyingAChannelNotifiesBothSides) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  channels_.clear();  // destroys it: joins its threads
  EXPECT_EQ(imp_.closed().size(), 1u) << "OnChannelClosed must have run before the destructor returned";
  EXPECT_TRUE(exp_.WaitClosed(sub->id()));
}

TEST_P(TransportTest, IdleConnectionCostsNoCpu) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  ASSERT_TRUE(Fetch(ch, 1, 0, 1).ok());
  rusage a{}, b{};
  getrusage(RUSAGE_SELF, &a);
  const absl::Time t0 = absl::Now();
  absl::SleepFor(absl::Seconds(2));
  getrusage(RUSAGE_SELF, &b);
  const absl::Duration wall = absl::Now() - t0;
  auto cpu = [](const rusage& r) {
    return absl::DurationFromTimeval(r.ru_utime) + absl::DurationFromTimeval(r.ru_stime);
  };
  const absl::Duration used = cpu(b) - cpu(a);
  std::printf("# idle connection (both sides): %s cpu in %s\n", absl::FormatDuration(used).c_str(),
              absl::FormatDuration(wall).c_str());
  EXPECT_LT(used, wall / 10);
  EXPECT_TRUE(ch->alive());
}

// A read's missing pages travel as one batch (ImportTable::Read): pieces
// of every size around the rdma slot (256 pages) and the tcp frame limit,
// each landing in its own buffer, with its own sequence.
TEST_P(TransportTest, FetchVReturnsEveryOpsOwnPages) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.SetSeq(77);
  const std::vector<uint32_t> sizes = {1, 31, 32, 33, 255, 256, 257, kMaxFetchPages, 2};
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<FetchOp> ops;
  uint64_t pages = 0;
  for (size_t i = 0; i < sizes.size(); ++i) bufs.emplace_back(sizes[i] * kPageSize, 0xee);
  for (size_t i = 0; i < sizes.size(); ++i) {
    FetchOp op;
    op.export_id = 20 + i % 3;
    op.first_page = 5 * i;
    op.npages = sizes[i];
    op.track = i % 2 == 0;
    op.dst = absl::MakeSpan(bufs[i]);
    ops.push_back(op);
    pages += sizes[i];
  }
  ch->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(20)));
  for (size_t i = 0; i < ops.size(); ++i) {
    ASSERT_TRUE(ops[i].result.ok()) << i << ": " << ops[i].result.status();
    EXPECT_EQ(*ops[i].result, 77u);
    EXPECT_TRUE(PagesAre(bufs[i], ops[i].export_id, ops[i].first_page)) << "op " << i;
    // tcp receives into dst; rdma copies out of its receive slots into a
    // dst that no landing area covers (FetchesLandInTheCacheFile...).
    EXPECT_EQ(ops[i].transport_copied, GetParam().name == "rdma" ? ops[i].dst.size() : 0u) << "op " << i;
  }
  uint64_t served = 0;
  for (const auto& c : exp_.calls()) served += c.npages;
  EXPECT_EQ(served, pages) << "every page asked for once";
  EXPECT_TRUE(ch->alive());
}

// The connection is lost with many fetches of one batch on the wire (the
// peer closed it, or died): every one of them fails at once with
// UNAVAILABLE, none waits for the timeout.
TEST_P(TransportTest, FetchVFailsEveryOpInFlightWhenTheConnectionIsLost) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  exp_.Block();
  constexpr int kOps = 6;  // fewer than rdma's slots: all on the wire
  std::vector<std::vector<uint8_t>> bufs(kOps, std::vector<uint8_t>(2 * kPageSize));
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    ops[i].export_id = 1;
    ops[i].first_page = 2 * i;
    ops[i].npages = 2;
    ops[i].track = true;
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  auto pending = std::async(std::launch::async,
                            [&] { ch->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(20))); });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  const absl::Time start = absl::Now();
  sub->Close();
  ASSERT_EQ(pending.wait_for(absl::ToChronoSeconds(Scaled(absl::Seconds(3)))), std::future_status::ready)
      << "a batch outlived its connection";
  pending.get();
  EXPECT_LT(absl::Now() - start, Scaled(absl::Seconds(3)));
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(ops[i].result.status().code(), absl::StatusCode::kUnavailable) << i << ": " << ops[i].result.status();
  }
  EXPECT_FALSE(ch->alive());
  exp_.Release();
  EXPECT_TRUE(imp_.WaitClosed(ch).ok());
}

// The asynchronous form (ImportTable::Read's): FetchVAsync returns before
// any answer, and when the connection dies under a batch its done runs
// exactly once, from the transport's thread, with every op UNAVAILABLE; a
// batch on the dead channel completes at once, on the caller's thread.
TEST_P(TransportTest, FetchVAsyncCompletesOnceWithAnErrorWhenTheLinkDies) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  exp_.Block();
  constexpr int kOps = 12;  // more than rdma's slots: some wait to be issued
  std::vector<std::vector<uint8_t>> bufs(kOps, std::vector<uint8_t>(2 * kPageSize));
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    ops[i].export_id = 1;
    ops[i].first_page = 2 * i;
    ops[i].npages = 2;
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  std::atomic<int> calls{0};
  std::atomic<bool> on_caller{false};
  absl::Notification first;
  const std::thread::id caller = std::this_thread::get_id();
  ch->FetchVAsync(absl::MakeSpan(ops), Scaled(absl::Seconds(20)), [&] {
    if (std::this_thread::get_id() == caller) on_caller = true;
    if (calls.fetch_add(1) == 0) first.Notify();
  });
  EXPECT_EQ(calls.load(), 0) << "FetchVAsync waited for an answer";
  ASSERT_TRUE(exp_.WaitBlocked(1));
  const absl::Time start = absl::Now();
  sub->Close();
  ASSERT_TRUE(first.WaitForNotificationWithTimeout(Scaled(absl::Seconds(3)))) << "a batch outlived its connection";
  EXPECT_LT(absl::Now() - start, Scaled(absl::Seconds(3)));
  EXPECT_FALSE(on_caller.load());
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(ops[i].result.status().code(), absl::StatusCode::kUnavailable) << i << ": " << ops[i].result.status();
  }
  exp_.Release();
  EXPECT_TRUE(imp_.WaitClosed(ch).ok());
  // Whatever the exporter still sends, and the close's own reports, come
  // after: done must not run again.
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  EXPECT_EQ(calls.load(), 1) << "done ran more than once";

  std::vector<uint8_t> late_buf(kPageSize);
  FetchOp late;
  late.export_id = 1;
  late.npages = 1;
  late.dst = absl::MakeSpan(late_buf);
  int late_calls = 0;
  ch->FetchVAsync(absl::MakeSpan(&late, 1), Scaled(absl::Seconds(20)), [&] { ++late_calls; });
  EXPECT_EQ(late_calls, 1) << "a batch on a closed channel completes before FetchVAsync returns";
  EXPECT_EQ(late.result.status().code(), absl::StatusCode::kUnavailable) << late.result.status();
}

// Destroying a channel with a batch outstanding (svmd stopping, a link
// replaced): done has run, once, before the destructor returns, and no
// page lands in a dst after it.
TEST_P(TransportTest, DestroyingAChannelCompletesItsOutstandingFetchesFirst) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.Block();
  constexpr int kOps = 10;
  auto bufs = std::make_shared<std::vector<std::vector<uint8_t>>>(kOps, std::vector<uint8_t>(kPageSize, 0xee));
  auto ops = std::make_shared<std::vector<FetchOp>>(kOps);
  for (int i = 0; i < kOps; ++i) {
    (*ops)[i].export_id = 1;
    (*ops)[i].first_page = i;
    (*ops)[i].npages = 1;
    (*ops)[i].dst = absl::MakeSpan((*bufs)[i]);
  }
  auto calls = std::make_shared<std::atomic<int>>(0);
  ch->FetchVAsync(absl::MakeSpan(*ops), Scaled(absl::Seconds(20)), [calls] { calls->fetch_add(1); });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  channels_.clear();
  EXPECT_EQ(calls->load(), 1) << "the channel went with its batch not completed";
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ((*ops)[i].result.status().code(), absl::StatusCode::kUnavailable) << i << ": " << (*ops)[i].result.status();
  }
  exp_.Release();
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  EXPECT_EQ(calls->load(), 1);
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ((*bufs)[i], std::vector<uint8_t>(kPageSize, 0xee)) << "op " << i << " written after its batch completed";
  }
}

// A batch whose export fails on the exporter (its process was killed)
// stops at the first failure: the read it serves fails now, not after
// every later piece was asked for and refused (rdma issues pieces as slots
// free; tcp has sent them all at once and the exporter refuses each fast).
TEST_P(TransportTest, AFailedFetchEndsItsBatch) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.FailExport(9, absl::FailedPreconditionError("export 'x' gone"));
  constexpr int kOps = 40;
  std::vector<std::vector<uint8_t>> bufs(kOps, std::vector<uint8_t>(4 * kPageSize));
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    ops[i].export_id = 9;
    ops[i].first_page = 4 * i;
    ops[i].npages = 4;
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  ch->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(20)));
  EXPECT_EQ(ops[0].result.status().code(), absl::StatusCode::kFailedPrecondition) << ops[0].result.status();
  for (int i = 1; i < kOps; ++i) {
    EXPECT_TRUE(absl::IsFailedPrecondition(ops[i].result.status()) || absl::IsCancelled(ops[i].result.status()))
        << i << ": " << ops[i].result.status();
  }
  if (!GetParam().one_sided) return;  // tcp: all were on the wire
  EXPECT_LE(exp_.calls().size(), 8u) << "pieces were still issued after the first failure";
  EXPECT_TRUE(ch->alive());
}

INSTANTIATE_TEST_SUITE_P(Tcp, TransportTest, ::testing::Values(kTcp), KindName);
INSTANTIATE_TEST_SUITE_P(Rdma, TransportTest, ::testing::Values(kRdma), KindName);

// ------------------------------------------- tcp only: the raw wire

// The tcp data connection is a byte stream anyone can connect to: what a
// client that is not an importer sends must not hurt the exporter.
using TcpWireTest = TransportTest;

std::vector<uint8_t> RawFrame(FrameType t, const void* payload, size_t len) {
  return MakeFrame(t, 0, payload, len);
}

// RawConnect, then the HELLO that presents token, then the exporter's
// HELLO read back: a data connection the test drives frame by frame. An
// invalid fd (with the failure recorded) when any step fails.
UniqueFd RawHello(uint16_t port, const std::string& token) {
  UniqueFd raw = RawConnect(port);
  if (!raw.valid()) return raw;
  auto hello = RawFrame(FrameType::kHello, token.data(), token.size());
  FrameHeader h;
  if (!WriteFull(raw.get(), hello.data(), hello.size()).ok() ||
      !ReadFull(raw.get(), &h, sizeof(h)).ok() || h.type != static_cast<uint8_t>(FrameType::kHello)) {
    ADD_FAILURE() << "no HELLO back from the exporter";
    return UniqueFd();
  }
  return raw;
}

TEST_P(TcpWireTest, TheOfferedEndpointIsTheListener) {
  auto s = Prepare("n");
  ASSERT_TRUE(s.ok()) << s.status();
  v1::TcpEndpoint e;
  ASSERT_TRUE(UnpackEndpoint(s->offer.endpoint, &e));
  EXPECT_EQ(exporter_->listen_address(), absl::StrCat("127.0.0.1:", e.port()));
}

TEST_P(TcpWireTest, FetchBeyondTheLargestIsRefusedByTheExporter) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  auto r = Fetch(ch, 1, 0, kMaxFetchPages + 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(exp_.calls().empty()) << "the backend must not see it";
  EXPECT_TRUE(ch->alive());
  EXPECT_TRUE(Fetch(ch, 1, 0, 1).ok());
}

TEST_P(TcpWireTest, RefusedTokensAreNotBurned) {
  auto setup = Prepare("n");
  ASSERT_TRUE(setup.ok());
  SessionOffer bad = setup->offer;
  bad.token.back() ^= 1;
  EXPECT_EQ(Connect(bad, "").status().code(), absl::StatusCode::kUnavailable);
  bad.token.clear();
  EXPECT_EQ(Connect(bad, "").status().code(), absl::StatusCode::kUnavailable);
  // The refusals did not burn the real token.
  auto ch = Connect(setup->offer, setup->begin);
  ASSERT_TRUE(ch.ok()) << ch.status();
  EXPECT_TRUE(Fetch(ch->get(), 1, 0, 1).ok());
  channels_.push_back(std::move(*ch));
}

TEST_P(TcpWireTest, FirstFrameOtherThanHelloDoesNotBurnTheToken) {
  auto setup = Prepare("n");
  ASSERT_TRUE(setup.ok());
  // A client that sends the right token in a FETCH frame is refused...
  UniqueFd raw = RawConnect(PortOf(exporter_->listen_address()));
  const std::string& tok = setup->offer.token;
  auto f = RawFrame(FrameType::kFetch, tok.data(), tok.size());
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  EXPECT_TRUE(PeerClosed(raw.get()));
  ASSERT_TRUE(exp_.WaitClosedCount(1));
  // ... and the importer the token was made for can still use it.
  auto ch = Connect(setup->offer, setup->begin);
  ASSERT_TRUE(ch.ok()) << ch.status();
  channels_.push_back(std::move(*ch));
}

TEST_P(TcpWireTest, GarbageClosesOnlyThatConnection) {
  PeerChannel* good = Open("good");
  ASSERT_NE(good, nullptr);

  UniqueFd raw = RawConnect(PortOf(exporter_->listen_address()));
  std::mt19937 rng(12345);
  std::vector<uint8_t> junk(256);
  for (auto& b : junk) b = static_cast<uint8_t>(rng());
  junk[0] = 0;  // never "SVMD"
  ASSERT_TRUE(WriteFull(raw.get(), junk.data(), junk.size()).ok());
  EXPECT_TRUE(PeerClosed(raw.get())) << "the exporter kept a connection that sent garbage";
  ASSERT_TRUE(exp_.WaitClosedCount(1));

  EXPECT_TRUE(good->alive());
  std::vector<uint8_t> buf;
  ASSERT_TRUE(Fetch(good, 3, 1, 1, &buf).ok());
  EXPECT_TRUE(PagesAre(buf, 3, 1));
  EXPECT_NE(Open("later"), nullptr) << "the listener stopped accepting";
}

TEST_P(TcpWireTest, GarbageAfterHelloClosesTheConnection) {
  auto setup = Prepare("raw");
  ASSERT_TRUE(setup.ok());
  const std::string& tok = setup->offer.token;
  UniqueFd raw = RawHello(PortOf(exporter_->listen_address()), tok);
  ASSERT_TRUE(raw.valid());
  FrameHeader h;
  auto sub = exporter_->FindSubscriber(tok);
  ASSERT_NE(sub, nullptr);

  // A header announcing more than kMaxPayload: dropped without reading it.
  FrameHeader big;
  big.type = static_cast<uint8_t>(FrameType::kFetch);
  big.payload_len = kMaxPayload + 1;
  ASSERT_TRUE(WriteFull(raw.get(), &big, sizeof(big)).ok());
  EXPECT_TRUE(PeerClosed(raw.get()));
  EXPECT_TRUE(exp_.WaitClosed(sub->id()));
  EXPECT_FALSE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}))
      << "PushInvalidation must report a closed connection";
  EXPECT_TRUE(exp_.calls().empty());
}

TEST_P(TcpWireTest, MalformedFetchClosesTheConnection) {
  auto setup = Prepare("raw");
  ASSERT_TRUE(setup.ok());
  UniqueFd raw = RawHello(PortOf(exporter_->listen_address()), setup->offer.token);
  ASSERT_TRUE(raw.valid());
  FrameHeader h;
  uint8_t short_fetch[10] = {};
  auto f = RawFrame(FrameType::kFetch, short_fetch, sizeof(short_fetch));
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  EXPECT_TRUE(PeerClosed(raw.get()));
  EXPECT_TRUE(exp_.calls().empty());
}

// A peer that sends fetches and does not read the answers: once
// max_pending responses are queued unsent, the rest are answered
// RESOURCE_EXHAUSTED without being served (nothing copied, nothing more
// queued than a short error each); once the peer reads, fetches are served
// again.
TEST_P(TcpWireTest, FetchesBeyondThePendingLimitAreRefusedNotQueued) {
  exp_.max_pending = 4;
  auto setup = Prepare("flood");
  ASSERT_TRUE(setup.ok());
  const std::string& tok = setup->offer.token;
  UniqueFd raw = RawHello(PortOf(exporter_->listen_address()), tok);
  ASSERT_TRUE(raw.valid());
  FrameHeader h;
  // 4 MiB answers each: the socket buffers hold a few at most.
  constexpr int kFetches = 48;
  auto send = [&](int n) {
    for (int i = 0; i < n; ++i) {
      FetchPayload f{1, 0, kMaxFetchPages, 0};
      auto frame = MakeFrame(FrameType::kFetch, 100 + i, &f, sizeof(f));
      ASSERT_TRUE(WriteFull(raw.get(), frame.data(), frame.size()).ok());
    }
  };
  send(kFetches);
  // Read only once the exporter's queue has reached the limit (the fetch
  // admitted at 4 queued is refused): a reader that started at once could
  // keep up with a slow exporter (ThreadSanitizer's build) and keep its
  // queue short. Then every fetch is answered, in order.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (exp_.max_pending_seen.load() < 4 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  auto read_all = [&](int n, int* served, int* refused) {
    std::vector<uint8_t> payload;
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(ReadFull(raw.get(), &h, sizeof(h)).ok()) << i;
      ASSERT_EQ(h.type, static_cast<uint8_t>(FrameType::kFetchResp));
      payload.resize(h.payload_len);
      ASSERT_TRUE(ReadFull(raw.get(), payload.data(), payload.size()).ok());
      FetchRespPayload r;
      std::memcpy(&r, payload.data(), sizeof(r));
      if (r.code == 0) {
        ++*served;
      } else {
        EXPECT_EQ(r.code, static_cast<uint32_t>(absl::StatusCode::kResourceExhausted));
        ++*refused;
      }
    }
  };
  int served = 0, refused = 0;
  read_all(kFetches, &served, &refused);
  EXPECT_GT(refused, 0) << "the exporter queued every answer";
  EXPECT_GE(served, 4);
  EXPECT_EQ(exp_.calls().size(), static_cast<size_t>(served)) << "a refused fetch is not served";
  EXPECT_GE(exp_.max_pending_seen.load(), 4u) << "admission saw the queue";
  // The peer read everything: its next fetches are served.
  send(2);
  int served2 = 0, refused2 = 0;
  read_all(2, &served2, &refused2);
  EXPECT_EQ(served2, 2);
}

// A fake exporter on a raw socket: the importer's end of the wire, seen
// from the exporter's side.
class RawExporter {
 public:
  RawExporter() {
    listen_.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listen_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(listen_.get(), 4), 0);
    socklen_t len = sizeof(a);
    ::getsockname(listen_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  SessionOffer Offer() const {
    v1::TcpEndpoint e;
    e.set_port(port_);
    return SessionOffer{"raw-token", PackEndpoint(e)};
  }
  // Accepts the importer and answers its HELLO.
  bool Accept() {
    conn_.Reset(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn_.valid()) return false;
    timeval tv{3, 0};
    ::setsockopt(conn_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    FrameHeader h;
    std::vector<uint8_t> payload;
    if (!ReadFrame(conn_.get(), &h, &payload).ok() || h.type != static_cast<uint8_t>(FrameType::kHello)) {
      return false;
    }
    auto hello = MakeFrame(FrameType::kHello, 0, nullptr, 0);
    return WriteFull(conn_.get(), hello.data(), hello.size()).ok();
  }
  int fd() const { return conn_.get(); }
  void Drop() { conn_.Reset(); }

 private:
  UniqueFd listen_;
  UniqueFd conn_;
  uint16_t port_ = 0;
};

// importer's channel to raw (Connect and raw's accept run together).
absl::StatusOr<std::unique_ptr<PeerChannel>> ConnectToRaw(RawExporter& raw, Transport& importer,
                                                          ImportBackend* backend) {
  auto connecting = std::async(std::launch::async,
                               [&] { return importer.Connect("127.0.0.1", raw.Offer(), backend, ""); });
  const bool accepted = raw.Accept();
  auto ch = connecting.get();
  if (!accepted) return absl::UnavailableError("the raw exporter accepted no connection");
  return ch;
}

// Every FETCH of a batch is on the wire before the first answer (the
// exporter reads them all without answering one), and answers that come
// back in another order still land in their own buffers.
TEST_P(TcpWireTest, FetchVPutsEveryFetchOnTheWireBeforeAnyAnswer) {
  RawExporter raw;
  auto ch = ConnectToRaw(raw, *importer_, &imp_);
  ASSERT_TRUE(ch.ok()) << ch.status();
  constexpr int kOps = 5;
  std::vector<std::vector<uint8_t>> bufs(kOps);
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    bufs[i].assign((i + 1) * kPageSize, 0);
    ops[i].export_id = 3;
    ops[i].first_page = 10 * i;
    ops[i].npages = i + 1;
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  auto batch = std::async(std::launch::async, [&] { (*ch)->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(10))); });
  std::vector<std::pair<uint64_t, FetchPayload>> fetches;
  for (int i = 0; i < kOps; ++i) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    // A batch sent one fetch at a time never shows the second one here.
    ASSERT_TRUE(ReadFrame(raw.fd(), &h, &payload).ok()) << "FETCH " << i << " of the batch never arrived";
    ASSERT_EQ(h.type, static_cast<uint8_t>(FrameType::kFetch));
    ASSERT_EQ(payload.size(), sizeof(FetchPayload));
    FetchPayload f;
    std::memcpy(&f, payload.data(), sizeof(f));
    fetches.emplace_back(h.id, f);
  }
  for (auto it = fetches.rbegin(); it != fetches.rend(); ++it) {
    const FetchPayload& f = it->second;
    std::vector<uint8_t> pages(f.npages * kPageSize);
    for (uint32_t k = 0; k < f.npages; ++k) {
      std::memset(pages.data() + k * kPageSize, FillOf(f.export_id, f.first_page + k), kPageSize);
    }
    FetchRespPayload r{};
    r.seq = 100 + f.first_page;
    auto frame = MakeFrame(FrameType::kFetchResp, it->first, &r, sizeof(r), pages.data(), pages.size());
    ASSERT_TRUE(WriteFull(raw.fd(), frame.data(), frame.size()).ok());
  }
  batch.get();
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(ops[i].result.ok()) << i << ": " << ops[i].result.status();
    EXPECT_EQ(*ops[i].result, 100u + ops[i].first_page);
    EXPECT_TRUE(PagesAre(bufs[i], 3, ops[i].first_page)) << "op " << i;
  }

  // A second batch, and the exporter dies with all of it unanswered.
  for (auto& op : ops) op.result = absl::UnknownError("not fetched");
  auto doomed = std::async(std::launch::async, [&] { (*ch)->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(10))); });
  for (int i = 0; i < kOps; ++i) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(ReadFrame(raw.fd(), &h, &payload).ok());
  }
  const absl::Time start = absl::Now();
  raw.Drop();
  doomed.get();
  EXPECT_LT(absl::Now() - start, Scaled(absl::Seconds(2)));
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(ops[i].result.status().code(), absl::StatusCode::kUnavailable) << ops[i].result.status();
  }
  EXPECT_TRUE(imp_.WaitClosed(ch->get()).ok());
}

// The importer expects answers in the order of its FETCHes and receives
// the oldest one's pages with its header in one system call, into that
// fetch's buffer. Whatever else comes first (an invalidation, an error
// answer, several frames in one write, a header split across writes) is
// read again from what was received: every fetch ends with its own bytes or
// its own error, and every invalidation is delivered and acknowledged.
TEST_P(TcpWireTest, AnswersAmongInvalidationsErrorsAndSplitWritesLandInTheirOwnBuffers) {
  RawExporter raw;
  auto ch = ConnectToRaw(raw, *importer_, &imp_);
  ASSERT_TRUE(ch.ok()) << ch.status();
  // Each write below leaves at once (no Nagle delay merging them).
  int one = 1;
  ASSERT_EQ(::setsockopt(raw.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)), 0);
  constexpr int kOps = 4;
  const uint32_t npages[kOps] = {1, 2, 1, 3};
  std::vector<std::vector<uint8_t>> bufs(kOps);
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    bufs[i].assign(npages[i] * kPageSize, 0xee);
    ops[i].export_id = 3;
    ops[i].first_page = 10 * i;
    ops[i].npages = npages[i];
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  auto batch = std::async(std::launch::async, [&] { (*ch)->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(10))); });
  std::vector<uint64_t> ids;
  for (int i = 0; i < kOps; ++i) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(ReadFrame(raw.fd(), &h, &payload).ok());
    ASSERT_EQ(h.type, static_cast<uint8_t>(FrameType::kFetch));
    ids.push_back(h.id);
  }
  auto answer = [&](int i) {
    std::vector<uint8_t> pages(npages[i] * kPageSize);
    for (uint32_t k = 0; k < npages[i]; ++k) {
      std::memset(pages.data() + k * kPageSize, FillOf(3, ops[i].first_page + k), kPageSize);
    }
    FetchRespPayload r{};
    r.seq = 100 + i;
    return MakeFrame(FrameType::kFetchResp, ids[i], &r, sizeof(r), pages.data(), pages.size());
  };
  auto inval = [](uint64_t page, uint64_t seq) {
    const InvalPayload p{3, page, 1, seq, static_cast<uint32_t>(source::ChangeKind::kWrite), 0, 0};
    return MakeFrame(FrameType::kInval, 0, &p, sizeof(p));
  };
  auto write = [&](std::vector<uint8_t> a, const std::vector<uint8_t>& b = {}) {
    a.insert(a.end(), b.begin(), b.end());
    return WriteFull(raw.fd(), a.data(), a.size()).ok();
  };
  // An invalidation alone, while the reader waits for the first answer.
  ASSERT_TRUE(write(inval(0, 5)));
  ASSERT_TRUE(imp_.WaitInvals(1));
  // The first answer and an invalidation in one write.
  ASSERT_TRUE(write(answer(0), inval(1, 6)));
  // An error for the second fetch, its header cut in two writes, the
  // second with the third answer.
  const std::string msg = "gone away";
  FetchRespPayload e{};
  e.code = static_cast<uint32_t>(absl::StatusCode::kNotFound);
  e.msg_len = static_cast<uint32_t>(msg.size());
  auto error = MakeFrame(FrameType::kFetchResp, ids[1], &e, sizeof(e), msg.data(), msg.size());
  ASSERT_TRUE(WriteFull(raw.fd(), error.data(), 20).ok());
  absl::SleepFor(absl::Milliseconds(20));
  ASSERT_TRUE(write(std::vector<uint8_t>(error.begin() + 20, error.end()), answer(2)));
  // The last answer in two writes: its header with part of the pages, then
  // the remaining pages.
  const auto last = answer(3);
  const size_t cut = sizeof(FrameHeader) + sizeof(FetchRespPayload) + 100;
  ASSERT_TRUE(WriteFull(raw.fd(), last.data(), cut).ok());
  absl::SleepFor(absl::Milliseconds(20));
  ASSERT_TRUE(WriteFull(raw.fd(), last.data() + cut, last.size() - cut).ok());
  batch.get();
  for (int i : {0, 2, 3}) {
    ASSERT_TRUE(ops[i].result.ok()) << i << ": " << ops[i].result.status();
    EXPECT_EQ(*ops[i].result, 100u + i);
    EXPECT_TRUE(PagesAre(bufs[i], 3, ops[i].first_page)) << "op " << i;
  }
  EXPECT_EQ(ops[1].result.status().code(), absl::StatusCode::kNotFound) << ops[1].result.status();
  EXPECT_EQ(ops[1].result.status().message(), msg);
  ASSERT_TRUE(imp_.WaitInvals(2));
  const auto invals = imp_.invals();
  ASSERT_EQ(invals.size(), 2u);
  EXPECT_EQ(invals[0].first_page, 0u);
  EXPECT_EQ(invals[0].seq, 5u);
  EXPECT_EQ(invals[1].first_page, 1u);
  EXPECT_EQ(invals[1].seq, 6u);
  for (uint64_t seq : {5u, 6u}) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(ReadFrame(raw.fd(), &h, &payload).ok());
    ASSERT_EQ(h.type, static_cast<uint8_t>(FrameType::kInvalAck));
    InvalAckPayload a;
    ASSERT_EQ(payload.size(), sizeof(a));
    std::memcpy(&a, payload.data(), sizeof(a));
    EXPECT_EQ(a.seq, seq);
  }
  EXPECT_TRUE((*ch)->alive());
}

// tcp: a fetch issued while the importer's reader sleeps with nothing
// outstanding still fails at its own deadline: the reader sleeps at most
// the previous batch's timeout (here 10 s) and is woken for a batch due
// earlier.
TEST_P(TcpWireTest, AFetchIssuedWhileTheReaderIsIdleFailsAtItsOwnDeadline) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_TRUE(Fetch(ch, 1, 0, 1, nullptr, true, Scaled(absl::Seconds(10))).ok());
  absl::SleepFor(absl::Milliseconds(50));  // the reader is asleep again
  exp_.Block();
  const absl::Duration timeout = absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  auto r = Fetch(ch, 1, 0, 1, nullptr, true, timeout);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_LT(took, timeout + Scaled(absl::Milliseconds(500))) << "took " << took;
  exp_.Release();
}

INSTANTIATE_TEST_SUITE_P(Tcp, TcpWireTest, ::testing::Values(kTcp), KindName);

// ----------------------------------------- rdma's in-band HELLO, natively

std::vector<uint8_t> HelloPayload(uint64_t addr, uint64_t len, uint32_t rkey, uint32_t pad,
                                  const std::string& token) {
  RdmaHelloPayload p{addr, len, rkey, pad};
  std::vector<uint8_t> out(sizeof(p) + token.size());
  std::memcpy(out.data(), &p, sizeof(p));
  std::memcpy(out.data() + sizeof(p), token.data(), token.size());
  return out;
}

// A channel that only counts landing registrations; refuse: they fail.
class CountingChannel final : public PeerChannel {
 public:
  explicit CountingChannel(bool refuse) : PeerChannel(Capabilities{}), refuse_(refuse) {}
  void FetchVAsync(absl::Span<FetchOp>, absl::Duration, FetchDone done) override { std::move(done)(); }
  absl::StatusOr<std::unique_ptr<LandingArea>> RegisterLanding(void* addr, size_t len, LandingUse use) override {
    ++registrations;
    last_addr = addr;
    last_len = len;
    last_use = use;
    if (refuse_) return absl::FailedPreconditionError("refused");
    return std::make_unique<LandingArea>();
  }
  bool alive() const override { return true; }
  void Close() override {}
  const char* path() const override { return "counting"; }
  int registrations = 0;
  void* last_addr = nullptr;
  size_t last_len = 0;
  LandingUse last_use = LandingUse::kFetches;

 private:
  const bool refuse_;
};

// A session's data area is registered once per channel it is read over,
// with its own extent and use; a refusal is remembered (not asked again on
// every read); a channel that is gone loses its entry, and a new channel
// gets a registration of its own.
TEST(LandingAreasTest, OneRegistrationPerChannelAndRefusalsAreRemembered) {
  alignas(4096) static uint8_t mem[4 * 4096];
  LandingAreas areas(mem, sizeof(mem), LandingUse::kReads);
  EXPECT_EQ(areas.For(nullptr), nullptr);
  auto a = std::make_shared<CountingChannel>(/*refuse=*/false);
  const LandingArea* first = areas.For(a);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(areas.For(a), first);
  EXPECT_EQ(a->registrations, 1);
  EXPECT_EQ(a->last_addr, mem);
  EXPECT_EQ(a->last_len, sizeof(mem));
  EXPECT_EQ(a->last_use, LandingUse::kReads);
  auto refusing = std::make_shared<CountingChannel>(/*refuse=*/true);
  EXPECT_EQ(areas.For(refusing), nullptr);
  EXPECT_EQ(areas.For(refusing), nullptr);
  EXPECT_EQ(refusing->registrations, 1) << "a refusal was asked for again";
  // The channel goes; its successor registers anew.
  a.reset();
  auto b = std::make_shared<CountingChannel>(/*refuse=*/false);
  EXPECT_NE(areas.For(b), nullptr);
  EXPECT_EQ(b->registrations, 1);
  EXPECT_EQ(areas.For(b), areas.For(b));
  EXPECT_EQ(b->registrations, 1);
}

TEST(RdmaHelloTest, RoundTripsThroughTheFrameBuilder) {
  const RdmaHello in{0x7f0012340000, 8 << 20, 0xabcd, std::string(16, '\x5a')};
  auto frame = MakeRdmaHello(in, 512);
  ASSERT_TRUE(frame.ok()) << frame.status();
  auto m = SplitMessage(absl::MakeConstSpan(*frame), 512);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->header.type, static_cast<uint8_t>(FrameType::kHello));
  auto out = ParseRdmaHello(m->payload);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->area_addr, in.area_addr);
  EXPECT_EQ(out->area_len, in.area_len);
  EXPECT_EQ(out->rkey, in.rkey);
  EXPECT_EQ(out->token, in.token);
}

TEST(RdmaHelloTest, MalformedHellosAreRefusedWithAnError) {
  const std::string tok(16, 't');
  struct Case {
    const char* what;
    std::vector<uint8_t> payload;
  };
  constexpr uint32_t v = kRdmaProtocolVersion;
  const std::vector<uint8_t> good = HelloPayload(4096, 4096, 1, v, tok);
  for (const Case& c : std::vector<Case>{
           {"empty", {}},
           {"keepalive-sized", std::vector<uint8_t>(good.begin(), good.begin() + 23)},
           {"no token", HelloPayload(4096, 4096, 1, v, "")},
           {"token too long", HelloPayload(4096, 4096, 1, v, std::string(kMaxTokenBytes + 1, 't'))},
           {"empty area", HelloPayload(4096, 0, 1, v, tok)},
           {"area wraps", HelloPayload(UINT64_MAX - 4095, 8192, 1, v, tok)},
       }) {
    auto h = ParseRdmaHello(absl::MakeConstSpan(c.payload));
    EXPECT_TRUE(absl::IsDataLoss(h.status())) << c.what << ": " << h.status();
  }
  EXPECT_TRUE(ParseRdmaHello(absl::MakeConstSpan(good)).ok());
  // A peer of another protocol version (1 sent 0 in the field) is refused
  // with both versions named.
  for (uint32_t other : {0u, 1u, 3u}) {
    auto h = ParseRdmaHello(absl::MakeConstSpan(HelloPayload(4096, 4096, 1, other, tok)));
    EXPECT_TRUE(absl::IsFailedPrecondition(h.status())) << other << ": " << h.status();
    EXPECT_TRUE(absl::StrContains(h.status().message(), absl::StrCat("version ", other == 0 ? 1 : other)))
        << h.status();
    EXPECT_TRUE(absl::StrContains(h.status().message(), absl::StrCat("speaks version ", v))) << h.status();
  }
  // The builder refuses what the parser would, and never cuts a token.
  EXPECT_FALSE(MakeRdmaHello(RdmaHello{4096, 0, 1, tok}, 512).ok());
  EXPECT_FALSE(MakeRdmaHello(RdmaHello{4096, 4096, 1, ""}, 512).ok());
  EXPECT_FALSE(MakeRdmaHello(RdmaHello{4096, 4096, 1, tok}, sizeof(FrameHeader) + 30).ok());
}

// The exporter's parser of an established importer's FETCH: exactly the
// fixed payload, padding 0, a target that does not wrap.
TEST(RdmaFetchTest, MalformedFetchesAreRefusedWithAnError) {
  RdmaFetchPayload good{{1, 2, 3, 0}, 0x7f0000000000, 0x42, 0};
  auto bytes = [](const RdmaFetchPayload& f) {
    std::vector<uint8_t> b(sizeof(f));
    std::memcpy(b.data(), &f, sizeof(f));
    return b;
  };
  auto ok = ParseRdmaFetch(absl::MakeConstSpan(bytes(good)));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->addr, good.addr);
  EXPECT_EQ(ok->rkey, good.rkey);
  EXPECT_EQ(ok->f.npages, 3u);
  std::vector<uint8_t> short_one = bytes(good);
  short_one.resize(32);  // a version-1 FETCH
  RdmaFetchPayload padded = good;
  padded.pad = 1;
  RdmaFetchPayload wraps = good;
  wraps.addr = UINT64_MAX - 4095;
  for (const auto& b : {short_one, bytes(padded), bytes(wraps), std::vector<uint8_t>()}) {
    EXPECT_TRUE(absl::IsDataLoss(ParseRdmaFetch(absl::MakeConstSpan(b)).status()));
  }
}

TEST(RdmaHelloTest, MessagesAreSplitOnlyWhenWhole) {
  auto frame = MakeRdmaHello(RdmaHello{4096, 4096, 1, "tok"}, 512);
  ASSERT_TRUE(frame.ok());
  std::vector<uint8_t> bytes = *frame;
  EXPECT_TRUE(SplitMessage(absl::MakeConstSpan(bytes), 512).ok());
  EXPECT_TRUE(absl::IsDataLoss(SplitMessage(absl::MakeConstSpan(bytes), 40).status()));
  EXPECT_TRUE(absl::IsDataLoss(
      SplitMessage(absl::MakeConstSpan(bytes).subspan(0, bytes.size() - 1), 512).status()));
  EXPECT_TRUE(absl::IsDataLoss(SplitMessage(absl::MakeConstSpan(bytes).subspan(0, 31), 512).status()));
  bytes.push_back(0);
  EXPECT_TRUE(absl::IsDataLoss(SplitMessage(absl::MakeConstSpan(bytes), 512).status()));
  bytes.pop_back();
  bytes[0] ^= 1;  // magic
  EXPECT_TRUE(absl::IsDataLoss(SplitMessage(absl::MakeConstSpan(bytes), 512).status()));
}

// ------------------------------------- rdma only: queue pairs, zero copy

using RdmaOnlyTest = TransportTest;

TEST_P(RdmaOnlyTest, TokensAndEndpointsAreCheckedAndOneTime) {
  auto setup = Prepare("n");
  ASSERT_TRUE(setup.ok()) << setup.status();
  // A token of another session: the exporter refuses the HELLO on this
  // session's queue pair.
  auto other = Prepare("n");
  ASSERT_TRUE(other.ok()) << other.status();
  SessionOffer forged = setup->offer;
  forged.token = other->offer.token;
  auto ch = Connect(forged, setup->begin);
  EXPECT_TRUE(absl::IsUnavailable(ch.status())) << ch.status();
  // The importer's endpoint is checked by the exporter...
  EXPECT_FALSE(exporter_->PrepareSession("n", "").ok());
  EXPECT_FALSE(exporter_->PrepareSession("n", "garbage").ok());
  EXPECT_FALSE(exporter_->PrepareSession("n", kRdma.foreign_endpoint()).ok());
  // ... and a Connect needs the BeginConnect its offer was made for.
  auto unknown = Connect(other->offer, "not begun");
  EXPECT_TRUE(absl::IsFailedPrecondition(unknown.status())) << unknown.status();
}

// Shared anonymous memory of len bytes filled with a pattern of seed,
// registered by the exporter (the zero-copy path) and described for the
// channel's protection key ("": no TLS), as export 7's region.
struct TestRegion {
  uint8_t* bytes = nullptr;
  size_t len = 0;
  std::unique_ptr<RegisteredRegion> region;
  RemoteRegion remote;
  TestRegion() = default;
  TestRegion(const TestRegion&) = delete;
  TestRegion& operator=(const TestRegion&) = delete;
  ~TestRegion() {
    region.reset();  // deregistered before the memory goes
    if (bytes != nullptr) ::munmap(bytes, len);
  }
};

absl::StatusOr<std::unique_ptr<TestRegion>> MakeTestRegion(Transport& exporter, size_t len, unsigned seed) {
  auto t = std::make_unique<TestRegion>();
  void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return absl::InternalError("mmap");
  t->bytes = static_cast<uint8_t*>(mem);
  t->len = len;
  for (size_t i = 0; i < len; ++i) t->bytes[i] = static_cast<uint8_t>(i * seed + i / 4093);
  auto region = exporter.RegisterRegion(mem, len);
  if (!region.ok()) return region.status();
  t->region = std::move(*region);
  auto mine = t->region->RemoteFor("");  // the channel's protection key
  if (!mine.ok()) return mine.status();
  t->remote = *mine;
  t->remote.len = len;
  return t;
}

// Zero-copy: a region registered by the exporter is read by the importer
// with one-sided READs (no exporter backend call), byte-exact at unaligned
// offsets and across several slots; a non-write invalidation drops it
// before it is delivered, and a region described before that invalidation
// is refused.
TEST_P(RdmaOnlyTest, RegisteredRegionIsReadOneSidedAndDroppedByInvalidations) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("zc", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  constexpr size_t kLen = 3 * 1024 * 1024 + 5 * kPageSize;  // > 3 slots
  auto t = MakeTestRegion(*exporter_, kLen, 31);
  ASSERT_TRUE(t.ok()) << t.status();
  const uint8_t* bytes = (*t)->bytes;
  const RemoteRegion r = (*t)->remote;
  std::vector<uint8_t> buf(kLen);
  EXPECT_TRUE(absl::IsFailedPrecondition(ch->ReadRegion(7, 0, absl::MakeSpan(buf), absl::Seconds(5))));
  ASSERT_TRUE(ch->SetRegion(7, r, /*seq=*/3));
  const size_t fetches = exp_.calls().size();
  for (auto [off, len] : std::vector<std::pair<size_t, size_t>>{
           {0, kLen}, {100, 1}, {4095, 2}, {12345, 2 * 1024 * 1024 + 777}, {kLen - 9, 9}}) {
    std::vector<uint8_t> got(len);
    uint64_t copied = 1;
    ASSERT_TRUE(ch->ReadRegion(7, off, absl::MakeSpan(got), Scaled(absl::Seconds(10)), &copied).ok()) << off;
    ASSERT_EQ(std::memcmp(got.data(), bytes + off, len), 0) << "offset " << off << " length " << len;
    // Read into the receive slots and copied out (counted).
    EXPECT_EQ(copied, len) << "offset " << off;
  }
  EXPECT_EQ(exp_.calls().size(), fetches) << "a zero-copy read reached the exporter's backend";
  std::vector<uint8_t> past(10);
  EXPECT_TRUE(absl::IsOutOfRange(ch->ReadRegion(7, kLen - 5, absl::MakeSpan(past), absl::Seconds(5))));

  // A write keeps the region; anything else drops it before delivery.
  ASSERT_TRUE(sub->PushInvalidation(InvalRecord{7, 0, 1, 4, source::ChangeKind::kWrite, 0}));
  ASSERT_TRUE(imp_.WaitInvals(1));
  EXPECT_TRUE(ch->ReadRegion(7, 0, absl::MakeSpan(past), absl::Seconds(5)).ok());
  ASSERT_TRUE(sub->PushInvalidation(InvalRecord{7, 0, 1, 5, source::ChangeKind::kUnmap, 0}));
  ASSERT_TRUE(imp_.WaitInvals(2));
  EXPECT_TRUE(absl::IsFailedPrecondition(ch->ReadRegion(7, 0, absl::MakeSpan(past), absl::Seconds(5))));
  EXPECT_FALSE(ch->SetRegion(7, r, /*seq=*/4)) << "a region older than the drop was accepted";
  EXPECT_TRUE(ch->SetRegion(7, r, /*seq=*/5));
  EXPECT_TRUE(ch->ReadRegion(7, 0, absl::MakeSpan(past), absl::Seconds(5)).ok());
}

// Protection: a region is readable only through the connections of the
// protection key it was opened for. A peer that presents another key's
// rkey and address (learned or guessed), or the probe registration's, has
// its READ refused by the device (its queue pair is in another protection
// domain), loses that connection, and reads nothing; the rightful peer's
// connection is untouched.
TEST_P(RdmaOnlyTest, ARegionIsReadableOnlyByThePeerItWasOpenedFor) {
  PeerChannel* a = Open("node-a", nullptr, nullptr, "peer-a");
  ASSERT_NE(a, nullptr);
  constexpr size_t kLen = 64 * kPageSize;
  void* mem = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  absl::Cleanup unmap = [&] { munmap(mem, kLen); };
  auto* bytes = static_cast<uint8_t*>(mem);
  for (size_t i = 0; i < kLen; ++i) bytes[i] = static_cast<uint8_t>(i * 7 + 1);
  auto region = exporter_->RegisterRegion(mem, kLen);
  ASSERT_TRUE(region.ok()) << region.status();
  auto for_a = (*region)->RemoteFor("peer-a");
  ASSERT_TRUE(for_a.ok()) << for_a.status();
  auto again = (*region)->RemoteFor("peer-a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->rkey, for_a->rkey) << "registered once per key";
  auto for_b = (*region)->RemoteFor("peer-b");
  ASSERT_TRUE(for_b.ok()) << for_b.status();
  EXPECT_NE(for_b->rkey, for_a->rkey);

  std::vector<uint8_t> got(kLen);
  ASSERT_TRUE(a->SetRegion(7, *for_a, 1));
  ASSERT_TRUE(a->ReadRegion(7, 0, absl::MakeSpan(got), Scaled(absl::Seconds(10))).ok());
  ASSERT_EQ(std::memcmp(got.data(), bytes, kLen), 0);

  // Each intruder uses a connection of its own: a refused READ ends it.
  struct Intruder {
    const char* what;
    std::string key;
    RemoteRegion presents;
  };
  for (const Intruder& in : {Intruder{"peer-b presenting peer-a's rkey", "peer-b", *for_a},
                             Intruder{"an anonymous peer presenting peer-a's rkey", "", *for_a},
                             Intruder{"peer-b presenting the probe's rkey", "peer-b", (*region)->remote()},
                             Intruder{"peer-a presenting peer-b's rkey", "peer-a", *for_b}}) {
    SCOPED_TRACE(in.what);
    PeerChannel* x = Open("intruder", nullptr, nullptr, in.key);
    ASSERT_NE(x, nullptr);
    ASSERT_TRUE(x->SetRegion(7, in.presents, 1));
    std::vector<uint8_t> stolen(kLen, 0);
    absl::Status st = x->ReadRegion(7, 0, absl::MakeSpan(stolen), Scaled(absl::Seconds(10)));
    EXPECT_FALSE(st.ok()) << "the READ crossed protection domains";
    EXPECT_NE(std::memcmp(stolen.data(), bytes, kLen), 0) << "the intruder read the region";
  }
  // peer-a's connection is untouched and still reads.
  std::fill(got.begin(), got.end(), 0);
  ASSERT_TRUE(a->ReadRegion(7, 0, absl::MakeSpan(got), Scaled(absl::Seconds(10))).ok());
  EXPECT_EQ(std::memcmp(got.data(), bytes, kLen), 0);
  region->reset();
}

// Zero-copy reads are asynchronous: one thread puts more reads in flight
// than the connection has receive slots (each read spans several), none
// waits for another, and every one completes byte-exact, the later ones
// issued as the earlier ones free their slots.
TEST_P(RdmaOnlyTest, ManyZeroCopyReadsFromOneThreadQueueForSlots) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("zc", &sub);
  ASSERT_NE(ch, nullptr);
  constexpr size_t kLen = 4 * 1024 * 1024;
  auto t = MakeTestRegion(*exporter_, kLen, 13);
  ASSERT_TRUE(t.ok()) << t.status();
  const uint8_t* bytes = (*t)->bytes;
  ASSERT_TRUE(ch->SetRegion(7, (*t)->remote, /*seq=*/3));
  constexpr int kReads = 24;  // x 2 slots each, against 8 slots
  struct Result {
    absl::Notification done;
    absl::Status st;
    std::vector<uint8_t> got;
  };
  // Shared with the callbacks: a read still in flight when an assertion
  // ends the test writes into memory that still exists.
  auto res = std::make_shared<std::vector<Result>>(kReads);
  auto off_of = [](int i) { return static_cast<uint64_t>(i) * 131072 + 77; };  // unaligned: the slots
  for (int i = 0; i < kReads; ++i) {
    (*res)[i].got.resize(1024 * 1024 + 5);
    ch->ReadRegionAsync(7, off_of(i), absl::MakeSpan((*res)[i].got), Scaled(absl::Seconds(20)), nullptr,
                        [res, i](absl::Status st, uint64_t) {
                          (*res)[i].st = std::move(st);
                          (*res)[i].done.Notify();
                        });
  }
  for (int i = 0; i < kReads; ++i) {
    Result& r = (*res)[i];
    ASSERT_TRUE(r.done.WaitForNotificationWithTimeout(Scaled(absl::Seconds(30)))) << "read " << i;
    ASSERT_TRUE(r.st.ok()) << i << ": " << r.st;
    ASSERT_EQ(std::memcmp(r.got.data(), bytes + off_of(i), r.got.size()), 0) << "read " << i;
  }
  EXPECT_TRUE(ch->alive());
}

// Zero-copy READs into memory registered for reads (a session's data area,
// LandingUse::kReads): on an ODP device a READ of whole pages lands in dst
// itself (nothing copied), byte-exact across several slots; a read that
// starts or ends inside a page still goes through the slots. The area
// grants no remote access, so a fetch handed it lands in a slot as before
// (never a WRITE the device would refuse). A pinned device refuses the area.
TEST_P(RdmaOnlyTest, ReadsLandInAnAreaRegisteredForReads) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("zc", &sub);
  ASSERT_NE(ch, nullptr);
  constexpr size_t kLen = 2 * 1024 * 1024 + 3 * kPageSize;  // > 2 slots
  auto t = MakeTestRegion(*exporter_, kLen, 17);
  ASSERT_TRUE(t.ok()) << t.status();
  const uint8_t* bytes = (*t)->bytes;
  ASSERT_TRUE(ch->SetRegion(7, (*t)->remote, /*seq=*/3));

  UniqueFd fd(::memfd_create("svm-read-area-test", MFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(kLen)), 0);
  void* m = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(m, MAP_FAILED);
  absl::Cleanup unmap = [&] { ::munmap(m, kLen); };
  auto* area_mem = static_cast<uint8_t*>(m);
  const bool odp = absl::EndsWith(ch->path(), "/odp");
  if (const char* e = std::getenv("SVM_EXPECT_ODP"); e != nullptr && *e != '\0') {
    ASSERT_EQ(odp, std::string(e) == "1") << ch->path();
  }
  auto area = ch->RegisterLanding(area_mem, kLen, LandingUse::kReads);
  if (!odp) {
    EXPECT_TRUE(absl::IsFailedPrecondition(area.status())) << area.status();
    return;
  }
  ASSERT_TRUE(area.ok()) << area.status();
  // Whole pages: the READs write the area itself.
  for (auto [off, len] : std::vector<std::pair<size_t, size_t>>{{0, kLen}, {kPageSize, kPageSize}, {5 * kPageSize, 1024 * 1024}}) {
    std::memset(area_mem, 0, kLen);
    uint64_t copied = 1;
    ASSERT_TRUE(ch->ReadRegion(7, off, absl::MakeSpan(area_mem + off, len), Scaled(absl::Seconds(10)), &copied,
                               area->get())
                    .ok())
        << off;
    ASSERT_EQ(std::memcmp(area_mem + off, bytes + off, len), 0) << "offset " << off << " length " << len;
    EXPECT_EQ(copied, 0u) << "offset " << off << ": a READ of whole pages into the area was copied";
  }
  // Inside a page: the slots, copied out.
  uint64_t copied = 0;
  ASSERT_TRUE(ch->ReadRegion(7, 100, absl::MakeSpan(area_mem + 100, 3 * kPageSize), Scaled(absl::Seconds(10)),
                             &copied, area->get())
                  .ok());
  EXPECT_EQ(std::memcmp(area_mem + 100, bytes + 100, 3 * kPageSize), 0);
  EXPECT_EQ(copied, 3 * kPageSize);
  // A fetch is not written into an area the exporter has no access to.
  FetchOp op;
  op.export_id = 1;
  op.first_page = 0;
  op.npages = 4;
  op.dst = absl::MakeSpan(area_mem, 4 * kPageSize);
  op.area = area->get();
  ch->FetchV(absl::MakeSpan(&op, 1), Scaled(absl::Seconds(20)));
  ASSERT_TRUE(op.result.ok()) << op.result.status();
  EXPECT_TRUE(PagesAre(std::vector<uint8_t>(area_mem, area_mem + 4 * kPageSize), 1, 0));
  EXPECT_EQ(op.transport_copied, 4 * kPageSize);
  EXPECT_TRUE(ch->alive());
}

// Fetches into the importer's shared cache file (a memfd that svmd maps
// read-write and clients map read-only) through one landing area: on an
// ODP device the exporter's WRITEs land in the file's pages themselves (the
// transport copies nothing), and after pages are punched out of the file
// (an invalidation) the next fetch lands in the file again: a client's
// mapping sees the new bytes, not zeros (a pinned registration would keep
// writing the punched-out pages). A pinned device refuses the area and
// copies from its receive slots.
TEST_P(RdmaOnlyTest, FetchesLandInTheCacheFileAndFollowItsPunches) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  constexpr uint64_t kPages = 600;  // more than two receive slots
  const size_t len = kPages * kPageSize;
  UniqueFd fd(::memfd_create("svm-landing-test", MFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(len)), 0);
  void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(m, MAP_FAILED);
  void* cm = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd.get(), 0);  // a client's view
  ASSERT_NE(cm, MAP_FAILED);
  absl::Cleanup unmap = [&] {
    ::munmap(m, len);
    ::munmap(cm, len);
  };
  auto* base = static_cast<uint8_t*>(m);
  const auto* client = static_cast<const uint8_t*>(cm);
  const bool odp = std::string(ch->path()) == "staged/odp";
  if (const char* e = std::getenv("SVM_EXPECT_ODP"); e != nullptr && *e != '\0') {
    ASSERT_EQ(odp, std::string(e) == "1") << ch->path();
  }
  auto area = ch->RegisterLanding(base, len);
  if (odp) {
    ASSERT_TRUE(area.ok()) << area.status();
  } else {
    EXPECT_TRUE(absl::IsFailedPrecondition(area.status())) << area.status();
  }
  const LandingArea* a = area.ok() ? area->get() : nullptr;
  auto fetch_into = [&](uint64_t id, uint64_t page, uint32_t n) {
    FetchOp op;
    op.export_id = id;
    op.first_page = page;
    op.npages = n;
    op.track = true;
    op.dst = absl::MakeSpan(base + page * kPageSize, n * kPageSize);
    op.area = a;
    ch->FetchV(absl::MakeSpan(&op, 1), Scaled(absl::Seconds(20)));
    return op;
  };
  auto client_sees = [&](uint64_t id, uint64_t page, uint64_t n) {
    return PagesAre(std::vector<uint8_t>(client + page * kPageSize, client + (page + n) * kPageSize), id, page);
  };
  // One page, one slot's worth, and more than a slot, at page offsets
  // across the file.
  for (auto [page, n] : std::vector<std::pair<uint64_t, uint32_t>>{{0, 1}, {1, 256}, {257, 343}}) {
    FetchOp op = fetch_into(1, page, n);
    ASSERT_TRUE(op.result.ok()) << page << ": " << op.result.status();
    EXPECT_TRUE(client_sees(1, page, n)) << "pages " << page << "+" << n;
    EXPECT_EQ(op.transport_copied, odp ? 0u : uint64_t{n} * kPageSize) << "pages " << page << "+" << n;
  }
  // An invalidation punches pages out; the refetch (other content) lands in
  // the file, and what was not punched is unchanged.
  ASSERT_EQ(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 * kPageSize, 300 * kPageSize), 0);
  FetchOp op = fetch_into(2, 1, 300);
  ASSERT_TRUE(op.result.ok()) << op.result.status();
  EXPECT_TRUE(client_sees(2, 1, 300)) << "a fetch after a punch did not land in the file";
  EXPECT_TRUE(client_sees(1, 0, 1));
  EXPECT_TRUE(client_sees(1, 301, kPages - 301));
  EXPECT_EQ(op.transport_copied, odp ? 0u : 300 * kPageSize);
  EXPECT_TRUE(ch->alive());
}

// The exporter copies pages off the completion path: while one copy is
// stuck in the backend (a page fault in the exporting process, here a hook
// that waits to be released), the same connection still answers a second
// FETCH and delivers an invalidation and its acknowledgement; the stuck
// fetch then completes with its own bytes.
TEST_P(RdmaOnlyTest, ASlowCopyDoesNotStallTheConnection) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  absl::Notification entered, release;
  // Released on every path, so a failure cannot leave the copy blocked.
  absl::Cleanup unblock = [&] {
    if (!release.HasBeenNotified()) release.Notify();
  };
  exp_.OnNextFetch([&] {
    entered.Notify();
    release.WaitForNotificationWithTimeout(Scaled(absl::Seconds(20)));
  });
  std::vector<uint8_t> slow_pages;
  auto slow = std::async(std::launch::async, [&] {
    return Fetch(ch, 1, 0, 2, &slow_pages, true, Scaled(absl::Seconds(20)));
  });
  ASSERT_TRUE(entered.WaitForNotificationWithTimeout(Scaled(absl::Seconds(5))));

  std::vector<uint8_t> pages;
  auto fast = Fetch(ch, 2, 5, 3, &pages, true, Scaled(absl::Seconds(5)));
  ASSERT_TRUE(fast.ok()) << "a second fetch waited for the blocked copy: " << fast.status();
  EXPECT_TRUE(PagesAre(pages, 2, 5));
  ASSERT_TRUE(sub->PushInvalidation({3, 0, 1, 9, ChangeKind::kUnmap, 0}));
  EXPECT_TRUE(imp_.WaitInvals(1)) << "an invalidation waited for the blocked copy";
  EXPECT_TRUE(exp_.WaitAcks(1)) << "an acknowledgement waited for the blocked copy";
  EXPECT_EQ(slow.wait_for(std::chrono::seconds(0)), std::future_status::timeout)
      << "the blocked fetch was answered before its copy finished";

  release.Notify();
  auto r = slow.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(PagesAre(slow_pages, 1, 0));
  EXPECT_TRUE(ch->alive());
}

// The rdma exporter serves 2 FETCHes at a time per connection (its staging
// buffers); the others wait in the connection, and those are what
// --max-pending-fetches-per-peer counts (AdmitFetch sees how many wait).
// Past the limit a FETCH is answered RESOURCE_EXHAUSTED at once instead of
// waiting; the admitted ones are served when the copies go on, and the
// connection stays up.
TEST_P(RdmaOnlyTest, FetchesWaitingForAStagingBufferArePendingFetches) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.max_pending = 2;
  exp_.Block();
  absl::Cleanup unblock = [&] { exp_.Release(); };
  constexpr int kOps = 8;  // the importer's receive slots: all on the wire at once
  std::vector<std::vector<uint8_t>> bufs(kOps, std::vector<uint8_t>(kPageSize));
  std::vector<FetchOp> ops(kOps);
  for (int i = 0; i < kOps; ++i) {
    ops[i].export_id = 1;
    ops[i].first_page = i;
    ops[i].npages = 1;
    ops[i].dst = absl::MakeSpan(bufs[i]);
  }
  auto pending = std::async(std::launch::async,
                            [&] { ch->FetchV(absl::MakeSpan(ops), Scaled(absl::Seconds(20))); });
  ASSERT_TRUE(exp_.WaitBlocked(2)) << "both staging buffers copying";
  // Release only once every FETCH has reached the exporter and been
  // decided: the last 4 refused. Releasing when the first was refused let
  // the copies drain the queue before the later ones arrived (seen on a
  // loaded machine: 5 and 6 admitted).
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  while (exp_.refused.load() < kOps - 4 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(exp_.max_pending_seen.load(), 2u) << "admission saw the FETCHes waiting";
  EXPECT_EQ(exp_.refused.load(), kOps - 4) << "the FETCHes past the limit were refused while the copies were blocked";
  exp_.Release();
  pending.get();
  // 2 copying, 2 waiting (admitted at 0 and 1 waiting), 4 refused at 2.
  for (int i = 0; i < kOps; ++i) {
    if (i < 4) {
      ASSERT_TRUE(ops[i].result.ok()) << i << ": " << ops[i].result.status();
      EXPECT_TRUE(PagesAre(bufs[i], 1, i)) << i;
    } else {
      EXPECT_EQ(ops[i].result.status().code(), absl::StatusCode::kResourceExhausted)
          << i << ": " << ops[i].result.status();
    }
  }
  EXPECT_EQ(exp_.calls().size(), 4u) << "a refused fetch is not served";
  EXPECT_TRUE(ch->alive());
}

// Threads do not grow with connections: one completion context (CQ and
// thread) per device serves every queue pair on it, and it also watches
// the liveness sockets. Opening 8 more connections, each used, adds at most
// a couple of threads (transient ones of the liveness listener), where a
// thread per connection side would add 16 or more.
TEST_P(RdmaOnlyTest, ManyConnectionsShareOneCompletionThread) {
  auto threads = [] {
    int n = 0;
    for (auto& e : std::filesystem::directory_iterator("/proc/self/task")) n += e.exists() ? 1 : 0;
    return n;
  };
  // Warm up: the contexts, the copy worker, the listener exist.
  PeerChannel* first = Open("warm");
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(Fetch(first, 1, 0, 1).ok());
  absl::SleepFor(Scaled(absl::Milliseconds(200)));
  const int before = threads();
  std::vector<PeerChannel*> chs;
  for (int i = 0; i < 8; ++i) {
    PeerChannel* ch = Open(absl::StrCat("n", i));
    ASSERT_NE(ch, nullptr);
    std::vector<uint8_t> got;
    ASSERT_TRUE(Fetch(ch, 2, i, 1, &got).ok());
    EXPECT_TRUE(PagesAre(got, 2, i));
    chs.push_back(ch);
  }
  // The listener's threads hand their socket over and end.
  int after = threads();
  for (absl::Time end = absl::Now() + Scaled(absl::Seconds(2)); after > before + 2 && absl::Now() < end;) {
    absl::SleepFor(absl::Milliseconds(20));
    after = threads();
  }
  std::printf("# threads: %d before 8 more connections, %d after\n", before, after);
  EXPECT_LE(after, before + 2);
  for (PeerChannel* ch : chs) EXPECT_TRUE(ch->alive());
}

INSTANTIATE_TEST_SUITE_P(Rdma, RdmaOnlyTest, ::testing::Values(kRdma), KindName);

}  // namespace
}  // namespace svm::transport
