// Process faults and lifecycles (issue "Security and fault tolerance",
// section "Faults", "Processes"): a daemon SIGKILLed and restarted on the
// exporting and on the importing node, an exporting daemon stopped for
// longer than the peer timeout, and many export/unexport cycles. Every test
// ends with the convergence check (tests/integration/convergence.h: after
// the fault heals and invalidations drain, every importer's reads equal the
// exporter's memory) and checks that the daemons' fd and thread counts,
// their RDMA memory regions (rdma instances) and their resident memory
// within a bound return to their baseline.
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <vector>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"
#include "tests/integration/convergence.h"
#include "tests/integration/harness.h"
#include "tests/integration/two_daemons.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = kStampPage;
constexpr uint64_t kPages = 16;

// gRPC's own thread pools (timer manager, event engine) start and retire
// threads by themselves. svm's executors grow by a thread when a task finds
// every thread busy (common/executor.h), up to a bound, and keep it: a
// thread or two more after a fault is that, a leak grows with every round.
constexpr int kGrpcThreadSlack = 4;
constexpr int kOwnThreadSlack = 2;

// The value after `key` in one line of `rdma res show` ("dev rxe0 mrn 42
// ... pdn 9 pid 548 comm svmd"); "" when the line has none.
std::string FieldOf(absl::string_view line, absl::string_view key) {
  std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
  for (size_t i = 0; i + 1 < f.size(); ++i) {
    if (f[i] == key) return std::string(f[i + 1]);
  }
  return "";
}

// The RDMA memory regions process pid holds, from the kernel's resource
// tracking (`rdma res show`), so a registration svmd lost track of is
// counted too. The kernel names the *thread* that registered a region (its
// tid; 0 once that thread has exited), not the process, so a region is
// counted by its protection domain: one that a live thread of pid
// allocated (svmd allocates its one per device at start, on its main
// thread). -1 when the tool (iproute2's rdma) or RDMA netlink is missing
// or pid holds no protection domain (it does not run rdma).
int MrsOf(pid_t pid) {
  std::set<std::string> tids;
  if (DIR* d = ::opendir(absl::StrCat("/proc/", pid, "/task").c_str()); d != nullptr) {
    while (dirent* de = ::readdir(d)) {
      if (de->d_name[0] != '.') tids.insert(de->d_name);
    }
    ::closedir(d);
  }
  // RunCommand does not search PATH.
  std::string tool;
  for (const char* p : {"/usr/bin/rdma", "/usr/sbin/rdma", "/sbin/rdma", "/bin/rdma"}) {
    if (::access(p, X_OK) == 0) {
      tool = p;
      break;
    }
  }
  if (tool.empty()) return -1;
  RunResult pds = RunCommand({tool, "res", "show", "pd"});
  RunResult mrs = RunCommand({tool, "res", "show", "mr"});
  if (pds.exit_code != 0 || mrs.exit_code != 0) return -1;
  std::set<std::string> mine;  // "DEV PDN"
  for (absl::string_view line : absl::StrSplit(pds.out, '\n', absl::SkipEmpty())) {
    if (tids.count(FieldOf(line, "pid")) != 0) {
      mine.insert(absl::StrCat(FieldOf(line, "dev"), " ", FieldOf(line, "pdn")));
    }
  }
  if (mine.empty()) return -1;
  int n = 0;
  for (absl::string_view line : absl::StrSplit(mrs.out, '\n', absl::SkipEmpty())) {
    n += mine.count(absl::StrCat(FieldOf(line, "dev"), " ", FieldOf(line, "pdn"))) != 0 ? 1 : 0;
  }
  return n;
}

// A footprint with the memory regions registered with the NIC (rdma
// instances: -1 there, no count, is a failure, never a pass).
struct Baseline : Footprint {
  int mrs = -1;
};
Baseline BaselineOf(pid_t pid) {
  Baseline b;
  static_cast<Footprint&>(b) = FootprintOf(pid);
  b.mrs = MrsOf(pid);
  return b;
}
// Whether the running test is an rdma instance (set by Lifecycle::SetUp).
bool g_rdma = false;

