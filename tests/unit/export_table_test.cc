// daemon/core/export_table against a fake mirror source and fake
// subscribers: the exporter's coherence bookkeeping (section 3 of DESIGN.md).
#include "daemon/core/export_table.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <future>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spdlog/sinks/ostream_sink.h"
#include "spdlog/spdlog.h"

namespace svm::source {
// Readable kinds in failure messages.
void PrintTo(ChangeKind k, std::ostream* os) { *os << ChangeKindName(k); }
}  // namespace svm::source

namespace svm::core {
namespace {

using source::Change;
using source::ChangeKind;
using source::kPageSize;
using transport::InvalRecord;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t kBase = 0x7f0000000000;  // where the fake process memory starts
constexpr uint64_t kMemPages = 64;
constexpr pid_t kPid = 4242;

// ------------------------------------------------------------------- fakes

// A process of kMemPages pages at kBase whose memory the test owns. Records
// every attach; lets the test fire changes through an attachment's sink.
class FakeSource final : public source::MirrorSource {
 public:
  FakeSource() : mem_(kMemPages * kPageSize) {
    for (uint64_t p = 0; p < kMemPages; ++p) FillPage(p, static_cast<uint8_t>(p + 1));
  }

  const char* name() const override { return "fake"; }

  absl::StatusOr<std::unique_ptr<source::MirrorRange>> Attach(pid_t pid, uint64_t addr,
                                                              uint64_t len,
                                                              source::ChangeSink sink) override {
    absl::MutexLock l(&mu_);
    if (!attach_error_.ok()) return std::exchange(attach_error_, absl::OkStatus());
    attachments_.push_back(Attachment{pid, addr, len, std::move(sink), true});
    return std::unique_ptr<source::MirrorRange>(
        std::make_unique<Range>(this, attachments_.size() - 1, addr, needs_scrub_));
  }

  // ---- test controls
  void FailNextAttach(absl::Status st) {
    absl::MutexLock l(&mu_);
    attach_error_ = std::move(st);
  }
  void SetNeedsScrub(bool v) {
    absl::MutexLock l(&mu_);
    needs_scrub_ = v;
  }
  void FailReads(absl::Status st) {
    absl::MutexLock l(&mu_);
    read_error_ = std::move(st);
  }
  // Runs (once) at the start of the next Read, outside the fake's lock.
  void OnNextRead(std::function<void()> hook) {
    absl::MutexLock l(&mu_);
    read_hook_ = std::move(hook);
  }
  // Fires a change through attachment i's sink, as the source's thread
  // would. False when the range was detached (no sink call may happen).
  bool Fire(size_t i, const Change& c) {
    source::ChangeSink sink;
    {
      absl::MutexLock l(&mu_);
      if (i >= attachments_.size() || !attachments_[i].attached) return false;
      sink = attachments_[i].sink;
    }
    sink(c);
    return true;
  }
  // "CPU stores" by the fake process: fills process page p (relative to kBase).
  void FillPage(uint64_t p, uint8_t v) {
    absl::MutexLock l(&mu_);
    std::memset(mem_.data() + p * kPageSize, v, kPageSize);
  }
  void StoreByte(uint64_t p, size_t off, uint8_t v) {
    absl::MutexLock l(&mu_);
    mem_[p * kPageSize + off] = v;
  }
  std::vector<uint8_t> PageContent(uint64_t p) {
    absl::MutexLock l(&mu_);
    return std::vector<uint8_t>(mem_.begin() + p * kPageSize, mem_.begin() + (p + 1) * kPageSize);
  }
  size_t attach_count() {
    absl::MutexLock l(&mu_);
    return attachments_.size();
  }
  size_t attached_count() {
    absl::MutexLock l(&mu_);
    size_t n = 0;
    for (auto& a : attachments_) n += a.attached;
    return n;
  }
  bool attached(size_t i) {
    absl::MutexLock l(&mu_);
    return attachments_.at(i).attached;
  }
  struct Attachment {
    pid_t pid;
    uint64_t addr, len;
    source::ChangeSink sink;
    bool attached;
  };
  Attachment attachment(size_t i) {
    absl::MutexLock l(&mu_);
    return attachments_.at(i);
  }
  int reads() {
    absl::MutexLock l(&mu_);
    return reads_;
  }

 private:
  class Range final : public source::MirrorRange {
   public:
    Range(FakeSource* src, size_t index, uint64_t addr, bool scrub)
        : src_(src), index_(index), addr_(addr), scrub_(scrub) {}
    ~Range() override {
      absl::MutexLock l(&src_->mu_);
      src_->attachments_[index_].attached = false;
    }
    absl::Status Read(uint64_t offset, absl::Span<uint8_t> dst) override {
      std::function<void()> hook;
      {
        absl::MutexLock l(&src_->mu_);
        hook = std::exchange(src_->read_hook_, nullptr);
      }
      if (hook) hook();
      absl::MutexLock l(&src_->mu_);
      ++src_->reads_;
      if (!src_->read_error_.ok()) return src_->read_error_;
      const uint64_t at = addr_ + offset - kBase;
      if (addr_ + offset < kBase || at + dst.size() > src_->mem_.size()) {
        return absl::FailedPreconditionError("fake: not mapped");
      }
      std::memcpy(dst.data(), src_->mem_.data() + at, dst.size());
      return absl::OkStatus();
    }
    bool NeedsScrub() const override { return scrub_; }

   private:
    FakeSource* const src_;
    const size_t index_;
    const uint64_t addr_;
    const bool scrub_;
  };

  absl::Mutex mu_;  // guards everything below
  std::vector<uint8_t> mem_;
  std::vector<Attachment> attachments_;
  absl::Status attach_error_;
  absl::Status read_error_;
  std::function<void()> read_hook_;
  bool needs_scrub_ = false;
  int reads_ = 0;
};

// An importer's data connection as the export table sees it.
class FakeSubscriber final : public transport::Subscriber {
 public:
  explicit FakeSubscriber(uint64_t id) : id_(id), node_(absl::StrCat("node-", id)) {}
  FakeSubscriber(uint64_t id, std::string node) : id_(id), node_(std::move(node)) {}
  uint64_t id() const override { return id_; }
  const std::string& node() const override { return node_; }
  bool PushInvalidation(const InvalRecord& r) override {
    absl::MutexLock l(&mu_);
    if (closed_) return false;
    records_.push_back(r);
    return true;
  }
  void Close() override {
    absl::MutexLock l(&mu_);
    closed_ = true;
    ++close_calls_;
  }
  uint64_t PendingFetches() const override { return pending.load(); }
  std::atomic<uint64_t> pending{0};  // what the connection reports waiting

  std::vector<InvalRecord> records() {
    absl::MutexLock l(&mu_);
    return records_;
  }
  bool closed() {
    absl::MutexLock l(&mu_);
    return closed_;
  }
  int close_calls() {
    absl::MutexLock l(&mu_);
    return close_calls_;
  }
  bool WaitForRecords(size_t n, absl::Duration timeout = absl::Seconds(2)) {
    absl::MutexLock l(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return records_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }

 private:
  const uint64_t id_;
  const std::string node_;
  absl::Mutex mu_;  // guards everything below
  std::vector<InvalRecord> records_;
  bool closed_ = false;
  int close_calls_ = 0;
};

// Acknowledges every invalidation a subscriber receives, from its own
// thread, like a healthy importer.
class AutoAcker {
 public:
  AutoAcker(FakeSubscriber* sub, transport::ExportBackend* backend)
      : sub_(sub), backend_(backend), thread_([this] { Loop(); }) {}
  ~AutoAcker() {
    stop_.store(true);
    thread_.join();
  }

 private:
  void Loop() {
    size_t done = 0;
    while (!stop_.load()) {
      if (!sub_->WaitForRecords(done + 1, absl::Milliseconds(5))) continue;
      auto recs = sub_->records();
      for (; done < recs.size(); ++done) backend_->OnAck(sub_->id(), recs[done].export_id, recs[done].seq);
    }
  }
  FakeSubscriber* const sub_;
  transport::ExportBackend* const backend_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::string KindsOf(const std::vector<InvalRecord>& recs) {
  std::string s;
  for (auto& r : recs) {
    absl::StrAppend(&s, s.empty() ? "" : " ", source::ChangeKindName(r.kind), "@", r.first_page, "+",
                    r.npages, "#", r.seq);
  }
  return s;
}

// ----------------------------------------------------------------- fixture

class ExportTableTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeTable(Limits()); }

