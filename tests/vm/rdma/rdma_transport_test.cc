// daemon/transport/rdma/rdma_transport end to end in one process on rxe0:
// an exporter transport with a fake ExportBackend and an importer transport
// with a fake ImportBackend, connected through BeginConnect / PrepareSession
// / Connect exactly as svmd does over gRPC. On a host without an RDMA device
// every test skips, unless SVM_EXPECT_RDMA=1 (the VM tier) makes that fail.
#include <sys/mman.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "daemon/transport/frame.h"
#include "daemon/transport/rdma/rdma_transport.h"
#include "gtest/gtest.h"

namespace svm::transport {
namespace {

using source::kPageSize;

uint8_t FillOf(uint64_t id, uint64_t page) { return static_cast<uint8_t>(id * 7 + page * 3 + 1); }

class FakeExportBackend final : public ExportBackend {
 public:
  absl::StatusOr<uint64_t> ServeFetch(uint64_t export_id, uint64_t first_page, uint32_t npages,
                                      bool /*track*/, absl::Span<uint8_t> dst) override {
    std::function<void()> hook;
    {
      absl::MutexLock l(&mu_);
      ++fetches_;
      hook = std::exchange(hook_, nullptr);
      if (block_) {
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
  void OnAck(uint64_t, uint64_t, uint64_t seq) override {
    absl::MutexLock l(&mu_);
    acks_.push_back(seq);
  }
  void OnSubscriberClosed(uint64_t id) override {
    absl::MutexLock l(&mu_);
    closed_.push_back(id);
  }

  void SetSeq(uint64_t s) {
    absl::MutexLock l(&mu_);
    seq_ = s;
  }
  int fetches() {
    absl::MutexLock l(&mu_);
    return fetches_;
  }
  void FailExport(uint64_t id, absl::Status st) {
    absl::MutexLock l(&mu_);
    errors_[id] = std::move(st);
  }
  void OnNextFetch(std::function<void()> hook) {
    absl::MutexLock l(&mu_);
    hook_ = std::move(hook);
  }
  void Block(bool b) {
    absl::MutexLock l(&mu_);
    block_ = b;
  }
  bool WaitAcks(size_t n, absl::Duration timeout = absl::Seconds(5)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return acks_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  bool WaitClosed(size_t n, absl::Duration timeout = absl::Seconds(5)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  std::vector<uint64_t> acks() {
    absl::MutexLock l(&mu_);
    return acks_;
  }

 private:
  absl::Mutex mu_;  // guards everything below
  int fetches_ = 0;
  std::vector<uint64_t> acks_;
  std::vector<uint64_t> closed_;
  std::map<uint64_t, absl::Status> errors_;
  std::function<void()> hook_;
  uint64_t seq_ = 0;
  bool block_ = false;
};

class FakeImportBackend final : public ImportBackend {
 public:
  void OnInvalidation(PeerChannel*, const InvalRecord& r) override {
    absl::MutexLock l(&mu_);
    invals_.push_back(r);
  }
  void OnChannelClosed(PeerChannel* ch, const absl::Status& why) override {
    absl::MutexLock l(&mu_);
    closed_.push_back({ch, why});
  }
  bool WaitInvals(size_t n, absl::Duration timeout = absl::Seconds(5)) {
    absl::MutexLock l(&mu_);
    auto cond = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return invals_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
  }
  absl::StatusOr<absl::Status> WaitClosed(PeerChannel* ch, absl::Duration timeout = absl::Seconds(5)) {
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

 private:
  absl::Mutex mu_;  // guards everything below
  std::vector<InvalRecord> invals_;
  std::vector<std::pair<PeerChannel*, absl::Status>> closed_;
};

bool ExpectRdma() {
  const char* e = std::getenv("SVM_EXPECT_RDMA");
  return e != nullptr && std::string(e) == "1";
}

class RdmaTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto e = CreateRdmaTransport(RdmaOptions{});
    if (!e.ok()) {
      if (ExpectRdma()) FAIL() << e.status();
      GTEST_SKIP() << e.status();
    }
    exporter_ = std::move(*e);
    ASSERT_STREQ(exporter_->name(), "rdma");
    ASSERT_TRUE(exporter_->Start(HostPort{"127.0.0.1", 0}, &exp_).ok());
    auto i = CreateRdmaTransport(RdmaOptions{});
    ASSERT_TRUE(i.ok()) << i.status();
    importer_ = std::move(*i);
  }
  void TearDown() override {
    exp_.Block(false);
    channels_.clear();
    if (exporter_) exporter_->Stop();
  }

  // What svmd does: BeginConnect, SetupData (PrepareSession), Connect.
  PeerChannel* Open(const std::string& node, std::shared_ptr<Subscriber>* sub = nullptr) {
    auto begin = importer_->BeginConnect();
    EXPECT_TRUE(begin.ok()) << begin.status();
    if (!begin.ok()) return nullptr;
    EXPECT_EQ(begin->size(), 33u);
    auto setup = exporter_->PrepareSession(node, *begin);
    EXPECT_TRUE(setup.ok()) << setup.status();
    if (!setup.ok()) return nullptr;
    EXPECT_TRUE(setup->has_rdma());
    auto ch = importer_->Connect("127.0.0.1", *setup, &imp_, *begin);
    EXPECT_TRUE(ch.ok()) << ch.status();
    if (!ch.ok()) return nullptr;
    if (sub) *sub = exporter_->FindSubscriber(setup->session_token());
    channels_.push_back(std::move(*ch));
    return channels_.back().get();
  }

  static bool PagesAre(const std::vector<uint8_t>& buf, uint64_t id, uint64_t first) {
    for (size_t i = 0; i < buf.size(); ++i) {
      if (buf[i] != FillOf(id, first + i / kPageSize)) {
        ADD_FAILURE() << "byte " << i << " is " << int{buf[i]};
        return false;
      }
    }
    return true;
  }

  absl::StatusOr<uint64_t> Fetch(PeerChannel* ch, uint64_t id, uint64_t first, uint32_t n,
                                 std::vector<uint8_t>* out = nullptr,
                                 absl::Duration timeout = absl::Seconds(10)) {
    std::vector<uint8_t> buf(n * kPageSize);
    auto r = ch->Fetch(id, first, n, true, absl::MakeSpan(buf), timeout);
    if (out) *out = std::move(buf);
    return r;
  }

  FakeExportBackend exp_;
  FakeImportBackend imp_;
  std::unique_ptr<Transport> exporter_;
  std::unique_ptr<Transport> importer_;
  std::vector<std::unique_ptr<PeerChannel>> channels_;
};

TEST_F(RdmaTransportTest, FetchReturnsTheBackendsBytesAndSeqAtEverySize) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("importer-1", &sub);
  ASSERT_NE(ch, nullptr);
  // "staged/odp" or "staged/pinned": the registration of the receive area.
  EXPECT_EQ(std::string(ch->path()).rfind("staged/", 0), 0u) << ch->path();
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->node(), "importer-1");
  exp_.SetSeq(42);
  // 1 page, one slot exactly, and the largest fetch (split into 4 on the wire).
  for (uint32_t n : {1u, 256u, 257u, kMaxFetchPages}) {
    std::vector<uint8_t> buf;
    auto seq = Fetch(ch, 3, 10, n, &buf);
    ASSERT_TRUE(seq.ok()) << n << ": " << seq.status();
    EXPECT_EQ(*seq, 42u);
    EXPECT_TRUE(PagesAre(buf, 3, 10)) << n << " pages";
  }
}

TEST_F(RdmaTransportTest, ConcurrentFetchesBeyondTheSlotsGetTheirOwnReplies) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 16; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        std::vector<uint8_t> buf((1 + t % 3) * kPageSize);
        auto r = ch->Fetch(100 + t, i, 1 + t % 3, true, absl::MakeSpan(buf), absl::Seconds(20));
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
}

TEST_F(RdmaTransportTest, BackendErrorsKeepCodeAndMessage) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.FailExport(9, absl::NotFoundError("no export 9"));
  auto r = Fetch(ch, 9, 0, 2);
  EXPECT_TRUE(absl::IsNotFound(r.status())) << r.status();
  EXPECT_EQ(r.status().message(), "no export 9");
  EXPECT_TRUE(ch->alive());
  EXPECT_TRUE(Fetch(ch, 1, 0, 1).ok()) << "the connection survives an error reply";
}

TEST_F(RdmaTransportTest, InvalidationQueuedDuringAFetchArrivesBeforeItsReplyAndIsAcked) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(sub, nullptr);
  exp_.OnNextFetch([&] {
    InvalRecord r;
    r.export_id = 5;
    r.first_page = 1;
    r.npages = 2;
    r.seq = 7;
    EXPECT_TRUE(sub->PushInvalidation(r));
  });
  auto seq = Fetch(ch, 5, 0, 4);
  ASSERT_TRUE(seq.ok()) << seq.status();
  // Delivered (OnInvalidation returned) before Fetch saw its reply.
  auto inv = imp_.invals();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_EQ(inv[0].seq, 7u);
  EXPECT_EQ(inv[0].first_page, 1u);
  for (uint64_t s = 8; s < 40; ++s) {
    InvalRecord r;
    r.export_id = 5;
    r.seq = s;
    ASSERT_TRUE(sub->PushInvalidation(r));
  }
  // The burst may arrive collapsed into fewer INVALs (MergeInvalFrame):
  // each delivered one is newer than the one before, the last is seq 39,
  // and the acknowledgements follow in the same order.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  auto last_seq = [](const std::vector<uint64_t>& v) { return v.empty() ? 0 : v.back(); };
  std::vector<uint64_t> seqs, acks;
  do {
    seqs.clear();
    for (auto& r : imp_.invals()) seqs.push_back(r.seq);
    acks = exp_.acks();
    if (last_seq(seqs) == 39 && last_seq(acks) == 39) break;
    absl::SleepFor(absl::Milliseconds(5));
  } while (absl::Now() < deadline);
  ASSERT_EQ(last_seq(seqs), 39u);
  ASSERT_EQ(last_seq(acks), 39u);
  for (size_t i = 1; i < seqs.size(); ++i) EXPECT_GT(seqs[i], seqs[i - 1]) << "invalidations in order";
  for (size_t i = 1; i < acks.size(); ++i) EXPECT_GT(acks[i], acks[i - 1]) << "acks in order";
  std::printf("# 32 invalidations arrived as %zu\n", seqs.size() - 1);
}

TEST_F(RdmaTransportTest, FetchTimeoutClosesTheConnectionOnBothSides) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  exp_.Block(true);
  const absl::Time t0 = absl::Now();
  auto r = Fetch(ch, 1, 0, 1, nullptr, absl::Milliseconds(500));
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  EXPECT_FALSE(ch->alive());
  auto why = imp_.WaitClosed(ch);
  ASSERT_TRUE(why.ok());
  EXPECT_TRUE(absl::IsUnavailable(*why)) << *why;
  exp_.Block(false);
  EXPECT_TRUE(exp_.WaitClosed(1)) << "the exporter learns through the liveness socket";
}

