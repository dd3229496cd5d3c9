// The control plane never waits on the data plane or on a peer: with one
// exporting peer SIGSTOPped and many reads of its import outstanding, the
// importing daemon still answers status and listings, and reads of another,
// healthy peer's import, promptly; the stuck reads fail with UNAVAILABLE
// within the peer timeout. Natively only (the bounds are wall-clock).
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;
constexpr int kStuckReads = 32;

struct Outcome {
  absl::Status status;
  absl::Duration took;
};

// Starts n fresh reads of name, each from its own thread and client.
class ReadStorm {
 public:
  ReadStorm(const Daemon& d, const std::string& name, int n) {
    for (int i = 0; i < n; ++i) {
      threads_.emplace_back([this, &d, name] {
        auto c = const_cast<Daemon&>(d).Connect();
        std::string buf(kPage, '\0');
        const absl::Time t0 = absl::Now();
        absl::Status st = absl::InternalError("no client");
        if (c) {
          ReadOptions fresh;
          fresh.fresh = true;
          st = c->Read(name, 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), kPage), fresh)
                   .status();
        }
        absl::MutexLock l(&mu_);
        outcomes_.push_back({st, absl::Now() - t0});
      });
    }
  }
  std::vector<Outcome> Join() {
    for (auto& t : threads_) t.join();
    threads_.clear();
    absl::MutexLock l(&mu_);
    return outcomes_;
  }
  ~ReadStorm() { Join(); }

 private:
  std::vector<std::thread> threads_;
  absl::Mutex mu_;
  std::vector<Outcome> outcomes_;
};

// Each control call of the healthy side, timed.
void ExpectPrompt(Client& c, const std::string& label, absl::Duration bound) {
  absl::Time t0 = absl::Now();
  auto st = c.Status();
  const absl::Duration status_took = absl::Now() - t0;
  ASSERT_TRUE(st.ok()) << label << ": " << st.status();
  EXPECT_LT(status_took, bound) << label << ": status took " << status_took;

  t0 = absl::Now();
  auto ex = c.ListExports();
  const absl::Duration exports_took = absl::Now() - t0;
  ASSERT_TRUE(ex.ok()) << label << ": " << ex.status();
  EXPECT_LT(exports_took, bound) << label << ": exports took " << exports_took;

  t0 = absl::Now();
  auto im = c.ListImports();
  const absl::Duration imports_took = absl::Now() - t0;
  ASSERT_TRUE(im.ok()) << label << ": " << im.status();
  EXPECT_LT(imports_took, bound) << label << ": imports took " << imports_took;

  t0 = absl::Now();
  auto r = ReadBytes(c, "good", 0, kPage, /*fresh=*/true);
  const absl::Duration read_took = absl::Now() - t0;
  ASSERT_TRUE(r.ok()) << label << ": " << r.status();
  EXPECT_EQ(*r, std::string(kPage, 'G'));
  EXPECT_LT(read_took, bound) << label << ": a read of the healthy peer's import took " << read_took;
  std::printf("%s: status %.1f ms, exports %.1f ms, imports %.1f ms, healthy read %.1f ms\n",
              label.c_str(), absl::ToDoubleMilliseconds(status_took),
              absl::ToDoubleMilliseconds(exports_took), absl::ToDoubleMilliseconds(imports_took),
              absl::ToDoubleMilliseconds(read_took));
}