  static ExportLimits Limits() {
    ExportLimits l;
    l.sync_timeout = absl::Seconds(2);
    return l;
  }
  void MakeTable(ExportLimits limits) {
    reader_acker_.reset();
    reader_.reset();
    reader_of_.clear();
    first_sub_.clear();
    table_.reset();
    table_ = std::make_unique<ExportTable>(&source_, &hub_, &counters_, limits, "tcp");
  }
  // Exports npages process pages starting at process page first.
  absl::StatusOr<v1::ExportInfo> Export(const std::string& name, uint64_t first, uint64_t npages,
                                        uid_t uid = 1000) {
    return table_->Export(name, kPid, kBase + first * kPageSize, npages * kPageSize, uid);
  }
  uint64_t IdOf(const std::string& name) {
    auto d = table_->Describe(name);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? d->export_id() : 0;
  }
  std::shared_ptr<FakeSubscriber> Subscribe(const std::string& name, uint64_t sub_id) {
    auto sub = std::make_shared<FakeSubscriber>(sub_id);
    const uint64_t id = IdOf(name);
    auto seq = table_->Subscribe(id, sub);
    EXPECT_TRUE(seq.ok()) << seq.status();
    if (seq.ok()) first_sub_.emplace(id, sub);
    return sub;
  }
  // Fetches as the data connection `as`; by default as the first
  // subscriber the test subscribed to the export, or else as a reader of
  // the fixture's own (subscribed on first use, acknowledging everything,
  // as a healthy importer): only subscribers are served.
  absl::StatusOr<uint64_t> Fetch(uint64_t id, uint64_t first, uint32_t n, bool track,
                                 std::vector<uint8_t>* out = nullptr,
                                 const transport::Subscriber* as = nullptr) {
    if (as == nullptr) {
      if (auto it = first_sub_.find(id); it != first_sub_.end()) as = it->second.get();
    }
    if (as == nullptr) {
      if (!reader_) {
        reader_ = std::make_shared<FakeSubscriber>(kReaderId);
        reader_acker_ = std::make_unique<AutoAcker>(reader_.get(), table_.get());
      }
      if (!reader_of_.contains(id) && table_->Subscribe(id, reader_).ok()) reader_of_.insert(id);
      as = reader_.get();
    }
    std::vector<uint8_t> buf(n * kPageSize);
    auto seq = table_->ServeFetch(*as, id, first, n, track, absl::MakeSpan(buf));
    if (out) *out = std::move(buf);
    return seq;
  }
  static Change Ch(uint64_t first, uint64_t n, ChangeKind k, uint64_t ns = 123) {
    return Change{first, n, k, ns};
  }

  // Destroyed in reverse order: the table (which holds ranges of the
  // source and publishes to the hub) goes first.
  FakeSource source_;
  WatchHub hub_;
  Counters counters_;
  std::unique_ptr<ExportTable> table_;
  // Fetch()'s default connections (weak: a test's own subscribers are its).
  static constexpr uint64_t kReaderId = 0xfe7c4;
  std::map<uint64_t, std::shared_ptr<FakeSubscriber>> first_sub_;
  std::shared_ptr<FakeSubscriber> reader_;
  std::unique_ptr<AutoAcker> reader_acker_;
  std::set<uint64_t> reader_of_;
};

// ------------------------------------------------------ export / unexport

TEST_F(ExportTableTest, ExportAttachesAndDescribes) {
  auto info = Export("a", 2, 4);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->name(), "a");
  EXPECT_EQ(info->pid(), kPid);
  EXPECT_EQ(info->addr(), kBase + 2 * kPageSize);
  EXPECT_EQ(info->len(), 4 * kPageSize);
  EXPECT_EQ(info->page_size(), kPageSize);
  EXPECT_EQ(info->source(), "fake");
  EXPECT_EQ(info->path(), "tcp");
  EXPECT_EQ(info->seq(), 0u);
  EXPECT_EQ(info->subscribers(), 0u);
  EXPECT_FALSE(info->gone());

  ASSERT_EQ(source_.attach_count(), 1u);
  auto a = source_.attachment(0);
  EXPECT_EQ(a.pid, kPid);
  EXPECT_EQ(a.addr, kBase + 2 * kPageSize);
  EXPECT_EQ(a.len, 4 * kPageSize);
  EXPECT_TRUE(a.attached);

  EXPECT_TRUE(table_->Has("a"));
  EXPECT_FALSE(table_->Has("b"));
  auto d = table_->Describe("a");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->name(), "a");
  EXPECT_EQ(d->len(), 4 * kPageSize);
  EXPECT_EQ(d->page_size(), kPageSize);
  EXPECT_EQ(d->seq(), 0u);
  EXPECT_NE(d->export_id(), 0u);
  ASSERT_EQ(table_->List().size(), 1u);
  EXPECT_EQ(table_->List()[0].name(), "a");
}

TEST_F(ExportTableTest, ExportIdsAreDistinct) {
  ASSERT_TRUE(Export("a", 0, 1).ok());
  ASSERT_TRUE(Export("b", 1, 1).ok());
  EXPECT_NE(IdOf("a"), IdOf("b"));
}

TEST_F(ExportTableTest, DuplicateNameAlreadyExists) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto dup = Export("a", 4, 2);
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(dup.status().message()), HasSubstr("'a'"));
  EXPECT_EQ(source_.attached_count(), 1u) << "a refused export must not stay attached";
  // The original is untouched.
  auto d = table_->Describe("a");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->len(), 2 * kPageSize);
  std::vector<uint8_t> buf;
  ASSERT_TRUE(Fetch(d->export_id(), 0, 1, false, &buf).ok());
  EXPECT_EQ(buf[0], 1);  // process page 0
}

TEST_F(ExportTableTest, AttachFailureIsReturnedAndLeavesNothing) {
  source_.FailNextAttach(absl::InvalidArgumentError("range 0x1+0x2 is not mapped"));
  auto r = Export("a", 0, 2);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("not mapped"));
  EXPECT_FALSE(table_->Has("a"));
  EXPECT_TRUE(table_->List().empty());
  EXPECT_TRUE(Export("a", 0, 2).ok()) << "the name stays free";
}

TEST_F(ExportTableTest, UnexportDetachesAndNotifies) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  std::vector<v1::Invalidation> seen;
  hub_.Add("a", [&](const v1::Invalidation& ev) { seen.push_back(ev); });

  ASSERT_TRUE(table_->Unexport("a").ok());
  EXPECT_FALSE(table_->Has("a"));
  EXPECT_FALSE(source_.attached(0)) << "unexport must detach the range";
  EXPECT_EQ(table_->Describe("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Unexport("a").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Fetch(id, 0, 1, true).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Sync("a").status().code(), absl::StatusCode::kNotFound);

  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 1u) << KindsOf(recs);
  EXPECT_EQ(recs[0].kind, ChangeKind::kUnexport);
  EXPECT_EQ(recs[0].export_id, id);
  EXPECT_EQ(recs[0].first_page, 0u);
  EXPECT_EQ(recs[0].npages, 4u);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].kind(), v1::INVALIDATION_KIND_UNEXPORT);

  EXPECT_FALSE(source_.Fire(0, Ch(0, 1, ChangeKind::kUnmap))) << "detached";
  // The name can be used again, for a new export with a new id.
  ASSERT_TRUE(Export("a", 8, 1).ok());
  EXPECT_NE(IdOf("a"), id);
}

TEST_F(ExportTableTest, UnexportUnknownIsNotFound) {
  EXPECT_EQ(table_->Unexport("nope").code(), absl::StatusCode::kNotFound);
}

TEST_F(ExportTableTest, DestroyingTheTableDetachesEverything) {
  ASSERT_TRUE(Export("a", 0, 1).ok());
  ASSERT_TRUE(Export("b", 1, 1).ok());
  EXPECT_EQ(source_.attached_count(), 2u);
  table_.reset();
  EXPECT_EQ(source_.attached_count(), 0u);
}

// ------------------------------------------------------------------ limits

TEST_F(ExportTableTest, PerUidExportCountLimit) {
  ExportLimits l = Limits();
  l.live->Set({.exports_per_client = 2});
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 1, 1000).ok());
  ASSERT_TRUE(Export("b", 1, 1, 1000).ok());
  auto c = Export("c", 2, 1, 1000);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(table_->Has("c"));
  EXPECT_TRUE(Export("c", 2, 1, 1001).ok()) << "limits are per uid";
  ASSERT_TRUE(table_->Unexport("a").ok());
  EXPECT_TRUE(Export("d", 3, 1, 1000).ok()) << "an unexport frees a slot";
}

TEST_F(ExportTableTest, AnExportWhoseProcessExitedFreesItsSlot) {
  ExportLimits l = Limits();
  l.live->Set({.exports_per_client = 1});
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 1, 1000).ok());
  EXPECT_EQ(Export("b", 1, 1, 1000).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kExit)));
  EXPECT_TRUE(Export("b", 1, 1, 1000).ok()) << "a gone export holds no slot";
}

