// svm-read-bench: reads an export from the other node through svmd and
// prints perftest-style columns, each beside a reference measured in the
// same run, with the ratio:
//   --reference tcp (default): a plain TCP request/response of the same size
//     between two threads over 127.0.0.1 (latency, interleaved with the svm
//     reads), and a TCP stream of the same total in the same request size;
//   --reference perftest: ib_read_lat / ib_read_bw on the RDMA device (server
//     and client processes, run before and after the svm measurement; the
//     mean is the reference), ib_send_lat for the invalidation latency, and
//     with --ucx also ucx_perftest on the same device: --ucx-api uct (default:
//     `-t get -x rc_verbs`, UCX's transport layer) or ucp (`-t ucp_get`,
//     UCX_TLS=--ucx-tls; its wire-up does not work on rxe, see README.md).
//
//   svm-read-bench [--iterations N] [--sizes 4096,65536,1048576]
//                  [--bw-total-mb 64] [--bw-request-kb 1024] [--json]
//                  [--transport tcp|rdma] [--source procfs|shim]
//                  [--memory private|memfd] [--tests lat,bw,inval]
//                  [--inval-iterations N]
//                  [--reference tcp|perftest] [--rdma-device rxe0]
//                  [--rdma-port 1] [--rdma-gid-index 1] [--rdma-addr 10.77.0.1]
//                  [--ucx] [--ucx-api uct|ucp] [--ucx-tls rc_verbs]
//
// Two svmd (the given source and transport; svmd's defaults when not given)
// and an exporter process (the exported range is anonymous private memory, or
// a MAP_SHARED memfd mapping with --memory memfd) are started for the run.
// svm reads are --fresh (every read crosses to the exporter), except the
// "cached" rows, which hit the importer's cache. The data path the import
// uses (ImportInfo.path) is printed.
//
// inval: this process exports 64 of its own pages to the first daemon, the
// second imports them and this process watches the import; each iteration
// MADV_DONTNEEDs one page and waits for the Watch event on the importer.
// Columns: end to end (madvise call to event received), detection (madvise
// call to the event's detected_ns, CLOCK_MONOTONIC on the exporter's host:
// the same host here) and delivery (detected_ns to event received).
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/args.h"
#include "common/fd.h"
#include "common/net.h"
#include "tests/bench/reference.h"
#include "tests/integration/harness.h"

namespace {

using svm::bench::NowNs;
using svm::bench::NowUs;
using svm::bench::RdmaTarget;
using svm::bench::RefResult;
using svm::bench::Stats;
using svm::bench::Summarize;
using svm::testing::Daemon;
using svm::testing::Exporter;
using svm::testing::TempDir;

// Reference: a TCP server thread that answers an 8-byte request (the size)
// with that many bytes, like a fetch.
class TcpReference {
 public:
  TcpReference() {
    auto l = svm::TcpListen({"127.0.0.1", 0});
    listen_ = std::move(*l);
    port_ = *svm::LocalPort(listen_.get());
    server_ = std::thread([this] {
      svm::UniqueFd c(::accept(listen_.get(), nullptr, nullptr));
      std::vector<uint8_t> buf(64u << 20, 0x5a);
      uint64_t n;
      while (svm::ReadFull(c.get(), &n, sizeof(n)).ok() && n <= buf.size()) {
        if (!svm::WriteFull(c.get(), buf.data(), n).ok()) break;
      }
    });
    auto c = svm::TcpConnect({"127.0.0.1", port_}, absl::Seconds(2));
    conn_ = std::move(*c);
  }
  ~TcpReference() {
    conn_.Reset();
    server_.join();
  }
  void RoundTrip(uint64_t n, std::vector<uint8_t>& buf) {
    (void)svm::WriteFull(conn_.get(), &n, sizeof(n));
    (void)svm::ReadFull(conn_.get(), buf.data(), n);
  }

