// svm-read-bench: reads an export from the other node through svmd and
// prints perftest-style columns, each beside the same measurement of a
// reference taken in the same run: a plain TCP request/response of the
// same size between two threads over 127.0.0.1 (latency), and a plain TCP
// stream of the same total in the same request size (bandwidth).
//
//   svm-read-bench [--iterations N] [--sizes 4096,65536,1048576]
//                  [--bw-total-mb 64] [--bw-request-kb 1024] [--json]
//
// Two svmd (procfs source, tcp transport) and an exporter process are
// started for the run. svm reads are --fresh (every read crosses to the
// exporter), except the "cached" rows, which hit the importer's cache.
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/args.h"
#include "common/fd.h"
#include "common/net.h"
#include "tests/integration/harness.h"

namespace {

using svm::testing::Daemon;
using svm::testing::Exporter;
using svm::testing::TempDir;

double NowUs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

struct Stats {
  double min, max, typical, avg, p99;
};

Stats Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Stats s{};
  s.min = v.front();
  s.max = v.back();
  s.typical = v[v.size() / 2];
  s.avg = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  s.p99 = v[std::min(v.size() - 1, static_cast<size_t>(static_cast<double>(v.size()) * 0.99))];
  return s;
}

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

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv, {"iterations", "sizes", "bw-total-mb", "bw-request-kb"}, {"json"});
  if (!a.ok()) {
    std::fprintf(stderr, "svm-read-bench: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  const uint64_t iters = *a->GetU64("iterations", 1000);
  const uint64_t bw_total = *a->GetU64("bw-total-mb", 64) << 20;
  const uint64_t bw_req = *a->GetU64("bw-request-kb", 1024) << 10;
  std::vector<uint64_t> sizes;
  for (absl::string_view s : absl::StrSplit(a->Get("sizes", "4096,65536,1048576"), ',')) {
    uint64_t v;
    if (absl::SimpleAtoi(s, &v) && v > 0) sizes.push_back(v);
  }
  const uint64_t max_size = std::max(*std::max_element(sizes.begin(), sizes.end()), bw_req);
  const uint64_t export_bytes = std::max<uint64_t>(bw_total, max_size);

  TempDir dir;
  auto da = Daemon::Start({.node = "bench-a", .dir = dir.path(), .extra = {"--log-level", "warn"}});
  auto db = Daemon::Start({.node = "bench-b", .dir = dir.path(), .extra = {"--log-level", "warn"}});
  if (!da.ok() || !db.ok()) {
    std::fprintf(stderr, "svm-read-bench: cannot start svmd\n");
    return 1;
  }
  auto ex = Exporter::Start({.daemon = da->get(), .name = "bench", .pages = export_bytes / 4096, .fill = 7});
  if (!ex.ok()) {
    std::fprintf(stderr, "svm-read-bench: %s\n", ex.status().ToString().c_str());
    return 1;
  }
  auto cb = (*db)->Connect();
  if (auto imp = cb->Import((*da)->peer(), "bench"); !imp.ok()) {
    std::fprintf(stderr, "svm-read-bench: import: %s\n", imp.status().ToString().c_str());
    return 1;
  }
  TcpReference ref;
  std::vector<uint8_t> buf(std::max(max_size, bw_req));
  const bool json = a->Has("json");
  std::string json_rows;

  if (!json) {
    std::printf("# svm read latency through svmd (tcp path, procfs source) vs a TCP request/response of the same size\n");
    std::printf("%-10s %-8s %-12s %-12s %-12s %-16s %-12s %-20s %-16s %s\n", "#bytes", "mode", "#iterations",
                "t_min[usec]", "t_max[usec]", "t_typical[usec]", "t_avg[usec]", "99% percentile[usec]",
                "ref_typical[usec]", "ratio(typical)");
  }
  for (uint64_t size : sizes) {
    const uint64_t n = size >= (1u << 20) ? std::max<uint64_t>(iters / 10, 20) : iters;
    for (const char* mode : {"fresh", "cached"}) {
      svm::ReadOptions ro;
      ro.fresh = std::string(mode) == "fresh";
      auto span = absl::MakeSpan(buf.data(), size);
      std::vector<double> t, r;
      for (uint64_t i = 0; i < n / 10 + 5; ++i) {  // warm-up
        (void)cb->Read("bench", 0, span, ro);
        ref.RoundTrip(size, buf);
      }
      for (uint64_t i = 0; i < n; ++i) {  // interleaved: both see the same machine noise
        double t0 = NowUs();
        auto rr = cb->Read("bench", 0, span, ro);
        double t1 = NowUs();
        if (!rr.ok()) {
          std::fprintf(stderr, "svm-read-bench: read: %s\n", rr.status().ToString().c_str());
          return 1;
        }
        ref.RoundTrip(size, buf);
        double t2 = NowUs();
        t.push_back(t1 - t0);
        r.push_back(t2 - t1);
      }
      Stats s = Summarize(t), rs = Summarize(r);
      if (json) {
        absl::StrAppend(&json_rows, json_rows.empty() ? "" : ",\n",
                        absl::StrFormat("  {\"test\":\"lat\",\"bytes\":%u,\"mode\":\"%s\",\"iterations\":%u,"
                                        "\"t_min_usec\":%.2f,\"t_max_usec\":%.2f,\"t_typical_usec\":%.2f,"
                                        "\"t_avg_usec\":%.2f,\"t_p99_usec\":%.2f,\"ref_typical_usec\":%.2f,"
                                        "\"ratio\":%.2f}",
                                        size, mode, n, s.min, s.max, s.typical, s.avg, s.p99, rs.typical,
                                        s.typical / rs.typical));
      } else {
        std::printf("%-10llu %-8s %-12llu %-12.2f %-12.2f %-16.2f %-12.2f %-20.2f %-16.2f %.2f\n",
                    (unsigned long long)size, mode, (unsigned long long)n, s.min, s.max, s.typical, s.avg,
                    s.p99, rs.typical, s.typical / rs.typical);
      }
    }
  }

  // Bandwidth: bw_total bytes in bw_req requests, fresh, vs a TCP stream of
  // the same total in the same request size.
  auto bw = [&](auto&& one) {
    double t0 = NowUs();
    for (uint64_t off = 0; off < bw_total; off += bw_req) one(off);
    return static_cast<double>(bw_total) / (NowUs() - t0);  // bytes/usec == MB/s
  };
  svm::ReadOptions fresh;
  fresh.fresh = true;
  std::vector<double> svm_bw, ref_bw;
  for (int rep = 0; rep < 3; ++rep) {
    svm_bw.push_back(bw([&](uint64_t off) { (void)cb->Read("bench", off, absl::MakeSpan(buf.data(), bw_req), fresh); }));
    ref_bw.push_back(bw([&](uint64_t) { ref.RoundTrip(bw_req, buf); }));
  }
  std::sort(svm_bw.begin(), svm_bw.end());
  std::sort(ref_bw.begin(), ref_bw.end());
  const double sbw = svm_bw[1], rbw = ref_bw[1];  // median of 3
  if (json) {
    absl::StrAppend(&json_rows, ",\n",
                    absl::StrFormat("  {\"test\":\"bw\",\"bytes\":%u,\"request_bytes\":%u,\"bw_avg_mb_s\":%.1f,"
                                    "\"ref_bw_avg_mb_s\":%.1f,\"ratio\":%.2f}",
                                    bw_total, bw_req, sbw, rbw, sbw / rbw));
    std::printf("[\n%s\n]\n", json_rows.c_str());
  } else {
    std::printf("\n# svm read bandwidth (%llu MiB in %llu KiB fresh reads) vs a TCP stream of the same requests\n",
                (unsigned long long)(bw_total >> 20), (unsigned long long)(bw_req >> 10));
    std::printf("%-12s %-14s %-20s %-20s %s\n", "#bytes", "#request", "BW average[MB/sec]", "ref BW[MB/sec]", "ratio");
    std::printf("%-12llu %-14llu %-20.1f %-20.1f %.2f\n", (unsigned long long)bw_total, (unsigned long long)bw_req,
                sbw, rbw, sbw / rbw);
  }
  return 0;
}
