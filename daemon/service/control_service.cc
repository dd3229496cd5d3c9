// Control service: local clients. Reactors never block: every call that may
// wait (on the network, on acknowledgements, on the kernel) runs on the
// daemon's executor and finishes the reactor from there.
#include <deque>

#include "absl/algorithm/container.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "daemon/service/access.h"
#include "daemon/service/requests.h"
#include "daemon/service/server.h"
#include "daemon/service/session_backend.h"
#include "common/log.h"
#include "svm/v1/control.grpc.pb.h"

namespace svm::service {
namespace {

constexpr size_t kMaxWatchQueue = 4096;

// Streams invalidations of one name to one client. Owned by gRPC; deletes
// itself in OnDone after unregistering from the hub.
class WatchReactor final : public grpc::ServerWriteReactor<v1::Invalidation> {
 public:
  WatchReactor(core::WatchHub* hub, const std::string& name) : hub_(hub), name_(name) {
    id_ = hub_->Add(name, [this](const v1::Invalidation& ev) { Push(ev); });
    StartSendInitialMetadata();  // tells the client the watch is registered
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&mu_);
    queue_.pop_front();
    if (!ok) {
      finished_ = true;
      Finish(grpc::Status::OK);
      return;
    }
    if (!queue_.empty() && !finished_) {
      StartWrite(&queue_.front());
    } else {
      writing_ = false;
    }
  }

  void OnCancel() override {
    absl::MutexLock l(&mu_);
    if (!finished_) {
      finished_ = true;
      Finish(grpc::Status::CANCELLED);
    }
  }

  void OnDone() override {
    hub_->Remove(id_);
    delete this;
  }

 private:
  void Push(const v1::Invalidation& ev) {
    absl::MutexLock l(&mu_);
    if (finished_) return;
    if (queue_.size() >= kMaxWatchQueue) {
      // The client is not keeping up: collapse what is queued (except the
      // message being written) into one whole-range overflow event.
      v1::Invalidation all;
      all.set_name(name_);
      all.set_first_page(0);
      all.set_npages(0);  // 0: the whole range
      all.set_seq(ev.seq());
      all.set_kind(v1::INVALIDATION_KIND_OVERFLOW);
      queue_.resize(writing_ ? 1 : 0);
      queue_.push_back(all);
    } else {
      queue_.push_back(ev);
    }
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
  }

  core::WatchHub* const hub_;
  const std::string name_;
  uint64_t id_ = 0;
  absl::Mutex mu_;  // guards the queue and the write state
  std::deque<v1::Invalidation> queue_ ABSL_GUARDED_BY(mu_);  // front: being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class ControlService final : public v1::Control::CallbackService {
  // A peer that cannot be connected to may be refusing this node's TLS (or
  // its lack of it): the gRPC message says only "Socket closed" then.
  absl::Status WithTlsHint(const absl::Status& st) const {
    if (!absl::IsUnavailable(st) || !absl::StrContains(st.message(), "failed to connect")) return st;
    return absl::Status(
        st.code(),
        absl::StrCat(st.message(),
                     d_->options().import.peer_credentials
                         ? " (this node connects with TLS: if the peer is up, it must run with "
                           "--tls-* and each certificate must verify against the other node's "
                           "--tls-ca; the peer's log names a refused handshake)"
                         : " (this node connects without TLS: a peer running with --tls-* "
                           "refuses it)"));
  }

 public:
  ControlService(core::Daemon* d, ClientRegistry* clients, std::string* peer_address,
                 RangeDeposits* deposits)
      : d_(d), clients_(clients), peer_address_(peer_address), deposits_(deposits) {}