TEST(ControlPlane, AStoppedPeerDelaysNeitherControlCallsNorReadsOfAHealthyPeer) {
  if (TestTransport() == "rdma") GTEST_SKIP() << "wall-clock bounds: tcp on the host only";
  TempDir dir;
  auto start = [&](const std::string& node) {
    auto d = Daemon::Start({.node = node, .dir = dir.path(), .transport = "tcp"});
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  };
  auto a = start("A"), c = start("C"), b = start("B");
  ASSERT_TRUE(a && b && c);
  auto good = Exporter::Start({.daemon = a.get(), .name = "good", .pages = 4, .fill = 'G',
                               .log_path = absl::StrCat(dir.path(), "/exporter-good.log")});
  auto stuck = Exporter::Start({.daemon = c.get(), .name = "stuck", .pages = 4, .fill = 'S',
                                .log_path = absl::StrCat(dir.path(), "/exporter-stuck.log")});
  ASSERT_TRUE(good.ok()) << good.status();
  ASSERT_TRUE(stuck.ok()) << stuck.status();
  auto cb = b->Connect();
  ASSERT_NE(cb, nullptr);
  ASSERT_TRUE(cb->Import(a->peer(), "good").ok());
  ASSERT_TRUE(cb->Import(c->peer(), "stuck").ok());
  ASSERT_TRUE(ReadBytes(*cb, "good", 0, kPage).ok());
  ASSERT_TRUE(ReadBytes(*cb, "stuck", 0, kPage).ok());

  ASSERT_TRUE(c->process().Stop(absl::Seconds(5)).ok());
  const absl::Duration bound = absl::Milliseconds(100);
  // The peer timeout (svmd's default --peer-timeout-ms) and the fetch
  // timeout (--fetch-timeout-ms): a stuck read fails within the larger.
  const absl::Duration stuck_bound = absl::Milliseconds(2000) + absl::Milliseconds(300);

  // 1. Reads outstanding on a connection not yet declared lost.
  {
    ReadStorm storm(*b, "stuck", kStuckReads);
    absl::SleepFor(absl::Milliseconds(200));
    ExpectPrompt(*cb, "before the connection is declared lost", bound);
    for (const Outcome& o : storm.Join()) {
      EXPECT_TRUE(absl::IsUnavailable(o.status)) << o.status;
      EXPECT_LT(o.took, stuck_bound) << o.status;
    }
  }
  // 2. The connection was declared lost: reads now try to reconnect to a
  // peer that does not answer.
  {
    ReadStorm storm(*b, "stuck", kStuckReads);
    absl::SleepFor(absl::Milliseconds(200));
    ExpectPrompt(*cb, "after the connection was declared lost", bound);
    int unavailable = 0;
    absl::Duration slowest;
    for (const Outcome& o : storm.Join()) {
      unavailable += absl::IsUnavailable(o.status);
      EXPECT_TRUE(absl::IsUnavailable(o.status)) << o.status;
      EXPECT_LT(o.took, stuck_bound) << o.status;
      slowest = std::max(slowest, o.took);
    }
    std::printf("%d stuck reads failed with UNAVAILABLE, the slowest after %.0f ms\n", unavailable,
                absl::ToDoubleMilliseconds(slowest));
  }
  c->process().Signal(SIGCONT);
  // The peer answers again: its import recovers.
  absl::StatusOr<std::string> rec = absl::UnavailableError("not tried");
  for (int i = 0; i < 50 && !rec.ok(); ++i) {
    rec = ReadBytes(*cb, "stuck", 0, kPage);
    if (!rec.ok()) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(*rec, std::string(kPage, 'S'));
}

// Peer calls are asynchronous: reads and imports waiting for a peer that
// does not answer hold no thread of the importer (its thread count stays
// near its baseline however many are outstanding), and the setup of a link
// to another peer (Hello, SetupData, DescribeExport, Subscribe) does not
// queue behind them.
TEST(ControlPlane, CallsStuckOnAStoppedPeerHoldNoThreads) {
  if (TestTransport() == "rdma") GTEST_SKIP() << "wall-clock bounds: tcp on the host only";
  constexpr int kStuck = 64;
  constexpr int kClients = 8;
  TempDir dir;
  auto start = [&](const std::string& node) {
    auto d = Daemon::Start({.node = node, .dir = dir.path(), .transport = "tcp"});
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  };
  auto a = start("A"), c = start("C"), b = start("B");
  ASSERT_TRUE(a && b && c);
  auto other = Exporter::Start({.daemon = a.get(), .name = "other", .pages = 4, .fill = 'O',
                                .log_path = absl::StrCat(dir.path(), "/exporter-other.log")});
  auto stuck = Exporter::Start({.daemon = c.get(), .name = "stuck", .pages = 4, .fill = 'S',
                                .log_path = absl::StrCat(dir.path(), "/exporter-stuck.log")});
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE(stuck.ok()) << stuck.status();
  auto cb = b->Connect();
  ASSERT_NE(cb, nullptr);
  ASSERT_TRUE(cb->Import(c->peer(), "stuck").ok());
  ASSERT_TRUE(ReadBytes(*cb, "stuck", 0, kPage).ok());
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(b->Connect());
    ASSERT_NE(clients.back(), nullptr);
    ASSERT_TRUE(clients.back()->Status().ok());
  }
  absl::SleepFor(absl::Milliseconds(200));
  const int baseline = FootprintOf(b->process().pid()).threads;
  ASSERT_GT(baseline, 0);

  ASSERT_TRUE(c->process().Stop(absl::Seconds(5)).ok());
  absl::Mutex mu;
  std::vector<Outcome> reads, imports;
  std::vector<std::thread> threads;
  for (int i = 0; i < kStuck; ++i) {
    Client* cl = clients[i % kClients].get();
    threads.emplace_back([&, cl] {
      std::string buf(kPage, '\0');
      ReadOptions fresh;
      fresh.fresh = true;
      const absl::Time t0 = absl::Now();
      absl::Status st =
          cl->Read("stuck", 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), kPage), fresh)
              .status();
      absl::MutexLock l(&mu);
      reads.push_back({st, absl::Now() - t0});
    });
    threads.emplace_back([&, cl, i] {
      const absl::Time t0 = absl::Now();
      absl::Status st = cl->Import(c->peer(), "stuck", absl::StrCat("stuck-", i)).status();
      absl::MutexLock l(&mu);
      imports.push_back({st, absl::Now() - t0});
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  const int during = FootprintOf(b->process().pid()).threads;
  // A link to a peer never contacted before: Hello and the rest of the
  // setup, while every call above still waits for the stopped peer.
  const absl::Time t0 = absl::Now();
  auto imported = cb->Import(a->peer(), "other");
  const absl::Duration import_took = absl::Now() - t0;
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto r = ReadBytes(*cb, "other", 0, kPage, /*fresh=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(kPage, 'O'));
  for (auto& t : threads) t.join();
  std::printf("svmd threads: %d before, %d with %d reads and %d imports outstanding; "
              "an import from another peer took %.1f ms\n",
              baseline, during, kStuck, kStuck, absl::ToDoubleMilliseconds(import_took));
  EXPECT_LE(during, baseline + 8) << "the importer grew threads for calls stuck on a peer";
  EXPECT_LT(import_took, absl::Milliseconds(500));
  const absl::Duration stuck_bound = absl::Milliseconds(2000) + absl::Milliseconds(300);
  ASSERT_EQ(reads.size(), static_cast<size_t>(kStuck));
  ASSERT_EQ(imports.size(), static_cast<size_t>(kStuck));
  for (const Outcome& o : reads) {
    EXPECT_TRUE(absl::IsUnavailable(o.status)) << o.status;
    EXPECT_LT(o.took, stuck_bound) << o.status;
  }
  for (const Outcome& o : imports) {
    EXPECT_TRUE(absl::IsUnavailable(o.status)) << o.status;
    EXPECT_LT(o.took, stuck_bound) << o.status;
  }
  c->process().Signal(SIGCONT);
}

// Every outstanding call completes when the importer shuts down: with
// reads and imports waiting for a stopped peer, SIGTERM ends svmd cleanly
// (exit 0) within the peer timeout, and every caller gets an answer.
TEST(ControlPlane, ShutdownWithCallsOutstandingToAStoppedPeerIsClean) {
  if (TestTransport() == "rdma") GTEST_SKIP() << "tcp on the host only";
  constexpr int kCalls = 16;
  TempDir dir;
  auto start = [&](const std::string& node) {
    auto d = Daemon::Start({.node = node, .dir = dir.path(), .transport = "tcp"});
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  };
  auto c = start("C"), b = start("B");
  ASSERT_TRUE(b && c);
  auto stuck = Exporter::Start({.daemon = c.get(), .name = "stuck", .pages = 4, .fill = 'S',
                                .log_path = absl::StrCat(dir.path(), "/exporter-stuck.log")});
  ASSERT_TRUE(stuck.ok()) << stuck.status();
  auto cb = b->Connect();
  ASSERT_NE(cb, nullptr);
  ASSERT_TRUE(cb->Import(c->peer(), "stuck").ok());
  ASSERT_TRUE(ReadBytes(*cb, "stuck", 0, kPage).ok());
  ASSERT_TRUE(c->process().Stop(absl::Seconds(5)).ok());
  std::atomic<int> answered{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&] {
      std::string buf(kPage, '\0');
      ReadOptions fresh;
      fresh.fresh = true;
      (void)cb->Read("stuck", 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), kPage), fresh);
      ++answered;
    });
    threads.emplace_back([&, i] {
      (void)cb->Import(c->peer(), "stuck", absl::StrCat("stuck-", i));
      ++answered;
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  b->process().Signal(SIGTERM);
  auto st = b->process().Wait(Scaled(absl::Seconds(5)));
  EXPECT_TRUE(st.ok()) << "svmd did not exit: " << st.status();
  if (st.ok()) {
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << *st;
  } else {
    b->Kill();  // so that the callers get their answers
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(answered.load(), 2 * kCalls);
  c->process().Signal(SIGCONT);
}

}  // namespace
}  // namespace svm::testing
