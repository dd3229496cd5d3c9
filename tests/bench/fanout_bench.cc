// svm-fanout-bench: one exporter and N importing daemons, each in a network
// namespace of its own (veth + bridge, tests/integration/netns.h), tcp, the
// procfs source; for each N (default 1,2,4,8,16, a fresh set of daemons
// each) it measures:
//   read      every importer reads the whole export fresh, all at once, for
//             --read-seconds: MB/sec per importer (min and median; an
//             importer below half the median is "starved");
//   inval     every importer holds the whole export; the exporter remaps one
//             page at a time (munmap + mmap); latency from the event's
//             detected_ns (the exporter's CLOCK_MONOTONIC, the same clock
//             here) to its arrival at the LAST importer's Watch;
//   cpu       the exporting svmd's CPU time (all its threads,
//             /proc/PID/task/*/schedstat) over the inval phase divided by
//             the invalidations it sent (its procfs poller's share
//             included; its idle rate, measured for 1 s before, beside it);
//   sync      every importer holds the whole export; the exporter stores a
//             new stamp into every page and calls Sync: Sync's completion time.
// Each row is printed beside the N = 1 row of the same run (the reference)
// and the ratio. Targets (issue 12): Sync with 16 importers within 3x of
// Sync with one; no importer starved.
//
//   svm-fanout-bench [--importers 1,2,4,8,16] [--pages 64] [--rounds 2]
//                    [--sync-iterations 30] [--read-seconds 2]
// Needs root (network namespaces), iproute2 and nftables; exits 77 without.
#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/args.h"
#include "tests/bench/reference.h"
#include "tests/integration/convergence.h"
#include "tests/integration/harness.h"
#include "tests/integration/netns.h"

namespace {

using svm::bench::NowNs;
using svm::bench::Stats;
using svm::bench::Summarize;
using svm::testing::Exporter;
using svm::testing::Fabric;
using svm::testing::NetCluster;
using svm::testing::TempDir;

constexpr uint64_t kPage = 4096;

// CPU time of every thread of pid, in seconds: the sum of the first field
// of /proc/PID/task/*/schedstat (nanoseconds on the CPU; utime + stime in
// /proc/PID/stat count 10 ms ticks, too coarse for one invalidation).
double CpuSeconds(pid_t pid) {
  uint64_t ns = 0;
  const std::string tasks = absl::StrCat("/proc/", pid, "/task");
  DIR* d = opendir(tasks.c_str());
  if (d == nullptr) return 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(absl::StrCat(tasks, "/", e->d_name, "/schedstat"));
    uint64_t run = 0;
    if (in >> run) ns += run;
  }
  closedir(d);
  return static_cast<double>(ns) / 1e9;
}

struct Row {
  int n = 0;
  Stats inval_us;        // detected -> last importer's event
  Stats sync_us;         // Sync's completion
  double cpu_us = 0;     // exporting svmd CPU per invalidation sent
  double idle_pct = 0;   // its CPU use while idle, % of one core
  double read_min = 0;   // MB/sec of the slowest importer
  double read_median = 0;
};

