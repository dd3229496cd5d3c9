// svm-soak: a long randomized run (not in CI; tests/soak/README.md).
//
// N daemons on this machine (one "node" each, tcp or rdma), E exporting
// processes (svm-exporter) spread over them, and until the time is up:
//   - reader threads (one per node) import exports of other nodes and read
//     random ranges of them, cached or fresh, and count pages that are not
//     whole (torn: read while the exporter was stamping them, which a CPU
//     on the exporter's node can see too);
//   - a mutator thread makes the exporters remap, drop and restamp pages
//     (`storm`) and calls Sync;
//   - the main thread injects faults: a daemon SIGKILLed and restarted
//     (importing or exporting), a daemon SIGSTOPped past the peer timeout;
//   - every --check-every seconds, with mutations paused, faults healed and
//     every export Synced, the convergence check: every import on every
//     node, read cached, fresh and mapped, equals its exporter's memory.
// Prints one summary line; exits 0 when every check passed and no read
// returned an unexpected error.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tests/integration/convergence.h"
#include "tests/integration/harness.h"

ABSL_FLAG(int, minutes, 10, "how long to run");
ABSL_FLAG(int, nodes, 8, "daemons (nodes)");
ABSL_FLAG(int, exports, 6, "exporting processes, spread over the nodes");
ABSL_FLAG(int, pages, 64, "pages per export");
ABSL_FLAG(int, check_every, 30, "seconds between convergence checks");
ABSL_FLAG(int, fault_every, 7, "seconds between injected faults");
ABSL_FLAG(std::string, transport, "tcp", "tcp or rdma");
ABSL_FLAG(uint32_t, seed, 1, "random seed (the run is random, not reproducible: threads race)");

namespace svm::testing {
namespace {

constexpr uint64_t kPage = kStampPage;

struct NodeState {
  std::unique_ptr<Daemon> daemon;
  absl::Mutex mu;
  bool up ABSL_GUARDED_BY(mu) = true;
  // Bumped at every restart: a client of an older generation is dropped.
  int generation ABSL_GUARDED_BY(mu) = 0;
  std::vector<std::string> imports ABSL_GUARDED_BY(mu);  // export names imported here
};

struct ExportState {
  std::string name;
  int node = 0;
  std::unique_ptr<Exporter> proc;
  absl::Mutex mu;  // one command at a time on its stdin
};

struct Tally {
  std::atomic<uint64_t> reads{0}, reads_cached_pages{0}, read_unavailable{0}, read_gone{0},
      read_other{0}, torn{0}, imports{0}, mutations{0}, syncs{0}, kills{0}, stops{0},
      checks_passed{0}, checks_failed{0};
  absl::Mutex mu;
  std::vector<std::string> errors ABSL_GUARDED_BY(mu);
  void Error(std::string e) {
    absl::MutexLock l(&mu);
    if (errors.size() < 20) errors.push_back(std::move(e));
  }
};

class Soak {
 public:
  int Run();

 private:
  bool StartAll();
  void Reader(int k, uint32_t seed);
  void Mutator(uint32_t seed);
  void InjectFault(std::mt19937& rng);
  // Re-creates what a restarted node held: its imports, and the exports
  // of the processes living on it.
  void Reinstate(int k);
  bool Check(int n);
  std::unique_ptr<Client> ConnectUp(int k);
  ExportState* FindExport(const std::string& name) {
    for (auto& e : exports_) {
      if (e->name == name) return e.get();
    }
    return nullptr;
  }

  TempDir dir_;
  std::vector<std::unique_ptr<NodeState>> nodes_;
  std::vector<std::unique_ptr<ExportState>> exports_;
  Tally t_;
  std::atomic<bool> stop_{false};
  // Readers and the mutator stop touching the daemons while this is set
  // (a check, or a fault being injected) and count themselves idle.
  absl::Mutex quiet_mu_;
  bool quiet_ ABSL_GUARDED_BY(quiet_mu_) = false;
  int busy_ ABSL_GUARDED_BY(quiet_mu_) = 0;