TEST_F(ExportTableTest, PerUidByteLimit) {
  ExportLimits l = Limits();
  l.live->Set({.export_bytes_per_client = 8 * kPageSize});
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 6, 1000).ok());
  EXPECT_EQ(Export("b", 8, 3, 1000).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Export("b", 8, 3, 1001).ok());
  EXPECT_TRUE(Export("c", 16, 2, 1000).ok()) << "exactly at the limit is allowed";
  EXPECT_EQ(Export("d", 20, 1, 1000).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(ExportTableTest, ByteLimitSumCannotWrap) {
  ExportLimits l = Limits();
  l.live->Set({.export_bytes_per_client = UINT64_MAX});  // only the wrap check can refuse
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 2, 1000).ok());
  auto r = table_->Export("huge", kPid, kBase, UINT64_MAX & ~(kPageSize - 1), 1000);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(ExportTableTest, ALoweredLimitRefusesNewExportsAndKeepsHeldOnes) {
  ExportLimits l = Limits();
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 1, 1000).ok());
  ASSERT_TRUE(Export("b", 1, 1, 1000).ok());
  l.live->Set({.exports_per_client = 1});  // as SIGHUP does
  auto c = Export("c", 2, 1, 1000);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--max-exports-per-client=1")) << c.status();
  EXPECT_TRUE(table_->Has("a") && table_->Has("b")) << "held exports stay";
  EXPECT_EQ(l.live->refusals(Limit::kExportsPerClient), 1u);
  l.live->Set({.exports_per_client = 3});
  EXPECT_TRUE(Export("c", 2, 1, 1000).ok()) << "a raised limit admits at once";
}

TEST_F(ExportTableTest, ByteLimitRefusalNamesItsFlag) {
  ExportLimits l = Limits();
  l.live->Set({.export_bytes_per_client = 2 * kPageSize});
  MakeTable(l);
  auto r = Export("a", 0, 3, 1000);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "--max-export-bytes-per-client=8192")) << r.status();
  EXPECT_EQ(l.live->refusals(Limit::kExportBytesPerClient), 1u);
}

TEST_F(ExportTableTest, ImportsPerPeerCountSubscriptionsOfOneNodeOverEveryExport) {
  ExportLimits l = Limits();
  l.live->Set({.imports_per_peer = 2});
  MakeTable(l);
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(Export(n, n[0] - 'a', 1).ok());
  auto sub = std::make_shared<FakeSubscriber>(7);  // node-7
  ASSERT_TRUE(table_->Subscribe(IdOf("a"), sub).ok());
  ASSERT_TRUE(table_->Subscribe(IdOf("b"), sub).ok());
  auto third = table_->Subscribe(IdOf("c"), sub);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(third.status().message(), "node node-7")) << third.status();
  EXPECT_TRUE(absl::StrContains(third.status().message(), "--max-imports-per-peer=2")) << third.status();
  // Another connection of the same node counts against the same limit.
  auto other = std::make_shared<FakeSubscriber>(9, "node-7");
  EXPECT_EQ(table_->Subscribe(IdOf("c"), other).status().code(), absl::StatusCode::kResourceExhausted);
  // A re-subscription holds no new slot; another node has its own.
  EXPECT_TRUE(table_->Subscribe(IdOf("a"), sub).ok());
  EXPECT_TRUE(table_->Subscribe(IdOf("c"), std::make_shared<FakeSubscriber>(8)).ok());
  // Lowering it keeps the held subscriptions.
  l.live->Set({.imports_per_peer = 1});
  EXPECT_EQ(table_->List()[0].subscribers(), 1u);
  // Use drops (the connection closes): the node may import again.
  l.live->Set({.imports_per_peer = 2});
  table_->OnSubscriberClosed(sub->id());
  EXPECT_TRUE(table_->Subscribe(IdOf("c"), other).ok());
  EXPECT_EQ(l.live->refusals(Limit::kImportsPerPeer), 2u);
}

// With TLS a peer is the identity it proved: connections declaring other
// node names under one certificate share one limit; another certificate,
// or a connection without one, is another peer even under the same name.
TEST_F(ExportTableTest, ImportsPerPeerCountTheProvedIdentityNotTheDeclaredNode) {
  ExportLimits l = Limits();
  l.live->Set({.imports_per_peer = 2});
  MakeTable(l);
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(Export(n, n[0] - 'a', 1).ok());
  const std::vector<std::string> b = {"b.example", "127.0.0.1"};
  const std::vector<std::string> c = {"c.example"};
  ASSERT_TRUE(table_->Subscribe(IdOf("a"), std::make_shared<FakeSubscriber>(1, "x1"), b).ok());
  ASSERT_TRUE(table_->Subscribe(IdOf("b"), std::make_shared<FakeSubscriber>(2, "x2"), b).ok());
  auto third = table_->Subscribe(IdOf("c"), std::make_shared<FakeSubscriber>(3, "x3"), b);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_TRUE(absl::StrContains(third.status().message(), "peer b.example,127.0.0.1 already holds 2"))
      << third.status();
  EXPECT_TRUE(table_->Subscribe(IdOf("c"), std::make_shared<FakeSubscriber>(4, "x1"), c).ok());
  EXPECT_TRUE(table_->Subscribe(IdOf("c"), std::make_shared<FakeSubscriber>(5, "x1")).ok());
  EXPECT_EQ(l.live->refusals(Limit::kImportsPerPeer), 1u);
}

TEST_F(ExportTableTest, AGoneExportHoldsNoImportSlot) {
  ExportLimits l = Limits();
  l.live->Set({.imports_per_peer = 1});
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 1).ok());
  ASSERT_TRUE(Export("b", 1, 1).ok());
  auto sub = std::make_shared<FakeSubscriber>(7);
  ASSERT_TRUE(table_->Subscribe(IdOf("a"), sub).ok());
  EXPECT_FALSE(table_->Subscribe(IdOf("b"), sub).ok());
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kExit)));
  EXPECT_TRUE(table_->Subscribe(IdOf("b"), sub).ok());
}

TEST_F(ExportTableTest, AdmitFetchRefusesAtThePendingLimit) {
  ExportLimits l = Limits();
  l.live->Set({.pending_fetches_per_peer = 4});
  MakeTable(l);
  const FakeSubscriber b(1, "b");  // subscribed to nothing: counts alone
  EXPECT_TRUE(table_->AdmitFetch(b, 0).ok());
  EXPECT_TRUE(table_->AdmitFetch(b, 3).ok());
  absl::Status st = table_->AdmitFetch(b, 4);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(st.message(), "node b has 4 fetches waiting on its 1 data connections"))
      << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "--max-pending-fetches-per-peer=4")) << st;
  EXPECT_EQ(l.live->refusals(Limit::kPendingFetchesPerPeer), 1u);
}

// One peer's data connections share --max-pending-fetches-per-peer: the
// sum over the connections of its key (its TLS identity, or its declared
// node), never another peer's; a closed connection's waiting fetches stop
// counting, and so do drained ones.
TEST_F(ExportTableTest, PendingFetchesAreSummedOverThePeersConnections) {
  ExportLimits l = Limits();
  l.live->Set({.pending_fetches_per_peer = 10});
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 1).ok());
  const std::vector<std::string> b = {"b.example"};
  auto b1 = std::make_shared<FakeSubscriber>(1, "x1");
  auto b2 = std::make_shared<FakeSubscriber>(2, "x2");  // same identity, another name
  auto b3 = std::make_shared<FakeSubscriber>(3, "x3");
  auto other = std::make_shared<FakeSubscriber>(4, "x1");  // b1's name, no identity
  for (auto& s : {b1, b2, b3}) ASSERT_TRUE(table_->Subscribe(IdOf("a"), s, b).ok());
  ASSERT_TRUE(table_->Subscribe(IdOf("a"), other).ok());
  b2->pending = 4;
  b3->pending = 3;
  other->pending = 9;
  EXPECT_TRUE(table_->AdmitFetch(*b1, 2).ok()) << "2 + 4 + 3 = 9 < 10";
  absl::Status st = table_->AdmitFetch(*b1, 3);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << "3 + 4 + 3 = 10";
  EXPECT_TRUE(absl::StrContains(st.message(), "peer b.example has 10 fetches waiting on its 3 data "
                                              "connections"))
      << st;
  EXPECT_TRUE(table_->AdmitFetch(*other, 0).ok()) << "another peer: its own 9 only";
  EXPECT_FALSE(table_->AdmitFetch(*other, 10).ok());
  b2->pending = 0;  // drained
  EXPECT_TRUE(table_->AdmitFetch(*b1, 3).ok());
  b2->pending = 4;
  EXPECT_FALSE(table_->AdmitFetch(*b1, 3).ok());
  table_->OnSubscriberClosed(b2->id());  // closed: its queue is gone with it
  EXPECT_TRUE(table_->AdmitFetch(*b1, 6).ok()) << "6 + 3 = 9";
  EXPECT_EQ(l.live->refusals(Limit::kPendingFetchesPerPeer), 3u);
}

// ---------------------------------------------------- seq and invalidation

