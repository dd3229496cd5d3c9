// Network faults on the tcp path (issue 11, "Faults"): an exporting and an
// importing daemon, each in a network namespace of its own, joined by veth
// pairs on a bridge; faults on the importer's link (both directions)
// while the exporter storms its pages (invalidations), the test calls Sync,
// and the importer reads the export whole, through the cache and fresh:
// 1% and 10% loss (nftables `numgen random` drops), 50 ms delay with 10 ms
// jitter and reordering (`tc netem`: these skip, saying so, on a kernel
// without sch_netem, as the CI host's), and a 5 s partition (nftables drops
// everything) in the middle of it all.
//
// Required: every read succeeds with untorn pages (a page read while the
// storm was stamping it holds that one version and zeros: the exporter's
// own memory at that moment, counted, not failed), faults on a page the
// storm has unmapped (FAILED_PRECONDITION, as a CPU access would) or fails
// UNAVAILABLE, and none takes longer than --fetch-timeout-ms (plus 1 s of
// scheduling slack on this shared machine); every Sync returns within
// --sync-timeout-ms (plus the same slack); after the fault heals the import
// reads again by itself (no new import); after a Sync and a drain the
// importer's mapped, cached and fresh reads equal the exporter's memory (the
// convergence check); and both daemons' fd counts and RSS return near what
// they were before the fault.
//
// The fault lasts SVM_NETFAULT_SECONDS (default 6; the heavier variant in
// tests/integration/README.md runs it longer).
#include <dirent.h>

#include <atomic>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/integration/convergence.h"
#include "tests/integration/harness.h"
#include "tests/integration/netns.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPages = 64;
constexpr uint64_t kBytes = kPages * kStampPage;

struct Fault {
  std::string name;
  int drop_percent = 0;             // nftables, for the whole run
  std::vector<std::string> netem;   // tc netem, for the whole run
  bool partition = false;           // 5 s of dropping everything in the middle of the run
};

void PrintTo(const Fault& f, std::ostream* os) { *os << f.name; }

int FdCount(pid_t pid) {
  int n = 0;
  DIR* d = opendir(absl::StrCat("/proc/", pid, "/fd").c_str());
  if (d == nullptr) return -1;
  while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

uint64_t RssKb(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view v = line;
    if (absl::ConsumePrefix(&v, "VmRSS:")) {
      uint64_t kb = 0;
      (void)absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::StripSuffix(absl::StripAsciiWhitespace(v), "kB")), &kb);
      return kb;
    }
  }
  return 0;
}

absl::Duration FaultLength() {
  const char* s = std::getenv("SVM_NETFAULT_SECONDS");
  int v = 0;
  return s != nullptr && absl::SimpleAtoi(s, &v) && v > 0 ? absl::Seconds(v) : absl::Seconds(6);
}

class NetFault : public ::testing::TestWithParam<Fault> {
 protected:
  void SetUp() override {
    if (const std::string why = Fabric::Unsupported(); !why.empty()) GTEST_SKIP() << why;
    if (!GetParam().netem.empty()) {
      if (const std::string why = Fabric::NetemUnsupported(); !why.empty()) GTEST_SKIP() << why;
    }
  }
};