  bool Enter() {
    absl::MutexLock l(&quiet_mu_);
    quiet_mu_.Await(absl::Condition(
        +[](Soak* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->quiet_mu_) { return !s->quiet_ || s->stop_; },
        this));
    if (stop_) return false;
    ++busy_;
    return true;
  }
  void Leave() {
    absl::MutexLock l(&quiet_mu_);
    --busy_;
  }
  void Quiesce() {
    absl::MutexLock l(&quiet_mu_);
    quiet_ = true;
    quiet_mu_.Await(absl::Condition(
        +[](Soak* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->quiet_mu_) { return s->busy_ == 0; }, this));
  }
  void Resume() {
    absl::MutexLock l(&quiet_mu_);
    quiet_ = false;
  }
};

std::unique_ptr<Client> Soak::ConnectUp(int k) {
  {
    absl::MutexLock l(&nodes_[k]->mu);
    if (!nodes_[k]->up) return nullptr;
  }
  auto c = Client::Connect(nodes_[k]->daemon->control());
  return c.ok() ? std::move(*c) : nullptr;
}

bool Soak::StartAll() {
  const int n = absl::GetFlag(FLAGS_nodes);
  for (int k = 0; k < n; ++k) {
    auto d = Daemon::Start({.node = absl::StrCat("n", k), .dir = dir_.path(),
                            .transport = absl::GetFlag(FLAGS_transport)});
    if (!d.ok()) {
      std::fprintf(stderr, "soak: node %d: %s\n", k, d.status().ToString().c_str());
      return false;
    }
    nodes_.push_back(std::make_unique<NodeState>());
    nodes_.back()->daemon = std::move(*d);
  }
  for (int i = 0; i < absl::GetFlag(FLAGS_exports); ++i) {
    auto e = std::make_unique<ExportState>();
    e->name = absl::StrCat("x", i);
    e->node = i % n;
    auto p = Exporter::Start({.daemon = nodes_[e->node]->daemon.get(), .name = e->name,
                              .pages = static_cast<uint64_t>(absl::GetFlag(FLAGS_pages)),
                              .log_path = absl::StrCat(dir_.path(), "/exporter-", e->name, ".log")});
    if (!p.ok()) {
      std::fprintf(stderr, "soak: exporter %s: %s\n", e->name.c_str(), p.status().ToString().c_str());
      return false;
    }
    e->proc = std::move(*p);
    exports_.push_back(std::move(e));
  }
  return true;
}

void Soak::Reader(int k, uint32_t seed) {
  std::mt19937 rng(seed);
  const uint64_t pages = absl::GetFlag(FLAGS_pages);
  std::unique_ptr<Client> c;
  int generation = -1;
  std::string buf;
  while (Enter()) {
    {
      absl::MutexLock l(&nodes_[k]->mu);
      if (nodes_[k]->generation != generation) c.reset();
      generation = nodes_[k]->generation;
    }
    if (!c) c = ConnectUp(k);
    if (!c) {
      Leave();
      absl::SleepFor(absl::Milliseconds(50));
      continue;
    }
    ExportState& e = *exports_[rng() % exports_.size()];
    if (e.node == k) {
      Leave();
      continue;
    }
    bool imported;
    {
      absl::MutexLock l(&nodes_[k]->mu);
      imported = std::find(nodes_[k]->imports.begin(), nodes_[k]->imports.end(), e.name) !=
                 nodes_[k]->imports.end();
    }
    if (!imported) {
      auto imp = c->Import(nodes_[e.node]->daemon->peer(), e.name);
      if (imp.ok() || absl::IsAlreadyExists(imp.status())) {
        absl::MutexLock l(&nodes_[k]->mu);
        nodes_[k]->imports.push_back(e.name);
        ++t_.imports;
      }
      Leave();
      continue;
    }
    const uint64_t first = rng() % pages;
    const uint64_t n = 1 + rng() % std::min<uint64_t>(16, pages - first);
    buf.assign(n * kPage, '\0');
    ReadOptions o;
    o.fresh = rng() % 4 == 0;
    auto r = c->Read(e.name, first * kPage,
                     absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()), o);
    Leave();
    ++t_.reads;
    if (r.ok()) {
      t_.reads_cached_pages += r->pages_from_cache;
      for (uint64_t p = 0; p < n; ++p) {
        // A page the exporter was stamping at that moment is torn in its
        // own memory too (a store in flight): counted, not an error. What
        // matters is what the checks read after Sync.
        if (!StampOf(buf.data() + p * kPage).has_value()) ++t_.torn;
      }
    } else if (absl::IsUnavailable(r.status()) || absl::IsDeadlineExceeded(r.status())) {
      ++t_.read_unavailable;  // a node down or stopped: expected during faults
    } else if (absl::IsFailedPrecondition(r.status())) {
      ++t_.read_gone;  // an unmapped page, or the export re-created after a restart
    } else if (absl::IsNotFound(r.status())) {
      // The node was restarted and lost the import: import again.
      absl::MutexLock l(&nodes_[k]->mu);
      std::erase(nodes_[k]->imports, e.name);
    } else {
      ++t_.read_other;
      t_.Error(absl::StrCat("node ", k, " read of ", e.name, ": ", r.status().ToString()));
    }
  }
}

void Soak::Mutator(uint32_t seed) {
  std::mt19937 rng(seed);
  while (Enter()) {
    ExportState& e = *exports_[rng() % exports_.size()];
    {
      absl::MutexLock l(&e.mu);
      auto r = e.proc->Command(absl::StrCat("storm 0.2 ", rng(), " 1 300"), absl::Seconds(30));
      if (r.ok() && absl::StartsWith(*r, "ok")) ++t_.mutations;
      if (rng() % 3 == 0) {
        // Through the exporter's own client: fails while its node is down.
        auto s = e.proc->Command("sync", absl::Seconds(30));
        if (s.ok() && absl::StartsWith(*s, "ok")) ++t_.syncs;
      }
    }
    Leave();
    absl::SleepFor(absl::Milliseconds(20));
  }
}

void Soak::Reinstate(int k) {
  auto c = Client::Connect(nodes_[k]->daemon->control());
  if (!c.ok()) {
    t_.Error(absl::StrCat("node ", k, " after restart: ", c.status().ToString()));
    return;
  }
  for (auto& e : exports_) {
    if (e->node != k) continue;
    auto x = (*c)->ExportPid(e->name, e->proc->pid(), e->proc->addr(), e->proc->len());
    if (!x.ok()) t_.Error(absl::StrCat("re-export ", e->name, ": ", x.status().ToString()));
  }
  std::vector<std::string> imports;
  {
    absl::MutexLock l(&nodes_[k]->mu);
    imports = nodes_[k]->imports;
  }
  for (const std::string& name : imports) {
    ExportState* e = FindExport(name);
    if (e == nullptr) continue;
    auto imp = (*c)->Import(nodes_[e->node]->daemon->peer(), name);
    if (!imp.ok() && !absl::IsAlreadyExists(imp.status())) {
      t_.Error(absl::StrCat("re-import ", name, " on node ", k, ": ", imp.status().ToString()));
    }
  }
}

void Soak::InjectFault(std::mt19937& rng) {
  const int k = rng() % nodes_.size();
  NodeState& node = *nodes_[k];
  if (rng() % 3 == 0) {
    // Stopped past the peer timeout, then continued: nothing to reinstate.
    if (!node.daemon->process().Stop(absl::Seconds(5)).ok()) return;
    ++t_.stops;
    absl::SleepFor(Scaled(absl::Seconds(3)));
    node.daemon->process().Signal(SIGCONT);
    return;
  }
  {
    absl::MutexLock l(&node.mu);
    node.up = false;
  }
  node.daemon->Kill();
  ++t_.kills;
  absl::SleepFor(absl::Milliseconds(200 + rng() % 2000));
  // Restart from this (the main) thread: it outlives the daemon.
  if (auto st = node.daemon->Restart(); !st.ok()) {
    t_.Error(absl::StrCat("restart node ", k, ": ", st.ToString()));
    return;
  }
  Reinstate(k);
  absl::MutexLock l(&node.mu);
  node.up = true;
  ++node.generation;
}

bool Soak::Check(int n) {
  Quiesce();
  const uint64_t pages = absl::GetFlag(FLAGS_pages);
  int bad = 0;
  // Sync every export through a client of its node, so every importer has
  // acknowledged every invalidation before the reads.
  for (auto& e : exports_) {
    auto c = ConnectUp(e->node);
    if (!c) {
      ++bad;
      t_.Error(absl::StrCat("check ", n, ": node ", e->node, " down"));
      continue;
    }
    auto s = c->Sync(e->name);
    if (!s.ok()) {
      ++bad;
      t_.Error(absl::StrCat("check ", n, ": Sync ", e->name, ": ", s.status().ToString()));
    }
  }
  for (size_t k = 0; k < nodes_.size(); ++k) {
    auto c = ConnectUp(static_cast<int>(k));
    if (!c) continue;
    std::vector<std::string> imports;
    {
      absl::MutexLock l(&nodes_[k]->mu);
      imports = nodes_[k]->imports;
    }
    for (const std::string& name : imports) {
      ExportState* e = FindExport(name);
      if (e == nullptr) continue;
      absl::MutexLock l(&e->mu);
      auto expected = ExporterPages(*e->proc, *nodes_[e->node]->daemon, name, pages);
      if (!expected.ok()) {
        ++bad;
        t_.Error(absl::StrCat("check ", n, ": exporter ", name, ": ", expected.status().ToString()));
        continue;
      }
      for (const std::string& d : Diverging(*c, name, *expected, {"cached", "fresh", "mapped"})) {
        ++bad;
        t_.Error(absl::StrCat("check ", n, ": node ", k, " import ", name, ": ", d));
      }
    }
  }
  Resume();
  (bad == 0 ? t_.checks_passed : t_.checks_failed)++;
  return bad == 0;
}

int Soak::Run() {
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Minutes(absl::GetFlag(FLAGS_minutes));
  if (!StartAll()) return 1;
  const uint32_t seed = absl::GetFlag(FLAGS_seed);
  std::vector<std::thread> threads;
  for (size_t k = 0; k < nodes_.size(); ++k) {
    threads.emplace_back([this, k, seed] { Reader(static_cast<int>(k), seed + 100 + k); });
  }
  threads.emplace_back([this, seed] { Mutator(seed + 7); });
  std::mt19937 rng(seed);
  absl::Time next_check = start + absl::Seconds(absl::GetFlag(FLAGS_check_every));
  absl::Time next_fault = start + absl::Seconds(absl::GetFlag(FLAGS_fault_every));
  int checks = 0;
  while (absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(100));
    if (absl::Now() >= next_fault) {
      Quiesce();  // a fault between operations, so the bookkeeping stays true
      Resume();
      InjectFault(rng);
      next_fault = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_fault_every));
    }
    if (absl::Now() >= next_check) {
      // Let reconnections and re-attachments settle after the last fault.
      absl::SleepFor(Scaled(absl::Seconds(3)));
      Check(++checks);
      std::printf("soak: %.0f s: check %d: %s\n", absl::ToDoubleSeconds(absl::Now() - start), checks,
                  t_.checks_failed == 0 ? "converged" : "FAILED so far");
      std::fflush(stdout);
      next_check = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_check_every));
    }
  }
  absl::SleepFor(Scaled(absl::Seconds(3)));
  Check(++checks);
  {
    absl::MutexLock l(&quiet_mu_);
    stop_ = true;
    quiet_ = false;
  }
  for (auto& t : threads) t.join();
  {
    absl::MutexLock l(&t_.mu);
    for (const auto& e : t_.errors) std::printf("soak: error: %s\n", e.c_str());
  }
  const bool ok = t_.checks_failed == 0 && t_.read_other == 0;
  std::printf(
      "soak: %s: %.0f s, %zu nodes (%s), %zu exports; %llu reads (%llu pages from cache; %llu "
      "unavailable, %llu gone, %llu other errors; %llu pages torn by a store in flight), %llu imports, %llu storms, %llu "
      "syncs; faults: %llu kills+restarts, %llu stops; convergence checks: %llu passed, %llu failed\n",
      ok ? "PASS" : "FAIL", absl::ToDoubleSeconds(absl::Now() - start), nodes_.size(),
      absl::GetFlag(FLAGS_transport).c_str(), exports_.size(), (unsigned long long)t_.reads.load(),
      (unsigned long long)t_.reads_cached_pages.load(), (unsigned long long)t_.read_unavailable.load(),
      (unsigned long long)t_.read_gone.load(), (unsigned long long)t_.read_other.load(),
      (unsigned long long)t_.torn.load(), (unsigned long long)t_.imports.load(),
      (unsigned long long)t_.mutations.load(), (unsigned long long)t_.syncs.load(),
      (unsigned long long)t_.kills.load(), (unsigned long long)t_.stops.load(),
      (unsigned long long)t_.checks_passed.load(), (unsigned long long)t_.checks_failed.load());
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace svm::testing

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("svm-soak: a long randomized run of svm (tests/soak/README.md)");
  absl::ParseCommandLine(argc, argv);
  svm::testing::Soak soak;
  return soak.Run();
}
