#include "daemon/core/import_table.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/numbers.h"
#include "daemon/transport/frame.h"
#include "common/log.h"

namespace svm::core {

using source::ChangeKind;
using source::kPageSize;

namespace {

// 2: SetupDataResponse carries one opaque transport endpoint (field 4).
constexpr uint32_t kProtocolVersion = 2;

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  auto code = static_cast<absl::StatusCode>(s.error_code());
  if (code == absl::StatusCode::kDeadlineExceeded) code = absl::StatusCode::kUnavailable;
  return absl::Status(code, absl::StrCat(what, ": ", s.error_message()));
}

}  // namespace

std::vector<std::string> CommonTransports(const std::vector<std::string>& local,
                                          const std::vector<std::string>& peer) {
  std::vector<std::string> out;
  for (const std::string& l : local) {
    const bool offered = peer.empty() ? l == "tcp" : std::find(peer.begin(), peer.end(), l) != peer.end();
    if (offered && std::find(out.begin(), out.end(), l) == out.end()) out.push_back(l);
  }
  return out;
}

// A peer link's state (Link::state, under Link::mu). Only the completions of
// the link's own calls and OnChannelClosed move it; nobody waits in it.
enum class LinkState {
  // Never connected: the first caller starts an attempt; the callers after
  // it wait for its outcome (continuations in Link::waiters, not threads).
  kIdle,
  // An attempt is in flight: Hello, then per transport BeginConnect,
  // SetupData and the data connection. Callers wait for it when the link
  // never was up; when it was, they fail fast (UNAVAILABLE, "reconnecting").
  kConnecting,
  // The data connection is up (Link::data).
  kUp,
  // The last attempt failed or the data connection was lost: callers fail
  // fast with the last error until retry_at; then the next caller starts
  // an attempt.
  kDown,
};

// How long a link that failed stays down before the next attempt.
constexpr absl::Duration kLinkBackoff = absl::Milliseconds(500);
// The worker pool for reads' blocking work, how many of its threads one
// link's reads may hold at a time, and the threads for data connections'
// blocking steps (apart, so reads stuck on some peers never delay another
// peer's link setup).
constexpr int kWorkers = 16;
constexpr int kConnectors = 4;

// What a connected link hands its callers.
struct ImportTable::Connected {
  std::shared_ptr<transport::PeerChannel> channel;
  std::string token;  // the data session's, for Subscribe
};

// One connection attempt past Hello: the transports both ends run, in
// preference order, and why the ones tried so far failed.
struct ImportTable::ConnectAttempt {
  std::vector<transport::Transport*> candidates;
  size_t next = 0;  // the one being tried
  std::string fallback_reason;
};

// A peer call in flight (CallPeer), cancelled when the table goes.
struct ImportTable::PendingCall {
  virtual ~PendingCall() = default;
  grpc::ClientContext ctx;
};

// One read, from the caller to its done.
struct ImportTable::ReadOp {
  std::shared_ptr<ImportEntry> imp;
  uint64_t offset = 0;
  absl::Span<uint8_t> dst;
  bool fresh = false, fill = false;
  bool in_cache = false;  // the bytes may stay in the shared cache (ReadInCache)
  SessionReadDone done;
  transport::LandingAreas* dst_areas = nullptr;  // dst registered for landing, or null
  bool staged_only = false;  // the zero-copy region failed it: the staged path
  void Finish(absl::StatusOr<v1::ReadResponse> r, bool left_in_cache = false) {
    done(std::move(r), left_in_cache);
  }
};

struct ImportTable::Link {
  std::string peer;  // HOST:PORT as given
  std::string host;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Peer::Stub> stub;

  // Guards everything below; held only briefly (never across a call), so
  // listing imports does not wait for a connection attempt.
  absl::Mutex mu;
  LinkState state ABSL_GUARDED_BY(mu) = LinkState::kIdle;
  bool was_up ABSL_GUARDED_BY(mu) = false;
  absl::Time retry_at ABSL_GUARDED_BY(mu);
  absl::Status last_error ABSL_GUARDED_BY(mu);
  // The data connection of the last successful attempt; moved out (and
  // released on a worker) when the next attempt starts.
  std::shared_ptr<transport::PeerChannel> data ABSL_GUARDED_BY(mu);
  std::string token ABSL_GUARDED_BY(mu);
  std::string path ABSL_GUARDED_BY(mu);             // the last data connection's
  std::string fallback_reason ABSL_GUARDED_BY(mu);  // why rdma was not used, if it failed
  // kConnecting: the callers waiting for the attempt's outcome.
  std::vector<ConnectDone> waiters ABSL_GUARDED_BY(mu);
};

// The import's state machine is coherence::ImportCoherence (kDetached ->
// kSubscribing -> kLive; kGone when the exporter's process exited or the
// export was withdrawn, reattached by name on the next read if it was
// exported again; kDetached again when the channel is lost).
struct ImportTable::ImportEntry {
  uint64_t id = 0;  // cache key
  std::string name, remote_name;
  std::shared_ptr<Link> link;
  ImportStats stats;  // relaxed atomics, no lock

  absl::Mutex mu;  // guards everything below; taken by invalidations
  // An attachment is in flight; concurrent readers of a detached import
  // wait for it (attach_waiters) instead of racing their own subscription.
  bool attaching ABSL_GUARDED_BY(mu) = false;
  std::vector<AttachDone> attach_waiters ABSL_GUARDED_BY(mu);
  uint64_t export_id ABSL_GUARDED_BY(mu) = 0;
  uint64_t len ABSL_GUARDED_BY(mu) = 0;
  // The channel invalidations of the import arrive on: set before the
  // subscription is sent (the subscribing window), cleared when lost.
  std::shared_ptr<transport::PeerChannel> channel ABSL_GUARDED_BY(mu);
  coherence::ImportCoherence coh ABSL_GUARDED_BY(mu);
  std::string gone_reason ABSL_GUARDED_BY(mu);
  // Zero-copy: the exporter offered a registered region for this export.
  // Reads go to it while the channel holds it (SetRegion); after an
  // invalidation that dropped it (anything but a write) the descriptor is
  // asked for again on the next read, otherwise at most every second.
  bool zc_offered ABSL_GUARDED_BY(mu) = false;
  std::string zc_registration ABSL_GUARDED_BY(mu);  // of the region in use; "" when none
  absl::Time zc_refresh_at ABSL_GUARDED_BY(mu) = absl::InfinitePast();
};

namespace {
transport::RemoteRegion RegionOf(const v1::ExportDescriptor& d) {
  return transport::RemoteRegion{d.zero_copy().addr(), d.len(), d.zero_copy().rkey(),
                                 d.zero_copy().registration() == "odp"};
}

using Async = v1::Peer::Stub::async_interface;
using Callback = std::function<void(grpc::Status)>;
}  // namespace

