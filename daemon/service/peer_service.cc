// Peer service: other svmd daemons. Every call is authenticated before
// anything is revealed: mutual TLS (the peer server refuses a handshake
// without a certificate the CA signed) gives the caller's identities
// (PeerNames), and the pre-shared token is checked when one is configured.
// Exports with an access list are described, subscribed to and synced only
// for identities on it; any other caller gets PERMISSION_DENIED and nothing
// about the export (no size, path, id or rkey). Fetches on data connections
// name an export by its id, a random 64-bit number only DescribeExport
// reveals (ExportTable).
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "daemon/service/requests.h"
#include "daemon/service/server.h"
#include "daemon/service/tls.h"
#include "daemon/transport/session_registry.h"
#include "common/log.h"
#include "svm/v1/peer.grpc.pb.h"

namespace svm::service {
namespace {

// 2: SetupDataResponse carries one opaque transport endpoint (field 4).
constexpr uint32_t kProtocolVersion = 2;

class PeerService final : public v1::Peer::CallbackService {
 public:
  explicit PeerService(core::Daemon* d) : d_(d) {}

  grpc::ServerUnaryReactor* Hello(grpc::CallbackServerContext* ctx, const v1::HelloRequest* req,
                                  v1::HelloResponse* resp) override {
    return Now(ctx, [&](const Caller&) -> absl::Status {
      resp->set_node(d_->options().node);
      resp->set_protocol_version(kProtocolVersion);
      // Preference order: the importer takes the first one it also runs.
      for (transport::Transport* t : d_->transports()) resp->add_transports(std::string(t->name()));
      spdlog::debug("hello from node {}", LogSafe(req->node()));
      return absl::OkStatus();
    });
  }

  // On the executor: a zero-copy export registers its memory for this
  // peer's protection key on the first describe (pinned: that pins the
  // pages once more), which must not hold a reactor.
  grpc::ServerUnaryReactor* DescribeExport(grpc::CallbackServerContext* ctx,
                                           const v1::DescribeExportRequest* req,
                                           v1::ExportDescriptor* resp) override {
    auto* r = ctx->DefaultReactor();
    auto c = Authenticate(ctx);
    if (!c.ok()) {
      r->Finish(ToGrpc(c.status()));
      return r;
    }
    d_->executor().Submit([this, r, req, resp, c = *std::move(c)] {
      auto d = d_->exports().Describe(req->name(), c.names);
      if (d.ok()) *resp = *std::move(d);
      r->Finish(ToGrpc(d.ok() ? absl::OkStatus() : Refused(c, req->name(), d.status())));
    });
    return r;
  }

  // PrepareSession may be slow (rdma: a queue pair brought up to RTS and its
  // buffers registered), so it runs on the executor, never on the reactor,
  // and the reactor is finished from there. --max-data-connections-per-peer
  // is checked first, here, before any transport makes anything: the slot
  // goes to the transport, which gives it back when the connection's
  // resources are gone.
  grpc::ServerUnaryReactor* SetupData(grpc::CallbackServerContext* ctx,
                                      const v1::SetupDataRequest* req,
                                      v1::SetupDataResponse* resp) override {
    auto* r = ctx->DefaultReactor();
    auto c = Authenticate(ctx);
    if (!c.ok()) {
      r->Finish(ToGrpc(c.status()));
      return r;
    }
    auto slot = d_->data_connections().Admit(core::PeerKey(c->names, req->node()));
    if (!slot.ok()) {
      r->Finish(ToGrpc(slot.status()));
      return r;
    }
    // std::function needs a copyable task: the slot travels in a shared_ptr.
    auto held = std::make_shared<std::unique_ptr<transport::ConnectionSlot>>(*std::move(slot));
    d_->executor().Submit([this, r, req, resp, held, key = transport::ProtectionKey(c->names)] {
      r->Finish(ToGrpc(PrepareSession(*req, resp, std::move(*held), key)));
    });
    return r;
  }