// Waits until pid's fds, threads and memory regions are back at the baseline (or below:
// a peer that is gone holds nothing) and its resident memory within
// slack_kib of it; returns what it saw last, with a failure when the wait
// ran out. Connections of a dead peer close asynchronously (TCP reset,
// gRPC's transport), hence the wait; a leak never comes back, so the
// deadline only bounds how long a failure takes.
Baseline ExpectBackToBaseline(const char* who, pid_t pid, const Baseline& baseline,
                              int64_t slack_kib) {
  if (g_rdma) {
    EXPECT_GE(baseline.mrs, 0) << who << ": no memory-region count on an rdma run (rdma res show)";
  }
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  Baseline now;
  do {
    now = BaselineOf(pid);
    if (now.fds <= baseline.fds && now.own_threads <= baseline.own_threads + kOwnThreadSlack &&
        now.threads <= baseline.threads + kGrpcThreadSlack &&
        now.rss_kib <= baseline.rss_kib + slack_kib && now.mrs <= baseline.mrs) {
      return now;
    }
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < deadline);
  ADD_FAILURE() << who << " did not return to its baseline: " << baseline.ToString() << ", "
                << baseline.mrs << " memory regions, then " << now.ToString() << ", " << now.mrs
                << " memory regions (resident slack " << slack_kib << " KiB)";
  return now;
}

// Waits until pid has fewer fds than `than` (a dead peer's connections
// closed: asynchronously, once the kernel and gRPC's transport noticed).
Footprint ExpectFewerFds(const char* who, pid_t pid, const Footprint& than) {
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  Footprint now = FootprintOf(pid);
  while (now.fds >= than.fds && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    now = FootprintOf(pid);
  }
  EXPECT_LT(now.fds, than.fds) << who << " kept the dead peer's connections open";
  return now;
}

// Exporter's stamp → Sync → drain → every way of reading on the importer
// equals the exporter's memory.
void ExpectConverges(Exporter& e, Daemon& exporting, Client& importer, const std::string& name,
                     uint64_t version) {
  auto stamp = e.Command(absl::StrCat("stamp ", version));
  ASSERT_TRUE(stamp.ok() && absl::StartsWith(*stamp, "ok")) << (stamp.ok() ? *stamp : "");
  auto sync = e.Command("sync");
  ASSERT_TRUE(sync.ok() && absl::StartsWith(*sync, "ok")) << (sync.ok() ? *sync : "");
  auto expected = ExporterPages(e, exporting, name, kPages);
  ASSERT_TRUE(expected.ok()) << expected.status();
  // Sync returned once every importer acknowledged the invalidations, so
  // there is nothing to drain here: a read that differs is stale.
  for (const std::string& d : Diverging(importer, name, *expected, {"cached", "fresh", "mapped"})) {
    ADD_FAILURE() << name << ": " << d;
  }
}

class Lifecycle : public TwoDaemons {
 protected:
  void SetUp() override {
    g_rdma = GetParam() == "rdma";
    TwoDaemons::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    // Over rdma the export is shareable memory (a memfd): where svmd serves
    // it zero-copy it registers it with the NIC per export and releases it
    // after the unexport drains; every data connection registers its own
    // buffers (staged path) and releases them when it closes. The
    // memory-region count below covers both.
    auto e = Exporter::Start({.daemon = a_.get(), .name = "life", .pages = kPages,
                              .backing = GetParam() == "rdma" ? "memfd" : "anon",
                              .log_path = absl::StrCat(dir_.path(), "/exporter.log")});
    ASSERT_TRUE(e.ok()) << e.status();
    e_ = std::move(*e);
    auto imp = cb_->Import(a_->peer(), "life");
    ASSERT_TRUE(imp.ok()) << imp.status();
  }

  // Reads the whole import until it succeeds (a link coming back, an
  // import re-attaching) or the deadline passes.
  absl::Status ReadUntilOk(Client& c) {
    absl::StatusOr<std::string> r = absl::UnavailableError("not tried");
    const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(15));
    while (absl::Now() < deadline) {
      r = ReadBytes(c, "life", 0, kPages * kPage);
      if (r.ok()) return absl::OkStatus();
      absl::SleepFor(absl::Milliseconds(100));
    }
    return r.status();
  }

  std::unique_ptr<Exporter> e_;
};