TEST_F(RdmaTransportTest, ExporterCloseFailsPendingFetchAndReachesTheImporter) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("n", &sub);
  ASSERT_NE(sub, nullptr);
  exp_.Block(true);
  std::thread closer([&] {
    absl::SleepFor(absl::Milliseconds(200));
    sub->Close();
  });
  auto r = Fetch(ch, 1, 0, 1, nullptr, absl::Seconds(10));
  closer.join();
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  EXPECT_TRUE(imp_.WaitClosed(ch).ok());
  EXPECT_FALSE(sub->PushInvalidation(InvalRecord{}));
  exp_.Block(false);
  EXPECT_TRUE(exp_.WaitClosed(1));
}

TEST_F(RdmaTransportTest, DestroyingAChannelIsSeenByTheExporter) {
  PeerChannel* ch = Open("n");
  ASSERT_NE(ch, nullptr);
  channels_.clear();
  EXPECT_TRUE(exp_.WaitClosed(1));
}

TEST_F(RdmaTransportTest, TokensAndEndpointsAreCheckedAndOneTime) {
  auto begin = importer_->BeginConnect();
  ASSERT_TRUE(begin.ok());
  auto setup = exporter_->PrepareSession("n", *begin);
  ASSERT_TRUE(setup.ok());
  // A token of another session: the exporter refuses the HELLO.
  auto other = exporter_->PrepareSession("n", *importer_->BeginConnect());
  ASSERT_TRUE(other.ok());
  v1::SetupDataResponse forged = *setup;
  forged.set_session_token(other->session_token());
  auto ch = importer_->Connect("127.0.0.1", forged, &imp_, *begin);
  EXPECT_TRUE(absl::IsUnavailable(ch.status())) << ch.status();
  // Endpoint checks on both sides.
  EXPECT_FALSE(exporter_->PrepareSession("n", "").ok());
  EXPECT_FALSE(exporter_->PrepareSession("n", "garbage").ok());
  v1::SetupDataResponse tcp;
  tcp.mutable_tcp()->set_port(1);
  auto b2 = importer_->BeginConnect();
  auto no_rdma = importer_->Connect("127.0.0.1", tcp, &imp_, *b2);
  EXPECT_TRUE(absl::IsFailedPrecondition(no_rdma.status())) << no_rdma.status();
  auto unknown = importer_->Connect("127.0.0.1", *other, &imp_, "not begun");
  EXPECT_TRUE(absl::IsFailedPrecondition(unknown.status())) << unknown.status();
}