ImportTable::ImportTable(std::vector<transport::Transport*> transports, WatchHub* hub,
                         session::SharedCache* cache, Counters* counters, ImportOptions opts)
    : transports_(std::move(transports)),
      hub_(hub),
      cache_(cache),
      counters_(counters),
      opts_(std::move(opts)),
      workers_(1, kWorkers),
      connectors_(0, kConnectors) {
  SVM_CHECK(!transports_.empty());
}

ImportTable::~ImportTable() {
  // No peer call starts from now on (CallPeer answers CANCELLED); those in
  // flight are cancelled and their completions, which may queue work,
  // awaited.
  std::vector<std::shared_ptr<PendingCall>> calls;
  {
    absl::MutexLock l(&calls_mu_);
    stopping_ = true;
    calls = calls_;
  }
  for (auto& c : calls) c->ctx.TryCancel();
  calls.clear();
  {
    absl::MutexLock l(&calls_mu_);
    calls_mu_.Await(absl::Condition(
        +[](std::vector<std::shared_ptr<PendingCall>>* v) { return v->empty(); }, &calls_));
  }
  // Every channel is closed and its reader joined while the table is still
  // whole: readers call back into it (OnChannelClosed) on their way out.
  // The connectors and workers (destroyed next) see closed channels and
  // finish promptly.
  std::vector<std::shared_ptr<transport::PeerChannel>> channels;
  {
    absl::MutexLock l(&mu_);
    for (auto& [p, link] : links_) {
      absl::MutexLock ll(&link->mu);
      if (link->data) channels.push_back(std::move(link->data));
    }
    for (auto& [n, imp] : imports_) {
      absl::MutexLock il(&imp->mu);
      if (imp->channel) channels.push_back(std::move(imp->channel));
    }
  }
  for (auto& ch : channels) ch->Close();
  channels.clear();  // joins the readers, unless a worker still holds one
  // Closed channels complete every outstanding fetch (UNAVAILABLE).
  absl::MutexLock l(&fetching_mu_);
  fetching_mu_.Await(absl::Condition(+[](int* n) { return *n == 0; }, &fetching_));
}

template <typename Resp, typename Req, typename Start>
void ImportTable::CallPeer(Link& link, absl::Duration timeout, const Req& req, std::string what,
                           Start start, std::function<void(absl::StatusOr<Resp>)> done) {
  struct Call final : PendingCall {
    Req req;
    Resp resp;
  };
  auto call = std::make_shared<Call>();
  call->req = req;
  call->ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
  if (opts_.peer_token != nullptr) {
    if (std::string t = opts_.peer_token->Get(); !t.empty()) call->ctx.AddMetadata("svm-peer-token", t);
  }
  bool stopping;
  {
    absl::MutexLock l(&calls_mu_);
    stopping = stopping_;
    if (!stopping) calls_.push_back(call);
  }
  if (stopping) {
    done(absl::CancelledError(absl::StrCat(what, ": this daemon is stopping")));
    return;
  }
  // gRPC may run the callback before start returns: nothing is locked here.
  start(link.stub->async(), &call->ctx, &call->req, &call->resp,
        [this, call, what = std::move(what), done = std::move(done)](grpc::Status s) {
          absl::Status st = FromGrpc(s, what);
          if (st.ok()) {
            done(std::move(call->resp));
          } else {
            done(std::move(st));
          }
          absl::MutexLock l(&calls_mu_);
          calls_.erase(std::find(calls_.begin(), calls_.end(), call));
        });
}

std::shared_ptr<ImportTable::Link> ImportTable::GetLink(const std::string& peer) {
  absl::MutexLock l(&mu_);
  auto& link = links_[peer];
  if (!link) {
    link = std::make_shared<Link>();
    link->peer = peer;
    auto hp = ParseHostPort(peer);
    link->host = hp.ok() ? hp->host : peer;
    grpc::ChannelArguments args;
    // A restarted peer must be reachable again within a second or so. (Not
    // GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: gRPC also uses it as the minimum
    // connect timeout, and a small one fails every slow handshake; each call
    // is bounded by its own deadline anyway.)
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    link->channel = grpc::CreateCustomChannel(
        peer, opts_.peer_credentials ? opts_.peer_credentials : grpc::InsecureChannelCredentials(), args);
    link->stub = v1::Peer::NewStub(link->channel);
  }
  return link;
}

void ImportTable::Connect(const std::shared_ptr<Link>& link, ConnectDone done) {
  absl::StatusOr<Connected> now = absl::UnknownError("not decided");
  bool start = false;
  std::shared_ptr<transport::PeerChannel> old;
  {
    absl::MutexLock l(&link->mu);
    switch (link->state) {
      case LinkState::kUp:
        if (link->data != nullptr && link->data->alive()) {
          now = Connected{link->data, link->token};
        } else {
          // Lost, and its reader has not reported it yet.
          start = true;
          link->last_error =
              absl::UnavailableError(absl::StrCat("peer ", link->peer, ": data connection lost"));
        }
        break;
      case LinkState::kIdle:
        start = true;
        break;
      case LinkState::kConnecting:
        if (!link->was_up) {
          link->waiters.push_back(std::move(done));
          return;
        }
        now = absl::UnavailableError(absl::StrCat("peer ", link->peer, ": reconnecting (",
                                                  link->last_error.message(), ")"));
        break;
      case LinkState::kDown:
        if (absl::Now() >= link->retry_at) {
          start = true;
          break;
        }
        // The last attempt's answer, with its code (RESOURCE_EXHAUSTED for
        // a memory limit stays that), until the next attempt.
        now = absl::Status(
            link->last_error.code(),
            absl::StrCat(link->last_error.message(), " (next attempt in ",
                         absl::FormatDuration(absl::Trunc(link->retry_at - absl::Now(),
                                                          absl::Milliseconds(1))),
                         ")"));
        break;
    }
    if (start) {
      link->state = LinkState::kConnecting;
      link->waiters.push_back(std::move(done));
      old = std::move(link->data);
    }
  }
  // Its last reference may join its reader: not on this caller's thread.
  if (old != nullptr) connectors_.Submit([old = std::move(old)] {});
  if (!start) {
    done(std::move(now));
    return;
  }
  v1::HelloRequest req;
  req.set_node(opts_.node);
  req.set_protocol_version(kProtocolVersion);
  CallPeer<v1::HelloResponse>(
      *link, opts_.rpc_timeout, req, absl::StrCat("peer ", link->peer),
      [](Async* a, grpc::ClientContext* c, const v1::HelloRequest* rq, v1::HelloResponse* rs,
         Callback cb) { a->Hello(c, rq, rs, std::move(cb)); },
      std::function<void(absl::StatusOr<v1::HelloResponse>)>(
          [this, link](absl::StatusOr<v1::HelloResponse> r) { OnHello(link, std::move(r)); }));
}