absl::StatusOr<Row> Measure(int n, uint64_t pages, int rounds, int sync_iters, double read_s) {
  Row row;
  row.n = n;
  TempDir dir;
  auto net = NetCluster::Start(dir.path(), n);
  if (!net.ok()) return net.status();
  NetCluster& c = **net;
  auto e = Exporter::Start({.daemon = c.exporter.get(), .name = "fan", .pages = pages,
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  if (!e.ok()) return e.status();
  if (auto r = (*e)->Command("stamp 1"); !r.ok()) return r.status();
  std::vector<std::unique_ptr<svm::Client>> clients;
  std::vector<std::unique_ptr<svm::WatchStream>> watches;
  for (auto& d : c.importers) {
    auto cl = svm::Client::Connect(d->control());
    if (!cl.ok()) return cl.status();
    if (auto imp = (*cl)->Import(c.exporter->peer(), "fan"); !imp.ok()) return imp.status();
    auto w = (*cl)->Watch("fan");
    if (!w.ok()) return w.status();
    clients.push_back(std::move(*cl));
    watches.push_back(std::move(*w));
  }
  auto a = svm::Client::Connect(c.exporter->control());
  if (!a.ok()) return a.status();
  const uint64_t bytes = pages * kPage;
  auto read_all = [&]() -> absl::Status {
    for (auto& cl : clients) {
      auto r = svm::testing::ReadBytes(*cl, "fan", 0, bytes);
      if (!r.ok()) return r.status();
    }
    return absl::OkStatus();
  };
  auto drain = [&] {
    for (auto& w : watches) {
      while (w->Next(absl::Milliseconds(50)).ok()) {
      }
    }
  };

  // read: all importers at once, fresh.
  {
    std::vector<uint64_t> got(n, 0);
    std::atomic<bool> failed{false};
    std::vector<std::thread> t;
    const absl::Time end = absl::Now() + absl::Seconds(read_s);
    for (int i = 0; i < n; ++i) {
      t.emplace_back([&, i] {
        std::string buf(bytes, '\0');
        svm::ReadOptions o;
        o.fresh = true;
        while (absl::Now() < end) {
          auto r = clients[i]->Read("fan", 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), bytes), o);
          if (!r.ok()) {
            failed = true;
            return;
          }
          got[i] += bytes;
        }
      });
    }
    for (auto& th : t) th.join();
    if (failed) return absl::InternalError("a fresh read failed");
    std::vector<double> mbs;
    for (uint64_t g : got) mbs.push_back(static_cast<double>(g) / (1 << 20) / read_s);
    std::sort(mbs.begin(), mbs.end());
    row.read_min = mbs.front();
    row.read_median = mbs[mbs.size() / 2];
  }

  // inval + cpu: one page remapped at a time, every importer holding all.
  {
    std::vector<double> last;
    double cpu = 0, busy_s = 0;
    uint64_t sent = 0;
    // The exporting svmd's idle CPU rate (its procfs poller, scrubs of the
    // held pages, heartbeats), printed beside the cost per invalidation,
    // which includes the poller's share of the phase.
    if (auto st = read_all(); !st.ok()) return st;
    drain();
    const double idle0 = CpuSeconds(c.exporter->process().pid());
    const absl::Time idle_t0 = absl::Now();
    absl::SleepFor(absl::Seconds(1));
    const double idle_rate = (CpuSeconds(c.exporter->process().pid()) - idle0) /
                             absl::ToDoubleSeconds(absl::Now() - idle_t0);
    for (int r = 0; r < rounds; ++r) {
      if (auto st = read_all(); !st.ok()) return st;
      drain();
      const uint64_t sent0 = svm::testing::Counter(**a, "invalidations_sent");
      const double cpu0 = CpuSeconds(c.exporter->process().pid());
      const absl::Time busy0 = absl::Now();
      for (uint64_t p = 0; p < pages; ++p) {
        auto reply = (*e)->Command(absl::StrFormat("remap %u 1 %u", p, 2 + r));
        if (!reply.ok() || *reply != "ok") return absl::InternalError("remap failed");
        uint64_t latest = 0, detected = 0;
        for (auto& w : watches) {
          auto ev = svm::testing::WaitForPage(*w, p, absl::Seconds(10));
          if (!ev.ok()) return ev.status();
          latest = std::max(latest, NowNs());
          detected = ev->detected_ns;
        }
        last.push_back(static_cast<double>(latest - detected) / 1e3);
      }
      cpu += CpuSeconds(c.exporter->process().pid()) - cpu0;
      busy_s += absl::ToDoubleSeconds(absl::Now() - busy0);
      sent += svm::testing::Counter(**a, "invalidations_sent") - sent0;
    }
    row.inval_us = Summarize(last);
    (void)busy_s;
    row.cpu_us = sent == 0 ? 0 : cpu * 1e6 / static_cast<double>(sent);
    row.idle_pct = idle_rate * 100;
  }

  // sync: a new stamp in every held page, then Sync.
  {
    std::vector<double> took;
    for (int i = 0; i < sync_iters; ++i) {
      if (auto st = read_all(); !st.ok()) return st;
      if (auto r = (*e)->Command(absl::StrCat("stamp ", 10 + i)); !r.ok()) return r.status();
      const uint64_t t0 = NowNs();
      auto s = (*a)->Sync("fan");
      const uint64_t t1 = NowNs();
      if (!s.ok()) return s.status();
      if (s->subscribers_acked != static_cast<uint32_t>(n)) {
        return absl::InternalError(absl::StrCat("Sync: ", s->subscribers_acked, " of ", n, " acknowledged"));
      }
      took.push_back(static_cast<double>(t1 - t0) / 1e3);
      drain();
    }
    row.sync_us = Summarize(took);
  }
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv, {"importers", "pages", "rounds", "sync-iterations", "read-seconds"}, {});
  if (!a.ok()) {
    std::fprintf(stderr, "svm-fanout-bench: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  std::vector<int> ns;
  for (absl::string_view s : absl::StrSplit(a->Get("importers", "1,2,4,8,16"), ',')) {
    int v;
    if (absl::SimpleAtoi(s, &v) && v > 0 && v <= 64) ns.push_back(v);
  }
  const uint64_t pages = *a->GetU64("pages", 64);
  const int rounds = static_cast<int>(*a->GetU64("rounds", 2));
  const int sync_iters = static_cast<int>(*a->GetU64("sync-iterations", 30));
  double read_s = 2;
  if (a->Has("read-seconds") && !absl::SimpleAtod(a->Get("read-seconds"), &read_s)) read_s = 0;
  if (ns.empty() || ns.front() != 1 || pages == 0 || rounds <= 0 || sync_iters <= 0 || read_s <= 0) {
    std::fprintf(stderr, "svm-fanout-bench: --importers must start with 1 (the reference); bad "
                         "--pages, --rounds, --sync-iterations or --read-seconds\n");
    return 2;
  }
  if (const std::string why = Fabric::Unsupported(); !why.empty()) {
    std::fprintf(stderr, "svm-fanout-bench: %s\n", why.c_str());
    return 77;  // ctest: skipped
  }
  std::vector<Row> rows;
  for (int n : ns) {
    auto r = Measure(n, pages, rounds, sync_iters, read_s);
    if (!r.ok()) {
      std::fprintf(stderr, "svm-fanout-bench: N=%d: %s\n", n, r.status().ToString().c_str());
      return 1;
    }
    rows.push_back(*r);
    std::fprintf(stderr, "N=%d done\n", n);
  }
  const Row& ref = rows.front();
  std::printf("# %llu pages, tcp, procfs; reference: N=1 in the same run\n", (unsigned long long)pages);
  std::printf("%-11s %-26s %-16s %-16s %-20s %-20s %-8s\n", "#importers", "measure", "t_min[usec]",
              "t_typical[usec]", "99% percentile[usec]", "ref_typical[usec]", "ratio");
  for (const Row& r : rows) {
    std::printf("%-11d %-26s %-16.1f %-16.1f %-20.1f %-20.1f %-8.2f\n", r.n, "inval to last importer",
                r.inval_us.min, r.inval_us.typical, r.inval_us.p99, ref.inval_us.typical,
                r.inval_us.typical / ref.inval_us.typical);
  }
  for (const Row& r : rows) {
    std::printf("%-11d %-26s %-16.1f %-16.1f %-20.1f %-20.1f %-8.2f\n", r.n, "Sync completion",
                r.sync_us.min, r.sync_us.typical, r.sync_us.p99, ref.sync_us.typical,
                r.sync_us.typical / ref.sync_us.typical);
  }
  std::printf("\n%-11s %-30s %-18s %-8s %-20s\n", "#importers", "exporter CPU/inval[usec]", "ref[usec]",
              "ratio", "exporter idle[%cpu]");
  for (const Row& r : rows) {
    std::printf("%-11d %-30.1f %-18.1f %-8.2f %-20.1f\n", r.n, r.cpu_us, ref.cpu_us, r.cpu_us / ref.cpu_us,
                r.idle_pct);
  }
  std::printf("\n%-11s %-22s %-22s %-12s %-20s %-8s\n", "#importers", "read min[MB/sec]",
              "read median[MB/sec]", "min/median", "ref median[MB/sec]", "ratio");
  bool starved = false;
  for (const Row& r : rows) {
    const double fair = r.read_min / r.read_median;
    starved = starved || fair < 0.5;
    std::printf("%-11d %-22.1f %-22.1f %-12.2f %-20.1f %-8.2f\n", r.n, r.read_min, r.read_median,
                fair, ref.read_median, r.read_median / ref.read_median);
  }
  const Row& big = rows.back();
  const double sync_ratio = big.sync_us.typical / ref.sync_us.typical;
  std::printf("\n# targets\n");
  std::printf("Sync with %d importers / Sync with 1: %.2f (target <= 3): %s\n", big.n, sync_ratio,
              sync_ratio <= 3 ? "met" : "NOT MET");
  std::printf("no importer starved (each >= half the median read rate): %s\n", starved ? "NOT MET" : "met");
  return 0;
}