TEST_F(RdmaTransportTest, IdleConnectionCostsNoCpu) {
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

// Zero-copy: a region registered by the exporter is read by the importer
// with one-sided READs (no exporter backend call), byte-exact at unaligned
// offsets and across several slots; a non-write invalidation drops it
// before it is delivered, and a region described before that invalidation
// is refused.
TEST_F(RdmaTransportTest, RegisteredRegionIsReadOneSidedAndDroppedByInvalidations) {
  std::shared_ptr<Subscriber> sub;
  PeerChannel* ch = Open("zc", &sub);
  ASSERT_NE(ch, nullptr);
  ASSERT_NE(sub, nullptr);
  constexpr size_t kLen = 3 * 1024 * 1024 + 5 * kPageSize;  // > 3 slots
  void* mem = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* bytes = static_cast<uint8_t*>(mem);
  for (size_t i = 0; i < kLen; ++i) bytes[i] = static_cast<uint8_t>(i * 31 + i / 4093);
  auto region = exporter_->RegisterRegion(mem, kLen);
  ASSERT_TRUE(region.ok()) << region.status();
  RemoteRegion r = (*region)->remote();
  r.len = kLen;
  std::vector<uint8_t> buf(kLen);
  EXPECT_TRUE(absl::IsFailedPrecondition(ch->ReadRegion(7, 0, absl::MakeSpan(buf), absl::Seconds(5))));
  ASSERT_TRUE(ch->SetRegion(7, r, /*seq=*/3));
  const int fetches = exp_.fetches();
  for (auto [off, len] : std::vector<std::pair<size_t, size_t>>{
           {0, kLen}, {100, 1}, {4095, 2}, {12345, 2 * 1024 * 1024 + 777}, {kLen - 9, 9}}) {
    std::vector<uint8_t> got(len);
    ASSERT_TRUE(ch->ReadRegion(7, off, absl::MakeSpan(got), absl::Seconds(10)).ok()) << off;
    ASSERT_EQ(std::memcmp(got.data(), bytes + off, len), 0) << "offset " << off << " length " << len;
  }
  EXPECT_EQ(exp_.fetches(), fetches) << "a zero-copy read reached the exporter's backend";
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
  region->reset();
  munmap(mem, kLen);
}

}  // namespace
}  // namespace svm::transport
