// daemon/transport/tcp_transport end to end in one process: an exporter
// transport on 127.0.0.1:0 with a fake ExportBackend, an importer transport
// connecting to it with a fake ImportBackend. Hermetic: loopback only.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <future>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/fd.h"
#include "common/net.h"
#include "daemon/transport/frame.h"
#include "daemon/transport/transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace svm::source {
// Readable kinds in failure messages.
void PrintTo(ChangeKind k, std::ostream* os) { *os << ChangeKindName(k); }
}  // namespace svm::source

namespace svm::transport {
namespace {

using source::ChangeKind;
using source::kPageSize;

// The byte every byte of page `page` of export `id` carries.
uint8_t FillOf(uint64_t id, uint64_t page) { return static_cast<uint8_t>(id * 7 + page * 3 + 1); }

// ------------------------------------------------------------------ fakes

class FakeExportBackend final : public ExportBackend {
 public:
  struct Call {
    uint64_t export_id, first_page;
    uint32_t npages;
    bool track;
  };
  struct Ack {
    uint64_t sub, export_id, seq;
  };

  absl::StatusOr<uint64_t> ServeFetch(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                      bool track, absl::Span<uint8_t> dst) override {
    std::function<void()> hook;
    {
      absl::MutexLock l(&mu_);
      calls_.push_back({export_id, first_page, npages, track});
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
  // Runs once, on the connection's reader thread, inside the next ServeFetch.
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
  bool WaitBlocked(int n, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocked_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitAcks(size_t n, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return acks_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosed(uint64_t sub, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return std::find(closed_.begin(), closed_.end(), sub) != closed_.end();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosedCount(size_t n, absl::Duration timeout = absl::Seconds(2)) {
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
  bool WaitInvals(size_t n, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return invals_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosed(PeerChannel* ch, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (auto& c : closed_) {
        if (c.first == ch) return true;
      }
      return false;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
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

// A raw TCP client, for feeding the exporter bytes no importer would send.
UniqueFd RawConnect(uint16_t port) {
  auto fd = TcpConnect(HostPort{"127.0.0.1", port}, absl::Seconds(2));
  EXPECT_TRUE(fd.ok()) << fd.status();
  if (!fd.ok()) return UniqueFd();
  timeval tv{3, 0};
  ::setsockopt(fd->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return std::move(*fd);
}

std::vector<uint8_t> RawFrame(FrameType t, const void* payload, size_t len) {
  FrameHeader h;
  h.type = static_cast<uint8_t>(t);
  h.payload_len = static_cast<uint32_t>(len);
  std::vector<uint8_t> out(sizeof(h) + len);
  std::memcpy(out.data(), &h, sizeof(h));
  if (len) std::memcpy(out.data() + sizeof(h), payload, len);
  return out;
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

// ---------------------------------------------------------------- fixture

class TcpTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    exporter_ = CreateTcpTransport();
    ASSERT_STREQ(exporter_->name(), "tcp");
    ASSERT_TRUE(exporter_->Start(HostPort{"127.0.0.1", 0}, &exp_).ok());
    importer_ = CreateTcpTransport();
  }
  void TearDown() override {
    exp_.Release();
    imp_.Release();
    channels_.clear();
    exporter_->Stop();
  }

  uint16_t port() {
    auto s = exporter_->PrepareSession("probe");
    return s.ok() ? static_cast<uint16_t>(s->tcp().port()) : 0;
  }

  // Opens a data connection; returns the channel (owned by the fixture)
  // and the exporter's view of it.
  PeerChannel* Open(const std::string& node, std::shared_ptr<Subscriber>* sub = nullptr,
                    std::string* token = nullptr) {
    auto setup = exporter_->PrepareSession(node);
    EXPECT_TRUE(setup.ok()) << setup.status();
    if (!setup.ok()) return nullptr;
    auto ch = importer_->Connect("127.0.0.1", *setup, &imp_);
    EXPECT_TRUE(ch.ok()) << ch.status();
    if (!ch.ok()) return nullptr;
    if (sub) *sub = exporter_->FindSubscriber(setup->session_token());
    if (token) *token = setup->session_token();
    channels_.push_back(std::move(*ch));
    return channels_.back().get();
  }

  static void ExpectPages(const std::vector<uint8_t>& buf, uint64_t id, uint64_t first) {
    for (size_t i = 0; i < buf.size(); ++i) {
      const uint8_t want = FillOf(id, first + i / kPageSize);
      if (buf[i] != want) {
        ADD_FAILURE() << "byte " << i << " is " << int{buf[i]} << ", want " << int{want};
        return;
      }
    }
  }

  absl::StatusOr<uint64_t> Fetch(PeerChannel* ch, uint64_t id, uint64_t first, uint32_t n,
                                 std::vector<uint8_t>* out = nullptr, bool track = true,
                                 absl::Duration timeout = absl::Seconds(5)) {
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

// ------------------------------------------------------------------ tests

TEST_F(TcpTransportTest, ListensOnAnEphemeralPort) {
  const std::string addr = exporter_->listen_address();
  EXPECT_THAT(addr, ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(addr, "127.0.0.1:0");
  auto s = exporter_->PrepareSession("n");
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->has_tcp());
  EXPECT_EQ(addr, absl::StrCat("127.0.0.1:", s->tcp().port()));
  EXPECT_GE(s->session_token().size(), 16u);
  auto s2 = exporter_->PrepareSession("n");
  EXPECT_NE(s->session_token(), s2->session_token()) << "tokens are one-time";
}

TEST_F(TcpTransportTest, FetchReturnsTheBackendsBytesAndSeq) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("importer-1", &sub);
  ASSERT_NE(ch, nullptr);
  EXPECT_TRUE(ch->alive());
  EXPECT_STREQ(ch->path(), "tcp");
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->node(), "importer-1");

  exp_.SetSeq(42);
  std::vector<uint8_t> buf;
  auto seq = Fetch(ch, 9, 3, 2, &buf, /*track=*/true);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 42u);
  ExpectPages(buf, 9, 3);

  exp_.SetSeq(43);
  seq = Fetch(ch, 9, 0, 1, &buf, /*track=*/false);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 43u);
  ExpectPages(buf, 9, 0);

  auto calls = exp_.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].export_id, 9u);
  EXPECT_EQ(calls[0].first_page, 3u);
  EXPECT_EQ(calls[0].npages, 2u);
  EXPECT_TRUE(calls[0].track);
  EXPECT_FALSE(calls[1].track) << "track=false must reach the exporter (kFetchNoCache)";
}

TEST_F(TcpTransportTest, LargestFetch) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  std::vector<uint8_t> buf;
  auto seq = Fetch(ch, 1, 0, kMaxFetchPages, &buf);
  ASSERT_TRUE(seq.ok()) << seq.status();
  ExpectPages(buf, 1, 0);
}

TEST_F(TcpTransportTest, ConcurrentFetchesGetTheirOwnReplies) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        std::vector<uint8_t> buf(2 * kPageSize);
        const uint64_t id = 100 + t, first = i;
        auto r = ch->Fetch(id, first, 2, true, absl::MakeSpan(buf), absl::Seconds(5));
        if (!r.ok() || buf.front() != FillOf(id, first) || buf.back() != FillOf(id, first + 1)) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(exp_.calls().size(), 80u);
}

TEST_F(TcpTransportTest, BackendErrorsKeepCodeAndMessage) {
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
  ExpectPages(buf, 5, 0);
}

TEST_F(TcpTransportTest, BadPageCountsAreRefusedByTheExporter) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  std::vector<uint8_t> none;
  auto r = ch->Fetch(1, 0, 0, true, absl::MakeSpan(none), absl::Seconds(5));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  r = Fetch(ch, 1, 0, kMaxFetchPages + 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(exp_.calls().empty()) << "the backend must not see them";
  EXPECT_TRUE(ch->alive());
  EXPECT_TRUE(Fetch(ch, 1, 0, 1).ok());
}

TEST_F(TcpTransportTest, InvalidationsArriveInOrderWithResponsesAndAreAcked) {
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

TEST_F(TcpTransportTest, AckIsSentOnlyAfterTheImporterDroppedThePages) {
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

TEST_F(TcpTransportTest, InvalidationsGoOnlyToTheirConnection) {
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

TEST_F(TcpTransportTest, WrongTokenIsRefused) {
  auto setup = exporter_->PrepareSession("n");
  ASSERT_TRUE(setup.ok());
  v1::SetupDataResponse bad = *setup;
  bad.mutable_session_token()->back() ^= 1;
  auto ch = importer_->Connect("127.0.0.1", bad, &imp_);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  bad.set_session_token("");
  ch = importer_->Connect("127.0.0.1", bad, &imp_);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
  EXPECT_EQ(exporter_->FindSubscriber(bad.session_token()), nullptr);

  // The refusals did not burn the real token.
  ch = importer_->Connect("127.0.0.1", *setup, &imp_);
  ASSERT_TRUE(ch.ok()) << ch.status();
  EXPECT_TRUE(Fetch(ch->get(), 1, 0, 1).ok());
  channels_.push_back(std::move(*ch));
}

TEST_F(TcpTransportTest, FirstFrameOtherThanHelloDoesNotBurnTheToken) {
  auto setup = exporter_->PrepareSession("n");
  ASSERT_TRUE(setup.ok());
  // A client that sends the right token in a FETCH frame is refused...
  UniqueFd raw = RawConnect(static_cast<uint16_t>(setup->tcp().port()));
  const std::string& tok = setup->session_token();
  auto f = RawFrame(FrameType::kFetch, tok.data(), tok.size());
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  EXPECT_TRUE(PeerClosed(raw.get()));
  ASSERT_TRUE(exp_.WaitClosedCount(1));
  // ... and the importer the token was made for can still use it.
  auto ch = importer_->Connect("127.0.0.1", *setup, &imp_);
  ASSERT_TRUE(ch.ok()) << ch.status();
  channels_.push_back(std::move(*ch));
}

TEST_F(TcpTransportTest, UsedTokenIsRefusedAndTheFirstConnectionKeepsIt) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* first = Open("n", &sub, &token);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(sub, nullptr);

  v1::SetupDataResponse again;
  again.set_session_token(token);
  again.mutable_tcp()->set_port(port());
  auto ch = importer_->Connect("127.0.0.1", again, &imp_);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();

  // The refused connection is torn down on the exporter (its OnSubscriberClosed),
  // and that must not touch the first connection's session.
  ASSERT_TRUE(exp_.WaitClosedCount(1));
  EXPECT_EQ(exp_.closed()[0] == sub->id(), false) << "the wrong connection was closed";
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

TEST_F(TcpTransportTest, TokenOfAClosedConnectionIsRefused) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* first = Open("n", &sub, &token);
  ASSERT_NE(first, nullptr);
  first->Close();
  ASSERT_TRUE(exp_.WaitClosed(sub->id()));
  v1::SetupDataResponse again;
  again.set_session_token(token);
  again.mutable_tcp()->set_port(port());
  auto ch = importer_->Connect("127.0.0.1", again, &imp_);
  EXPECT_EQ(ch.status().code(), absl::StatusCode::kUnavailable) << ch.status();
}

TEST_F(TcpTransportTest, GarbageClosesOnlyThatConnection) {
  PeerChannel* good = Open("good");
  ASSERT_NE(good, nullptr);

  UniqueFd raw = RawConnect(port());
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
  ExpectPages(buf, 3, 1);
  EXPECT_NE(Open("later"), nullptr) << "the listener stopped accepting";
}

TEST_F(TcpTransportTest, GarbageAfterHelloClosesTheConnection) {
  auto setup = exporter_->PrepareSession("raw");
  ASSERT_TRUE(setup.ok());
  UniqueFd raw = RawConnect(static_cast<uint16_t>(setup->tcp().port()));
  const std::string& tok = setup->session_token();
  auto hello = RawFrame(FrameType::kHello, tok.data(), tok.size());
  ASSERT_TRUE(WriteFull(raw.get(), hello.data(), hello.size()).ok());
  FrameHeader h;
  ASSERT_TRUE(ReadFull(raw.get(), &h, sizeof(h)).ok());
  ASSERT_EQ(h.type, static_cast<uint8_t>(FrameType::kHello));
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

TEST_F(TcpTransportTest, MalformedFetchClosesTheConnection) {
  auto setup = exporter_->PrepareSession("raw");
  ASSERT_TRUE(setup.ok());
  UniqueFd raw = RawConnect(static_cast<uint16_t>(setup->tcp().port()));
  const std::string& tok = setup->session_token();
  auto hello = RawFrame(FrameType::kHello, tok.data(), tok.size());
  ASSERT_TRUE(WriteFull(raw.get(), hello.data(), hello.size()).ok());
  FrameHeader h;
  ASSERT_TRUE(ReadFull(raw.get(), &h, sizeof(h)).ok());
  uint8_t short_fetch[10] = {};
  auto f = RawFrame(FrameType::kFetch, short_fetch, sizeof(short_fetch));
  ASSERT_TRUE(WriteFull(raw.get(), f.data(), f.size()).ok());
  EXPECT_TRUE(PeerClosed(raw.get()));
  EXPECT_TRUE(exp_.calls().empty());
}

TEST_F(TcpTransportTest, ImporterCloseIsSeenByTheExporter) {
  std::shared_ptr<Subscriber> sub;
  std::string token;
  PeerChannel* ch = Open("n", &sub, &token);
  ASSERT_NE(ch, nullptr);
  ch->Close();
  EXPECT_FALSE(ch->alive());
  EXPECT_EQ(Fetch(ch, 1, 0, 1).status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(exp_.WaitClosed(sub->id()));
  EXPECT_TRUE(imp_.WaitClosed(ch));
  EXPECT_FALSE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  EXPECT_EQ(exporter_->FindSubscriber(token), nullptr);
}

TEST_F(TcpTransportTest, ExporterCloseFailsPendingFetch) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  exp_.Block();
  auto pending = std::async(std::launch::async, [&] { return Fetch(ch, 1, 0, 1, nullptr, true, absl::Seconds(10)); });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  const absl::Time start = absl::Now();
  sub->Close();  // e.g. Sync disconnecting an importer that stopped acknowledging
  ASSERT_EQ(pending.wait_for(std::chrono::seconds(2)), std::future_status::ready)
      << "a pending fetch outlived its connection";
  auto r = pending.get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  ASSERT_TRUE(imp_.WaitClosed(ch));
  EXPECT_FALSE(imp_.closed()[0].second.ok());
  EXPECT_FALSE(ch->alive());
  EXPECT_EQ(Fetch(ch, 1, 0, 1).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(sub->PushInvalidation({1, 0, 1, 1, ChangeKind::kUnmap, 0}));
  exp_.Release();
  EXPECT_TRUE(exp_.WaitClosed(sub->id()));
}

TEST_F(TcpTransportTest, ExporterStopFailsPendingFetch) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.Block();
  auto pending = std::async(std::launch::async, [&] { return Fetch(ch, 1, 0, 1, nullptr, true, absl::Seconds(10)); });
  ASSERT_TRUE(exp_.WaitBlocked(1));
  // Stop joins the connection threads, one of which is inside the backend:
  // run it aside and release the backend once the fetch has failed.
  auto stop = std::async(std::launch::async, [&] { exporter_->Stop(); });
  ASSERT_EQ(pending.wait_for(std::chrono::seconds(2)), std::future_status::ready);
  EXPECT_EQ(pending.get().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(imp_.WaitClosed(ch));
  exp_.Release();
  EXPECT_EQ(stop.wait_for(std::chrono::seconds(2)), std::future_status::ready);
  stop.get();
  // Nothing listens any more.
  auto setup = v1::SetupDataResponse();
  setup.set_session_token("x");
  setup.mutable_tcp()->set_port(static_cast<uint32_t>(
      std::stoi(exporter_->listen_address().substr(exporter_->listen_address().rfind(':') + 1))));
  EXPECT_FALSE(importer_->Connect("127.0.0.1", setup, &imp_).ok());
}

TEST_F(TcpTransportTest, FetchTimesOutWhenTheExporterDoesNotAnswer) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.Block();
  const absl::Duration timeout = absl::Milliseconds(200);
  const absl::Time start = absl::Now();
  auto r = Fetch(ch, 1, 0, 1, nullptr, true, timeout);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_GE(took, timeout - absl::Milliseconds(5));
  EXPECT_LT(took, timeout + absl::Milliseconds(500)) << "took " << took;
  EXPECT_FALSE(ch->alive()) << "a timed-out connection must be closed";
  EXPECT_TRUE(imp_.WaitClosed(ch));
  exp_.Release();
}

TEST_F(TcpTransportTest, ConnectWithoutATcpEndpoint) {
  v1::SetupDataResponse setup;
  setup.set_session_token("whatever");
  EXPECT_EQ(importer_->Connect("127.0.0.1", setup, &imp_).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(TcpTransportTest, DestroyingAChannelNotifiesBothSides) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(ch, nullptr);
  channels_.clear();  // destroys it: joins its reader
  EXPECT_EQ(imp_.closed().size(), 1u) << "OnChannelClosed must have run before the destructor returned";
  EXPECT_TRUE(exp_.WaitClosed(sub->id()));
}

}  // namespace
}  // namespace svm::transport