void ImportTable::OnHello(const std::shared_ptr<Link>& link, absl::StatusOr<v1::HelloResponse> hello) {
  if (!hello.ok()) return FinishConnect(link, hello.status(), "");
  if (hello->protocol_version() != kProtocolVersion) {
    return FinishConnect(link,
                         absl::FailedPreconditionError(absl::StrFormat(
                             "peer %s speaks protocol %u, this daemon %u", link->peer,
                             hello->protocol_version(), kProtocolVersion)),
                         "");
  }
  const std::vector<std::string> peer_transports(hello->transports().begin(),
                                                 hello->transports().end());
  std::vector<std::string> local;
  for (transport::Transport* t : transports_) local.push_back(t->name());
  auto attempt = std::make_shared<ConnectAttempt>();
  for (const std::string& name : CommonTransports(local, peer_transports)) {
    for (transport::Transport* t : transports_) {
      if (name == t->name()) attempt->candidates.push_back(t);
    }
  }
  if (attempt->candidates.empty()) {
    return FinishConnect(link,
                         absl::FailedPreconditionError(absl::StrFormat(
                             "no common transport with peer %s: this node runs %s, the peer offers %s",
                             link->peer, absl::StrJoin(local, ","),
                             absl::StrJoin(peer_transports, ","))),
                         "");
  }
  // BeginConnect may create a queue pair: not on a gRPC thread.
  connectors_.Submit([this, link, attempt] { SetupNext(link, attempt); });
}

void ImportTable::SetupNext(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt) {
  transport::Transport& t = *attempt->candidates[attempt->next];
  auto begin = t.BeginConnect(link->peer);
  if (!begin.ok()) return NextOrFail(link, std::move(attempt), begin.status());
  v1::SetupDataRequest req;
  req.set_node(opts_.node);
  req.set_transport(std::string(t.name()));
  req.set_importer_endpoint(*begin);
  CallPeer<v1::SetupDataResponse>(
      *link, opts_.rpc_timeout, req, absl::StrCat("peer ", link->peer),
      [](Async* a, grpc::ClientContext* c, const v1::SetupDataRequest* rq, v1::SetupDataResponse* rs,
         Callback cb) { a->SetupData(c, rq, rs, std::move(cb)); },
      std::function<void(absl::StatusOr<v1::SetupDataResponse>)>(
          [this, link, attempt, begin = *begin](absl::StatusOr<v1::SetupDataResponse> setup) {
            // The data connection blocks (a TCP connect, a queue pair's
            // bring-up): on a worker.
            connectors_.Submit([this, link, attempt, begin, setup = std::move(setup)] {
              ConnectData(link, attempt, begin, setup);
            });
          }));
}

void ImportTable::ConnectData(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt,
                              std::string begin, absl::StatusOr<v1::SetupDataResponse> setup) {
  transport::Transport& t = *attempt->candidates[attempt->next];
  if (!setup.ok()) {
    t.AbortConnect(begin);  // release its queue pair and buffers now
    return NextOrFail(link, std::move(attempt), setup.status());
  }
  transport::SessionOffer offer{setup->session_token(), setup->endpoint()};
  auto ch = t.Connect(link->host, offer, this, begin);
  if (!ch.ok()) return NextOrFail(link, std::move(attempt), ch.status());
  FinishConnect(link, Connected{std::shared_ptr<transport::PeerChannel>(std::move(*ch)), offer.token},
                attempt->fallback_reason);
}

void ImportTable::NextOrFail(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt,
                             absl::Status why) {
  const std::string name = attempt->candidates[attempt->next]->name();
  if (attempt->next + 1 == attempt->candidates.size()) {
    if (attempt->fallback_reason.empty()) return FinishConnect(link, why, "");
    return FinishConnect(link,
                         absl::Status(why.code(), absl::StrCat(why.message(), " (after ",
                                                               attempt->candidates[0]->name(),
                                                               " failed: ", attempt->fallback_reason,
                                                               ")")),
                         "");
  }
  // Only rdma comes before another transport today.
  attempt->fallback_reason = std::string(why.message());
  ++attempt->next;
  spdlog::warn("{} data connection to {} cannot be set up, falling back to {}: {}", name, link->peer,
               attempt->candidates[attempt->next]->name(), attempt->fallback_reason);
  counters_->Add(absl::StrCat(name, "_fallbacks"));
  SetupNext(link, std::move(attempt));
}

void ImportTable::FinishConnect(const std::shared_ptr<Link>& link, absl::StatusOr<Connected> result,
                                const std::string& fallback_reason) {
  std::vector<ConnectDone> waiters;
  {
    absl::MutexLock l(&link->mu);
    if (result.ok()) {
      link->state = LinkState::kUp;
      link->was_up = true;
      link->data = result->channel;
      link->token = result->token;
      link->path = link->data->path();
      link->fallback_reason = fallback_reason;
    } else {
      link->state = LinkState::kDown;
      link->retry_at = absl::Now() + kLinkBackoff;
      link->last_error = result.status();
    }
    waiters.swap(link->waiters);
  }
  if (result.ok()) {
    counters_->Add("data_connections_opened");
    spdlog::info("data connection to {} open ({})", link->peer, result->channel->path());
  }
  for (auto& w : waiters) w(result);
}

void ImportTable::Attach(const std::shared_ptr<ImportEntry>& imp, AttachDone done) {
  bool attached;
  {
    absl::MutexLock l(&imp->mu);
    // Attached meanwhile (by another reader).
    attached = imp->coh.state() == coherence::ImportState::kLive && imp->channel != nullptr &&
               imp->channel->alive();
    if (!attached) {
      imp->attach_waiters.push_back(std::move(done));
      if (imp->attaching) return;
      imp->attaching = true;
    }
  }
  if (attached) {
    done(absl::OkStatus());
    return;
  }
  Connect(imp->link, [this, imp](absl::StatusOr<Connected> c) {
    if (!c.ok()) return FinishAttach(*imp, c.status());
    v1::DescribeExportRequest req;
    req.set_name(imp->remote_name);
    CallPeer<v1::ExportDescriptor>(
        *imp->link, opts_.rpc_timeout, req, absl::StrCat("peer ", imp->link->peer),
        [](Async* a, grpc::ClientContext* ctx, const v1::DescribeExportRequest* rq,
           v1::ExportDescriptor* rs, Callback cb) { a->DescribeExport(ctx, rq, rs, std::move(cb)); },
        std::function<void(absl::StatusOr<v1::ExportDescriptor>)>(
            [this, imp, c = *c](absl::StatusOr<v1::ExportDescriptor> desc) {
              if (!desc.ok()) return FinishAttach(*imp, desc.status());
              Subscribe(imp, c, *desc);
            }));
  });
}