// The resident-memory bound for "returned to its baseline": allocators keep
// freed memory, so a few MiB of growth is noise; a leak per round or per
// cycle over the rounds below is far more. Under AddressSanitizer (the
// daemons are built like this test) freed memory sits in ASan's quarantine
// (256 MiB by default) before it is reused, so resident memory says nothing
// there; LeakSanitizer checks leaks at the daemons' exit instead. Under
// ThreadSanitizer its shadow memory and sync metadata grow with every new
// allocation, thread and lock it sees (each round reconnects), so resident
// memory is not bounded there either; fds, threads and memory regions are.
int64_t RssSlackKib() {
#if defined(__SANITIZE_ADDRESS__)
  return int64_t{1} << 40;
#else
  return UnderThreadSanitizer() ? int64_t{1} << 40 : 8 * 1024;
#endif
}

// Each fault runs in rounds. The first round warms up what grows lazily to
// a bound; the footprint after it is the baseline, and every later round
// must end where it did (fds exactly, threads within the slack above): a
// leak per fault grows past it over the rounds.
constexpr int kRounds = 5;

TEST_P(Lifecycle, ImportingDaemonKilledAndRestartedConverges) {
  ASSERT_TRUE(ReadUntilOk(*cb_).ok());
  Baseline a_base;
  for (int round = 0; round < kRounds && !HasFailure(); ++round) {
    const Footprint a_before = FootprintOf(a_->process().pid());
    cb_.reset();
    b_->Kill();
    // The exporter's pages change while the importer is gone.
    auto stamp = e_->Command(absl::StrCat("stamp ", 10 * round + 7));
    ASSERT_TRUE(stamp.ok() && absl::StartsWith(*stamp, "ok"));
    // The exporting daemon lets go of the dead importer's connections.
    ExpectFewerFds("the exporting svmd", a_->process().pid(), a_before);

    ASSERT_TRUE(b_->Restart().ok());
    cb_ = b_->Connect();
    ASSERT_NE(cb_, nullptr);
    auto imp = cb_->Import(a_->peer(), "life");
    ASSERT_TRUE(imp.ok()) << imp.status();
    ASSERT_TRUE(ReadUntilOk(*cb_).ok());
    ExpectConverges(*e_, *a_, *cb_, "life", 10 * round + 8);
    if (round == 0) {
      a_base = BaselineOf(a_->process().pid());
    } else {
      ExpectBackToBaseline(absl::StrCat("the exporting svmd after round ", round).c_str(),
                           a_->process().pid(), a_base, RssSlackKib());
    }
  }
}

TEST_P(Lifecycle, ExportingDaemonKilledAndRestartedConverges) {
  ASSERT_TRUE(ReadUntilOk(*cb_).ok());
  Baseline b_base;
  for (int round = 0; round < kRounds && !HasFailure(); ++round) {
    const Footprint b_before = FootprintOf(b_->process().pid());
    ca_.reset();
    a_->Kill();
    auto gone = ReadBytes(*cb_, "life", 0, kPage, /*fresh=*/true);
    EXPECT_TRUE(absl::IsUnavailable(gone.status())) << gone.status();
    ExpectFewerFds("the importing svmd", b_->process().pid(), b_before);
    // svm-exporter lost its daemon; its memory changes anyway.
    auto stamp = e_->Command(absl::StrCat("stamp ", 10 * round + 11));
    ASSERT_TRUE(stamp.ok() && absl::StartsWith(*stamp, "ok"));

    ASSERT_TRUE(a_->Restart().ok());
    ca_ = a_->Connect();
    ASSERT_NE(ca_, nullptr);
    auto again = ca_->ExportPid("life", e_->pid(), e_->addr(), e_->len());
    ASSERT_TRUE(again.ok()) << again.status();
    ASSERT_TRUE(ReadUntilOk(*cb_).ok());
    // svm-exporter's own `sync` goes through its client of the daemon that
    // was killed, so Sync through the restarted one.
    auto sync = ca_->Sync("life");
    ASSERT_TRUE(sync.ok()) << sync.status();
    auto dump = e_->Command("dump");
    ASSERT_TRUE(dump.ok()) << dump.status();
    auto expected = ParseDump(*dump, kPages);
    ASSERT_TRUE(expected.ok()) << expected.status();
    for (const std::string& d : Diverging(*cb_, "life", *expected, {"cached", "fresh", "mapped"})) {
      ADD_FAILURE() << "round " << round << ": " << d;
    }
    if (round == 0) {
      b_base = BaselineOf(b_->process().pid());
    } else {
      ExpectBackToBaseline(absl::StrCat("the importing svmd after round ", round).c_str(),
                           b_->process().pid(), b_base, RssSlackKib());
    }
  }
}