TEST_F(ExportTableTest, SeqIncrementsPerInvalidationAndReachesSubscribers) {
  ASSERT_TRUE(Export("a", 0, 8).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 7);
  EXPECT_EQ(table_->List()[0].subscribers(), 1u);

  ASSERT_TRUE(source_.Fire(0, Ch(1, 2, ChangeKind::kUnmap, 1111)));
  ASSERT_TRUE(source_.Fire(0, Ch(5, 1, ChangeKind::kProtection, 2222)));
  ASSERT_TRUE(source_.Fire(0, Ch(0, 8, ChangeKind::kRemap, 3333)));

  EXPECT_EQ(table_->Describe("a")->seq(), 3u);
  EXPECT_EQ(table_->List()[0].seq(), 3u);
  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 3u);
  const InvalRecord want[] = {{id, 1, 2, 1, ChangeKind::kUnmap, 1111},
                              {id, 5, 1, 2, ChangeKind::kProtection, 2222},
                              {id, 0, 8, 3, ChangeKind::kRemap, 3333}};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(recs[i].export_id, want[i].export_id) << i;
    EXPECT_EQ(recs[i].first_page, want[i].first_page) << i;
    EXPECT_EQ(recs[i].npages, want[i].npages) << i;
    EXPECT_EQ(recs[i].seq, want[i].seq) << i;
    EXPECT_EQ(recs[i].kind, want[i].kind) << i;
    EXPECT_EQ(recs[i].detected_ns, want[i].detected_ns) << i;
  }
}

TEST_F(ExportTableTest, SubscribeReturnsCurrentSeqAndChecksTheExport) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kUnmap)));
  ASSERT_TRUE(source_.Fire(0, Ch(1, 1, ChangeKind::kUnmap)));
  auto seq = table_->Subscribe(IdOf("a"), std::make_shared<FakeSubscriber>(1));
  ASSERT_TRUE(seq.ok());
  EXPECT_EQ(*seq, 2u);
  // An id no export has: refused as a peer not on a list is, so that ids
  // cannot be probed.
  EXPECT_EQ(table_->Subscribe(IdOf("a") + 12345, std::make_shared<FakeSubscriber>(2)).status().code(),
            absl::StatusCode::kPermissionDenied);
}

// An export with an access list is described, subscribed to and allowed
// only for a peer proving an identity on it; everyone else gets
// PERMISSION_DENIED and no descriptor.
TEST_F(ExportTableTest, AccessListRefusesPeersNotOnIt) {
  auto info = table_->Export("a", kPid, kBase, 2 * kPageSize, 1000, {"node-b", "spiffe://x/y"});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(std::vector<std::string>(info->allow().begin(), info->allow().end()),
            (std::vector<std::string>{"node-b", "spiffe://x/y"}));
  ASSERT_TRUE(Export("open", 4, 1).ok());
  const std::vector<std::string> b = {"other", "node-b"}, c = {"node-c"}, none;
  for (const auto& who : {c, none}) {
    EXPECT_EQ(table_->Describe("a", who).status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(table_->Allowed("a", who).code(), absl::StatusCode::kPermissionDenied);
    EXPECT_TRUE(table_->Describe("open", who).ok());  // no list: any peer
  }
  auto d = table_->Describe("a", b);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(table_->Allowed("a", b).ok());
  EXPECT_EQ(table_->Allowed("missing", b).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Subscribe(d->export_id(), std::make_shared<FakeSubscriber>(1), c).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(table_->List()[0].subscribers(), 0u);  // the refused one was not added
  // The same answer, word for word, as for an id no export has.
  EXPECT_EQ(table_->Subscribe(d->export_id(), std::make_shared<FakeSubscriber>(1), c).status(),
            table_->Subscribe(d->export_id() ^ 1, std::make_shared<FakeSubscriber>(1), b).status());
  EXPECT_TRUE(table_->Subscribe(d->export_id(), std::make_shared<FakeSubscriber>(2), b).ok());
}

// A data connection is served only the exports it subscribed to (through
// the access-checked Subscribe): a peer not on an export's list that learnt
// or guessed its id and fetches it over its own connection gets the answer
// an unknown id gets, and nothing of the export is read; the exporter logs
// the first refusal of each connection. The grant ends with the connection.
TEST_F(ExportTableTest, ServeFetchServesOnlyConnectionsSubscribedToTheExport) {
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  spdlog::default_logger()->sinks().push_back(sink);
  absl::Cleanup unsink = [&] { spdlog::default_logger()->sinks().pop_back(); };

  ASSERT_TRUE(table_->Export("secret", kPid, kBase, 4 * kPageSize, 1000, {"node-b"}).ok());
  ASSERT_TRUE(Export("open", 8, 2).ok());
  const std::vector<std::string> b = {"node-b"}, c = {"node-c"};
  const uint64_t secret = table_->Describe("secret", b).value().export_id(), open = IdOf("open");
  auto sub_b = std::make_shared<FakeSubscriber>(1);
  auto sub_c = std::make_shared<FakeSubscriber>(2);
  ASSERT_TRUE(table_->Subscribe(secret, sub_b, b).ok());
  ASSERT_EQ(table_->Subscribe(secret, sub_c, c).status().code(), absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(table_->Subscribe(open, sub_c, c).ok());  // c has a live, subscribed connection

  const int reads = source_.reads();
  auto forged = Fetch(secret, 0, 1, true, nullptr, sub_c.get());
  EXPECT_EQ(forged.status().code(), absl::StatusCode::kPermissionDenied) << forged.status();
  EXPECT_EQ(forged.status(), Fetch(secret ^ 1, 0, 1, true, nullptr, sub_c.get()).status())
      << "an existing id must answer as an unknown one";
  // Not even the size leaks: pages past the end answer the same.
  EXPECT_EQ(forged.status(), Fetch(secret, 1000, 1, true, nullptr, sub_c.get()).status());
  EXPECT_EQ(source_.reads(), reads) << "nothing may be read for a refused fetch";
  EXPECT_EQ(counters_.Snapshot()["fetches_refused"], 3u);
  EXPECT_EQ(table_->List()[1].subscribers(), 1u);
  // Logged once for the connection, not per fetch.
  std::vector<std::string> parts = absl::StrSplit(log.str(), "which it did not subscribe to");
  EXPECT_EQ(parts.size(), 2u) << log.str();
  EXPECT_THAT(log.str(), HasSubstr("from node node-2 fetched export id"));

  // Its own subscription is served, and so is b's.
  std::vector<uint8_t> buf;
  ASSERT_TRUE(Fetch(open, 0, 1, true, &buf, sub_c.get()).ok());
  EXPECT_EQ(buf[0], 9);
  ASSERT_TRUE(Fetch(secret, 0, 1, true, &buf, sub_b.get()).ok());
  EXPECT_EQ(buf[0], 1);
  // A withdrawn export: its subscriber learns so (NOT_FOUND); nobody else does.
  ASSERT_TRUE(table_->Unexport("secret").ok());
  EXPECT_EQ(Fetch(secret, 0, 1, true, nullptr, sub_b.get()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Fetch(secret, 0, 1, true, nullptr, sub_c.get()).status(), forged.status());
  // The grant ends with the connection.
  table_->OnSubscriberClosed(sub_c->id());
  EXPECT_EQ(Fetch(open, 0, 1, true, nullptr, sub_c.get()).status(), forged.status());
}

// Fetches name an export by its id: ids are random, not a counter another
// export's id would give away.
TEST_F(ExportTableTest, ExportIdsAreUnguessable) {
  ASSERT_TRUE(Export("a", 0, 1).ok());
  ASSERT_TRUE(Export("b", 1, 1).ok());
  const uint64_t a = IdOf("a"), b = IdOf("b");
  EXPECT_NE(a, 0u);
  EXPECT_NE(b, 0u);
  EXPECT_GT(a > b ? a - b : b - a, 1u << 20);
}

TEST_F(ExportTableTest, ClosedSubscriberIsDropped) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto s1 = Subscribe("a", 1);
  auto s2 = Subscribe("a", 2);
  s1->Close();
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kUnmap)));
  EXPECT_EQ(table_->List()[0].subscribers(), 1u) << "PushInvalidation false: the subscriber is gone";
  EXPECT_EQ(s2->records().size(), 1u);
}

TEST_F(ExportTableTest, OnSubscriberClosedRemovesIt) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  ASSERT_TRUE(Export("b", 2, 2).ok());
  auto s1 = Subscribe("a", 1);
  auto s1b = std::make_shared<FakeSubscriber>(1);  // the same connection, subscribed to b too
  ASSERT_TRUE(table_->Subscribe(IdOf("b"), s1b).ok());
  auto s2 = Subscribe("a", 2);

  table_->OnSubscriberClosed(1);
  for (auto& i : table_->List()) {
    EXPECT_EQ(i.subscribers(), i.name() == "a" ? 1u : 0u) << i.name();
  }
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kUnmap)));
  ASSERT_TRUE(source_.Fire(1, Ch(0, 1, ChangeKind::kUnmap)));
  EXPECT_TRUE(s1->records().empty());
  EXPECT_TRUE(s1b->records().empty());
  EXPECT_EQ(s2->records().size(), 1u);
  table_->OnSubscriberClosed(999);  // unknown: harmless
}