void ImportTable::Subscribe(const std::shared_ptr<ImportEntry>& imp, const Connected& c,
                            const v1::ExportDescriptor& desc) {
  if (desc.page_size() != kPageSize) {
    return FinishAttach(*imp, absl::FailedPreconditionError(absl::StrFormat(
                                  "export '%s' has %u-byte pages; this node uses %u",
                                  imp->remote_name, desc.page_size(), kPageSize)));
  }
  // The subscribing window opens before the request leaves: the exporter
  // may push an invalidation before its answer arrives, and that one must
  // be applied (OnInvalidation matches the channel and the export id).
  uint64_t epoch = 0;
  absl::Status reset;
  std::shared_ptr<transport::PeerChannel> old;  // released unlocked
  {
    absl::MutexLock l(&imp->mu);
    // Whatever was cached belongs to an earlier connection or export.
    reset = cache_->Reset(imp->id, desc.len());
    if (reset.ok()) {
      if (imp->export_id != desc.export_id()) imp->zc_offered = false;  // another export by that name
      imp->export_id = desc.export_id();
      imp->len = desc.len();
      old = std::move(imp->channel);
      imp->channel = c.channel;
      epoch = imp->coh.BeginSubscribe();
      imp->zc_registration.clear();
      imp->zc_refresh_at = absl::InfinitePast();
    }
  }
  if (!reset.ok()) return FinishAttach(*imp, reset);
  v1::SubscribeRequest req;
  req.set_session_token(c.token);
  req.set_export_id(desc.export_id());
  CallPeer<v1::SubscribeResponse>(
      *imp->link, opts_.rpc_timeout, req, absl::StrCat("peer ", imp->link->peer),
      [](Async* a, grpc::ClientContext* ctx, const v1::SubscribeRequest* rq, v1::SubscribeResponse* rs,
         Callback cb) { a->Subscribe(ctx, rq, rs, std::move(cb)); },
      std::function<void(absl::StatusOr<v1::SubscribeResponse>)>(
          [this, imp, c, desc, epoch](absl::StatusOr<v1::SubscribeResponse> sub) {
            absl::Status st;
            {
              absl::MutexLock l(&imp->mu);
              if (!sub.ok()) {
                if (imp->coh.epoch() == epoch) {
                  imp->coh.OnDisconnect();
                  cache_->DropImport(imp->id);
                }
                st = sub.status();
              } else if (!imp->coh.CompleteSubscribe(epoch, sub->seq())) {
                // The channel was lost (or the export ended) while subscribing.
                st = absl::UnavailableError(absl::StrCat(
                    "peer ", imp->link->peer, ": the subscription to '", imp->remote_name,
                    "' was overtaken by ",
                    imp->gone_reason.empty() ? "the loss of the data connection" : imp->gone_reason));
              } else {
                imp->gone_reason.clear();
                cache_->SetSeq(imp->id, imp->coh.max_seq());
                RenewLocked(*imp);
                // Sticky for the export: a region withdrawn at this moment (the
                // object being truncated, say) may come back; the import keeps asking.
                imp->zc_offered = (imp->zc_offered || desc.has_zero_copy()) && c.channel->one_sided();
                // A region described before the subscription may have been
                // replaced by an invalidation this import never received: only
                // one described at the subscription's own sequence is used;
                // otherwise the first read asks again.
                if (desc.has_zero_copy() && desc.seq() == sub->seq() &&
                    c.channel->SetRegion(desc.export_id(), RegionOf(desc), desc.seq())) {
                  imp->zc_registration = desc.zero_copy().registration();
                }
              }
            }
            FinishAttach(*imp, st);
          }));
}

void ImportTable::FinishAttach(ImportEntry& imp, const absl::Status& st) {
  std::vector<AttachDone> waiters;
  {
    absl::MutexLock l(&imp.mu);
    imp.attaching = false;
    waiters.swap(imp.attach_waiters);
  }
  for (auto& w : waiters) w(st);
}

void ImportTable::RefreshRegion(const std::shared_ptr<ImportEntry>& imp, std::function<void()> then) {
  std::shared_ptr<transport::PeerChannel> ch;
  uint64_t export_id;
  {
    absl::MutexLock l(&imp->mu);
    imp->zc_refresh_at = absl::Now() + absl::Seconds(1);
    ch = imp->channel;
    export_id = imp->export_id;
  }
  v1::DescribeExportRequest req;
  req.set_name(imp->remote_name);
  CallPeer<v1::ExportDescriptor>(
      *imp->link, opts_.rpc_timeout, req, absl::StrCat("peer ", imp->link->peer),
      [](Async* a, grpc::ClientContext* ctx, const v1::DescribeExportRequest* rq, v1::ExportDescriptor* rs,
         Callback cb) { a->DescribeExport(ctx, rq, rs, std::move(cb)); },
      std::function<void(absl::StatusOr<v1::ExportDescriptor>)>(
          [this, imp, ch, export_id, then = std::move(then)](absl::StatusOr<v1::ExportDescriptor> desc) {
            if (desc.ok()) {
              counters_->Add("zero_copy_refreshes");
              if (ch != nullptr && desc->export_id() == export_id && desc->has_zero_copy()) {
                absl::MutexLock l(&imp->mu);
                if (imp->channel == ch && ch->SetRegion(export_id, RegionOf(*desc), desc->seq())) {
                  imp->zc_registration = desc->zero_copy().registration();
                }
              }
            }
            then();
          }));
}

void ImportTable::Import(const std::string& peer, const std::string& name, const std::string& as,
                         ImportDone done) {
  const std::string local = as.empty() ? name : as;
  auto imp = std::make_shared<struct ImportEntry>();
  imp->name = local;
  imp->remote_name = name;
  imp->link = GetLink(peer);
  bool exists;
  {
    absl::MutexLock l(&mu_);
    exists = imports_.count(local) > 0;
    if (!exists) {
      imp->id = next_import_id_++;
      imports_[local] = imp;  // reserve the name while attaching
    }
  }
  if (exists) {
    done(absl::AlreadyExistsError(absl::StrCat("an import named '", local, "' exists")));
    return;
  }
  Attach(imp, [this, imp, peer, done = std::move(done)](absl::Status st) {
    if (!st.ok()) {
      {
        absl::MutexLock l(&mu_);
        auto it = imports_.find(imp->name);
        if (it != imports_.end() && it->second == imp) imports_.erase(it);
      }
      done(std::move(st));
      return;
    }
    counters_->Add("imports_created");
    spdlog::info("imported '{}' from {} as '{}'", imp->remote_name, peer, imp->name);
    done(InfoOf(*imp));
  });
}

