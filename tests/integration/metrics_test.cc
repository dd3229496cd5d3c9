// svmd --metrics-listen: two real daemons, a real export, import and read
// through svmctl, the endpoint scraped with curl and checked by promtool
// (the exposition format and Prometheus' naming conventions), then values
// compared with what the daemons did.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "svm/v1/control.grpc.pb.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;

// The "HOST:PORT" svmd logged for its metrics endpoint ("metrics on
// http://HOST:PORT/metrics"), or "" when it has not (yet).
std::string MetricsAddress(const std::string& log_path) {
  const std::string log = FileText(log_path);
  const std::string kSays = "metrics on http://";
  const size_t at = log.find(kSays);
  if (at == std::string::npos) return "";
  const size_t begin = at + kSays.size();
  return log.substr(begin, log.find("/metrics", begin) - begin);
}

// The value of one series ("name{labels}" exactly as exposed); a test
// failure and NaN (which no comparison accepts) when it is not there.
double Sample(const std::string& exposition, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " ")) continue;
    double v = 0;
    if (absl::SimpleAtod(line, &v)) return v;
  }
  ADD_FAILURE() << "no series " << series << " in the scrape";
  return std::nan("");
}

// Whether the series is there (no failure when it is not).
bool HasSample(const std::string& exposition, const std::string& series) {
  return absl::StrContains(absl::StrCat("\n", exposition), absl::StrCat("\n", series, " "));
}

class Metrics : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* node : {"A", "B"}) {
      auto d = Daemon::Start({.node = node, .dir = dir_.path(),
                              .extra = {"--metrics-listen", "127.0.0.1:0"}});
      ASSERT_TRUE(d.ok()) << d.status();
      const std::string addr = MetricsAddress(absl::StrCat(dir_.path(), "/", node, ".log"));
      ASSERT_TRUE(absl::StartsWith(addr, "127.0.0.1:")) << node << " did not log its metrics address";
      metrics_.push_back(addr);
      daemons_.push_back(std::move(*d));
    }
  }

  RunResult Ctl(int node, std::vector<std::string> args) {
    args.insert(args.begin(), {SvmctlPath(), "--daemon", daemons_[node]->control()});
    return RunCommand(args, Scaled(absl::Seconds(20)));
  }

  // Scrapes node's endpoint with curl into a file, runs promtool on it and
  // returns the exposition; fails the test when either complains.
  std::string Scrape(int node) {
    const std::string file = absl::StrCat(dir_.path(), "/scrape", node, "-", scrapes_++, ".txt");
    auto curl = RunCommand({CURL_PATH, "-sSf", "--max-time", "5", "-o", file,
                            absl::StrCat("http://", metrics_[node], "/metrics")});
    EXPECT_EQ(curl.exit_code, 0) << "curl: " << curl.err;
    auto check = RunCommand({"/bin/sh", "-c", absl::StrCat(PROMTOOL_PATH, " check metrics < ", file)});
    EXPECT_EQ(check.exit_code, 0) << "promtool check metrics on " << file << ":\n"
                                  << check.out << check.err;
    EXPECT_EQ(check.out + check.err, "") << "promtool check metrics on " << file;
    return FileText(file);
  }

  TempDir dir_;
  std::vector<std::unique_ptr<Daemon>> daemons_;
  std::vector<std::string> metrics_;
  int scrapes_ = 0;
};