// Local watchers (a session's events, svmctl watch on the exporting node)
// see an export's invalidations in sequence order whatever threads raise
// them (the mirror source's thread, a Sync's scrub, Unexport), as every
// subscriber's connection does.
TEST_F(ExportTableTest, LocalWatchersSeeAnExportsInvalidationsInSeqOrder) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  absl::Mutex mu;
  std::vector<uint64_t> seqs;
  hub_.Add("a", [&](const v1::Invalidation& ev) {
    absl::MutexLock l(&mu);
    seqs.push_back(ev.seq());
  });
  constexpr int kThreads = 4;
  constexpr int kEach = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) source_.Fire(0, Ch(t, 1, ChangeKind::kWrite, i + 1));
    });
  }
  for (auto& t : threads) t.join();
  absl::MutexLock l(&mu);
  ASSERT_EQ(seqs.size(), size_t{kThreads} * kEach);
  size_t out_of_order = 0;
  for (size_t i = 1; i < seqs.size(); ++i) out_of_order += seqs[i] <= seqs[i - 1];
  EXPECT_EQ(out_of_order, 0u);
}

TEST_F(ExportTableTest, WatchHubGetsEveryInvalidationByName) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  ASSERT_TRUE(Export("b", 4, 4).ok());
  absl::Mutex mu;
  std::vector<v1::Invalidation> seen_a, seen_b;
  hub_.Add("a", [&](const v1::Invalidation& ev) {
    absl::MutexLock l(&mu);
    seen_a.push_back(ev);
  });
  hub_.Add("b", [&](const v1::Invalidation& ev) {
    absl::MutexLock l(&mu);
    seen_b.push_back(ev);
  });
  const uint64_t id = IdOf("a");
  ASSERT_TRUE(Fetch(id, 3, 1, true).ok());
  ASSERT_TRUE(source_.Fire(0, Ch(1, 2, ChangeKind::kUnmap, 77)));
  source_.FillPage(3, 0xEE);
  ASSERT_TRUE(table_->Sync("a").ok());  // finds page 3 written
  ASSERT_TRUE(table_->Unexport("a").ok());

  absl::MutexLock l(&mu);
  ASSERT_EQ(seen_a.size(), 3u);
  for (auto& ev : seen_a) EXPECT_EQ(ev.name(), "a");
  EXPECT_EQ(seen_a[0].kind(), v1::INVALIDATION_KIND_UNMAP);
  EXPECT_EQ(seen_a[0].first_page(), 1u);
  EXPECT_EQ(seen_a[0].npages(), 2u);
  EXPECT_EQ(seen_a[0].seq(), 1u);
  EXPECT_EQ(seen_a[0].detected_ns(), 77u);
  EXPECT_EQ(seen_a[1].kind(), v1::INVALIDATION_KIND_WRITE);
  EXPECT_EQ(seen_a[1].first_page(), 3u);
  EXPECT_EQ(seen_a[1].npages(), 1u);
  EXPECT_EQ(seen_a[1].seq(), 2u);
  EXPECT_EQ(seen_a[2].kind(), v1::INVALIDATION_KIND_UNEXPORT);
  EXPECT_EQ(seen_a[2].seq(), 3u);
  EXPECT_TRUE(seen_b.empty()) << "another export's watchers hear nothing";
}

TEST(WatchHub, FiltersByNameAndStopsAfterRemove) {
  WatchHub hub;
  std::vector<std::string> got;
  const uint64_t a = hub.Add("a", [&](const v1::Invalidation& ev) { got.push_back("a" + ev.name()); });
  const uint64_t a2 = hub.Add("a", [&](const v1::Invalidation& ev) { got.push_back("A" + ev.name()); });
  hub.Add("b", [&](const v1::Invalidation& ev) { got.push_back("b" + ev.name()); });
  EXPECT_NE(a, a2);
  v1::Invalidation ev;
  ev.set_name("a");
  hub.Publish(ev);
  EXPECT_THAT(got, ElementsAre("aa", "Aa"));
  hub.Remove(a);
  hub.Publish(ev);
  EXPECT_THAT(got, ElementsAre("aa", "Aa", "Aa"));
  ev.set_name("c");
  hub.Publish(ev);  // nobody watches c
  EXPECT_EQ(got.size(), 3u);
  hub.Remove(12345);  // unknown: harmless
}

// --------------------------------------------------------------- fetching

TEST_F(ExportTableTest, ServeFetchCopiesTheRange) {
  ASSERT_TRUE(Export("a", 10, 4).ok());
  std::vector<uint8_t> buf;
  auto seq = Fetch(IdOf("a"), 1, 3, false, &buf);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 0u);
  for (uint64_t i = 0; i < 3; ++i) {
    std::vector<uint8_t> want = source_.PageContent(11 + i);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), buf.begin() + i * kPageSize)) << "page " << i;
    EXPECT_EQ(buf[i * kPageSize], 12 + i);
  }
}