std::shared_ptr<ImportTable::ImportEntry> ImportTable::Find(const std::string& name) const {
  absl::MutexLock l(&mu_);
  auto it = imports_.find(name);
  return it == imports_.end() ? nullptr : it->second;
}

bool ImportTable::Has(const std::string& name) const { return Find(name) != nullptr; }

absl::StatusOr<session::CacheFiles> ImportTable::OpenCache(const std::string& name) const {
  auto imp = Find(name);
  if (!imp) return absl::NotFoundError(absl::StrCat("no import named '", name, "'"));
  return cache_->OpenForClient(imp->id);
}

void ImportTable::ExpireLeases() {
  cache_->PunchStrays();
  std::vector<std::shared_ptr<struct ImportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, i] : imports_) all.push_back(i);
  }
  const int64_t now = static_cast<int64_t>(source::MonotonicNs());
  for (auto& imp : all) {
    absl::MutexLock l(&imp->mu);
    if (imp->coh.state() != coherence::ImportState::kLive || imp->coh.CacheUsable(now)) continue;
    if (cache_->DropImport(imp->id) > 0) {
      counters_->Add("leases_expired");
      spdlog::warn("import '{}': nothing heard from {} within the lease; cache dropped", imp->name,
                   imp->link->peer);
    }
  }
}

uint32_t ImportTable::peers() const {
  std::vector<std::shared_ptr<Link>> links;
  {
    absl::MutexLock l(&mu_);
    for (auto& [p, link] : links_) links.push_back(link);
  }
  uint32_t up = 0;
  for (auto& link : links) {
    absl::MutexLock il(&link->mu);
    up += link->state == LinkState::kUp;
  }
  return up;
}

v1::ImportInfo ImportTable::InfoOf(ImportEntry& imp) const {
  v1::ImportInfo i;
  i.set_name(imp.name);
  i.set_remote_name(imp.remote_name);
  i.set_peer(imp.link->peer);
  i.set_page_size(kPageSize);
  {
    absl::MutexLock il(&imp.link->mu);
    i.set_path(imp.link->path);
    i.set_fallback_reason(imp.link->fallback_reason);
  }
  i.set_cached_pages(cache_->CountImport(imp.id));
  absl::MutexLock l(&imp.mu);
  // The channel this import is attached to, when it still is one.
  if (imp.channel != nullptr) i.set_path(imp.channel->path());
  // Zero-copy while the channel holds the exporter's region.
  if (imp.channel != nullptr && !imp.zc_registration.empty()) {
    i.set_path(absl::StrCat("zero-copy/", imp.zc_registration));
  }
  i.set_len(imp.len);
  i.set_state(coherence::ImportStateName(imp.coh.state()));
  i.set_seq(imp.coh.max_seq());
  i.set_invalidations(imp.coh.invalidations());
  return i;
}

std::vector<ImportTable::StatsRef> ImportTable::Stats() const {
  absl::MutexLock l(&mu_);
  std::vector<StatsRef> out;
  for (const auto& [n, i] : imports_) out.push_back({n, std::shared_ptr<const ImportStats>(i, &i->stats)});
  return out;
}

void ImportTable::CountClientHits(const std::string& name, uint64_t reads, uint64_t pages) {
  auto imp = Find(name);
  if (!imp) return;  // unimported meanwhile: nothing left to count into
  imp->stats.reads.fetch_add(reads, std::memory_order_relaxed);
  imp->stats.pages_from_cache.fetch_add(pages, std::memory_order_relaxed);
}

std::vector<v1::ImportInfo> ImportTable::List() const {
  std::vector<std::shared_ptr<struct ImportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, i] : imports_) all.push_back(i);
  }
  std::vector<v1::ImportInfo> out;
  for (auto& i : all) out.push_back(InfoOf(*i));
  return out;
}

void ImportTable::Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh,
                       bool fill, ReadDone done) {
  ReadInCache(name, offset, dst, fresh, fill, /*in_cache=*/false,
              [done = std::move(done)](absl::StatusOr<v1::ReadResponse> r, bool) { done(std::move(r)); });
}

void ImportTable::ReadInCache(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh,
                              bool fill, bool in_cache, SessionReadDone done,
                              transport::LandingAreas* dst_areas) {
  auto imp = Find(name);
  if (!imp) {
    done(absl::NotFoundError(absl::StrCat("no export or import named '", name, "'")), false);
    return;
  }
  auto op = std::make_shared<ReadOp>(ReadOp{imp, offset, dst, fresh, fill, in_cache && !fresh && !fill,
                                            std::move(done), dst_areas});
  bool attached;
  {
    absl::MutexLock l(&imp->mu);
    attached = imp->coh.state() == coherence::ImportState::kLive && imp->channel != nullptr &&
               imp->channel->alive();
  }
  if (attached) return RunRead(op, /*may_refresh=*/true);
  Attach(imp, [this, op](absl::Status st) {
    if (st.ok()) return RunRead(op, /*may_refresh=*/true);
    {
      absl::MutexLock l(&op->imp->mu);
      if (op->imp->coh.state() == coherence::ImportState::kGone &&
          (absl::IsNotFound(st) || absl::IsFailedPrecondition(st))) {
        st = absl::FailedPreconditionError(
            absl::StrCat("export '", op->imp->remote_name, "' gone: ", op->imp->gone_reason));
      }
    }
    op->Finish(std::move(st));
  });
}

void ImportTable::RunRead(std::shared_ptr<ReadOp> op, bool may_refresh) { ReadAttached(op, may_refresh); }

void ImportTable::ReleaseChannel(std::shared_ptr<transport::PeerChannel> ch) {
  // (Nearly) the last reference: destroyed on a worker.
  if (ch.use_count() <= 2) workers_.Submit([c = std::move(ch)] {});
}