  grpc::ServerUnaryReactor* Subscribe(grpc::CallbackServerContext* ctx,
                                      const v1::SubscribeRequest* req,
                                      v1::SubscribeResponse* resp) override {
    return Now(ctx, [&](const Caller& c) -> absl::Status {
      // Tokens are random: at most one transport knows this one.
      std::shared_ptr<transport::Subscriber> sub;
      for (transport::Transport* t : d_->transports()) {
        if ((sub = t->FindSubscriber(req->session_token())) != nullptr) break;
      }
      if (!sub) return absl::FailedPreconditionError("no data connection for this session");
      auto seq = d_->exports().Subscribe(req->export_id(), sub, c.names);
      if (!seq.ok()) return Refused(c, absl::StrCat("id ", req->export_id()), seq.status());
      resp->set_seq(*seq);
      return absl::OkStatus();
    });
  }

  grpc::ServerUnaryReactor* Sync(grpc::CallbackServerContext* ctx, const v1::PeerSyncRequest* req,
                                 v1::PeerSyncResponse* resp) override {
    auto* r = ctx->DefaultReactor();
    auto c = Authenticate(ctx);
    absl::Status st = c.status();
    if (st.ok()) st = Refused(*c, req->name(), d_->exports().Allowed(req->name(), c->names));
    if (!st.ok()) {
      r->Finish(ToGrpc(st));
      return r;
    }
    d_->executor().Submit([this, r, req, resp] {
      auto s = d_->exports().Sync(req->name());
      if (s.ok()) {
        resp->set_pages_invalidated(s->pages_invalidated());
        resp->set_seq(s->seq());
        resp->set_subscribers_acked(s->subscribers_acked());
      }
      r->Finish(ToGrpc(s.status()));
    });
    return r;
  }

 private:
  // SetupData's work: the transport's offer, converted to the wire here (the
  // transport seam knows nothing of protobuf).
  absl::Status PrepareSession(const v1::SetupDataRequest& req, v1::SetupDataResponse* resp,
                              std::unique_ptr<transport::ConnectionSlot> slot, const std::string& protection) {
    transport::Transport* t = d_->FindTransport(req.transport());
    if (t == nullptr) {
      std::vector<std::string> offered;
      for (transport::Transport* o : d_->transports()) offered.push_back(o->name());
      return absl::FailedPreconditionError(
          absl::StrCat("transport '", req.transport(), "' is not offered; this node offers '",
                       absl::StrJoin(offered, ","), "'"));
    }
    auto offer = t->PrepareSession(req.node(), req.importer_endpoint(), std::move(slot), protection);
    if (!offer.ok()) return offer.status();
    resp->set_session_token(offer->token);
    resp->set_endpoint(offer->endpoint);
    return absl::OkStatus();
  }

  // Who called: the identities its certificate proves (empty without TLS)
  // and its address, for the log.
  struct Caller {
    std::vector<std::string> names;
    std::string peer;
  };

  absl::StatusOr<Caller> Authenticate(grpc::CallbackServerContext* ctx) const {
    Caller c{PeerNames(*ctx->auth_context()), ctx->peer()};
    const std::string want = d_->peer_token().Get();
    if (want.empty()) return c;
    const auto& md = ctx->client_metadata();
    auto it = md.find("svm-peer-token");
    if (it == md.end() || !transport::TokensEqual({it->second.data(), it->second.size()}, want)) {
      spdlog::warn("peer {} failed authentication", ctx->peer());
      return absl::UnauthenticatedError("peer token missing or wrong");
    }
    return c;
  }

  // A refusal by an export's access list is logged here, once per call,
  // where it is decided; other errors pass through.
  static absl::Status Refused(const Caller& c, const std::string& what, absl::Status st) {
    if (st.code() == absl::StatusCode::kPermissionDenied) {
      spdlog::warn("{}", RefusalLogLine(c.peer, c.names, what, st.message()));
    }
    return st;
  }

  template <typename F>
  grpc::ServerUnaryReactor* Now(grpc::CallbackServerContext* ctx, F fn) {
    auto* r = ctx->DefaultReactor();
    auto c = Authenticate(ctx);
    absl::Status st = c.ok() ? fn(*c) : c.status();
    r->Finish(ToGrpc(st));
    return r;
  }

  core::Daemon* const d_;
};

}  // namespace

std::unique_ptr<grpc::Service> CreatePeerService(core::Daemon* d) {
  return std::make_unique<PeerService>(d);
}

}  // namespace svm::service
