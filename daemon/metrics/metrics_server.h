// The HTTP endpoint Prometheus scrapes (--metrics-listen HOST:PORT): GET
// /metrics in the text exposition format, served by prometheus-cpp's
// embedded civetweb on its own threads. Scrapes only read the daemon's
// tables through their listing APIs.
#ifndef SVM_DAEMON_METRICS_METRICS_SERVER_H_
#define SVM_DAEMON_METRICS_METRICS_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/net.h"
#include "daemon/core/daemon.h"

namespace prometheus {
class Exposer;
}

namespace svm::metrics {

class DaemonCollector;

class MetricsServer {
 public:
  // Listens on listen (port 0: the kernel chooses). daemon must outlive
  // the server: destroying the server stops its threads first.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(core::Daemon* daemon,
                                                              const HostPort& listen);
  ~MetricsServer();
  // "HOST:PORT" with the port actually bound.
  const std::string& address() const { return address_; }

 private:
  MetricsServer() = default;

  // Declaration order is teardown order, reversed: the exposer's threads
  // stop before the collector they call goes away.
  std::shared_ptr<DaemonCollector> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
};

}  // namespace svm::metrics

#endif  // SVM_DAEMON_METRICS_METRICS_SERVER_H_