void ImportTable::FinishZeroCopyRead(const std::shared_ptr<ReadOp>& op, std::shared_ptr<transport::PeerChannel> ch,
                                     bool may_refresh, absl::Time zc_refresh_at, uint64_t seq_before, uint64_t n,
                                     absl::Time read_start, absl::Status st, uint64_t transport_copied) {
  ImportEntry* imp = op->imp.get();
  auto release = [&] { ReleaseChannel(std::move(ch)); };
  if (transport_copied > 0) counters_->Add("transport_bytes_copied", transport_copied);
  if (absl::IsFailedPrecondition(st) && may_refresh && absl::Now() >= zc_refresh_at) {
    release();
    // The read starts over when the answer is in.
    return RefreshRegion(op->imp, [this, op] { RunRead(op, /*may_refresh=*/false); });
  }
  if (st.ok()) {
    release();
    v1::ReadResponse resp;
    resp.set_len(op->dst.size());
    resp.set_seq(seq_before);
    resp.set_pages_fetched(n);
    counters_->Add("reads");
    counters_->Add("zero_copy_reads");
    counters_->Add("read_pages_fetched", n);
    imp->stats.fetch_latency.Observe(absl::Now() - read_start);
    imp->stats.reads.fetch_add(1, std::memory_order_relaxed);
    imp->stats.pages_fetched.fetch_add(n, std::memory_order_relaxed);
    return op->Finish(std::move(resp));
  }
  if (!absl::IsFailedPrecondition(st)) {
    if (!ch->alive()) OnChannelClosed(ch.get(), st);  // as FinishFetch does
    release();
    return op->Finish(std::move(st));
  }
  release();
  // No region right now (withdrawn or being replaced): the staged path.
  op->staged_only = true;
  ReadAttached(op, may_refresh);
}

// A staged read with its fetches outstanding (FetchVAsync), until
// FinishFetch.
struct ImportTable::Fetching {
  std::shared_ptr<ReadOp> op;
  std::shared_ptr<transport::PeerChannel> ch;
  coherence::FetchTicket ticket;
  bool install = false;
  bool direct = false;
  // The read completes in the cache (ReadInCache): nothing is copied into
  // dst and buf is null; pages this read cannot land are not fetched.
  bool in_cache = false;
  std::vector<uint8_t> bounce;
  uint8_t* buf = nullptr;
  uint64_t first = 0, n = 0;
  absl::Time fetch_start;
  v1::ReadResponse resp;
  std::vector<transport::FetchOp> ops;
  // Per op: its claim in the shared cache, or nullptr (the op lands in
  // buf). Destroying a claim not yet published abandons it; FinishFetch
  // runs when no fetch writes any more (FetchVAsync's promise).
  std::vector<std::unique_ptr<session::SharedCache::Landing>> landings;
};

void ImportTable::ReadAttached(const std::shared_ptr<ReadOp>& op, bool may_refresh) {
  ImportEntry* imp = op->imp.get();
  const std::string& name = imp->name;
  const uint64_t offset = op->offset;
  const absl::Span<uint8_t> dst = op->dst;
  const bool fresh = op->fresh, fill = op->fill;
  std::shared_ptr<transport::PeerChannel> ch;
  uint64_t export_id, len, seq_before;
  bool zc;
  absl::Time zc_refresh_at;
  coherence::FetchTicket ticket;
  bool cache_usable;
  {
    absl::MutexLock l(&imp->mu);
    if (imp->channel == nullptr) {
      return op->Finish(absl::UnavailableError(absl::StrCat("import '", name, "' lost its connection")));
    }
    ch = imp->channel;
    export_id = imp->export_id;
    len = imp->len;
    seq_before = imp->coh.max_seq();
    ticket = imp->coh.BeginFetch();
    zc = imp->zc_offered;
    zc_refresh_at = imp->zc_refresh_at;
    cache_usable = imp->coh.CacheUsable(static_cast<int64_t>(source::MonotonicNs()));
  }
  if (offset > len || dst.size() > len - offset) {
    return op->Finish(absl::OutOfRangeError(absl::StrFormat(
        "read of %u bytes at offset %u is past the end of '%s' (%u bytes)", dst.size(), offset, name, len)));
  }
  if (fill && cache_->capacity() == 0) {
    // A mapping's fault would never be satisfied.
    return op->Finish(
        absl::FailedPreconditionError("this importer keeps no cache (--cache-mb 0): nothing can be mapped"));
  }
  const uint64_t first = offset / kPageSize;
  const uint64_t last = (offset + dst.size() - 1) / kPageSize;
  const uint64_t n = last - first + 1;
  if (zc && !dst.empty() && !fill && !op->staged_only) {
    // Zero-copy: one-sided READs of the exporter's live pages, straight into
    // dst. Never cached: a cached copy could not follow the exporter's
    // stores without its CPU hashing what was read (the staged path's Sync
    // bookkeeping), and the read is as cheap as a fetch. Completed on the
    // transport's thread: no thread waits for the READs.
    const absl::Time read_start = absl::Now();
    const transport::LandingArea* area = op->dst_areas != nullptr ? op->dst_areas->For(ch) : nullptr;
    {
      // Counted as a fetch: the table is not destroyed under its completion.
      absl::MutexLock l(&fetching_mu_);
      ++fetching_;
    }
    ch->ReadRegionAsync(
        export_id, offset, dst, opts_.fetch_timeout, area,
        [this, op, ch, may_refresh, zc_refresh_at, seq_before, n, read_start](absl::Status st,
                                                                              uint64_t transport_copied) mutable {
          FinishZeroCopyRead(op, std::move(ch), may_refresh, zc_refresh_at, seq_before, n, read_start,
                             std::move(st), transport_copied);
          absl::MutexLock l(&fetching_mu_);
          --fetching_;
        });
    return;
  }
  auto f = std::make_shared<Fetching>();
  f->op = op;
  f->ch = ch;
  f->ticket = ticket;
  f->first = first;
  f->n = n;
  // An import the exporter offers zero-copy READs for is not cached (its
  // reads keep coming here and return to the READs once the region is
  // back), unless the pages must land in the cache (a mapping's fault).
  f->install = !fresh && (fill || !zc);
  // Whole pages of a read that installs nothing land straight in dst. Pages
  // to be installed land in the shared cache file itself (a Landing: the
  // page stays absent for clients until the install rule said yes; the
  // protocol is in shared_cache.h), never in dst: dst may be a session's
  // data area, which its client can write while svmd reads it, and the
  // shared cache serves every client of the import. What neither holds (a
  // read that starts or ends inside a page and installs nothing, pages
  // found in the cache, pages another read is landing) goes through svmd's
  // own buffer.
  f->direct = !f->install && offset % kPageSize == 0 && dst.size() % kPageSize == 0;
  // A read that completes in the cache needs no buffer at all: the pages it
  // lands are published where the client copies them from, the pages found
  // cached stay there, and the pages another read is landing are that
  // read's to publish (the client reads again any page whose word says it
  // is not there).
  f->in_cache = op->in_cache && f->install && cache_usable && cache_->capacity() > 0;
  if (!f->direct && !f->in_cache) f->bounce.resize(n * kPageSize);
  f->buf = f->in_cache ? nullptr : f->direct ? dst.data() : f->bounce.data();
  uint8_t* const buf = f->buf;
  std::vector<bool> have(n, false);
  if (!fresh && !cache_usable) counters_->Add("reads_past_lease");
  if (!fresh && cache_usable) {
    for (uint64_t i = 0; i < n; ++i) {
      // A fill wants the pages in the cache, not their bytes.
      have[i] = fill || f->in_cache ? cache_->Touch(imp->id, first + i)
                     : cache_->Lookup(imp->id, first + i, absl::MakeSpan(buf + i * kPageSize, kPageSize));
    }
  }
  // Every missing run, in pieces of at most the channel's piece size, is on
  // the wire at once: the exporter copies one piece while another travels.
  const uint64_t piece = std::clamp<uint64_t>(ch->capabilities().fetch_piece_pages, 1, transport::kMaxFetchPages);
  for (uint64_t i = 0; i < n;) {
    if (have[i]) {
      f->resp.set_pages_from_cache(f->resp.pages_from_cache() + 1);
      ++i;
      continue;
    }
    uint64_t j = i + 1;
    while (j < n && !have[j] && j - i < piece) ++j;
    transport::FetchOp fop;
    fop.export_id = export_id;
    fop.first_page = first + i;
    fop.track = !fresh;
    std::unique_ptr<session::SharedCache::Landing> land;
    if (f->install) land = cache_->Claim(imp->id, first + i, j - i);
    if (land != nullptr) {
      j = i + land->npages();
      fop.dst = land->span();
      // rdma on an ODP device: the exporter's WRITE lands in the claimed
      // pages themselves (one registration per cache file).
      fop.area = land->Area([&ch](void* addr, size_t len) { return ch->RegisterLanding(addr, len); });
    } else if (f->in_cache) {
      // Cached meanwhile, or another read is landing it: not fetched.
      counters_->Add("fetches_skipped_claimed");
      ++i;
      continue;
    } else {
      fop.dst = absl::MakeSpan(buf + i * kPageSize, (j - i) * kPageSize);
    }
    fop.npages = static_cast<uint32_t>(j - i);
    f->ops.push_back(fop);
    f->landings.push_back(std::move(land));
    i = j;
  }
  if (f->ops.empty()) return FinishFetch(*f);
  {
    absl::MutexLock l(&fetching_mu_);
    ++fetching_;
  }
  f->fetch_start = absl::Now();
  // Completed on the transport's thread (or here when the connection is
  // closed already): no thread waits for the wire.
  ch->FetchVAsync(absl::MakeSpan(f->ops), opts_.fetch_timeout, [this, f] {
    FinishFetch(*f);
    absl::MutexLock l(&fetching_mu_);
    --fetching_;
  });
}

