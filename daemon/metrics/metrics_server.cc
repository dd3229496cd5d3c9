#include "daemon/metrics/metrics_server.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "daemon/metrics/collector.h"
#include "prometheus/exposer.h"

namespace svm::metrics {

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(core::Daemon* daemon,
                                                                    const HostPort& listen) {
  std::unique_ptr<MetricsServer> s(new MetricsServer());
  s->collector_ = std::make_shared<DaemonCollector>(daemon);
  const std::string host = listen.host.find(':') != std::string::npos
                               ? absl::StrCat("[", listen.host, "]")
                               : listen.host;
  const std::string bind = absl::StrCat(host, ":", listen.port);
  // prometheus-cpp reports a failed bind by throwing; this is the only
  // place svmd lets a library exception happen, and it ends here.
  try {
    s->exposer_ = std::make_unique<prometheus::Exposer>(bind, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", bind, ": ", e.what()));
  }
  s->exposer_->RegisterCollectable(s->collector_);
  const auto ports = s->exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", bind));
  s->address_ = absl::StrCat(listen.host, ":", ports.front());
  return s;
}

MetricsServer::~MetricsServer() = default;

}  // namespace svm::metrics