 private:
  svm::UniqueFd listen_, conn_;
  uint16_t port_ = 0;
  std::thread server_;
};

// One row of the printed tables: an svm measurement beside one reference.
void PrintLatRow(bool json, std::string* json_rows, const char* test, uint64_t size,
                 const std::string& mode, uint64_t n, const Stats& s, const std::string& ref_name,
                 const absl::StatusOr<double>& ref) {
  const double ratio = ref.ok() ? s.typical / *ref : -1;
  if (json) {
    absl::StrAppend(json_rows, json_rows->empty() ? "" : ",\n",
                    absl::StrFormat("  {\"test\":\"%s\",\"bytes\":%u,\"mode\":\"%s\",\"iterations\":%u,"
                                    "\"t_min_usec\":%.2f,\"t_max_usec\":%.2f,\"t_typical_usec\":%.2f,"
                                    "\"t_avg_usec\":%.2f,\"t_p99_usec\":%.2f,\"reference\":\"%s\","
                                    "\"ref_typical_usec\":%.2f,\"ratio\":%.2f}",
                                    test, size, mode, n, s.min, s.max, s.typical, s.avg, s.p99, ref_name,
                                    ref.ok() ? *ref : -1.0, ratio));
    return;
  }
  std::printf("%-10llu %-18s %-12llu %-12.2f %-12.2f %-16.2f %-12.2f %-20.2f %-24s ",
              (unsigned long long)size, mode.c_str(), (unsigned long long)n, s.min, s.max, s.typical,
              s.avg, s.p99, ref_name.c_str());
  if (ref.ok()) {
    std::printf("%-18.2f %.2f\n", *ref, ratio);
  } else {
    std::printf("%-18s -\n", "n/a");
  }
}

// The floor under "to-client": a thread asleep in poll() on an eventfd and
// a socket (as a client waiting for an invalidation sleeps), woken by a
// write to the eventfd from another thread; microseconds from just before
// the write to the sleeper holding the event, n times, a few milliseconds
// apart (an invalidation comes after the procfs poll: the sleeper's CPU
// has gone idle).
std::vector<double> EventfdWakeLatency(uint64_t n) {
  svm::UniqueFd bell(::eventfd(0, EFD_CLOEXEC));
  int pair[2] = {-1, -1};
  std::vector<double> out;
  if (!bell.valid() || ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return out;
  svm::UniqueFd a(pair[0]), b(pair[1]);  // b stays open: a only ever polls quiet
  std::atomic<uint64_t> sent_ns{0}, woke_ns{0};
  std::thread sleeper([&] {
    for (uint64_t i = 0; i < n; ++i) {
      pollfd p[2] = {{bell.get(), POLLIN, 0}, {a.get(), POLLIN | POLLRDHUP, 0}};
      if (::poll(p, 2, 10000) <= 0) return;
      uint64_t v;
      (void)!::read(bell.get(), &v, sizeof(v));
      woke_ns.store(NowNs(), std::memory_order_release);
    }
  });
  for (uint64_t i = 0; i < n; ++i) {
    ::usleep(3000);
    woke_ns.store(0, std::memory_order_relaxed);
    sent_ns.store(NowNs(), std::memory_order_relaxed);
    const uint64_t one = 1;
    if (::write(bell.get(), &one, sizeof(one)) != sizeof(one)) break;
    uint64_t w;
    const uint64_t give_up = sent_ns.load(std::memory_order_relaxed) + 5'000'000'000ull;
    while ((w = woke_ns.load(std::memory_order_acquire)) == 0 && NowNs() < give_up) {
    }
    if (w == 0) break;  // the sleeper gave up
    out.push_back(static_cast<double>(w - sent_ns.load(std::memory_order_relaxed)) / 1e3);
  }
  sleeper.join();
  return out;
}

void PrintLatHeader(const char* first_col) {
  std::printf("%-10s %-18s %-12s %-12s %-12s %-16s %-12s %-20s %-24s %-18s %s\n", first_col, "mode",
              "#iterations", "t_min[usec]", "t_max[usec]", "t_typical[usec]", "t_avg[usec]",
              "99% percentile[usec]", "reference", "ref_typical[usec]", "ratio(typical)");
}

absl::StatusOr<double> Typical(const absl::StatusOr<RefResult>& r) {
  if (!r.ok()) return r.status();
  return r->typical_usec;
}

void ReportRefError(const std::string& name, const absl::Status& st) {
  std::printf("# reference %s unavailable: %s\n", name.c_str(),
              std::string(st.message().substr(0, 1500)).c_str());
}

struct Target {
  std::string what;
  double ratio;
  bool met;
  std::string rule;
};

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(
      argc, argv,
      {"iterations", "sizes", "bw-total-mb", "bw-request-kb", "transport", "source", "memory", "tests",
       "inval-iterations", "reference", "rdma-device", "rdma-port", "rdma-gid-index", "rdma-addr",
       "ucx-tls", "ucx-api"},
      {"json", "ucx"});
  if (!a.ok()) {
    std::fprintf(stderr, "svm-read-bench: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  const uint64_t iters = *a->GetU64("iterations", 1000);
  const uint64_t bw_total = *a->GetU64("bw-total-mb", 64) << 20;
  const uint64_t bw_req = *a->GetU64("bw-request-kb", 1024) << 10;
  const uint64_t inval_iters = *a->GetU64("inval-iterations", 200);
  std::vector<uint64_t> sizes;
  for (absl::string_view s : absl::StrSplit(a->Get("sizes", "4096,65536,1048576"), ',')) {
    uint64_t v;
    if (absl::SimpleAtoi(s, &v) && v > 0) sizes.push_back(v);
  }
  std::set<std::string> tests;
  for (absl::string_view t : absl::StrSplit(a->Get("tests", "lat,bw"), ',', absl::SkipEmpty())) {
    tests.insert(std::string(t));
  }
  const std::string memory = a->Get("memory", "private");
  const std::string reference = a->Get("reference", "tcp");
  if (sizes.empty() || bw_req == 0 || (memory != "private" && memory != "memfd") ||
      (reference != "tcp" && reference != "perftest")) {
    std::fprintf(stderr, "svm-read-bench: bad --sizes, --bw-request-kb, --memory or --reference\n");
    return 2;
  }
  // The harness refuses a daemon whose status names another transport than
  // asked for; it takes the mirror source from $SVM_TEST_SOURCE.
  const std::string want_transport = a->Get("transport", "");
  if (a->Has("source")) setenv("SVM_TEST_SOURCE", a->Get("source").c_str(), 1);
  RdmaTarget target;
  target.device = a->Get("rdma-device", target.device);
  target.port = static_cast<int>(*a->GetU64("rdma-port", 1));
  target.gid_index = static_cast<int>(*a->GetU64("rdma-gid-index", 1));
  target.addr = a->Get("rdma-addr", target.addr);
  const bool perftest = reference == "perftest";
  const bool ucx = a->Has("ucx");
  const std::string ucx_api = a->Get("ucx-api", "uct");
  const std::string ucx_tls = a->Get("ucx-tls", "rc_verbs");
  const std::string ucx_name = ucx_api == "uct" ? "ucx_perftest get (uct)" : "ucx_perftest ucp_get";
  const bool json = a->Has("json");
  std::string json_rows;
  std::vector<Target> targets;

  const uint64_t max_size = std::max(*std::max_element(sizes.begin(), sizes.end()), bw_req);
  const uint64_t export_bytes = std::max<uint64_t>(bw_total, max_size);

  TempDir dir;
  auto da = Daemon::Start({.node = "bench-a", .dir = dir.path(), .extra = {"--log-level", "warn"},
                           .transport = want_transport});
  auto db = Daemon::Start({.node = "bench-b", .dir = dir.path(), .extra = {"--log-level", "warn"},
                           .transport = want_transport});
  if (!da.ok() || !db.ok()) {
    std::fprintf(stderr, "svm-read-bench: cannot start svmd: %s\n",
                 (!da.ok() ? da.status() : db.status()).ToString().c_str());
    return 1;
  }
  auto ca = (*da)->Connect();
  auto cb = (*db)->Connect();
  auto status = cb->Status();
  // The transports svmd runs (preference order); "transport" is the option.
  std::string transport = status.ok() ? status->transport : "?";
  if (status.ok() && !status->transports.empty()) transport = absl::StrJoin(status->transports, ",");
  if (!json) {
    std::printf("# svmd: transport %s, source %s; exported memory: %s\n", transport.c_str(),
                svm::testing::TestSource().c_str(),
                memory == "memfd" ? "MAP_SHARED memfd mapping" : "anonymous private");
  }

  std::unique_ptr<Exporter> ex;
  std::string data_path = "?";
  if (tests.count("lat") > 0 || tests.count("bw") > 0 || tests.count("client") > 0 ||
      tests.count("threads") > 0 || tests.count("memory") > 0) {
    auto e = Exporter::Start({.daemon = da->get(), .name = "bench", .pages = export_bytes / 4096, .fill = 7,
                              .backing = memory == "memfd" ? "memfd" : "anon"});
    if (!e.ok()) {
      std::fprintf(stderr, "svm-read-bench: %s\n", e.status().ToString().c_str());
      return 1;
    }
    ex = std::move(*e);
    auto imp = cb->Import((*da)->peer(), "bench");
    if (!imp.ok()) {
      std::fprintf(stderr, "svm-read-bench: import: %s\n", imp.status().ToString().c_str());
      return 1;
    }
    std::string export_path = "?";
    if (auto l = ca->ListExports(); l.ok()) {
      for (const auto& e : *l) {
        if (e.name == "bench") export_path = e.path;
      }
    }
    if (!json) {
      std::printf("# data path: import %s, export %s\n", imp->path.c_str(), export_path.c_str());
    }
    data_path = imp->path;
    if (!json) {
      if (memory == "memfd" && !absl::StartsWith(imp->path, "zero-copy")) {
        std::printf("# note: no zero-copy path in this svmd: the memfd export is served %s\n",
                    imp->path.c_str());
      }
    }
  }
  std::unique_ptr<TcpReference> tcp_ref;
  if (!perftest) tcp_ref = std::make_unique<TcpReference>();
  std::vector<uint8_t> buf(std::max(max_size, bw_req));

  double ib_read_lat_4k = 0;  // usec, when --reference perftest measured it (lat)
  if (tests.count("lat") > 0) {
    if (!json) {
      std::printf("\n# svm read latency through svmd vs %s\n",
                  perftest ? "ib_read_lat on the same device (mean of runs before and after)"
                           : "a TCP request/response of the same size (interleaved)");
      PrintLatHeader("#bytes");
    }
    for (uint64_t size : sizes) {
      const uint64_t n = size >= (1u << 20) ? std::max<uint64_t>(iters / 10, 20) : iters;
      absl::StatusOr<RefResult> before = absl::UnknownError("not run");
      if (perftest) before = svm::bench::RunPerftest(target, "ib_read_lat", size, n);
      std::vector<std::pair<std::string, Stats>> rows;
      absl::StatusOr<double> tcp_typical = absl::UnknownError("not run");
      // fresh: importer -> exporter and back; cached: the importer's cache;
      // local: the exporter's daemon reads its own export (control call and
      // copy, no transport): fresh - local is what the data path costs.
      for (const char* mode : {"fresh", "cached", "local"}) {
        svm::ReadOptions ro;
        ro.fresh = std::string(mode) != "cached";
        svm::Client* c = std::string(mode) == "local" ? ca.get() : cb.get();
        auto span = absl::MakeSpan(buf.data(), size);
        std::vector<double> t, r;
        for (uint64_t i = 0; i < n / 10 + 5; ++i) {  // warm-up
          (void)c->Read("bench", 0, span, ro);
          if (tcp_ref) tcp_ref->RoundTrip(size, buf);
        }
        for (uint64_t i = 0; i < n; ++i) {  // interleaved: both see the same machine noise
          double t0 = NowUs();
          auto rr = c->Read("bench", 0, span, ro);
          double t1 = NowUs();
          if (!rr.ok()) {
            std::fprintf(stderr, "svm-read-bench: read: %s\n", rr.status().ToString().c_str());
            return 1;
          }
          t.push_back(t1 - t0);
          if (tcp_ref) {
            tcp_ref->RoundTrip(size, buf);
            r.push_back(NowUs() - t1);
          }
        }
        if (tcp_ref) {
          PrintLatRow(json, &json_rows, "lat", size, mode, n, Summarize(t), "tcp request/response",
                      Summarize(r).typical);
        } else {
          rows.emplace_back(mode, Summarize(t));
        }
      }
      if (!perftest) continue;
      absl::StatusOr<RefResult> after = svm::bench::RunPerftest(target, "ib_read_lat", size, n);
      absl::StatusOr<RefResult> ref = svm::bench::Mean(before, after);
      absl::StatusOr<RefResult> ucx_ref = absl::UnknownError("not run");
      if (ucx) ucx_ref = svm::bench::RunUcxGet(target, ucx_api, ucx_tls, size, n);
      for (const auto& [mode, s] : rows) {
        PrintLatRow(json, &json_rows, "lat", size, mode, n, s, "ib_read_lat", Typical(ref));
        if (ucx && mode == "fresh") {
          PrintLatRow(json, &json_rows, "lat", size, mode, n, s, ucx_name, Typical(ucx_ref));
        }
        if (size == 4096 && ref.ok()) ib_read_lat_4k = ref->typical_usec;
        if (size == 4096 && mode == "fresh" && ref.ok()) {
          const double q = s.typical / ref->typical_usec;
          targets.push_back({"4 KiB fresh read latency vs ib_read_lat", q, q <= 1.5, "<= 1.5"});
        }
        if (size == 4096 && mode == "fresh" && ucx_ref.ok()) {
          const double q = s.typical / ucx_ref->typical_usec;
          targets.push_back({"4 KiB fresh read latency vs " + ucx_name, q, q <= 1.0, "<= 1.0"});
        }
      }
      if (!json) {
        if (!ref.ok()) ReportRefError("ib_read_lat", ref.status());
        if (ref.ok()) {
          std::printf("# ib_read_lat: `%s` (server: the same without the address); before %.2f, after %.2f usec\n",
                      before->command.c_str(), before->typical_usec, after->typical_usec);
        }
        if (ucx && !ucx_ref.ok()) ReportRefError(ucx_name, ucx_ref.status());
        if (ucx && ucx_ref.ok()) std::printf("# ucx: `%s`\n", ucx_ref->command.c_str());
      }
    }
  }

  double fresh_bw = 0;  // MB/s of the fresh bulk read, for the prefetch row
  if (tests.count("bw") > 0) {
    // Bandwidth: bw_total bytes in bw_req requests, fresh, one request at a
    // time; MB = 2^20 bytes as perftest and UCX count them.
    auto bw = [&](auto&& one) {
      double t0 = NowUs();
      for (uint64_t off = 0; off < bw_total; off += bw_req) one(off);
      return static_cast<double>(bw_total) / (NowUs() - t0) / 1.048576;
    };
    svm::ReadOptions fresh;
    fresh.fresh = true;
    std::vector<std::pair<std::string, absl::StatusOr<double>>> refs;
    std::vector<double> svm_bw, tcp_bw;
    const uint64_t nreq = bw_total / bw_req;
    absl::StatusOr<RefResult> rb_before = absl::UnknownError("not run");
    if (perftest) rb_before = svm::bench::RunPerftest(target, "ib_read_bw", bw_req, std::max<uint64_t>(nreq, 16));
    for (int rep = 0; rep < 3; ++rep) {
      svm_bw.push_back(bw([&](uint64_t off) {
        auto r = cb->Read("bench", off, absl::MakeSpan(buf.data(), bw_req), fresh);
        if (!r.ok()) std::fprintf(stderr, "svm-read-bench: read: %s\n", r.status().ToString().c_str());
      }));
      if (tcp_ref) tcp_bw.push_back(bw([&](uint64_t) { tcp_ref->RoundTrip(bw_req, buf); }));
    }
    std::sort(svm_bw.begin(), svm_bw.end());
    const double sbw = svm_bw[1];  // median of 3
    fresh_bw = sbw;
    // Cached (not fresh) reads of pages nobody cached: every read misses,
    // its pages land in the importer's shared cache and libsvm copies them
    // from there (the read completes in the cache: no copy in svmd). One
    // pass; the export is re-stamped and synced afterwards so that the
    // tests below find the cache empty again.
    double cold_bw = -1;
    if (ex != nullptr) {
      cold_bw = bw([&](uint64_t off) {
        auto r = cb->Read("bench", off, absl::MakeSpan(buf.data(), bw_req));
        if (!r.ok()) std::fprintf(stderr, "svm-read-bench: read: %s\n", r.status().ToString().c_str());
      });
      if (auto st = ex->Command("fill 0 " + std::to_string(bw_total / 4096) + " 8"); !st.ok()) {
        std::fprintf(stderr, "svm-read-bench: refill: %s\n", st.status().ToString().c_str());
        return 1;
      }
      (void)cb->Sync("bench");
    }
    if (tcp_ref) {
      std::sort(tcp_bw.begin(), tcp_bw.end());
      refs.emplace_back("tcp stream", tcp_bw[1]);
    } else {
      auto rb = svm::bench::Mean(rb_before, svm::bench::RunPerftest(target, "ib_read_bw", bw_req,
                                                                    std::max<uint64_t>(nreq, 16)));
      auto rb1 = svm::bench::RunPerftest(target, "ib_read_bw", bw_req, std::max<uint64_t>(nreq, 16),
                                         {"-t", "1"});
      auto bwof = [](const absl::StatusOr<RefResult>& r) -> absl::StatusOr<double> {
        if (!r.ok()) return r.status();
        return r->bw_mib_s;
      };
      refs.emplace_back("ib_read_bw", bwof(rb));
      refs.emplace_back("ib_read_bw -t 1", bwof(rb1));
      if (rb.ok()) {
        targets.push_back({absl::StrFormat("read bandwidth (%s) vs ib_read_bw", data_path),
                           sbw / rb->bw_mib_s, sbw / rb->bw_mib_s >= 0.8, ">= 0.8"});
      }
      if (ucx) {
        auto u = svm::bench::RunUcxGet(target, ucx_api, ucx_tls, bw_req, std::max<uint64_t>(nreq, 16));
        refs.emplace_back(ucx_name, bwof(u));
        if (u.ok()) {
          targets.push_back({"read bandwidth vs " + ucx_name, sbw / u->bw_mib_s,
                             sbw / u->bw_mib_s >= 1.0, ">= 1.0"});
        }
        if (!json && u.ok()) std::printf("# ucx: `%s`\n", u->command.c_str());
      }
      if (!json && rb.ok()) std::printf("# ib_read_bw: `%s`\n", rb->command.c_str());
    }
    if (!json) {
      std::printf("\n# svm read bandwidth (%llu MiB in %llu KiB fresh reads, one at a time) vs references\n",
                  (unsigned long long)(bw_total >> 20), (unsigned long long)(bw_req >> 10));
      std::printf("%-12s %-14s %-20s %-24s %-20s %s\n", "#bytes", "#request", "BW average[MB/sec]",
                  "reference", "ref BW[MB/sec]", "ratio");
    }
    if (!json && cold_bw > 0) {
      std::printf("# cached reads that all miss (one pass, %llu KiB reads; svmd lands the pages in the shared "
                  "cache): %.1f MB/sec, %.2fx the fresh reads above\n",
                  (unsigned long long)(bw_req >> 10), cold_bw, cold_bw / sbw);
    }
    for (const auto& [name, r] : refs) {
      if (json) {
        absl::StrAppend(&json_rows, json_rows.empty() ? "" : ",\n",
                        absl::StrFormat("  {\"test\":\"bw\",\"bytes\":%u,\"request_bytes\":%u,\"bw_avg_mb_s\":%.1f,"
                                        "\"reference\":\"%s\",\"ref_bw_avg_mb_s\":%.1f,\"ratio\":%.2f}",
                                        bw_total, bw_req, sbw, name, r.ok() ? *r : -1.0, r.ok() ? sbw / *r : -1.0));
      } else if (r.ok()) {
        std::printf("%-12llu %-14llu %-20.1f %-24s %-20.1f %.2f\n", (unsigned long long)bw_total,
                    (unsigned long long)bw_req, sbw, name.c_str(), *r, sbw / *r);
      } else {
        std::printf("%-12llu %-14llu %-20.1f %-24s %-20s -\n", (unsigned long long)bw_total,
                    (unsigned long long)bw_req, sbw, name.c_str(), "n/a");
        ReportRefError(name, r.status());
      }
    }
  }

  if (tests.count("client") > 0) {
    // The client data plane against the machine itself: a cached 4 KiB read
    // vs a 4 KiB memcpy from a warm buffer; a sequential sum over a mapped,
    // cached import vs the same sum over ordinary memory; a first-touch
    // fault of a mapped import vs a fresh 4 KiB read (interleaved).
    if (!json) {
      std::printf("\n# client data plane (mapped import: %llu MiB)\n",
                  (unsigned long long)(bw_total >> 20));
      PrintLatHeader("#bytes");
    }
    std::vector<uint8_t> warm(8192, 1), dst(4096);
    auto span = absl::MakeSpan(buf.data(), 4096);
    // svmd caches no read of an import on the zero-copy path (only a
    // mapping's faults land in the shared cache): no cached row there.
    if (absl::StartsWith(data_path, "zero-copy")) {
      if (!json) {
        std::printf("# %s: reads are not cached, so no cached row; the mapping's faults land in the cache\n",
                    data_path.c_str());
      }
    } else {
      for (int i = 0; i < 100; ++i) (void)cb->Read("bench", 0, span);
      std::vector<double> t, r;
      for (uint64_t i = 0; i < iters; ++i) {
        double t0 = NowUs();
        auto rr = cb->Read("bench", 0, span);
        double t1 = NowUs();
        if (!rr.ok() || rr->pages_from_cache != 1) {
          std::fprintf(stderr, "svm-read-bench: cached read: %s\n",
                       rr.ok() ? "not from the cache" : rr.status().ToString().c_str());
          return 1;
        }
        std::memcpy(dst.data(), warm.data() + (i & 1) * 4096, 4096);
        asm volatile("" : : "r"(dst.data()) : "memory");
        r.push_back(NowUs() - t1);
        t.push_back(t1 - t0);
      }
      const Stats cached = Summarize(t);
      const double memcpy_us = Summarize(r).typical;
      PrintLatRow(json, &json_rows, "client", 4096, "cached", iters, cached, "memcpy 4 KiB", memcpy_us);
      targets.push_back({"4 KiB cached read vs memcpy", cached.typical / memcpy_us,
                         cached.typical / memcpy_us <= 3.0, "<= 3"});
    }

    // The mapped sum: everything prefetched (cached), then summed in place.
    auto m = cb->Map("bench");
    if (!m.ok()) {
      std::fprintf(stderr, "svm-read-bench: map: %s\n", m.status().ToString().c_str());
      return 1;
    }
    const uint64_t total = std::min<uint64_t>(bw_total, (*m)->size());
    const double p0 = NowUs();
    if (auto st = (*m)->Prefetch(0, total); !st.ok()) {
      std::fprintf(stderr, "svm-read-bench: prefetch: %s\n", st.ToString().c_str());
      return 1;
    }
    // The prefetch fetches every page into the shared cache (nothing was
    // cached: the bandwidth rows read fresh): the cache-filling path.
    const double prefetch_bw = static_cast<double>(total) / (NowUs() - p0) / 1.048576;
    if (!json) {
      std::printf("# prefetch of %llu MiB into the shared cache: %.1f MB/sec", (unsigned long long)(total >> 20),
                  prefetch_bw);
      if (fresh_bw > 0) std::printf(" (%.2fx the fresh bulk read above)", prefetch_bw / fresh_bw);
      std::printf("\n");
    }
    std::vector<uint64_t> plain(total / 8, 7);
    auto sum = [](const uint64_t* p, uint64_t n) {
      uint64_t acc = 0;
      for (uint64_t i = 0; i < n; ++i) acc += p[i];
      return acc;
    };
    std::vector<double> ts, tr;
    uint64_t sink = 0;
    for (int rep = 0; rep < 11; ++rep) {
      double t0 = NowUs();
      sink += sum(reinterpret_cast<const uint64_t*>((*m)->data()), total / 8);
      double t1 = NowUs();
      sink += sum(plain.data(), total / 8);
      tr.push_back(NowUs() - t1);
      ts.push_back(t1 - t0);
    }
    asm volatile("" : : "r"(sink));
    const Stats mapped = Summarize(ts);
    const double plain_us = Summarize(tr).typical;
    PrintLatRow(json, &json_rows, "client", total, "mapped-sum", 11, mapped, "sum over ordinary memory", plain_us);
    targets.push_back({"mapped import sequential sum vs ordinary memory", mapped.typical / plain_us,
                       mapped.typical / plain_us <= 1.1, "<= 1.1"});
    m->reset();

    // First touches: pages nobody cached (the cache was dropped by an
    // export of fresh content: the bench re-stamps the export first).
    svm::MapOptions one;
    one.readahead_pages = 0;
    if (auto st = ex->Command("fill 0 " + std::to_string(total / 4096) + " 9"); !st.ok()) {
      std::fprintf(stderr, "svm-read-bench: refill: %s\n", st.status().ToString().c_str());
      return 1;
    }
    (void)cb->Sync("bench");
    auto fm = cb->Map("bench", one);
    if (!fm.ok()) return 1;
    const uint64_t touches = std::min<uint64_t>(iters, total / 4096 - 1);
    svm::ReadOptions fresh;
    fresh.fresh = true;
    std::vector<double> tf, tfr;
    volatile uint8_t byte = 0;
    for (uint64_t i = 0; i < touches; ++i) {
      const uint64_t page = 1 + i;  // never touched before
      double t0 = NowUs();
      byte = byte + (*fm)->data()[page * 4096];
      double t1 = NowUs();
      (void)cb->Read("bench", 0, span, fresh);
      tfr.push_back(NowUs() - t1);
      tf.push_back(t1 - t0);
    }
    const Stats fault = Summarize(tf);
    const double fresh_us = Summarize(tfr).typical;
    PrintLatRow(json, &json_rows, "client", 4096, "first-touch", touches, fault, "4 KiB fresh read", fresh_us);
    targets.push_back({"4 KiB first-touch fault vs fresh read", fault.typical / fresh_us,
                       fault.typical / fresh_us <= 1.3, "<= 1.3"});
    if (ib_read_lat_4k > 0) {
      // The VM tier's row: a mapped import's first touch against the wire.
      PrintLatRow(json, &json_rows, "client", 4096, "first-touch", touches, fault, "ib_read_lat", ib_read_lat_4k);
      targets.push_back({absl::StrFormat("4 KiB first-touch fault (%s) vs ib_read_lat", data_path),
                         fault.typical / ib_read_lat_4k, fault.typical / ib_read_lat_4k <= 2.0, "<= 2"});
    }
  }

  if (tests.count("threads") > 0 && ex) {
    // 8 client threads sharing one Client (one session) against one thread:
    // aggregate operations per second, cached and fresh 4 KiB reads. The
    // reference is the same client with one thread, in the same run.
    if (!json) {
      std::printf("\n# 8 client threads, one session (time per read, aggregate over the threads)\n");
      PrintLatHeader("#bytes");
    }
    const uint64_t pages = export_bytes / 4096;
    auto run = [&](int threads, bool fresh_reads, uint64_t per_thread) {
      std::vector<std::thread> ts;
      std::atomic<uint64_t> errors{0};
      const double t0 = NowUs();
      for (int k = 0; k < threads; ++k) {
        ts.emplace_back([&, k] {
          std::vector<uint8_t> b(4096);
          svm::ReadOptions o;
          o.fresh = fresh_reads;
          for (uint64_t i = 0; i < per_thread; ++i) {
            const uint64_t page = (k * 131 + i * 7) % pages;
            if (!cb->Read("bench", page * 4096, absl::MakeSpan(b), o).ok()) errors.fetch_add(1);
          }
        });
      }
      for (auto& t : ts) t.join();
      const double us = NowUs() - t0;
      if (errors.load() > 0) std::fprintf(stderr, "svm-read-bench: %llu reads failed\n",
                                          (unsigned long long)errors.load());
      return us / static_cast<double>(threads * per_thread);  // usec per read, aggregate
    };
    // Every page cached first.
    {
      std::vector<uint8_t> whole(std::min<uint64_t>(export_bytes, 1 << 20));
      for (uint64_t off = 0; off < export_bytes; off += whole.size()) {
        const uint64_t n = std::min<uint64_t>(whole.size(), export_bytes - off);
        (void)cb->Read("bench", off, absl::MakeSpan(whole.data(), n));
      }
    }
    for (bool fresh_reads : {false, true}) {
      const uint64_t n = fresh_reads ? std::max<uint64_t>(iters / 4, 50) : iters * 20;
      std::vector<double> one, eight;
      for (int rep = 0; rep < 5; ++rep) {
        one.push_back(run(1, fresh_reads, n));
        eight.push_back(run(8, fresh_reads, n / 8 + 1));
      }
      const Stats s8 = Summarize(eight);
      const double s1 = Summarize(one).typical;
      PrintLatRow(json, &json_rows, "threads", 4096, fresh_reads ? "fresh/8-threads" : "cached/8-threads",
                  n * 5, s8, "the same, 1 thread", s1);
    }
  }

  if (tests.count("memory") > 0 && ex) {
    // What svmd spends beside the cached bytes themselves: its own memory
    // (VmRSS minus what it maps of shared memory) per GiB cached, and per
    // client session (svmd's own memory and the session's shared memory).
    auto rss_kb = [](pid_t pid, const char* key) -> uint64_t {
      std::FILE* f = std::fopen(absl::StrCat("/proc/", pid, "/status").c_str(), "r");
      if (f == nullptr) return 0;
      char line[256];
      uint64_t v = 0;
      while (std::fgets(line, sizeof(line), f)) {
        if (std::strncmp(line, key, std::strlen(key)) == 0) v = std::strtoull(line + std::strlen(key), nullptr, 10);
      }
      std::fclose(f);
      return v;
    };
    auto shmem_kb = []() -> uint64_t {
      std::FILE* f = std::fopen("/proc/meminfo", "r");
      char line[256];
      uint64_t v = 0;
      while (f && std::fgets(line, sizeof(line), f)) {
        if (std::strncmp(line, "Shmem:", 6) == 0) v = std::strtoull(line + 6, nullptr, 10);
      }
      if (f) std::fclose(f);
      return v;
    };
    const pid_t pb = (*db)->process().pid();
    // A second import of the same export, so its cache starts empty.
    auto imp2 = cb->Import((*da)->peer(), "bench", "bench2");
    if (!imp2.ok()) {
      std::fprintf(stderr, "svm-read-bench: import: %s\n", imp2.status().ToString().c_str());
      return 1;
    }
    const uint64_t anon0 = rss_kb(pb, "RssAnon:"), shm0 = shmem_kb();
    {
      std::vector<uint8_t> whole(1 << 20);
      for (uint64_t off = 0; off < export_bytes; off += whole.size()) {
        const uint64_t n = std::min<uint64_t>(whole.size(), export_bytes - off);
        (void)cb->Read("bench2", off, absl::MakeSpan(whole.data(), n));
      }
    }
    const uint64_t anon1 = rss_kb(pb, "RssAnon:"), shm1 = shmem_kb();
    const double gib = static_cast<double>(export_bytes) / (1ull << 30);
    const double own_per_gib = (static_cast<double>(anon1) - anon0) / 1024 / gib;
    const double cache_per_gib = (static_cast<double>(shm1) - shm0) / 1024 / gib;
    // Sessions: 16 clients connected, each with one read done.
    const uint64_t anon2 = rss_kb(pb, "RssAnon:"), shm2 = shmem_kb();
    std::vector<std::unique_ptr<svm::Client>> clients;
    for (int i = 0; i < 16; ++i) {
      clients.push_back((*db)->Connect());
      std::vector<uint8_t> b(4096);
      if (clients.back()) (void)clients.back()->Read("bench2", 0, absl::MakeSpan(b));
    }
    const uint64_t anon3 = rss_kb(pb, "RssAnon:"), shm3 = shmem_kb();
    clients.clear();
    const double per_session_own = (static_cast<double>(anon3) - anon2) / 16;
    const double per_session_shm = (static_cast<double>(shm3) - shm2) / 16;
    if (json) {
      absl::StrAppend(&json_rows, json_rows.empty() ? "" : ",\n",
                      absl::StrFormat("  {\"test\":\"memory\",\"cached_mib\":%u,\"svmd_own_mib_per_gib\":%.1f,"
                                      "\"shared_cache_mib_per_gib\":%.1f,\"svmd_own_kib_per_session\":%.0f,"
                                      "\"shared_kib_per_session\":%.0f}",
                                      export_bytes >> 20, own_per_gib, cache_per_gib, per_session_own,
                                      per_session_shm));
    } else {
      std::printf("\n# memory (svmd of the importer; %llu MiB cached)\n",
                  (unsigned long long)(export_bytes >> 20));
      std::printf("# svmd's own memory per GiB cached: %.1f MiB; shared cache per GiB cached: %.1f MiB "
                  "(the pages, their version words)\n", own_per_gib, cache_per_gib);
      std::printf("# per session: svmd's own %.0f KiB, shared memory %.0f KiB (rings and the used part "
                  "of the data area)\n", per_session_own, per_session_shm);
    }
  }

  if (tests.count("inval") > 0) {
    // One page per iteration, each zapped once: a page zapped, touched again
    // and zapped again between two polls of the procfs source looks the same
    // to both polls (absent), so reusing pages made the bench wait for an
    // invalidation no source could report whenever the poller was starved
    // for longer than the drain below (it is, at load 10+ on 2 CPUs). The
    // source still scrubs pages an importer holds; see tests/bench/README.md.
    const uint64_t warm = std::max<uint64_t>(inval_iters / 10, 3);
    const uint64_t kPages = warm + inval_iters;
    auto* mem = static_cast<uint8_t*>(
        mmap(nullptr, kPages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (mem == MAP_FAILED) {
      std::perror("svm-read-bench: mmap");
      return 1;
    }
    madvise(mem, kPages * 4096, MADV_NOHUGEPAGE);
    std::memset(mem, 1, kPages * 4096);
    auto exp = ca->Export("inval", mem, kPages * 4096);
    auto imp = exp.ok() ? cb->Import((*da)->peer(), "inval") : exp.status();
    if (!imp.ok()) {
      std::fprintf(stderr, "svm-read-bench: inval export/import: %s\n", imp.status().ToString().c_str());
      return 1;
    }
    auto watch = cb->Watch("inval");
    if (!watch.ok()) {
      std::fprintf(stderr, "svm-read-bench: watch: %s\n", watch.status().ToString().c_str());
      return 1;
    }
    auto drain = [&](absl::Duration quiet) {
      while ((*watch)->Next(quiet).ok()) {
      }
    };
    std::vector<double> e2e, detect, deliver, to_client;
    for (uint64_t i = 0; i < warm + inval_iters; ++i) {
      const uint64_t p = i;  // present since the memset, never zapped before
      drain(absl::Milliseconds(svm::testing::TestSource() == "procfs" ? 60 : 5));
      const uint64_t t0 = NowNs();
      madvise(mem + p * 4096, 4096, MADV_DONTNEED);
      absl::StatusOr<svm::Invalidation> ev = svm::testing::WaitForPage(**watch, p, absl::Seconds(10));
      const uint64_t t1 = NowNs();
      if (!ev.ok()) {
        std::fprintf(stderr, "svm-read-bench: no invalidation for page %llu: %s\n", (unsigned long long)p,
                     ev.status().ToString().c_str());
        return 1;
      }
      if (i < warm) continue;
      e2e.push_back(static_cast<double>(t1 - t0) / 1e3);
      detect.push_back((static_cast<double>(ev->detected_ns) - static_cast<double>(t0)) / 1e3);
      deliver.push_back((static_cast<double>(t1) - static_cast<double>(ev->detected_ns)) / 1e3);
      if (ev->received_ns > 0) {
        to_client.push_back((static_cast<double>(t1) - static_cast<double>(ev->received_ns)) / 1e3);
      }
    }
    absl::StatusOr<double> ref = absl::UnknownError("not run");
    if (perftest) ref = Typical(svm::bench::RunPerftest(target, "ib_send_lat", 64, 1000));
    const std::string ref_name = perftest ? "ib_send_lat -s 64" : "none";
    if (!perftest) ref = absl::UnavailableError("--reference perftest gives ib_send_lat");
    if (!json) {
      std::printf("\n# invalidation latency: exporter's MADV_DONTNEED of one page -> Watch event on the importer "
                  "(source %s, transport %s) vs %s (one-way: half the ping-pong)\n",
                  svm::testing::TestSource().c_str(), transport.c_str(), ref_name.c_str());
      PrintLatHeader("#bytes");
    }
    const std::string src = svm::testing::TestSource();
    PrintLatRow(json, &json_rows, "inval", 4096, "end-to-end/" + src, inval_iters, Summarize(e2e), ref_name, ref);
    PrintLatRow(json, &json_rows, "inval", 4096, "detect/" + src, inval_iters, Summarize(detect), ref_name, ref);
    PrintLatRow(json, &json_rows, "inval", 4096, "deliver/" + src, inval_iters, Summarize(deliver), ref_name, ref);
    // The importer's daemon received it -> the client has it (the session's event ring).
    if (!to_client.empty()) {
      const Stats tc = Summarize(to_client);
      PrintLatRow(json, &json_rows, "inval", 4096, "to-client/" + src, to_client.size(), tc, ref_name, ref);
      // Beside it, what waking a sleeping thread costs on this machine now
      // (no target: the part of to-client that svm cannot remove).
      const std::vector<double> wake = EventfdWakeLatency(inval_iters);
      if (!wake.empty()) {
        const Stats ws = Summarize(wake);
        PrintLatRow(json, &json_rows, "inval", 8, "eventfd-wake", wake.size(), ws, "to-client", tc.typical);
        if (!json) {
          std::printf("# to-client is %.2f usec over waking a thread asleep in poll() (%.2f usec typical)\n",
                      tc.typical - ws.typical, ws.typical);
        }
      }
      targets.push_back({"invalidation: importer's svmd -> client (usec)", tc.typical, tc.typical <= 50.0,
                         "<= 50 usec"});
    }
    if (!json && !ref.ok() && perftest) ReportRefError(ref_name, ref.status());
  }

  if (json) {
    std::printf("[\n%s\n]\n", json_rows.c_str());
  } else if (!targets.empty()) {
    std::printf("\n# targets\n");
    for (const Target& t : targets) {
      std::printf("# %-50s ratio %.2f (target %s): %s\n", t.what.c_str(), t.ratio, t.rule.c_str(),
                  t.met ? "met" : "NOT MET");
    }
  }
  return 0;
}