TEST_F(ExportTableTest, ServeFetchOutOfRange) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  const int reads = source_.reads();
  EXPECT_EQ(Fetch(id, 4, 1, true).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(Fetch(id, 3, 2, true).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(Fetch(id, 100, 1, true).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(Fetch(id, UINT64_MAX, 2, true).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(Fetch(id, UINT64_MAX / kPageSize + 1, 1, true).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(source_.reads(), reads) << "nothing may be read for a refused fetch";
  EXPECT_TRUE(Fetch(id, 3, 1, true).ok());
  EXPECT_EQ(Fetch(id + 999, 0, 1, true).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(ExportTableTest, ServeFetchPassesReadErrorsAndTracksNothing) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  auto sub = Subscribe("a", 1);
  source_.FailReads(absl::FailedPreconditionError("page 1 is not mapped"));
  auto r = Fetch(IdOf("a"), 0, 2, true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("not mapped"));
  source_.FailReads(absl::OkStatus());
  source_.FillPage(0, 0x55);
  auto s = table_->Sync("a");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->pages_invalidated(), 0u) << "a failed fetch handed nothing out";
  EXPECT_TRUE(sub->records().empty());
}

TEST_F(ExportTableTest, ServeFetchReturnsTheSeqSampledBeforeTheRead) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  ASSERT_TRUE(source_.Fire(0, Ch(0, 1, ChangeKind::kUnmap)));
  EXPECT_EQ(Fetch(id, 0, 1, true).value(), 1u);
  // An invalidation that races the copy: the reply must carry the older
  // seq, so the importer sees that its data may predate the invalidation.
  source_.OnNextRead([&] { ASSERT_TRUE(source_.Fire(0, Ch(1, 1, ChangeKind::kRemap))); });
  auto seq = Fetch(id, 1, 1, true);
  ASSERT_TRUE(seq.ok());
  EXPECT_EQ(*seq, 1u);
  EXPECT_EQ(table_->Describe("a")->seq(), 2u);
  EXPECT_EQ(Fetch(id, 1, 1, true).value(), 2u);
}

TEST_F(ExportTableTest, ReadLocal) {
  ASSERT_TRUE(Export("a", 4, 2).ok());
  std::vector<uint8_t> buf(100);
  auto seq = table_->ReadLocal("a", kPageSize + 10, absl::MakeSpan(buf));
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(*seq, 0u);
  EXPECT_EQ(buf[0], 6);  // process page 5
  EXPECT_EQ(table_->ReadLocal("a", 2 * kPageSize - 50, absl::MakeSpan(buf)).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(table_->ReadLocal("a", UINT64_MAX - 10, absl::MakeSpan(buf)).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(table_->ReadLocal("b", 0, absl::MakeSpan(buf)).status().code(),
            absl::StatusCode::kNotFound);
}

// ------------------------------------------------------------------- sync

TEST_F(ExportTableTest, SyncReportsServedPagesThatChangedAndWaitsForAck) {
  ASSERT_TRUE(Export("a", 0, 8).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(id, 0, 4, true).ok());  // pages 0..3 served
  ASSERT_TRUE(Fetch(id, 6, 1, true).ok());  // page 6 served
  source_.StoreByte(1, 4095, 0xAA);         // served and written
  source_.StoreByte(2, 0, 0xAA);            // served and written
  source_.StoreByte(6, 17, 0xAA);           // served and written
  source_.FillPage(5, 0xAA);                // written, never served
  source_.FillPage(7, 0xAA);                // written, never served

  const absl::Time start = absl::Now();
  auto sync = std::async(std::launch::async, [&] { return table_->Sync("a"); });
  ASSERT_TRUE(sub->WaitForRecords(2));
  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 2u) << KindsOf(recs);
  EXPECT_EQ(recs[0].kind, ChangeKind::kWrite);
  EXPECT_EQ(recs[0].first_page, 1u);
  EXPECT_EQ(recs[0].npages, 2u);
  EXPECT_EQ(recs[0].seq, 1u);
  EXPECT_EQ(recs[1].kind, ChangeKind::kWrite);
  EXPECT_EQ(recs[1].first_page, 6u);
  EXPECT_EQ(recs[1].npages, 1u);
  EXPECT_EQ(recs[1].seq, 2u);
  EXPECT_EQ(recs[0].export_id, id);

  // Not acknowledged yet (and not even fully): Sync must still be waiting.
  EXPECT_EQ(sync.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout)
      << "Sync returned before the importer acknowledged";
  table_->OnAck(1, id, 1);
  EXPECT_EQ(sync.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout)
      << "Sync returned with seq 2 unacknowledged";
  table_->OnAck(1, id, 2);
  auto r = sync.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2)) << "waited for the timeout instead of the ack";
  EXPECT_EQ(r->pages_invalidated(), 3u);
  EXPECT_EQ(r->seq(), 2u);
  EXPECT_EQ(r->subscribers_acked(), 1u);
  EXPECT_FALSE(sub->closed());

  // Nothing changed since: a second Sync reports nothing and pushes nothing.
  auto again = table_->Sync("a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->pages_invalidated(), 0u);
  EXPECT_EQ(again->subscribers_acked(), 1u);
  EXPECT_EQ(sub->records().size(), 2u);
}

// Sync and the scrubber compare at once (each from its own sample of the
// served pages): one store is invalidated once, by whichever decides first.
TEST_F(ExportTableTest, TwoComparisonPassesAtOnceInvalidateOneChangeOnce) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  AutoAcker ack(sub.get(), table_.get());
  ASSERT_TRUE(Fetch(id, 0, 4, true).ok());
  source_.StoreByte(2, 0, 0x99);
  // The outer Sync has sampled the served pages when it reads the first;
  // the inner one runs to its end there.
  absl::StatusOr<v1::SyncResponse> inner;
  source_.OnNextRead([&] { inner = table_->Sync("a"); });
  auto outer = table_->Sync("a");
  ASSERT_TRUE(outer.ok()) << outer.status();
  ASSERT_TRUE(inner.ok()) << inner.status();
  EXPECT_EQ(inner->pages_invalidated(), 1u);
  EXPECT_EQ(outer->pages_invalidated(), 0u) << "invalidated again by the pass that sampled first";
  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 1u) << KindsOf(recs);
  EXPECT_EQ(recs[0].first_page, 2u);
  EXPECT_EQ(recs[0].npages, 1u);
  // A store after both passes is still found by the next one.
  source_.StoreByte(3, 0, 0x99);
  EXPECT_EQ(table_->Sync("a")->pages_invalidated(), 1u);
}

TEST_F(ExportTableTest, InvalidatedPagesAreNoLongerServed) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  AutoAcker ack(sub.get(), table_.get());
  ASSERT_TRUE(Fetch(id, 0, 4, true).ok());
  ASSERT_TRUE(source_.Fire(0, Ch(1, 2, ChangeKind::kUnmap)));  // the importer dropped 1 and 2
  for (uint64_t p = 0; p < 4; ++p) source_.StoreByte(p, 0, 0x99);
  auto r = table_->Sync("a");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->pages_invalidated(), 2u) << "only pages 0 and 3 are still held";
  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 3u) << KindsOf(recs);
  EXPECT_EQ(recs[1].first_page, 0u);
  EXPECT_EQ(recs[1].npages, 1u);
  EXPECT_EQ(recs[2].first_page, 3u);
  EXPECT_EQ(recs[2].npages, 1u);
  EXPECT_EQ(r->subscribers_acked(), 1u);
}

TEST_F(ExportTableTest, RefetchedPageIsTrackedAgain) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  const uint64_t id = IdOf("a");
  ASSERT_TRUE(Fetch(id, 0, 1, true).ok());
  source_.FillPage(0, 0x10);
  EXPECT_EQ(table_->Sync("a")->pages_invalidated(), 1u);
  ASSERT_TRUE(Fetch(id, 0, 1, true).ok());  // the importer reads it again
  source_.FillPage(0, 0x20);
  EXPECT_EQ(table_->Sync("a")->pages_invalidated(), 1u);
}

TEST_F(ExportTableTest, UntrackedFetchIsNotReportedBySync) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 4, /*track=*/false).ok());
  for (uint64_t p = 0; p < 4; ++p) source_.FillPage(p, 0x33);
  auto r = table_->Sync("a");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->pages_invalidated(), 0u);
  EXPECT_EQ(r->seq(), 0u);
  EXPECT_TRUE(sub->records().empty());
}

TEST_F(ExportTableTest, SyncTreatsAnUnreadableServedPageAsChanged) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 2, true).ok());
  source_.FailReads(absl::FailedPreconditionError("gone"));
  auto r = table_->Sync("a");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->pages_invalidated(), 2u);
}

TEST_F(ExportTableTest, SyncDisconnectsAnImporterThatNeverAcks) {
  ExportLimits l = Limits();
  l.sync_timeout = absl::Milliseconds(100);
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 2).ok());
  const uint64_t id = IdOf("a");
  auto silent = Subscribe("a", 1);
  auto healthy = Subscribe("a", 2);
  AutoAcker ack(healthy.get(), table_.get());
  ASSERT_TRUE(Fetch(id, 0, 1, true).ok());
  source_.FillPage(0, 0x42);

  const absl::Time start = absl::Now();
  auto r = table_->Sync("a");
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(took, absl::Milliseconds(95)) << "gave up before sync_timeout";
  EXPECT_LT(took, absl::Seconds(1));
  EXPECT_EQ(r->pages_invalidated(), 1u);
  EXPECT_EQ(r->subscribers_acked(), 1u);
  EXPECT_TRUE(silent->closed()) << "a laggard must be disconnected so it invalidates on reconnect";
  EXPECT_EQ(silent->close_calls(), 1);
  EXPECT_FALSE(healthy->closed());
  EXPECT_EQ(silent->records().size(), 1u);
  EXPECT_EQ(healthy->records().size(), 1u);
}

TEST_F(ExportTableTest, SyncWithoutChangesDoesNotWait) {
  ExportLimits l = Limits();
  l.sync_timeout = absl::Seconds(5);
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto silent = Subscribe("a", 1);  // never acks, but has nothing to ack
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 2, true).ok());
  const absl::Time start = absl::Now();
  auto r = table_->Sync("a");
  ASSERT_TRUE(r.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(r->pages_invalidated(), 0u);
  EXPECT_EQ(r->subscribers_acked(), 1u);
  EXPECT_FALSE(silent->closed());
}

TEST_F(ExportTableTest, SyncDoesNotWaitForAClosedSubscriber) {
  ExportLimits l = Limits();
  l.sync_timeout = absl::Seconds(5);
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 1, true).ok());
  sub->Close();  // the connection ended: PushInvalidation now fails
  source_.FillPage(0, 0x42);
  const absl::Time start = absl::Now();
  auto r = table_->Sync("a");
  ASSERT_TRUE(r.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(r->pages_invalidated(), 1u);
  EXPECT_EQ(r->subscribers_acked(), 0u);
}

TEST_F(ExportTableTest, SyncReleasedWhenTheLaggardsConnectionCloses) {
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 1, true).ok());
  source_.FillPage(0, 0x42);
  const absl::Time start = absl::Now();
  auto sync = std::async(std::launch::async, [&] { return table_->Sync("a"); });
  ASSERT_TRUE(sub->WaitForRecords(1));
  table_->OnSubscriberClosed(1);
  auto r = sync.get();
  ASSERT_TRUE(r.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "Sync waited for a closed connection";
  EXPECT_EQ(r->subscribers_acked(), 0u);
}

// ------------------------------------------------------------------- exit