TEST_P(NetFault, ReadsAndInvalidationsSurviveAndConverge) {
  const Fault& f = GetParam();
  const absl::Duration fetch_timeout = Scaled(absl::Milliseconds(1500));  // the harness's
  const absl::Duration sync_timeout = Scaled(absl::Seconds(3));
  const absl::Duration slack = Scaled(absl::Seconds(1));
  // A read fails once the exporter has been silent for a whole fetch timeout
  // since its last byte, not since the read began (the fetch deadline's
  // rule). Under loss the answer's bytes trickle in through retransmissions,
  // so a read that received for a while and then met a silent stretch (TCP's
  // backed-off retransmission timer) fails up to a timeout later than one
  // issued into silence: seen in a CI run under loss10, 2.89 s (bytes until 1.4 s
  // in, then 1.5 s of silence). And a read can end up served on the next
  // connection, after its link's reconnect delay (0.5 s), where under loss
  // its answer may trickle again: seen in a CI run under loss10, 4.34 s (the
  // connection lost 3.8 s after the read began, the read answered right
  // after the next one opened).
  // Without loss the bound stays the timeout.
  const absl::Duration read_bound =
      fetch_timeout + slack + (f.drop_percent > 0 ? 2 * fetch_timeout : absl::ZeroDuration());
  const absl::Duration length = f.partition ? std::max(FaultLength(), absl::Seconds(8)) : FaultLength();
  TempDir dir;
  auto net = NetCluster::Start(dir.path(), 1,
                               {"--sync-timeout-ms", std::to_string(absl::ToInt64Milliseconds(sync_timeout))});
  ASSERT_TRUE(net.ok()) << net.status();
  NetCluster& n = **net;
  Daemon& b = *n.importers[0];
  auto e = Exporter::Start({.daemon = n.exporter.get(), .name = "storm", .pages = kPages,
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE((*e)->Command("stamp 1").ok());
  auto a = n.exporter->Connect();
  auto c = b.Connect();
  ASSERT_TRUE(a && c);
  ASSERT_TRUE(c->Import(n.exporter->peer(), "storm").ok());
  // Warm up every path the fault will exercise, then take the baseline.
  ASSERT_TRUE(ReadBytes(*c, "storm", 0, kBytes).ok());
  ASSERT_TRUE(ReadBytes(*c, "storm", 0, kBytes, /*fresh=*/true).ok());
  ASSERT_TRUE(a->Sync("storm").ok());
  const pid_t pids[2] = {n.exporter->process().pid(), b.process().pid()};
  int fds0[2];
  uint64_t rss0[2];
  for (int i = 0; i < 2; ++i) {
    fds0[i] = FdCount(pids[i]);
    rss0[i] = RssKb(pids[i]);
  }

  if (!f.netem.empty()) {
    ASSERT_TRUE(n.fabric->Netem(n.importer_nodes[0], f.netem).ok());
  }
  if (f.drop_percent > 0) {
    ASSERT_TRUE(n.fabric->Drop(n.importer_nodes[0], f.drop_percent).ok());
  }
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> storm_reply;
  std::thread storm([&] {
    storm_reply = (*e)->Command(absl::StrCat("storm ", absl::ToDoubleSeconds(length), " 4242 1 2000"),
                                length + absl::Seconds(30));
  });
  std::atomic<bool> over{false};
  std::atomic<uint64_t> ok{0}, unmapped{0}, unavailable{0}, syncs{0}, in_flight{0};
  absl::Mutex mu;
  std::vector<std::string> errors;
  absl::Duration slowest_read, slowest_sync;
  std::string slowest_what;
  auto fail = [&](std::string what) {
    absl::MutexLock l(&mu);
    if (errors.size() < 10) errors.push_back(std::move(what));
  };
  std::vector<std::thread> threads;
  for (bool fresh : {false, true}) {
    threads.emplace_back([&, fresh] {
      std::string buf(kBytes, '\0');
      ReadOptions o;
      o.fresh = fresh;
      while (!over) {
        const absl::Time t0 = absl::Now();
        auto r = c->Read("storm", 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), kBytes), o);
        const absl::Duration took = absl::Now() - t0;
        {
          absl::MutexLock l(&mu);
          if (took > slowest_read) {
            slowest_read = took;
            slowest_what = absl::StrCat(fresh ? "fresh, " : "cached, ", r.ok() ? "OK" : r.status().ToString(),
                                        ", ", absl::ToDoubleSeconds(t0 - start), " s in");
          }
        }
        if (took > read_bound) {
          fail(absl::StrCat(fresh ? "fresh" : "cached", " read took ", absl::FormatDuration(took), ": ",
                            r.ok() ? "OK" : r.status().ToString()));
        }
        if (r.ok()) {
          ++ok;
          for (uint64_t p = 0; p < kPages; ++p) {
            const char* page = buf.data() + p * kStampPage;
            if (StampOf(page)) continue;
            if (TornByAStoreInFlight(page)) {
              ++in_flight;  // read while the storm was stamping it
            } else {
              fail(absl::StrCat("page ", p, " read torn (not by a store in flight)"));
            }
          }
        } else if (absl::IsFailedPrecondition(r.status())) {
          ++unmapped;
        } else if (absl::IsUnavailable(r.status())) {
          ++unavailable;
          absl::SleepFor(absl::Milliseconds(50));
        } else {
          fail(absl::StrCat(fresh ? "fresh" : "cached", " read: ", r.status().ToString()));
        }
        absl::SleepFor(absl::Milliseconds(2));
      }
    });
  }
  threads.emplace_back([&] {
    while (!over) {
      const absl::Time t0 = absl::Now();
      auto r = a->Sync("storm");
      const absl::Duration took = absl::Now() - t0;
      {
        absl::MutexLock l(&mu);
        slowest_sync = std::max(slowest_sync, took);
      }
      if (!r.ok()) fail(absl::StrCat("Sync: ", r.status().ToString()));
      if (took > sync_timeout + slack) fail(absl::StrCat("Sync took ", absl::FormatDuration(took)));
      ++syncs;
      absl::SleepFor(absl::Milliseconds(500));
    }
  });
  if (f.partition) {  // 5 s cut in the middle of the storm, reads and Syncs
    absl::SleepFor(start + (length - absl::Seconds(5)) / 2 - absl::Now());
    auto st = n.fabric->Partition(n.importer_nodes[0]);
    EXPECT_TRUE(st.ok()) << st;
    absl::SleepFor(absl::Seconds(5));
    EXPECT_TRUE(n.fabric->Heal(n.importer_nodes[0]).ok());
  }
  storm.join();
  if (!f.partition) {
    EXPECT_TRUE(n.fabric->Heal(n.importer_nodes[0]).ok());
  }
  over = true;
  for (auto& t : threads) t.join();
  ASSERT_TRUE(storm_reply.ok()) << storm_reply.status();
  EXPECT_TRUE(absl::StartsWith(*storm_reply, "ok")) << *storm_reply;
  for (const auto& err : errors) ADD_FAILURE() << f.name << ": " << err;
  EXPECT_GT(ok.load(), 0u) << "no read succeeded during the fault";

  // Recovery by itself: a fresh read succeeds again, without a new import.
  const absl::Time healed = absl::Now();
  absl::Status fresh = absl::UnavailableError("not tried");
  while (absl::Now() < healed + Scaled(absl::Seconds(15))) {
    fresh = ReadBytes(*c, "storm", 0, kBytes, /*fresh=*/true).status();
    if (fresh.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(fresh.ok()) << "the import did not recover after the fault healed: " << fresh;
  const absl::Duration recovery = absl::Now() - healed;

  auto sync = (*e)->Command("sync");
  EXPECT_TRUE(sync.ok() && absl::StartsWith(*sync, "ok")) << (sync.ok() ? *sync : sync.status().ToString());
  absl::SleepFor(absl::Seconds(2));
  auto expected = ExporterPages(**e, *n.exporter, "storm", kPages);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (const std::string& d : Diverging(*c, "storm", *expected, {"mapped", "cached", "fresh"})) {
    ADD_FAILURE() << f.name << ": " << d;
  }

  // Resources back near the baseline (connections re-made, nothing leaked).
  int fds1[2];
  uint64_t rss1[2];
  const absl::Time settle = absl::Now() + Scaled(absl::Seconds(5));
  for (;;) {
    bool near = true;
    for (int i = 0; i < 2; ++i) {
      fds1[i] = FdCount(pids[i]);
      rss1[i] = RssKb(pids[i]);
      near = near && fds1[i] <= fds0[i] + 2 && rss1[i] <= rss0[i] + 16 * 1024;
    }
    if (near || absl::Now() > settle) break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  for (int i = 0; i < 2; ++i) {
    const char* who = i == 0 ? "exporting svmd" : "importing svmd";
    EXPECT_LE(fds1[i], fds0[i] + 2) << who << ": fds " << fds0[i] << " before the fault";
    EXPECT_LE(rss1[i], rss0[i] + 16 * 1024) << who << ": RSS (KiB) " << rss0[i] << " before the fault";
  }
  std::printf("netfault %s: %s; reads: %llu ok (%llu pages torn by a store in flight), %llu unmapped, "
              "%llu unavailable, the slowest %s (%s); %llu Syncs, the slowest %s; recovered %s after healing; fds %d->%d / %d->%d, "
              "RSS %llu->%llu / %llu->%llu KiB (exporter / importer)\n",
              f.name.c_str(), storm_reply->c_str(), (unsigned long long)ok.load(),
              (unsigned long long)in_flight.load(), (unsigned long long)unmapped.load(), (unsigned long long)unavailable.load(),
              absl::FormatDuration(slowest_read).c_str(), slowest_what.c_str(), (unsigned long long)syncs.load(),
              absl::FormatDuration(slowest_sync).c_str(), absl::FormatDuration(recovery).c_str(),
              fds0[0], fds1[0], fds0[1], fds1[1], (unsigned long long)rss0[0],
              (unsigned long long)rss1[0], (unsigned long long)rss0[1], (unsigned long long)rss1[1]);
}

// A slow link, not a dead peer: the importer's link limited to 8 Mbit/s
// (tbf) and --fetch-timeout-ms 1000, a fresh read of 4 MiB (about 4.4 s on
// that link) must succeed whole: the exporter answers all along, so the
// read is making progress and the deadline (meant to detect a peer that
// stopped answering) must not fail it. The partition case above checks the
// other half: a peer that answers nothing fails the read UNAVAILABLE within
// the timeout.
TEST(NetFaultSlowLink, ALargeReadThatKeepsArrivingOutlastsTheFetchTimeout) {
  if (const std::string why = Fabric::Unsupported(); !why.empty()) GTEST_SKIP() << why;
  constexpr uint64_t kSlowPages = 1024;  // 4 MiB
  const absl::Duration fetch_timeout = absl::Seconds(1);
  TempDir dir;
  auto net = NetCluster::Start(dir.path(), 1, {},
                               {"--fetch-timeout-ms", std::to_string(absl::ToInt64Milliseconds(fetch_timeout))});
  ASSERT_TRUE(net.ok()) << net.status();
  NetCluster& n = **net;
  auto e = Exporter::Start({.daemon = n.exporter.get(), .name = "big", .pages = kSlowPages,
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE((*e)->Command("stamp 7").ok());
  auto c = n.importers[0]->Connect();
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->Import(n.exporter->peer(), "big").ok());
  ASSERT_TRUE(ReadBytes(*c, "big", 0, kStampPage, /*fresh=*/true).ok());  // the data connection is up
  ASSERT_TRUE(n.fabric->Rate(n.importer_nodes[0], "8mbit").ok());
  const absl::Time t0 = absl::Now();
  auto r = ReadBytes(*c, "big", 0, kSlowPages * kStampPage, /*fresh=*/true);
  const absl::Duration took = absl::Now() - t0;
  ASSERT_TRUE(r.ok()) << r.status() << " after " << took;
  std::vector<uint64_t> expected(kSlowPages);
  for (uint64_t p = 0; p < kSlowPages; ++p) expected[p] = (uint64_t{7} << 32) | p;  // svm-exporter's stamp
  const auto wrong = WrongPages(*r, expected);
  EXPECT_TRUE(wrong.empty()) << wrong.size() << " pages wrong, the first: " << wrong.front();
  // The link was slow: the read outlasted the timeout (else this proves nothing).
  EXPECT_GT(took, 2 * fetch_timeout) << "the link was not slow enough to test the deadline";
  std::printf("slow link: 4 MiB fresh at 8 Mbit/s in %s (--fetch-timeout-ms %lld)\n",
              absl::FormatDuration(took).c_str(), (long long)absl::ToInt64Milliseconds(fetch_timeout));
  ASSERT_TRUE(n.fabric->Heal(n.importer_nodes[0]).ok());
}

INSTANTIATE_TEST_SUITE_P(
    Tcp, NetFault,
    ::testing::Values(Fault{.name = "loss1", .drop_percent = 1},
                      Fault{.name = "loss10", .drop_percent = 10},
                      Fault{.name = "delay50", .netem = {"delay", "50ms", "10ms"}},
                      Fault{.name = "reorder", .netem = {"delay", "10ms", "reorder", "25%", "50%"}},
                      Fault{.name = "partition5s", .partition = true}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace svm::testing
