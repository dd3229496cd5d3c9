#include "daemon/core/daemon.h"

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "daemon/transport/rdma/rdma_transport.h"

namespace svm::core {

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(DaemonOptions opts) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(opts)));
  const DaemonOptions& o = d->opts_;
  d->cache_ = std::make_unique<PageCache>(o.cache_bytes / source::kPageSize);
  source::SourceOptions so;
  so.poll_interval = o.poll_interval;
  auto src = source::CreateMirrorSource(o.source, so);
  if (!src.ok()) return src.status();
  d->source_ = std::move(*src);
  if (o.transport == "rdma") {
    auto t = transport::CreateRdmaTransport("");
    if (!t.ok()) {
      return absl::Status(t.status().code(),
                          absl::StrCat("--transport rdma: ", t.status().message()));
    }
    d->transport_ = std::move(*t);
  } else if (o.transport == "auto" || o.transport == "tcp") {
    // auto does not probe RDMA yet (no per-peer fallback): it means tcp.
    if (o.transport == "auto") spdlog::info("transport auto: using tcp (rdma only with --transport rdma)");
    d->transport_ = transport::CreateTcpTransport();
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown transport '", o.transport, "' (auto|rdma|tcp)"));
  }
  d->exports_ = std::make_unique<ExportTable>(d->source_.get(), &d->hub_, &d->counters_, o.limits,
                                              std::string(d->transport_->name()));
  if (auto st = d->transport_->Start(o.data_listen, d->exports_.get()); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("data listener: ", st.message()));
  }
  ImportOptions io = o.import;
  io.node = o.node;
  io.peer_token = o.peer_token;
  d->imports_ = std::make_unique<ImportTable>(d->transport_.get(), &d->hub_, d->cache_.get(),
                                              &d->counters_, io);
  d->executor_ = std::make_unique<Executor>(8);
  d->scrubber_ = std::thread([p = d.get()] { p->ScrubLoop(); });
  return d;
}

Daemon::~Daemon() {
  stop_.Notify();
  if (scrubber_.joinable()) scrubber_.join();
  executor_.reset();
  if (transport_) transport_->Stop();  // Create() may have failed before it existed
  imports_.reset();
  exports_.reset();
}

void Daemon::ScrubLoop() {
  while (!stop_.WaitForNotificationWithTimeout(opts_.scrub_interval)) exports_->Scrub();
}

}  // namespace svm::core