TEST_F(ExportTableTest, ExitMarksGone) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(source_.Fire(0, Ch(0, 4, ChangeKind::kExit, 5)));

  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].kind, ChangeKind::kExit);
  EXPECT_EQ(recs[0].first_page, 0u);
  EXPECT_EQ(recs[0].npages, 4u);
  EXPECT_EQ(recs[0].seq, 1u);

  EXPECT_EQ(Fetch(id, 0, 1, true).status().code(), absl::StatusCode::kFailedPrecondition);
  auto d = table_->Describe("a");
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("exited"));
  EXPECT_EQ(table_->Sync("a").status().code(), absl::StatusCode::kFailedPrecondition);
  std::vector<uint8_t> buf(10);
  EXPECT_EQ(table_->ReadLocal("a", 0, absl::MakeSpan(buf)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(table_->Subscribe(id, std::make_shared<FakeSubscriber>(2)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_EQ(table_->List().size(), 1u);
  EXPECT_TRUE(table_->List()[0].gone());
  EXPECT_TRUE(table_->Has("a"));

  // Nothing after the exit: everything was already invalidated.
  source_.Fire(0, Ch(1, 1, ChangeKind::kUnmap));
  EXPECT_EQ(sub->records().size(), 1u);
  EXPECT_EQ(table_->List()[0].seq(), 1u);
  // The operator can still withdraw it.
  EXPECT_TRUE(table_->Unexport("a").ok());
  EXPECT_FALSE(table_->Has("a"));
}

TEST_F(ExportTableTest, GoneExportsNameCanBeReused) {
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t old_id = IdOf("a");
  ASSERT_TRUE(source_.Fire(0, Ch(0, 4, ChangeKind::kExit)));
  auto info = Export("a", 8, 2);  // a new process exports under the same name
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->gone());
  EXPECT_EQ(info->len(), 2 * kPageSize);
  EXPECT_EQ(info->seq(), 0u);
  const uint64_t new_id = IdOf("a");
  EXPECT_NE(new_id, old_id);
  EXPECT_EQ(table_->List().size(), 1u);
  EXPECT_FALSE(source_.attached(0)) << "the replaced export's range must be detached";
  EXPECT_TRUE(source_.attached(1));
  EXPECT_FALSE(Fetch(old_id, 0, 1, true).ok()) << "the old id must not serve the new export";
  std::vector<uint8_t> buf;
  ASSERT_TRUE(Fetch(new_id, 0, 1, true, &buf).ok());
  EXPECT_EQ(buf[0], 9);  // process page 8
}

// ------------------------------------------------------------------ scrub

TEST_F(ExportTableTest, ScrubFindsChangedServedPages) {
  source_.SetNeedsScrub(true);
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(id, 0, 3, true).ok());

  table_->Scrub();
  EXPECT_TRUE(sub->records().empty()) << "nothing changed";

  source_.StoreByte(1, 99, 0xF0);
  source_.StoreByte(3, 0, 0xF0);  // not served
  table_->Scrub();
  auto recs = sub->records();
  ASSERT_EQ(recs.size(), 1u) << KindsOf(recs);
  EXPECT_EQ(recs[0].kind, ChangeKind::kWrite);
  EXPECT_EQ(recs[0].first_page, 1u);
  EXPECT_EQ(recs[0].npages, 1u);

  table_->Scrub();
  EXPECT_EQ(sub->records().size(), 1u) << "an invalidated page is not reported twice";
}

// Issue 8, cause 2: importer X caches page 1 at content v1; the page
// changes in place (no notifier: same frame); importer Y fetches it at v2.
// The second copy is proof of a change: X must be told at once. (Before the
// served versions were kept by the coherence core, the recorded hash simply
// became v2 and the next scrub compared v2 with v2: X kept v1 forever.)
TEST_F(ExportTableTest, ServingChangedContentInvalidatesTheOlderCopies) {
  source_.SetNeedsScrub(true);
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto x = Subscribe("a", 1);
  auto y = Subscribe("a", 2);
  auto seq_x = Fetch(id, 0, 3, true);  // X caches pages 0..2 at v1
  ASSERT_TRUE(seq_x.ok());

  source_.StoreByte(1, 7, 0xA5);  // in place: no Fire, as a reused frame
  auto seq_y = Fetch(id, 1, 1, true);  // Y fetches page 1 at v2
  ASSERT_TRUE(seq_y.ok());

  auto recs = x->records();
  ASSERT_EQ(recs.size(), 1u) << KindsOf(recs);
  EXPECT_EQ(recs[0].kind, ChangeKind::kWrite);
  EXPECT_EQ(recs[0].first_page, 1u);
  EXPECT_EQ(recs[0].npages, 1u);
  EXPECT_GT(recs[0].seq, *seq_y) << "Y received it before its reply: it does not install v2 either";
  EXPECT_EQ(y->records().size(), 1u);

  // Nothing else to find: the invalidation forgot the served version, and
  // the unchanged pages compare equal.
  table_->Scrub();
  EXPECT_EQ(x->records().size(), 1u) << KindsOf(x->records());

  // Both refetch page 1 at v2: the same version, nothing to report.
  ASSERT_TRUE(Fetch(id, 1, 1, true).ok());
  ASSERT_TRUE(Fetch(id, 1, 1, true).ok());
  EXPECT_EQ(x->records().size(), 1u) << KindsOf(x->records());
}

// A copy that raced an invalidation is not a version anybody installs (the
// importer gets the invalidation first), so it is not recorded: recording it
// would make the next comparison report a change that is not one.
TEST_F(ExportTableTest, ACopyOvertakenByAnInvalidationIsNotRecorded) {
  source_.SetNeedsScrub(true);
  ASSERT_TRUE(Export("a", 0, 4).ok());
  const uint64_t id = IdOf("a");
  auto x = Subscribe("a", 1);
  source_.OnNextRead([&] {
    source_.StoreByte(2, 0, 0x11);
    ASSERT_TRUE(source_.Fire(0, Ch(2, 1, ChangeKind::kRemap)));
  });
  ASSERT_TRUE(Fetch(id, 2, 1, true).ok());
  ASSERT_EQ(x->records().size(), 1u);
  table_->Scrub();
  EXPECT_EQ(x->records().size(), 1u) << KindsOf(x->records());
}

TEST_F(ExportTableTest, ScrubSkipsSourcesThatSeeEveryChange) {
  source_.SetNeedsScrub(false);
  ASSERT_TRUE(Export("a", 0, 2).ok());
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 2, true).ok());
  source_.FillPage(0, 0x77);
  const int reads = source_.reads();
  table_->Scrub();
  EXPECT_TRUE(sub->records().empty());
  EXPECT_EQ(source_.reads(), reads);
}

TEST_F(ExportTableTest, ScrubIsBoundedPerPassAndCoversEverything) {
  source_.SetNeedsScrub(true);
  ExportLimits l = Limits();
  l.scrub_pages_per_pass = 2;
  MakeTable(l);
  ASSERT_TRUE(Export("a", 0, 8).ok());
  auto sub = Subscribe("a", 1);
  ASSERT_TRUE(Fetch(IdOf("a"), 0, 5, true).ok());
  for (uint64_t p = 0; p < 5; ++p) source_.StoreByte(p, 0, 0xCC);

  int reads = source_.reads();
  table_->Scrub();
  EXPECT_EQ(source_.reads() - reads, 2);
  EXPECT_EQ(sub->records().size(), 1u);  // pages 0-1, one run
  table_->Scrub();
  table_->Scrub();
  std::vector<bool> seen(8, false);
  for (auto& r : sub->records()) {
    for (uint64_t p = r.first_page; p < r.first_page + r.npages; ++p) seen[p] = true;
  }
  EXPECT_THAT(seen, ElementsAre(true, true, true, true, true, false, false, false))
      << KindsOf(sub->records());
}

}  // namespace
}  // namespace svm::core

// ------------------------------------------------------------- zero-copy
//
// The export's range is a real memfd mapping of this process (SharedMapping
// opens it through /proc/self/map_files); the transport is a fake whose
// registrations record when they are released.
namespace svm::core {
namespace {

class FakeRegion final : public transport::RegisteredRegion {
 public:
  FakeRegion(uint32_t rkey, bool odp, std::atomic<int>* live) : rkey_(rkey), odp_(odp), live_(live) {
    ++*live_;
  }
  ~FakeRegion() override { --*live_; }
  transport::RemoteRegion remote() const override { return {0x1000, 0, rkey_, odp_}; }
  // A key's view: rkey_ in the low 16 bits, the key's order of first use
  // (from 1) above them; the probe's own rkey is never handed out.
  absl::StatusOr<transport::RemoteRegion> RemoteFor(const std::string& key) override {
    absl::MutexLock l(&mu_);
    auto it = std::find(keys_.begin(), keys_.end(), key);
    if (it == keys_.end()) it = keys_.insert(keys_.end(), key);
    const uint32_t order = static_cast<uint32_t>(it - keys_.begin()) + 1;
    return transport::RemoteRegion{0x1000, 0, (order << 16) | rkey_, odp_};
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> keys_ ABSL_GUARDED_BY(mu_);
  const uint32_t rkey_;
  const bool odp_;
  std::atomic<int>* const live_;
};

class FakeZeroCopyTransport final : public transport::Transport {
 public:
  explicit FakeZeroCopyTransport(bool odp) : Transport(transport::Capabilities{.one_sided = true}), odp_(odp) {}
  const char* name() const override { return "fake-rdma"; }
  absl::Status Start(const HostPort&, transport::ExportBackend*) override { return absl::OkStatus(); }
  std::string listen_address() const override { return ""; }
  absl::StatusOr<transport::SessionOffer> PrepareSession(
      const std::string&, const std::string&, std::unique_ptr<transport::ConnectionSlot>,
      const std::string&) override {
    return absl::UnimplementedError("fake");
  }
  std::shared_ptr<transport::Subscriber> FindSubscriber(const std::string&) override { return nullptr; }
  absl::StatusOr<std::unique_ptr<transport::PeerChannel>> Connect(const std::string&,
                                                                  const transport::SessionOffer&,
                                                                  transport::ImportBackend*,
                                                                  const std::string&) override {
    return absl::UnimplementedError("fake");
  }
  void Stop() override {}
  absl::StatusOr<std::unique_ptr<transport::RegisteredRegion>> RegisterRegion(void*, size_t) override {
    return std::unique_ptr<transport::RegisteredRegion>(new FakeRegion(++next_rkey_, odp_, &live));
  }
  std::atomic<int> live{0};  // registrations not released

