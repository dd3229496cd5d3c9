#include "daemon/core/daemon.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "daemon/transport/rdma/rdma_transport.h"

namespace svm::core {

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(DaemonOptions opts) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(opts)));
  const DaemonOptions& o = d->opts_;
  d->cache_ = std::make_unique<session::SharedCache>(o.cache_bytes / source::kPageSize);
  source::SourceOptions so;
  so.poll_interval = o.poll_interval;
  auto src = source::CreateMirrorSource(o.source, so);
  if (!src.ok()) return src.status();
  d->source_ = std::move(*src);
  const bool want_rdma = o.transport == "rdma" || o.transport == "auto";
  const bool want_tcp = o.transport == "tcp" || o.transport == "auto";
  if (!want_rdma && !want_tcp) {
    return absl::InvalidArgumentError(absl::StrCat("unknown transport '", o.transport, "' (auto|rdma|tcp)"));
  }
  auto reg = transport::ParseRdmaRegistration(o.rdma_registration);
  if (!reg.ok()) return absl::InvalidArgumentError(absl::StrCat("--rdma-registration: ", reg.status().message()));
  if (want_rdma) {
    auto t = transport::CreateRdmaTransport({o.rdma_device, *reg, o.rdma_ack_timeout});
    if (t.ok()) {
      d->rdma_ = std::move(*t);
    } else if (o.transport == "rdma" || *reg == transport::RdmaRegistration::kOdp) {
      // Asked for explicitly: honoured or svmd does not start.
      return absl::Status(t.status().code(),
                          absl::StrCat(o.transport == "rdma" ? "--transport rdma: " : "--rdma-registration odp: ",
                                       t.status().message()));
    } else {
      d->rdma_unavailable_ = std::string(t.status().message());
      spdlog::info("transport auto: rdma unavailable ({}); using tcp only", d->rdma_unavailable_);
    }
  } else {
    d->rdma_unavailable_ = "not enabled (--transport tcp)";
  }
  if (want_tcp) d->tcp_ = transport::CreateTcpTransport();
  if (d->rdma_) d->transport_list_.push_back(d->rdma_.get());
  if (d->tcp_) d->transport_list_.push_back(d->tcp_.get());
  d->primary_ = d->tcp_ ? d->tcp_.get() : d->rdma_.get();
  d->limits_ = std::make_shared<Limits>(o.limit_values);
  d->data_connections_ = std::make_unique<DataConnections>(d->limits_);
  ExportLimits el = o.limits;
  el.live = d->limits_;
  d->exports_ = std::make_unique<ExportTable>(d->source_.get(), &d->hub_, &d->counters_, el,
                                              d->export_paths());
  if (d->rdma_) d->exports_->EnableZeroCopy(d->rdma_.get());
  for (transport::Transport* t : d->transport_list_) {
    // tcp keeps --data-listen; rdma's liveness listener (its port travels in
    // SetupDataResponse) takes any port on that host unless it runs alone.
    HostPort listen = o.data_listen;
    if (t != d->primary_) listen.port = 0;
    if (auto st = t->Start(listen, d->exports_.get()); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat(t->name(), " data listener: ", st.message()));
    }
  }
  ImportOptions io = o.import;
  io.node = o.node;
  d->peer_token_ = std::make_shared<PeerToken>(o.peer_token);
  io.peer_token = d->peer_token_;
  d->imports_ = std::make_unique<ImportTable>(d->transport_list_, &d->hub_, d->cache_.get(),
                                              &d->counters_, io);
  d->executor_ = std::make_unique<Executor>(8, 64);
  d->scrubber_ = std::thread([p = d.get()] { p->ScrubLoop(); });
  d->heartbeat_ = std::thread([p = d.get()] { p->HeartbeatLoop(); });
  return d;
}

Daemon::~Daemon() {
  stop_.Notify();
  if (scrubber_.joinable()) scrubber_.join();
  if (heartbeat_.joinable()) heartbeat_.join();
  executor_.reset();
  for (transport::Transport* t : transport_list_) t->Stop();  // empty if Create() failed early
  imports_.reset();
  exports_.reset();
}

transport::Transport* Daemon::FindTransport(const std::string& name) const {
  for (transport::Transport* t : transport_list_) {
    if (name == t->name()) return t;
  }
  return nullptr;
}

std::string Daemon::export_paths() const {
  std::vector<std::string> paths;
  for (transport::Transport* t : transport_list_) {
    auto dev = t->device_status();
    paths.push_back(dev ? absl::StrCat("staged/", dev->registration) : std::string(t->name()));
  }
  return absl::StrJoin(paths, ",");
}

void Daemon::ScrubLoop() {
  while (!stop_.WaitForNotificationWithTimeout(opts_.scrub_interval)) exports_->Scrub();
}

// Its own thread: a slow scrub must not let importers' leases run out.
void Daemon::HeartbeatLoop() {
  while (!stop_.WaitForNotificationWithTimeout(opts_.heartbeat_interval)) {
    exports_->Heartbeat();
    imports_->ExpireLeases();
  }
}

}  // namespace svm::core
