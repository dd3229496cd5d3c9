#include "daemon/metrics/collector.h"

#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "daemon/source/mirror_source.h"

namespace svm::metrics {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

void AddSample(MetricFamily& f, std::vector<ClientMetric::Label> labels, double v) {
  ClientMetric m;
  m.label = std::move(labels);
  if (f.type == MetricType::Counter) {
    m.counter.value = v;
  } else {
    m.gauge.value = v;
  }
  f.metric.push_back(std::move(m));
}

}  // namespace

std::string CounterMetricName(const std::string& counter) {
  std::string n = absl::StrCat("svm_", counter);
  for (char& c : n) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_') c = '_';
  }
  return absl::StrCat(n, "_total");
}

std::vector<MetricFamily> DaemonCollector::Collect() const {
  std::vector<MetricFamily> out;
  core::Daemon& d = *daemon_;
  d.BeforeScrape();  // the sessions' client-side cache hits into the import figures

  auto build = Family("svm_build_info", "svmd version and node; always 1", MetricType::Gauge);
  AddSample(build, {{"version", SVM_VERSION}, {"node", d.options().node}}, 1);
  out.push_back(std::move(build));
  auto started = Family("svm_start_time_seconds", "when svmd started, seconds since the epoch",
                        MetricType::Gauge);
  AddSample(started, {}, absl::ToDoubleSeconds(d.started() - absl::UnixEpoch()));
  out.push_back(std::move(started));

  // Daemon totals: one counter per name `svmctl status` lists. A name
  // appears once its event happened at least once.
  for (const auto& [name, value] : d.counters().Snapshot()) {
    auto f = Family(CounterMetricName(name), absl::StrCat("daemon counter ", name, " (svmctl status)"),
                    MetricType::Counter);
    AddSample(f, {}, static_cast<double>(value));
    out.push_back(std::move(f));
  }

  const auto exports = d.exports().List();
  auto n_exports = Family("svm_exports", "exports of this node", MetricType::Gauge);
  AddSample(n_exports, {}, static_cast<double>(exports.size()));
  out.push_back(std::move(n_exports));
  auto e_subs = Family("svm_export_subscribers", "importers subscribed to the export", MetricType::Gauge);
  auto e_pages = Family("svm_export_pages", "pages the export spans", MetricType::Gauge);
  auto e_inval = Family("svm_export_invalidations_sent_total",
                        "invalidations the export sent to its subscribers (its sequence number)",
                        MetricType::Counter);
  auto e_gone = Family("svm_export_gone", "1 when the exporting process exited", MetricType::Gauge);
  auto e_info = Family("svm_export_info",
                       "the export's mirror source and the data paths it offers; always 1",
                       MetricType::Gauge);
  for (const auto& e : exports) {
    const std::vector<ClientMetric::Label> by_name = {{"name", e.name()}};
    AddSample(e_subs, by_name, e.subscribers());
    AddSample(e_pages, by_name, e.page_size() ? static_cast<double>(e.len() / e.page_size()) : 0);
    AddSample(e_inval, by_name, static_cast<double>(e.seq()));
    AddSample(e_gone, by_name, e.gone() ? 1 : 0);
    AddSample(e_info, {{"name", e.name()}, {"path", e.path()}, {"source", e.source()}}, 1);
  }
  for (auto* f : {&e_subs, &e_pages, &e_inval, &e_gone, &e_info}) out.push_back(std::move(*f));

  // Per export traffic (ExportStats, counted where it is served).
  auto e_reads = Family("svm_export_reads_served_total",
                        "reads the export served: fetches from importers and reads on this node "
                        "(zero-copy READs bypass the exporter's CPU and are not counted)",
                        MetricType::Counter);
  auto e_fetches = Family("svm_export_fetches_total", "fetch requests from importers the export served",
                          MetricType::Counter);
  auto e_bytes = Family("svm_export_served_bytes_total", "bytes the export's served reads copied",
                        MetricType::Counter);
  for (const auto& s : d.exports().Stats()) {
    const std::vector<ClientMetric::Label> by_name = {{"name", s.name}};
    const uint64_t fetches = s.stats->fetches.load(std::memory_order_relaxed);
    AddSample(e_reads, by_name,
              static_cast<double>(fetches + s.stats->local_reads.load(std::memory_order_relaxed)));
    AddSample(e_fetches, by_name, static_cast<double>(fetches));
    AddSample(e_bytes, by_name, static_cast<double>(s.stats->bytes_served.load(std::memory_order_relaxed)));
  }
  for (auto* f : {&e_reads, &e_fetches, &e_bytes}) out.push_back(std::move(*f));

  const auto imports = d.imports().List();
  auto n_imports = Family("svm_imports", "imports of this node", MetricType::Gauge);
  AddSample(n_imports, {}, static_cast<double>(imports.size()));
  out.push_back(std::move(n_imports));
  auto i_cached = Family("svm_import_cached_pages", "pages of the import in the mirror cache",
                         MetricType::Gauge);
  auto i_pages = Family("svm_import_pages", "pages the import spans", MetricType::Gauge);
  auto i_inval = Family("svm_import_invalidations_received_total",
                        "invalidations received for the import", MetricType::Counter);
  auto i_state = Family("svm_import_state",
                        "1 for the import's current state, 0 for the others", MetricType::Gauge);
  auto i_info = Family("svm_import_info",
                       "the import's exporter and data path; always 1", MetricType::Gauge);
  for (const auto& i : imports) {
    const std::vector<ClientMetric::Label> by_name = {{"name", i.name()}};
    AddSample(i_cached, by_name, static_cast<double>(i.cached_pages()));
    AddSample(i_pages, by_name, i.page_size() ? static_cast<double>(i.len() / i.page_size()) : 0);
    AddSample(i_inval, by_name, static_cast<double>(i.invalidations()));
    for (const char* s : kImportStates) {
      AddSample(i_state, {{"name", i.name()}, {"state", s}}, i.state() == s ? 1 : 0);
    }
    AddSample(i_info,
              {{"name", i.name()}, {"peer", i.peer()}, {"remote_name", i.remote_name()},
               {"path", i.path()}},
              1);
  }
  for (auto* f : {&i_cached, &i_pages, &i_inval, &i_state, &i_info}) out.push_back(std::move(*f));

  // Per import traffic (ImportStats, counted where the import reads).
  auto i_reads = Family("svm_import_reads_total", "reads of the import (through svmd, and those libsvm served from the shared cache)",
                        MetricType::Counter);
  auto i_hits = Family("svm_import_cache_hits_total", "pages of the import's reads found in the cache",
                       MetricType::Counter);
  auto i_misses = Family("svm_import_cache_misses_total",
                         "pages of the import's reads fetched from the exporter", MetricType::Counter);
  auto i_latency = Family("svm_import_fetch_duration_seconds",
                          "how long the wire part of a read took (all its fetches, or its zero-copy READ)",
                          MetricType::Histogram);
  auto i_behind = Family("svm_import_behind_exporter_seconds",
                         "time since the exporter was last heard from (heartbeat or invalidation): how "
                         "far behind the exporter the import may be; absent until first heard",
                         MetricType::Gauge);
  const auto now_ns = static_cast<int64_t>(source::MonotonicNs());
  for (const auto& s : d.imports().Stats()) {
    const std::vector<ClientMetric::Label> by_name = {{"name", s.name}};
    AddSample(i_reads, by_name, static_cast<double>(s.stats->reads.load(std::memory_order_relaxed)));
    AddSample(i_hits, by_name, static_cast<double>(s.stats->pages_from_cache.load(std::memory_order_relaxed)));
    AddSample(i_misses, by_name, static_cast<double>(s.stats->pages_fetched.load(std::memory_order_relaxed)));
    const auto h = s.stats->fetch_latency.Read();
    ClientMetric m;
    m.label = by_name;
    m.histogram.sample_count = h.count;
    m.histogram.sample_sum = h.sum_seconds;
    uint64_t cumulative = 0;
    for (size_t b = 0; b < h.buckets.size(); ++b) {
      cumulative += h.buckets[b];
      ClientMetric::Bucket bucket;
      bucket.cumulative_count = cumulative;
      bucket.upper_bound = b < core::LatencyHistogram::kBoundsSeconds.size()
                               ? core::LatencyHistogram::kBoundsSeconds[b]
                               : std::numeric_limits<double>::infinity();
      m.histogram.bucket.push_back(bucket);
    }
    i_latency.metric.push_back(std::move(m));
    const int64_t heard = s.stats->last_heard_ns.load(std::memory_order_relaxed);
    if (heard != 0) AddSample(i_behind, by_name, static_cast<double>(std::max<int64_t>(now_ns - heard, 0)) * 1e-9);
  }
  for (auto* f : {&i_reads, &i_hits, &i_misses, &i_latency, &i_behind}) out.push_back(std::move(*f));

  // Limits (daemon/core/limits.h): every limit is listed, refused or not.
  auto refusals = Family("svm_limit_refusals_total",
                         "requests refused with RESOURCE_EXHAUSTED by the limit (its flag: --max-*)",
                         MetricType::Counter);
  auto limit = Family("svm_limit", "the limit's value in force (SIGHUP may change it)", MetricType::Gauge);
  for (size_t i = 0; i < core::kLimitCount; ++i) {
    const auto l = static_cast<core::Limit>(i);
    const std::vector<ClientMetric::Label> by_limit = {{"limit", std::string(core::Limits::Name(l))}};
    AddSample(refusals, by_limit, static_cast<double>(d.limits().refusals(l)));
    AddSample(limit, by_limit, static_cast<double>(d.limits().Get(l)));
  }
  out.push_back(std::move(refusals));
  out.push_back(std::move(limit));

  auto peers = Family("svm_peer_links_up", "peer links whose data connection is up",
                      MetricType::Gauge);
  AddSample(peers, {}, d.imports().peers());
  out.push_back(std::move(peers));
  return out;
}

}  // namespace svm::metrics