void ImportTable::FinishFetch(Fetching& f) {
  ImportEntry* imp = f.op->imp.get();
  if (!f.ops.empty()) imp->stats.fetch_latency.Observe(absl::Now() - f.fetch_start);
  // The channel is released here, not with the completion: when this is
  // (nearly) the last reference, off the transport's thread, since
  // destroying a channel joins that thread.
  std::shared_ptr<transport::PeerChannel> ch = std::move(f.ch);
  auto release = [&] {
    f.landings.clear();  // what is not published yet is abandoned
    ReleaseChannel(std::move(ch));
  };
  const absl::Span<uint8_t> dst = f.op->dst;
  const uint64_t offset = f.op->offset;
  const uint64_t first = f.first;
  const bool fill = f.op->fill;
  v1::ReadResponse& resp = f.resp;
  uint64_t min_seq = UINT64_MAX;
  // The part of page i (of this read) that dst holds, copied from src. A
  // fill (a mapping's fault, a prefetch) wants the pages in the cache only:
  // nothing is copied into its dst.
  uint64_t copied = 0;
  auto copy_out = [&](uint64_t i, const uint8_t* src) {
    if (fill || f.in_cache) return;
    const uint64_t page_at = (first + i) * kPageSize;
    const uint64_t from = std::max(page_at, offset);
    const uint64_t to = std::min(page_at + kPageSize, offset + dst.size());
    if (to <= from) return;
    std::memcpy(dst.data() + (from - offset), src + (from - page_at), to - from);
    copied += to - from;
  };
  std::vector<bool> landed(f.n, false);
  uint64_t transport_copied = 0;
  for (const transport::FetchOp& op : f.ops) transport_copied += op.transport_copied;
  if (transport_copied > 0) counters_->Add("transport_bytes_copied", transport_copied);
  for (size_t o = 0; o < f.ops.size(); ++o) {
    const transport::FetchOp& op = f.ops[o];
    const auto& seq = op.result;
    if (!seq.ok()) {
      absl::Status st = seq.status();
      if (absl::IsNotFound(st)) {
        // Withdrawn on the exporter: reattach by name on the next read.
        {
          absl::MutexLock l(&imp->mu);
          imp->coh.MarkGone();
          cache_->SetLease(imp->id, imp->coh.lease_until_ns());
          imp->gone_reason = "withdrawn by the exporter";
        }
        st = absl::FailedPreconditionError(absl::StrCat("export '", imp->remote_name, "' gone: ", st.message()));
      } else if (!ch->alive()) {
        // The connection was given up (a peer that did not answer): nothing
        // cached from it may be served from now on, before this error
        // reaches the caller (the channel's reader reports the close too,
        // later, from its own thread; the second report finds nothing).
        OnChannelClosed(ch.get(), st);
      }
      release();
      return f.op->Finish(std::move(st));
    }
    min_seq = std::min(min_seq, *seq);
    session::SharedCache::Landing* land = f.landings[o].get();
    const uint64_t at = op.first_page - first;
    if (land != nullptr) {
      // The caller's copy comes from the claimed pages while nothing can
      // punch them (after Publish an invalidation may, at any time).
      for (uint32_t k = 0; k < op.npages; ++k) {
        copy_out(at + k, op.dst.data() + static_cast<size_t>(k) * kPageSize);
        landed[at + k] = true;
      }
      absl::MutexLock l(&imp->mu);
      // The install rule decides first; only then does a version word
      // become non-zero (SharedCache::Publish).
      if (imp->channel == ch && imp->coh.MayInstall(f.ticket, *seq)) {
        counters_->Add("cache_pages_landed", cache_->Publish(*land));
      } else {
        cache_->Abandon(*land);
        counters_->Add("fetches_not_cached_raced");
      }
    } else if (f.install) {
      // Cached meanwhile, or another read is landing these pages: that read
      // installs them.
      counters_->Add("fetches_not_landed_claimed");
    }
    resp.set_pages_fetched(resp.pages_fetched() + op.npages);
  }
  release();
  if (!f.direct && !f.in_cache) {
    for (uint64_t i = 0; i < f.n; ++i) {
      if (!landed[i]) copy_out(i, f.buf + i * kPageSize);
    }
  }
  if (copied > 0) counters_->Add("read_bytes_copied", copied);
  resp.set_len(dst.size());
  if (min_seq == UINT64_MAX) {
    absl::MutexLock l(&imp->mu);
    min_seq = imp->coh.max_seq();
  }
  resp.set_seq(min_seq);
  counters_->Add("reads");
  counters_->Add("read_pages_from_cache", resp.pages_from_cache());
  counters_->Add("read_pages_fetched", resp.pages_fetched());
  imp->stats.reads.fetch_add(1, std::memory_order_relaxed);
  imp->stats.pages_from_cache.fetch_add(resp.pages_from_cache(), std::memory_order_relaxed);
  imp->stats.pages_fetched.fetch_add(resp.pages_fetched(), std::memory_order_relaxed);
  f.op->Finish(std::move(resp), f.in_cache);
}