 private:
  const bool odp_;
  std::atomic<uint32_t> next_rkey_{0};
};

class ZeroCopyTableTest : public ::testing::TestWithParam<bool> {  // odp?
 protected:
  void SetUp() override {
    fd_ = memfd_create("svm-zc-test", 0);
    ASSERT_GE(fd_, 0);
    ASSERT_EQ(ftruncate(fd_, 4 * kPageSize), 0);
    mem_ = mmap(nullptr, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    ASSERT_NE(mem_, MAP_FAILED);
    table_ = std::make_unique<ExportTable>(&source_, &hub_, &counters_, ExportLimits(), "fake-rdma");
    table_->EnableZeroCopy(&transport_);
  }
  void TearDown() override {
    table_.reset();
    munmap(mem_, 4 * kPageSize);
    close(fd_);
  }
  absl::Status Export() {
    return table_->Export("zc", getpid(), reinterpret_cast<uint64_t>(mem_), 4 * kPageSize, 0).status();
  }
  // The rkey the descriptor offers, waiting up to 2 s for one to be
  // offered (0: none offered).
  uint32_t OfferedRkey(absl::Duration wait = absl::Seconds(2), std::vector<std::string> peer = {}) {
    const absl::Time until = absl::Now() + wait;
    for (;;) {
      auto d = table_->Describe("zc", peer);
      if (d.ok() && d->has_zero_copy()) return d->zero_copy().rkey();
      if (absl::Now() >= until) return 0;
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  void Fire(ChangeKind k) { ASSERT_TRUE(source_.Fire(0, Change{0, 1, k, 1})); }

  FakeSource source_;
  WatchHub hub_;
  Counters counters_;
  FakeZeroCopyTransport transport_{GetParam()};
  std::unique_ptr<ExportTable> table_;
  int fd_ = -1;
  void* mem_ = nullptr;
};

// Protection: each peer identity is handed the rkey of its own
// registration of the region (rdma: in its own protection domain), never
// the probe's and never another identity's; asking again gives the same.
TEST_P(ZeroCopyTableTest, EachPeerIdentityGetsItsOwnRegistration) {
  ASSERT_TRUE(Export().ok());
  const uint32_t anonymous = OfferedRkey();
  const uint32_t a = OfferedRkey(absl::Seconds(2), {"node-a"});
  const uint32_t b = OfferedRkey(absl::Seconds(2), {"node-b"});
  const uint32_t ab = OfferedRkey(absl::Seconds(2), {"node-a", "alias-a"});
  ASSERT_NE(anonymous, 0u);
  ASSERT_NE(a, 0u);
  ASSERT_NE(b, 0u);
  ASSERT_NE(ab, 0u);
  EXPECT_EQ(std::set<uint32_t>({anonymous, a, b, ab}).size(), 4u) << "one registration per identity";
  EXPECT_EQ(OfferedRkey(absl::Seconds(2), {"node-a"}), a) << "made once per identity";
  for (uint32_t k : {anonymous, a, b, ab}) EXPECT_NE(k >> 16, 0u) << "the probe's rkey is never offered";
  EXPECT_EQ(transport_.live.load(), 1) << "one region, whatever the number of identities";
}

// Rule 5 at the exporter: a registration replaced by an invalidation is
// released only when every subscriber acknowledged that invalidation (the
// importer acknowledges after its READs against it completed), however
// long that takes; never on a timer shorter than that.
TEST_P(ZeroCopyTableTest, ReplacedRegistrationIsReleasedAfterEveryAcknowledgement) {
  ASSERT_TRUE(Export().ok());
  const uint32_t first = OfferedRkey();
  ASSERT_NE(first, 0u);
  const uint64_t id = table_->Describe("zc")->export_id();
  auto s1 = std::make_shared<FakeSubscriber>(1);
  auto s2 = std::make_shared<FakeSubscriber>(2);
  ASSERT_TRUE(table_->Subscribe(id, s1).ok());
  ASSERT_TRUE(table_->Subscribe(id, s2).ok());

  Fire(ChangeKind::kRemap);
  ASSERT_EQ(s1->records().size(), 1u);
  const uint64_t q = s1->records()[0].seq;
  const uint32_t next = OfferedRkey();
  ASSERT_NE(next, 0u) << "the range still maps the object: offered again";
  if (GetParam()) {
    EXPECT_EQ(next, first) << "ODP keeps its registration";
    EXPECT_EQ(transport_.live.load(), 1);
    return;
  }
  EXPECT_NE(next, first) << "pinned is registered again";
  EXPECT_EQ(transport_.live.load(), 2) << "the old one is retired, not released";
  table_->OnAck(1, id, q);
  table_->Scrub();
  absl::SleepFor(absl::Milliseconds(50));
  table_->Scrub();
  EXPECT_EQ(transport_.live.load(), 2) << "subscriber 2 has not acknowledged";
  table_->OnAck(2, id, q);
  EXPECT_EQ(transport_.live.load(), 1) << "released at the last acknowledgement";
}

TEST_P(ZeroCopyTableTest, ASubscriberThatLeavesReleasesWhatItHeld) {
  ASSERT_TRUE(Export().ok());
  ASSERT_NE(OfferedRkey(), 0u);
  const uint64_t id = table_->Describe("zc")->export_id();
  auto s1 = std::make_shared<FakeSubscriber>(1);
  ASSERT_TRUE(table_->Subscribe(id, s1).ok());
  // The range stops mapping the object: withdrawn, and retired.
  void* anon = mmap(mem_, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                    -1, 0);
  ASSERT_EQ(anon, mem_);
  Fire(ChangeKind::kRemap);
  const absl::Time until = absl::Now() + absl::Seconds(2);
  while (counters_.Snapshot()["zero_copy_withdrawals"] == 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(counters_.Snapshot()["zero_copy_withdrawals"], 1u);
  EXPECT_EQ(OfferedRkey(absl::ZeroDuration()), 0u);
  EXPECT_EQ(transport_.live.load(), 1) << "held by subscriber 1 until it acknowledges or leaves";
  table_->OnSubscriberClosed(1);
  EXPECT_EQ(transport_.live.load(), 0);
}

// A withdrawn region is not re-opened on a timer: only after the source
// reports that the exporter's mapping changed (a CPU access never re-opens
// a mapping whose object went away; device-dax after disable-device is
// such an object). A write is no mapping change.
TEST_P(ZeroCopyTableTest, AWithdrawnRegionIsOpenedAgainOnlyAfterAMappingChange) {
  ASSERT_TRUE(Export().ok());
  ASSERT_NE(OfferedRkey(), 0u);
  void* anon = mmap(mem_, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                    -1, 0);
  ASSERT_EQ(anon, mem_);
  Fire(ChangeKind::kRemap);
  const absl::Time until = absl::Now() + absl::Seconds(2);
  while (counters_.Snapshot()["zero_copy_withdrawals"] == 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(counters_.Snapshot()["zero_copy_withdrawals"], 1u);
  const uint64_t opens = counters_.Snapshot()["zero_copy_opens"];
  // The object is back at the same place, but nothing said so.
  void* again = mmap(mem_, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_, 0);
  ASSERT_EQ(again, mem_);
  absl::SleepFor(absl::Milliseconds(1100));  // past the retry interval
  table_->Scrub();
  table_->Scrub();
  EXPECT_EQ(counters_.Snapshot()["zero_copy_opens"], opens) << "re-opened without a source event";
  Fire(ChangeKind::kWrite);
  table_->Scrub();
  EXPECT_EQ(counters_.Snapshot()["zero_copy_opens"], opens) << "a write is no mapping change";
  EXPECT_EQ(OfferedRkey(absl::ZeroDuration()), 0u);
  Fire(ChangeKind::kRemap);
  table_->Scrub();
  EXPECT_EQ(counters_.Snapshot()["zero_copy_opens"], opens + 1);
  EXPECT_NE(OfferedRkey(), 0u) << "offered again after the change";
}

INSTANTIATE_TEST_SUITE_P(Registration, ZeroCopyTableTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "odp" : "pinned"; });

}  // namespace
}  // namespace svm::core
