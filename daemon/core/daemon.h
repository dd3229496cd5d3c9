// svmd's state: the mirror source, the transport, exports, imports, the
// mirror cache and the watch hub, wired together. The gRPC services are thin
// adapters over this class.
#ifndef SVM_DAEMON_CORE_DAEMON_H_
#define SVM_DAEMON_CORE_DAEMON_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/executor.h"
#include "common/numbers.h"
#include "daemon/core/counters.h"
#include "daemon/core/export_table.h"
#include "daemon/core/import_table.h"
#include "daemon/core/limits.h"
#include "daemon/core/watch_hub.h"
#include "daemon/session/shared_cache.h"
#include "daemon/source/mirror_source.h"
#include "daemon/transport/transport.h"

namespace svm::core {

struct DaemonOptions {
  std::string node;
  std::string control;      // unix socket path
  HostPort peer_listen;
  HostPort data_listen;     // port 0: the kernel chooses
  std::string source = "auto";
  std::string transport = "auto";          // auto|rdma|tcp
  std::string rdma_device;                 // "" = the first with an active port
  std::string rdma_registration = "auto";  // auto|odp|pinned
  absl::Duration rdma_ack_timeout = absl::Milliseconds(67);  // every QP's local ACK timeout
  std::string peer_token;  // at start; peer_token() is the current one
  uint64_t cache_bytes = 256ull << 20;
  absl::Duration poll_interval = absl::Milliseconds(10);
  absl::Duration scrub_interval = absl::Milliseconds(50);
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  ExportLimits limits;  // its live limits are replaced by limit_values
  LimitValues limit_values;
  ImportOptions import;
};

class Daemon {
 public:
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(DaemonOptions opts);
  ~Daemon();

  const DaemonOptions& options() const { return opts_; }
  ExportTable& exports() { return *exports_; }
  ImportTable& imports() { return *imports_; }
  WatchHub& hub() { return hub_; }
  Counters& counters() { return counters_; }
  // The limits in force (SIGHUP replaces their values).
  Limits& limits() { return *limits_; }
  // Data connections per peer (--max-data-connections-per-peer): SetupData
  // takes a slot here for each.
  DataConnections& data_connections() { return *data_connections_; }
  // The peer token in force (SIGHUP replaces it).
  PeerToken& peer_token() { return *peer_token_; }
  Executor& executor() { return *executor_; }
  // The running transports in preference order: rdma (when running), then
  // tcp (unless --transport rdma).
  const std::vector<transport::Transport*>& transports() const { return transport_list_; }
  // The running transport named name ("rdma", "tcp"), or nullptr.
  transport::Transport* FindTransport(const std::string& name) const;
  // The transport listening on --data-listen (tcp unless --transport rdma).
  transport::Transport& primary() const { return *primary_; }
  // Why rdma is not running ("" when it is).
  const std::string& rdma_unavailable() const { return rdma_unavailable_; }
  // What exports offer, e.g. "staged/pinned,tcp".
  std::string export_paths() const;
  const char* source_name() const { return source_->name(); }
  absl::Time started() const { return started_; }
  // Folds figures kept outside the tables into them before the metrics
  // endpoint reads them (the sessions' client-side cache hits). Set by the
  // service server while it runs; empty: nothing to fold.
  void SetBeforeScrape(std::function<void()> hook) {
    absl::MutexLock l(&scrape_mu_);
    before_scrape_ = std::move(hook);
  }
  void BeforeScrape() {
    absl::MutexLock l(&scrape_mu_);
    if (before_scrape_) before_scrape_();
  }

 private:
  explicit Daemon(DaemonOptions opts) : opts_(std::move(opts)) {}
  void ScrubLoop();
  void HeartbeatLoop();

  DaemonOptions opts_;
  absl::Time started_ = absl::Now();
  absl::Mutex scrape_mu_;  // guards before_scrape_; held while it runs
  std::function<void()> before_scrape_ ABSL_GUARDED_BY(scrape_mu_);
  // Declaration order is teardown order, reversed: the executor stops first,
  // then the tables, then the transport, the source and the cache.
  Counters counters_;
  std::shared_ptr<Limits> limits_;  // shared with the export table
  std::unique_ptr<DataConnections> data_connections_;  // its slots may outlive it
  std::shared_ptr<PeerToken> peer_token_;  // shared with the import table
  WatchHub hub_;
  std::unique_ptr<session::SharedCache> cache_;
  std::unique_ptr<source::MirrorSource> source_;
  std::unique_ptr<transport::Transport> rdma_;
  std::unique_ptr<transport::Transport> tcp_;
  std::vector<transport::Transport*> transport_list_;
  transport::Transport* primary_ = nullptr;
  std::string rdma_unavailable_;
  std::unique_ptr<ExportTable> exports_;
  std::unique_ptr<ImportTable> imports_;
  std::unique_ptr<Executor> executor_;
  absl::Notification stop_;
  std::thread scrubber_;
  std::thread heartbeat_;
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_DAEMON_H_