void ImportTable::Sync(const std::string& name, SyncDone done) {
  auto imp = Find(name);
  if (!imp) {
    done(absl::NotFoundError(absl::StrCat("no export or import named '", name, "'")));
    return;
  }
  v1::PeerSyncRequest req;
  req.set_name(imp->remote_name);
  // The exporter waits up to its sync timeout for acknowledgements.
  CallPeer<v1::PeerSyncResponse>(
      *imp->link, absl::Seconds(10), req, absl::StrCat("peer ", imp->link->peer),
      [](Async* a, grpc::ClientContext* ctx, const v1::PeerSyncRequest* rq, v1::PeerSyncResponse* rs,
         Callback cb) { a->Sync(ctx, rq, rs, std::move(cb)); },
      std::function<void(absl::StatusOr<v1::PeerSyncResponse>)>(
          [done = std::move(done)](absl::StatusOr<v1::PeerSyncResponse> presp) {
            if (!presp.ok()) return done(presp.status());
            v1::SyncResponse r;
            r.set_pages_invalidated(presp->pages_invalidated());
            r.set_seq(presp->seq());
            r.set_subscribers_acked(presp->subscribers_acked());
            done(std::move(r));
          }));
}

void ImportTable::RenewLocked(ImportEntry& imp) {
  const auto now = static_cast<int64_t>(source::MonotonicNs());
  imp.coh.Renew(now, absl::ToInt64Nanoseconds(opts_.lease));
  imp.stats.last_heard_ns.store(now, std::memory_order_relaxed);
  cache_->SetLease(imp.id, imp.coh.lease_until_ns());
}

void ImportTable::Publish(ImportEntry& imp, uint64_t first, uint64_t n, uint64_t seq, ChangeKind kind,
                          uint64_t detected_ns) {
  v1::Invalidation ev;
  ev.set_name(imp.name);
  ev.set_first_page(first);
  ev.set_npages(n);
  ev.set_seq(seq);
  ev.set_kind(static_cast<v1::InvalidationKind>(kind));
  ev.set_detected_ns(detected_ns);
  ev.set_received_ns(source::MonotonicNs());
  hub_->Publish(ev);
}

void ImportTable::OnInvalidation(transport::PeerChannel* ch, const transport::InvalRecord& r) {
  std::vector<std::shared_ptr<struct ImportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, i] : imports_) all.push_back(i);
  }
  if (r.export_id == transport::kHeartbeatExportId) {
    // The exporter is still sending on ch: every import on it may keep
    // serving its cache a while longer.
    for (auto& imp : all) {
      absl::MutexLock l(&imp->mu);
      if (imp->channel.get() == ch && imp->coh.state() == coherence::ImportState::kLive) RenewLocked(*imp);
    }
    return;
  }
  for (auto& imp : all) {
    {
      absl::MutexLock l(&imp->mu);
      if (imp->channel.get() != ch || imp->export_id != r.export_id) continue;
      const bool terminal = r.kind == ChangeKind::kExit || r.kind == ChangeKind::kUnexport;
      if (!imp->coh.OnInvalidation(r.seq, terminal)) continue;
      cache_->Drop(imp->id, r.first_page, r.npages);
      cache_->SetSeq(imp->id, imp->coh.max_seq());
      if (imp->coh.state() == coherence::ImportState::kLive) RenewLocked(*imp);
      if (r.kind != ChangeKind::kWrite) {
        // The channel dropped the region: ask for the new one on the next read.
        imp->zc_registration.clear();
        imp->zc_refresh_at = absl::InfinitePast();
      }
      if (terminal) {
        imp->gone_reason = r.kind == ChangeKind::kExit ? "the exporting process exited"
                                                       : "withdrawn by the exporter";
      }
    }
    counters_->Add("invalidations_received");
    Publish(*imp, r.first_page, r.npages, r.seq, r.kind, r.detected_ns);
  }
}

void ImportTable::OnChannelClosed(transport::PeerChannel* ch, const absl::Status& why) {
  std::vector<std::shared_ptr<struct ImportEntry>> all;
  std::vector<std::shared_ptr<Link>> links;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, i] : imports_) all.push_back(i);
    for (auto& [p, link] : links_) links.push_back(link);
  }
  for (auto& link : links) {
    absl::MutexLock il(&link->mu);
    if (link->state != LinkState::kUp || link->data.get() != ch) continue;
    // Declared lost: callers fail fast for a back-off instead of each
    // waiting for a Hello to a peer that may not answer.
    link->state = LinkState::kDown;
    link->retry_at = absl::Now() + kLinkBackoff;
    link->last_error = absl::UnavailableError(
        absl::StrCat("peer ", link->peer, ": data connection lost: ", why.message()));
  }
  for (auto& imp : all) {
    uint64_t seq, npages;
    {
      absl::MutexLock l(&imp->mu);
      if (imp->channel.get() != ch) continue;
      // Invalidations may be lost with the connection: drop everything.
      cache_->DropImport(imp->id);
      imp->channel = nullptr;
      imp->coh.OnDisconnect();
      cache_->SetLease(imp->id, imp->coh.lease_until_ns());
      seq = imp->coh.max_seq();
      npages = imp->len / kPageSize;
    }
    spdlog::warn("import '{}' lost its connection ({}); cache dropped", imp->name, why.message());
    Publish(*imp, 0, npages, seq, ChangeKind::kReconnect, source::MonotonicNs());
  }
}

}  // namespace svm::core
