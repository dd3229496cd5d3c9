// svmd's Prometheus metrics, computed at scrape time from the daemon's
// public state: the named Counters, ExportTable::List(), ImportTable::List()
// and ImportTable::peers(). Nothing is cached between scrapes, so a scrape
// sees exactly what `svmctl status` / `list` would show at that moment.
#ifndef SVM_DAEMON_METRICS_COLLECTOR_H_
#define SVM_DAEMON_METRICS_COLLECTOR_H_

#include <string>
#include <vector>

#include "daemon/core/daemon.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace svm::metrics {

// The Prometheus name of daemon counter `counter` ("reads" ->
// "svm_reads_total"): the svm_ prefix, characters outside [a-zA-Z0-9_]
// replaced by '_', and the _total suffix counters carry by convention.
std::string CounterMetricName(const std::string& counter);

// The import states a scrape reports one 0/1 series for (the enum pattern:
// exactly one is 1 per import).
inline constexpr const char* kImportStates[] = {"connected", "connecting", "disconnected", "gone"};

class DaemonCollector final : public prometheus::Collectable {
 public:
  // daemon must outlive every Collect() call (the exposer that calls it is
  // destroyed before the daemon).
  explicit DaemonCollector(core::Daemon* daemon) : daemon_(daemon) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  core::Daemon* const daemon_;
};

}  // namespace svm::metrics

#endif  // SVM_DAEMON_METRICS_COLLECTOR_H_