TEST_F(Metrics, ScrapesPassPromtoolAndReportExportsImportsReadsAndInvalidations) {
  // Before anything happened: valid, and the daemon-wide series are there.
  const std::string idle = Scrape(1);
  EXPECT_EQ(Sample(idle, "svm_imports"), 0);
  EXPECT_EQ(Sample(idle, "svm_peer_links_up"), 0);
  EXPECT_TRUE(absl::StrContains(idle, "svm_build_info{")) << idle;

  auto e = Exporter::Start({.daemon = daemons_[0].get(), .name = "m", .pages = 4, .fill = 'M',
                            .log_path = absl::StrCat(dir_.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto imp = Ctl(1, {"import", "--peer", daemons_[0]->peer(), "--name", "m"});
  ASSERT_EQ(imp.exit_code, 0) << imp.err;
  auto read = Ctl(1, {"read", "--name", "m", "--len", std::to_string(4 * kPage)});
  ASSERT_EQ(read.exit_code, 0) << read.err;
  ASSERT_EQ(read.out, std::string(4 * kPage, 'M'));

  const std::string a = Scrape(0);
  EXPECT_EQ(Sample(a, "svm_exports"), 1);
  EXPECT_EQ(Sample(a, "svm_exports_created_total"), 1);
  EXPECT_EQ(Sample(a, "svm_export_pages{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(a, "svm_export_subscribers{name=\"m\"}"), 1);
  EXPECT_EQ(Sample(a, "svm_export_gone{name=\"m\"}"), 0);
  EXPECT_GE(Sample(a, "svm_fetches_served_total"), 1);
  EXPECT_GE(Sample(a, "svm_pages_served_total"), 4);

  const std::string b = Scrape(1);
  EXPECT_EQ(Sample(b, "svm_imports"), 1);
  EXPECT_EQ(Sample(b, "svm_imports_created_total"), 1);
  EXPECT_EQ(Sample(b, "svm_reads_total"), 1);
  EXPECT_EQ(Sample(b, "svm_read_pages_fetched_total"), 4);
  EXPECT_EQ(Sample(b, "svm_peer_links_up"), 1);
  EXPECT_EQ(Sample(b, "svm_import_pages{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b, "svm_import_cached_pages{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b, "svm_import_state{name=\"m\",state=\"connected\"}"), 1);
  EXPECT_EQ(Sample(b, "svm_import_state{name=\"m\",state=\"disconnected\"}"), 0);
  EXPECT_TRUE(absl::StrContains(
      b, absl::StrCat("svm_import_info{name=\"m\",peer=\"", daemons_[0]->peer(),
                      "\",remote_name=\"m\",path=\"")))
      << b;

  // Per export and per import traffic: the first read fetched all 4 pages.
  EXPECT_GE(Sample(a, "svm_export_fetches_total{name=\"m\"}"), 1);
  EXPECT_EQ(Sample(a, "svm_export_reads_served_total{name=\"m\"}"),
            Sample(a, "svm_export_fetches_total{name=\"m\"}"));
  EXPECT_EQ(Sample(a, "svm_export_served_bytes_total{name=\"m\"}"), 4 * kPage);
  EXPECT_EQ(Sample(b, "svm_import_reads_total{name=\"m\"}"), 1);
  EXPECT_EQ(Sample(b, "svm_import_cache_hits_total{name=\"m\"}"), 0);
  EXPECT_EQ(Sample(b, "svm_import_cache_misses_total{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b, "svm_import_fetch_duration_seconds_count{name=\"m\"}"), 1);
  EXPECT_GT(Sample(b, "svm_import_fetch_duration_seconds_sum{name=\"m\"}"), 0);
  EXPECT_EQ(Sample(b, "svm_import_fetch_duration_seconds_bucket{name=\"m\",le=\"+Inf\"}"), 1);
  // Heard from within the lease in effect (TestLease()).
  EXPECT_GE(Sample(b, "svm_import_behind_exporter_seconds{name=\"m\"}"), 0);
  EXPECT_LT(Sample(b, "svm_import_behind_exporter_seconds{name=\"m\"}"),
            absl::ToDoubleSeconds(TestLease()));

  // The same read again through the control API's Read: from B's cache,
  // hits move, misses and fetches do not; a read on A itself is served by
  // the export.
  {
    auto channel = grpc::CreateChannel(daemons_[1]->control(), grpc::InsecureChannelCredentials());
    auto stub = v1::Control::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ReadRequest req;
    req.set_name("m");
    req.set_len(4 * kPage);
    v1::ReadResponse resp;
    const grpc::Status st = stub->Read(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.data(), std::string(4 * kPage, 'M'));
    EXPECT_EQ(resp.pages_from_cache(), 4);
  }
  auto local = Ctl(0, {"read", "--name", "m", "--len", std::to_string(2 * kPage)});
  ASSERT_EQ(local.exit_code, 0) << local.err;
  const std::string b1 = Scrape(1);
  EXPECT_EQ(Sample(b1, "svm_import_reads_total{name=\"m\"}"), 2);
  EXPECT_EQ(Sample(b1, "svm_import_cache_hits_total{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b1, "svm_import_cache_misses_total{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b1, "svm_import_fetch_duration_seconds_count{name=\"m\"}"), 1);
  const std::string a1 = Scrape(0);
  EXPECT_EQ(Sample(a1, "svm_export_fetches_total{name=\"m\"}"),
            Sample(a, "svm_export_fetches_total{name=\"m\"}"));
  EXPECT_EQ(Sample(a1, "svm_export_reads_served_total{name=\"m\"}"),
            Sample(a, "svm_export_reads_served_total{name=\"m\"}") + 1);
  EXPECT_EQ(Sample(a1, "svm_export_served_bytes_total{name=\"m\"}"), 6 * kPage);

  // Reads libsvm serves from the shared cache without a message to svmd are
  // counted too: by the client in its session, added by svmd when scraped
  // (here while the session is open) and kept when the session ends.
  {
    auto c = daemons_[1]->Connect();
    std::string buf(4 * kPage, '\0');
    auto r = c->Read("m", 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->pages_from_cache, 4);
    EXPECT_EQ(r->pages_fetched, 0);
    EXPECT_EQ(buf, std::string(4 * kPage, 'M'));
    const std::string b2 = Scrape(1);
    EXPECT_EQ(Sample(b2, "svm_import_reads_total{name=\"m\"}"), 3);
    EXPECT_EQ(Sample(b2, "svm_import_cache_hits_total{name=\"m\"}"), 8);
    EXPECT_EQ(Sample(b2, "svm_import_cache_misses_total{name=\"m\"}"), 4);
  }
  auto cached = Ctl(1, {"read", "--name", "m", "--len", std::to_string(4 * kPage)});
  ASSERT_EQ(cached.exit_code, 0) << cached.err;
  ASSERT_EQ(cached.out, std::string(4 * kPage, 'M'));
  // svmd harvests svmctl's session when it sees it end.
  std::string b3;
  for (int i = 0; i < 100; ++i) {
    b3 = Scrape(1);
    if (Sample(b3, "svm_import_reads_total{name=\"m\"}") >= 4) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(Sample(b3, "svm_import_reads_total{name=\"m\"}"), 4);
  EXPECT_EQ(Sample(b3, "svm_import_cache_hits_total{name=\"m\"}"), 12);
  EXPECT_EQ(Sample(b3, "svm_import_cache_misses_total{name=\"m\"}"), 4);

  // An invalidation: counted on both sides, the page leaves B's cache.
  ASSERT_EQ(*(*e)->Command("dontneed 1 1"), "ok");
  std::string after;
  for (int i = 0; i < 100; ++i) {
    after = Scrape(1);
    const std::string series = "svm_import_invalidations_received_total{name=\"m\"}";
    if (HasSample(after, series) && Sample(after, series) >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GE(Sample(after, "svm_import_invalidations_received_total{name=\"m\"}"), 1);
  EXPECT_GE(Sample(after, "svm_invalidations_received_total"), 1);
  EXPECT_LT(Sample(after, "svm_import_cached_pages{name=\"m\"}"), 4);
  const std::string a2 = Scrape(0);
  EXPECT_GE(Sample(a2, "svm_export_invalidations_sent_total{name=\"m\"}"), 1);
  EXPECT_GE(Sample(a2, "svm_invalidations_sent_total"), 1);
}

// A bad address is a usage error; an address in use stops svmd from
// starting (exit 1) instead of running without the metrics it was asked for.
TEST(MetricsCommandLine, BadOrBusyAddressIsAnError) {
  TempDir dir;
  auto bad = RunCommand({SvmdPath(), "--control", absl::StrCat("unix:", dir.path(), "/x.sock"),
                         "--peer-listen", "127.0.0.1:0", "--metrics-listen", "nohost"},
                        Scaled(absl::Seconds(10)));
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_TRUE(absl::StrContains(bad.err, "flag 'metrics-listen'")) << bad.err;

  auto first = Daemon::Start({.node = "one", .dir = dir.path(),
                              .extra = {"--metrics-listen", "127.0.0.1:0"}});
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string busy = MetricsAddress(absl::StrCat(dir.path(), "/one.log"));
  ASSERT_FALSE(busy.empty());
  auto second = RunCommand({SvmdPath(), "--control", absl::StrCat("unix:", dir.path(), "/two.sock"),
                            "--peer-listen", "127.0.0.1:0", "--source", TestSource(),
                            "--metrics-listen", busy},
                           Scaled(absl::Seconds(10)));
  EXPECT_EQ(second.exit_code, 1) << second.err;
  EXPECT_TRUE(absl::StrContains(second.err, "cannot serve metrics")) << second.err;
}

}  // namespace
}  // namespace svm::testing