TEST_P(Lifecycle, ExportingDaemonStoppedPastThePeerTimeoutRecoversAndConverges) {
  ASSERT_TRUE(ReadUntilOk(*cb_).ok());
  Baseline b_base;
  const pid_t a_pid = a_->process().pid();
  for (int round = 0; round < kRounds && !HasFailure(); ++round) {
    ASSERT_TRUE(a_->process().Stop(Scaled(absl::Seconds(10))).ok());
    // The pages change while the exporting daemon cannot see it.
    auto stamp = e_->Command(absl::StrCat("stamp ", 10 * round + 21));
    // Stopped for longer than the peer timeout (2 s, scaled): the importer
    // gives up on the link; a read fails within the fetch timeout.
    const absl::Time t0 = absl::Now();
    auto during = ReadBytes(*cb_, "life", 0, kPage, /*fresh=*/true);
    const absl::Duration took = absl::Now() - t0;
    absl::SleepFor(Scaled(absl::Seconds(3)) - took);
    ASSERT_EQ(::kill(a_pid, SIGCONT), 0);
    EXPECT_FALSE(during.ok()) << "a fresh read succeeded while the exporting daemon was stopped";
    EXPECT_TRUE(absl::IsUnavailable(during.status()) || absl::IsDeadlineExceeded(during.status()))
        << during.status();
    EXPECT_LT(took, Scaled(absl::Seconds(3))) << "the read outlived the peer and fetch timeouts";
    ASSERT_TRUE(stamp.ok() && absl::StartsWith(*stamp, "ok"));

    // The import recovers by itself; the stamp made while svmd was stopped
    // and a later one both reach the importer.
    ASSERT_TRUE(ReadUntilOk(*cb_).ok());
    ExpectConverges(*e_, *a_, *cb_, "life", 10 * round + 22);
    if (round == 0) {
      b_base = BaselineOf(b_->process().pid());
    } else {
      ExpectBackToBaseline(absl::StrCat("the importing svmd after round ", round).c_str(),
                           b_->process().pid(), b_base, RssSlackKib());
    }
  }
}

// Export, read through the importer (which re-attaches by name), unexport:
// over and over. Neither daemon keeps anything per cycle. The importer's
// Watch sees each unexport before the next export, so every read is of
// the current incarnation (a read racing the unexport would rightly fail
// "gone").
TEST_P(Lifecycle, ExportUnexportCyclesLeakNothing) {
  const int cycles = Scaled(absl::Seconds(1)) > absl::Seconds(1) ? 100 : 1000;
  const int warmup = cycles / 10;
  auto w = cb_->Watch("life");
  ASSERT_TRUE(w.ok()) << w.status();
  Baseline a_base, b_base;
  const absl::Time t0 = absl::Now();
  for (int i = 0; i < warmup + cycles; ++i) {
    if (i == warmup) {
      a_base = BaselineOf(a_->process().pid());
      b_base = BaselineOf(b_->process().pid());
    }
    auto r = ReadBytes(*cb_, "life", (i % kPages) * kPage, kPage);
    ASSERT_TRUE(r.ok()) << "cycle " << i << ": " << r.status();
    ASSERT_EQ(StampOf(r->data()), (i % kPages) + 1) << "cycle " << i;
    ASSERT_TRUE(ca_->Unexport("life").ok()) << "cycle " << i;
    auto ev = (*w)->Next(Scaled(absl::Seconds(5)));
    ASSERT_TRUE(ev.ok()) << "cycle " << i << ": no unexport event: " << ev.status();
    auto again = ca_->ExportPid("life", e_->pid(), e_->addr(), e_->len());
    ASSERT_TRUE(again.ok()) << "cycle " << i << ": " << again.status();
  }
  std::printf("lifecycle: %d export/read/unexport cycles in %.1f s\n", warmup + cycles,
              absl::ToDoubleSeconds(absl::Now() - t0));
  ExpectBackToBaseline("the exporting svmd", a_->process().pid(), a_base, RssSlackKib());
  ExpectBackToBaseline("the importing svmd", b_->process().pid(), b_base, RssSlackKib());
  ExpectConverges(*e_, *a_, *cb_, "life", 100);
}

INSTANTIATE_TEST_SUITE_P(Tcp, Lifecycle, ::testing::Values("tcp"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Rdma, Lifecycle, ::testing::Values("rdma"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace svm::testing