  grpc::ServerUnaryReactor* Export(grpc::CallbackServerContext* ctx, const v1::ExportRequest* req,
                                   v1::ExportResponse* resp) override {
    auto cred = clients_->Lookup(ctx->peer());
    return Async(ctx, [=, this]() -> absl::Status {
      if (!cred.ok()) return cred.status();
      if (auto st = ValidateExportRequest(*req); !st.ok()) return st;
      UniqueFd range_fd, object;
      pid_t pid = req->pid() == 0 ? cred->pid : req->pid();
      if (req->range_token() != 0) {
        auto dep = deposits_->Take(req->range_token(), *cred);
        if (!dep.ok()) return dep.status();
        if (dep->info.start != req->addr() || dep->info.len != req->len()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "the deposited range fd is attached to 0x%x+0x%x, not 0x%x+0x%x", dep->info.start,
              dep->info.len, req->addr(), req->len()));
        }
        if (dep->info.pid == 0) {
          return absl::NotFoundError("the process of the deposited range fd exited");
        }
        if (req->pid() != 0 && dep->info.pid != req->pid()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "the deposited range fd is attached to process %d, not %d", dep->info.pid, req->pid()));
        }
        pid = dep->info.pid;
        range_fd = std::move(dep->fd);
        object = std::move(dep->object);
      }
      // A range fd is the client's proof (the kernel checked it at attach);
      // without one, or with a source that does not mirror through range
      // fds (procfs), svmd checks the ptrace rule on SO_PEERCRED itself.
      if (!range_fd.valid() || !d_->exports().AcceptsRangeFds()) {
        range_fd.Reset();
        if (auto st = CheckMayExport(*cred, pid); !st.ok()) return st;
      }
      auto info = d_->exports().Export(req->name(), pid, req->addr(), req->len(), cred->uid,
                                       {req->allow().begin(), req->allow().end()},
                                       std::move(range_fd), std::move(object));
      if (!info.ok()) return info.status();
      *resp->mutable_info() = *info;
      return absl::OkStatus();
    });
  }

  grpc::ServerUnaryReactor* Unexport(grpc::CallbackServerContext* ctx,
                                     const v1::UnexportRequest* req, v1::UnexportResponse*) override {
    auto cred = clients_->Lookup(ctx->peer());
    return Async(ctx, [=, this]() -> absl::Status {
      if (!cred.ok()) return cred.status();
      if (auto st = ValidateName(req->name()); !st.ok()) return st;
      // Only the owner (or root) may withdraw an export.
      for (const auto& e : d_->exports().List()) {
        if (e.name() == req->name() && cred->uid != 0) {
          auto mine = CheckMayExport(*cred, e.pid());
          if (!mine.ok() && !absl::IsNotFound(mine)) return mine;
        }
      }
      return d_->exports().Unexport(req->name());
    });
  }

  grpc::ServerUnaryReactor* ListExports(grpc::CallbackServerContext* ctx,
                                        const v1::ListExportsRequest*,
                                        v1::ListExportsResponse* resp) override {
    for (auto& e : d_->exports().List()) *resp->add_exports() = e;
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

  grpc::ServerUnaryReactor* Import(grpc::CallbackServerContext* ctx, const v1::ImportRequest* req,
                                   v1::ImportResponse* resp) override {
    // Asynchronous: the peer calls run on gRPC's callback API and this
    // call finishes from their completion, holding no thread meanwhile.
    auto* r = ctx->DefaultReactor();
    absl::Status st = [&]() -> absl::Status {
      if (auto st = ValidateImportRequest(*req); !st.ok()) return st;
      const std::string local = req->as().empty() ? req->name() : req->as();
      if (d_->exports().Has(local)) {
        return absl::AlreadyExistsError(
            absl::StrCat("'", local, "' names a local export; import it under another name (--as)"));
      }
      return absl::OkStatus();
    }();
    if (!st.ok()) {
      r->Finish(ToGrpc(st));
      return r;
    }
    d_->imports().Import(req->peer(), req->name(), req->as(),
                         [this, r, resp](absl::StatusOr<v1::ImportInfo> info) {
                           if (!info.ok()) {
                             const absl::Status why = WithTlsHint(info.status());
                             spdlog::debug("control call failed: {}", why.ToString());
                             return r->Finish(ToGrpc(why));
                           }
                           *resp->mutable_info() = std::move(*info);
                           r->Finish(grpc::Status::OK);
                         });
    return r;
  }

  grpc::ServerUnaryReactor* ListImports(grpc::CallbackServerContext* ctx,
                                        const v1::ListImportsRequest*,
                                        v1::ListImportsResponse* resp) override {
    for (auto& i : d_->imports().List()) *resp->add_imports() = i;
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

  grpc::ServerUnaryReactor* Read(grpc::CallbackServerContext* ctx, const v1::ReadRequest* req,
                                 v1::ReadResponse* resp) override {
    if (absl::Status st = ValidateReadRequest(*req); !st.ok()) {
      auto* r = ctx->DefaultReactor();
      r->Finish(ToGrpc(st));
      return r;
    }
    std::string* buf = resp->mutable_data();
    buf->resize(req->len());
    auto dst = absl::MakeSpan(reinterpret_cast<uint8_t*>(buf->data()), buf->size());
    if (!d_->imports().Has(req->name())) {
      return Async(ctx, [=, this]() -> absl::Status {
        auto seq = d_->exports().ReadLocal(req->name(), req->offset(), dst);
        if (!seq.ok()) return seq.status();
        resp->set_len(dst.size());
        resp->set_seq(*seq);
        return absl::OkStatus();
      });
    }
    // Asynchronous: the import's peer link runs it (a peer that does not
    // answer holds up reads of its own imports only) and this call
    // finishes from its completion.
    auto* r = ctx->DefaultReactor();
    d_->imports().Read(req->name(), req->offset(), dst, req->fresh(), /*fill=*/false,
                       [r, resp](absl::StatusOr<v1::ReadResponse> rr) {
                         if (!rr.ok()) {
                           spdlog::debug("control call failed: {}", rr.status().ToString());
                           return r->Finish(ToGrpc(rr.status()));
                         }
                         resp->set_len(rr->len());
                         resp->set_seq(rr->seq());
                         resp->set_pages_from_cache(rr->pages_from_cache());
                         resp->set_pages_fetched(rr->pages_fetched());
                         r->Finish(grpc::Status::OK);
                       });
    return r;
  }

  grpc::ServerWriteReactor<v1::Invalidation>* Watch(grpc::CallbackServerContext* ctx,
                                                    const v1::WatchRequest* req) override {
    absl::Status st = ValidateName(req->name());
    if (st.ok() && !d_->imports().Has(req->name()) && !d_->exports().Has(req->name())) {
      st = absl::NotFoundError(absl::StrCat("no export or import named '", req->name(), "'"));
    }
    if (!st.ok()) {
      class Failed final : public grpc::ServerWriteReactor<v1::Invalidation> {
       public:
        explicit Failed(grpc::Status s) { Finish(s); }
        void OnDone() override { delete this; }
      };
      return new Failed(ToGrpc(st));
    }
    (void)ctx;
    return new WatchReactor(&d_->hub(), req->name());
  }

  grpc::ServerUnaryReactor* Sync(grpc::CallbackServerContext* ctx, const v1::SyncRequest* req,
                                 v1::SyncResponse* resp) override {
    if (auto st = ValidateName(req->name()); !st.ok() || !d_->exports().Has(req->name())) {
      // An import's: forwarded to its exporter asynchronously.
      auto* r = ctx->DefaultReactor();
      if (!st.ok()) {
        r->Finish(ToGrpc(st));
        return r;
      }
      d_->imports().Sync(req->name(), [r, resp](absl::StatusOr<v1::SyncResponse> sr) {
        if (!sr.ok()) return r->Finish(ToGrpc(sr.status()));
        *resp = std::move(*sr);
        r->Finish(grpc::Status::OK);
      });
      return r;
    }
    // The exporter waits for its subscribers' acknowledgements: on the executor.
    return Async(ctx, [=, this]() -> absl::Status {
      auto r = d_->exports().Sync(req->name());
      if (!r.ok()) return r.status();
      *resp = *r;
      return absl::OkStatus();
    });
  }

  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* ctx, const v1::StatusRequest*,
                                   v1::StatusResponse* resp) override {
    const auto& o = d_->options();
    resp->set_node(o.node);
    resp->set_version(SVM_VERSION);
    resp->set_pid(::getpid());
    resp->set_control(o.control);
    resp->set_session_socket(SessionSocketPath(o.control));
    resp->set_peer_listen(*peer_address_);
    resp->set_data_listen(d_->primary().listen_address());
    resp->set_source(std::string(d_->source_name()));
    resp->set_transport(o.transport);  // the configured mode
    for (transport::Transport* t : d_->transports()) {
      resp->add_transports(std::string(t->name()));
      if (auto dev = t->device_status()) {
        v1::RdmaDeviceStatus* r = resp->mutable_rdma();
        r->set_device(dev->device);
        r->set_port(dev->port);
        r->set_port_state(dev->port_state);
        r->set_gid(dev->gid);
        r->set_active_mtu(dev->active_mtu);
        r->set_odp_rc_read(dev->odp_rc_read);
        r->set_odp_check(dev->odp_check);
        r->set_registration(dev->registration);
        r->set_liveness_listen(t->listen_address());
      }
    }
    resp->set_rdma_unavailable(d_->rdma_unavailable());
    resp->set_sync_detection("page-hash");
    resp->set_exports(static_cast<uint32_t>(d_->exports().List().size()));
    resp->set_imports(static_cast<uint32_t>(d_->imports().List().size()));
    resp->set_peers(d_->imports().peers());  // the links that are up
    resp->set_uptime_ms(absl::ToInt64Milliseconds(absl::Now() - d_->started()));
    for (auto& [k, v] : d_->counters().Snapshot()) (*resp->mutable_counters())[k] = v;
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

 private:
  template <typename F>
  grpc::ServerUnaryReactor* Async(grpc::CallbackServerContext* ctx, F fn) {
    return Async(ctx, nullptr, std::move(fn));
  }
  // On executor ex (the daemon's when null).
  template <typename F>
  grpc::ServerUnaryReactor* Async(grpc::CallbackServerContext* ctx, Executor* ex, F fn) {
    auto* r = ctx->DefaultReactor();
    (ex != nullptr ? *ex : d_->executor()).Submit([r, fn = std::move(fn)]() mutable {
      absl::Status st = fn();
      if (!st.ok()) spdlog::debug("control call failed: {}", st.ToString());
      r->Finish(ToGrpc(st));
    });
    return r;
  }

  core::Daemon* const d_;
  ClientRegistry* const clients_;
  std::string* const peer_address_;
  RangeDeposits* const deposits_;
};

}  // namespace

std::unique_ptr<grpc::Service> CreateControlService(core::Daemon* d, ClientRegistry* clients,
                                                    std::string* peer_address,
                                                    RangeDeposits* deposits) {
  return std::make_unique<ControlService>(d, clients, peer_address, deposits);
}

}  // namespace svm::service
