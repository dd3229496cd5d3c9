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

// A peer link's state (Link::state, under info_mu).
enum class LinkState {
  // Never connected: the first caller connects, the others wait for it
  // (Link::mu).
  kIdle,
  // A caller is (re)connecting: Hello, SetupData, the data connection.
  // Others wait when the link never was up; when it was, they fail fast.
  kConnecting,
  // The data connection is up.
  kUp,
  // The last attempt failed or the data connection was lost: callers fail
  // fast until retry_at; then the next caller tries again.
  kDown,
};

// How long a link that failed stays down before the next attempt.
constexpr absl::Duration kLinkBackoff = absl::Milliseconds(500);

struct ImportTable::Link {
  std::string peer;  // HOST:PORT as given
  std::string host;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Peer::Stub> stub;
  // Reads of this link's imports (grows with blocked reads, up to 32).
  Executor reads{1, 32};

  absl::Mutex mu;  // guards the data channel; serialises (re)connection
  std::shared_ptr<transport::PeerChannel> data ABSL_GUARDED_BY(mu);
  std::string token ABSL_GUARDED_BY(mu);
  uint64_t generation ABSL_GUARDED_BY(mu) = 0;

  // What InfoOf shows; held only briefly (never across a call), so listing
  // imports does not wait for a connection attempt.
  absl::Mutex info_mu;
  std::string path ABSL_GUARDED_BY(info_mu);             // the last data connection's
  std::string fallback_reason ABSL_GUARDED_BY(info_mu);  // why rdma was not used, if it failed
  LinkState state ABSL_GUARDED_BY(info_mu) = LinkState::kIdle;
  bool was_up ABSL_GUARDED_BY(info_mu) = false;
  absl::Time retry_at ABSL_GUARDED_BY(info_mu);
  absl::Status last_error ABSL_GUARDED_BY(info_mu);
  const transport::PeerChannel* up_channel ABSL_GUARDED_BY(info_mu) = nullptr;
};

// The import's state machine is coherence::ImportCoherence (kDetached ->
// kSubscribing -> kLive; kGone when the exporter's process exited or the
// export was withdrawn, reattached by name on the next read if it was
// exported again; kDetached again when the channel is lost).
struct ImportTable::ImportEntry {
  uint64_t id = 0;  // cache key
  std::string name, remote_name;
  std::shared_ptr<Link> link;

  // Serialises (re)attachment: concurrent readers of a detached import wait
  // for one subscription instead of racing their own. Taken before mu.
  absl::Mutex attach_mu;
  absl::Mutex mu;  // guards everything below; taken by invalidations
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
}  // namespace

ImportTable::ImportTable(std::vector<transport::Transport*> transports, WatchHub* hub,
                         session::SharedCache* cache, Counters* counters, ImportOptions opts)
    : transports_(std::move(transports)),
      hub_(hub),
      cache_(cache),
      counters_(counters),
      opts_(std::move(opts)) {
  SVM_CHECK(!transports_.empty());
}

ImportTable::~ImportTable() {
  // Every channel is closed and its reader joined while the table is still
  // whole: readers call back into it (OnChannelClosed) on their way out.
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
  channels.clear();  // the last references: joins the readers
}

void ImportTable::PrepareCall(grpc::ClientContext* ctx, absl::Duration timeout) const {
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
  if (!opts_.peer_token.empty()) ctx->AddMetadata("svm-peer-token", opts_.peer_token);
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
    link->channel = grpc::CreateCustomChannel(peer, grpc::InsecureChannelCredentials(), args);
    link->stub = v1::Peer::NewStub(link->channel);
  }
  return link;
}

absl::Status ImportTable::Gate(Link& link) {
  absl::MutexLock il(&link.info_mu);
  switch (link.state) {
    case LinkState::kIdle:
    case LinkState::kUp:
      return absl::OkStatus();
    case LinkState::kConnecting:
      if (!link.was_up) return absl::OkStatus();
      return absl::UnavailableError(absl::StrCat("peer ", link.peer, ": reconnecting (",
                                                 link.last_error.message(), ")"));
    case LinkState::kDown:
      if (absl::Now() >= link.retry_at) return absl::OkStatus();
      // The last attempt's answer, with its code (RESOURCE_EXHAUSTED for a
      // memory limit stays that), until the next attempt.
      return absl::Status(
          link.last_error.code(),
          absl::StrCat(link.last_error.message(), " (next attempt in ",
                       absl::FormatDuration(absl::Trunc(link.retry_at - absl::Now(), absl::Milliseconds(1))),
                       ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<transport::PeerChannel>> ImportTable::Connect(Link& link, uint64_t* generation) {
  if (auto st = Gate(link); !st.ok()) return st;
  absl::MutexLock l(&link.mu);
  if (link.data && link.data->alive()) {
    *generation = link.generation;
    return link.data;
  }
  // Waited for another caller's attempt that failed meanwhile: its answer.
  if (auto st = Gate(link); !st.ok()) return st;
  {
    absl::MutexLock il(&link.info_mu);
    link.state = LinkState::kConnecting;
    link.up_channel = nullptr;
  }
  auto ch = ConnectLocked(link, generation);
  absl::MutexLock il(&link.info_mu);
  if (ch.ok()) {
    link.state = LinkState::kUp;
    link.was_up = true;
    link.up_channel = ch->get();
  } else {
    link.state = LinkState::kDown;
    link.retry_at = absl::Now() + kLinkBackoff;
    link.last_error = ch.status();
  }
  return ch;
}

absl::StatusOr<std::shared_ptr<transport::PeerChannel>> ImportTable::ConnectLocked(Link& link,
                                                                                   uint64_t* generation) {
  // The old channel's reader has finished or is finishing; its callbacks
  // take no lock that is held here, so joining it is safe.
  link.data.reset();
  std::vector<std::string> peer_transports;
  {
    grpc::ClientContext ctx;
    PrepareCall(&ctx, opts_.rpc_timeout);
    v1::HelloRequest req;
    req.set_node(opts_.node);
    req.set_protocol_version(kProtocolVersion);
    v1::HelloResponse resp;
    if (auto st = FromGrpc(link.stub->Hello(&ctx, req, &resp), absl::StrCat("peer ", link.peer));
        !st.ok()) {
      return st;
    }
    if (resp.protocol_version() != kProtocolVersion) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "peer %s speaks protocol %u, this daemon %u", link.peer, resp.protocol_version(),
          kProtocolVersion));
    }
    peer_transports.assign(resp.transports().begin(), resp.transports().end());
  }
  std::vector<std::string> local;
  for (transport::Transport* t : transports_) local.push_back(t->name());
  const std::vector<std::string> candidates = CommonTransports(local, peer_transports);
  if (candidates.empty()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no common transport with peer %s: this node runs %s, the peer offers %s", link.peer,
        absl::StrJoin(local, ","), absl::StrJoin(peer_transports, ",")));
  }
  std::string fallback_reason;
  for (size_t i = 0; i < candidates.size(); ++i) {
    transport::Transport* t = nullptr;
    for (transport::Transport* c : transports_) {
      if (candidates[i] == c->name()) t = c;
    }
    std::string token;
    auto ch = ConnectWith(link, *t, &token);
    if (!ch.ok()) {
      if (i + 1 == candidates.size()) {
        if (fallback_reason.empty()) return ch.status();
        return absl::Status(ch.status().code(),
                            absl::StrCat(ch.status().message(), " (after ", candidates[0],
                                         " failed: ", fallback_reason, ")"));
      }
      // Only rdma comes before another transport today.
      fallback_reason = std::string(ch.status().message());
      spdlog::warn("{} data connection to {} cannot be set up, falling back to {}: {}",
                   candidates[i], link.peer, candidates[i + 1], fallback_reason);
      counters_->Add(absl::StrCat(candidates[i], "_fallbacks"));
      continue;
    }
    link.data = std::move(*ch);
    link.token = std::move(token);
    break;
  }
  ++link.generation;
  *generation = link.generation;
  {
    absl::MutexLock il(&link.info_mu);
    link.path = link.data->path();
    link.fallback_reason = fallback_reason;
  }
  counters_->Add("data_connections_opened");
  spdlog::info("data connection to {} open ({})", link.peer, link.data->path());
  return link.data;
}

absl::StatusOr<std::unique_ptr<transport::PeerChannel>> ImportTable::ConnectWith(
    Link& link, transport::Transport& t, std::string* token) {
  auto begin = t.BeginConnect();
  if (!begin.ok()) return begin.status();
  grpc::ClientContext ctx;
  PrepareCall(&ctx, opts_.rpc_timeout);
  v1::SetupDataRequest req;
  req.set_node(opts_.node);
  req.set_transport(std::string(t.name()));
  req.set_importer_endpoint(*begin);
  v1::SetupDataResponse setup;
  if (auto st = FromGrpc(link.stub->SetupData(&ctx, req, &setup), absl::StrCat("peer ", link.peer));
      !st.ok()) {
    t.AbortConnect(*begin);  // release its queue pair and buffers now
    return st;
  }
  transport::SessionOffer offer{setup.session_token(), setup.endpoint()};
  auto ch = t.Connect(link.host, offer, this, *begin);
  if (!ch.ok()) return ch.status();
  *token = std::move(offer.token);
  return ch;
}

absl::Status ImportTable::Attach(ImportEntry& imp) {
  absl::MutexLock al(&imp.attach_mu);
  {
    absl::MutexLock l(&imp.mu);
    // Another reader attached it while this one waited.
    if (imp.coh.state() == coherence::ImportState::kLive && imp.channel != nullptr &&
        imp.channel->alive()) {
      return absl::OkStatus();
    }
  }
  uint64_t gen = 0;
  auto ch = Connect(*imp.link, &gen);
  if (!ch.ok()) return ch.status();
  std::string token;
  {
    absl::MutexLock l(&imp.link->mu);
    token = imp.link->token;
  }
  v1::ExportDescriptor desc;
  {
    grpc::ClientContext ctx;
    PrepareCall(&ctx, opts_.rpc_timeout);
    v1::DescribeExportRequest req;
    req.set_name(imp.remote_name);
    auto st = FromGrpc(imp.link->stub->DescribeExport(&ctx, req, &desc),
                       absl::StrCat("peer ", imp.link->peer));
    if (!st.ok()) return st;
  }
  if (desc.page_size() != kPageSize) {
    return absl::FailedPreconditionError(
        absl::StrFormat("export '%s' has %u-byte pages; this node uses %u", imp.remote_name,
                        desc.page_size(), kPageSize));
  }
  // The subscribing window opens before the request leaves: the exporter
  // may push an invalidation before its answer arrives, and that one must
  // be applied (OnInvalidation matches the channel and the export id).
  uint64_t epoch;
  {
    absl::MutexLock l(&imp.mu);
    // Whatever was cached belongs to an earlier connection or export.
    if (auto st = cache_->Reset(imp.id, desc.len()); !st.ok()) return st;
    if (imp.export_id != desc.export_id()) imp.zc_offered = false;  // another export by that name
    imp.export_id = desc.export_id();
    imp.len = desc.len();
    imp.channel = *ch;
    epoch = imp.coh.BeginSubscribe();
    imp.zc_registration.clear();
    imp.zc_refresh_at = absl::InfinitePast();
  }
  v1::SubscribeResponse sub;
  absl::Status st;
  {
    grpc::ClientContext ctx;
    PrepareCall(&ctx, opts_.rpc_timeout);
    v1::SubscribeRequest req;
    req.set_session_token(token);
    req.set_export_id(desc.export_id());
    st = FromGrpc(imp.link->stub->Subscribe(&ctx, req, &sub), absl::StrCat("peer ", imp.link->peer));
  }
  absl::MutexLock l(&imp.mu);
  if (!st.ok()) {
    if (imp.coh.epoch() == epoch) {
      imp.coh.OnDisconnect();
      cache_->DropImport(imp.id);
    }
    return st;
  }
  if (!imp.coh.CompleteSubscribe(epoch, sub.seq())) {
    // The channel was lost (or the export ended) while subscribing.
    return absl::UnavailableError(absl::StrCat("peer ", imp.link->peer,
                                               ": the subscription to '", imp.remote_name,
                                               "' was overtaken by ", imp.gone_reason.empty()
                                                   ? "the loss of the data connection"
                                                   : imp.gone_reason));
  }
  imp.gone_reason.clear();
  cache_->SetSeq(imp.id, imp.coh.max_seq());
  RenewLocked(imp);
  // Sticky for the export: a region withdrawn at this moment (the object
  // being truncated, say) may come back; the import keeps asking.
  imp.zc_offered = (imp.zc_offered || desc.has_zero_copy()) && (*ch)->one_sided();
  // A region described before the subscription may have been replaced by
  // an invalidation this import never received: only one described at the
  // subscription's own sequence is used; otherwise the first read asks again.
  if (desc.has_zero_copy() && desc.seq() == sub.seq() &&
      (*ch)->SetRegion(desc.export_id(), RegionOf(desc), desc.seq())) {
    imp.zc_registration = desc.zero_copy().registration();
  }
  return absl::OkStatus();
}

void ImportTable::RefreshRegion(ImportEntry& imp, transport::PeerChannel* ch, uint64_t export_id) {
  {
    absl::MutexLock l(&imp.mu);
    imp.zc_refresh_at = absl::Now() + absl::Seconds(1);
  }
  grpc::ClientContext ctx;
  PrepareCall(&ctx, opts_.rpc_timeout);
  v1::DescribeExportRequest req;
  req.set_name(imp.remote_name);
  v1::ExportDescriptor desc;
  if (!FromGrpc(imp.link->stub->DescribeExport(&ctx, req, &desc), "").ok()) return;
  counters_->Add("zero_copy_refreshes");
  if (desc.export_id() != export_id || !desc.has_zero_copy()) return;
  absl::MutexLock l(&imp.mu);
  if (imp.channel.get() == ch && ch->SetRegion(export_id, RegionOf(desc), desc.seq())) {
    imp.zc_registration = desc.zero_copy().registration();
  }
}

absl::StatusOr<v1::ImportInfo> ImportTable::Import(const std::string& peer, const std::string& name,
                                                   const std::string& as) {
  const std::string local = as.empty() ? name : as;
  auto imp = std::make_shared<struct ImportEntry>();
  imp->name = local;
  imp->remote_name = name;
  imp->link = GetLink(peer);
  {
    absl::MutexLock l(&mu_);
    if (imports_.count(local)) {
      return absl::AlreadyExistsError(absl::StrCat("an import named '", local, "' exists"));
    }
    imp->id = next_import_id_++;
    imports_[local] = imp;  // reserve the name while attaching
  }
  if (auto st = Attach(*imp); !st.ok()) {
    absl::MutexLock l(&mu_);
    imports_.erase(local);
    return st;
  }
  counters_->Add("imports_created");
  spdlog::info("imported '{}' from {} as '{}'", name, peer, local);
  return InfoOf(*imp);
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

Executor* ImportTable::ReadExecutor(const std::string& name) const {
  auto imp = Find(name);
  return imp ? &imp->link->reads : nullptr;
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
    absl::MutexLock il(&link->info_mu);
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
    absl::MutexLock il(&imp.link->info_mu);
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

absl::StatusOr<v1::ReadResponse> ImportTable::Read(const std::string& name, uint64_t offset,
                                                   absl::Span<uint8_t> dst, bool fresh, bool fill) {
  auto imp = Find(name);
  if (!imp) return absl::NotFoundError(absl::StrCat("no export or import named '", name, "'"));
  bool attached;
  {
    absl::MutexLock l(&imp->mu);
    attached = imp->coh.state() == coherence::ImportState::kLive && imp->channel != nullptr &&
               imp->channel->alive();
  }
  if (!attached) {
    if (auto st = Attach(*imp); !st.ok()) {
      absl::MutexLock l(&imp->mu);
      if (imp->coh.state() == coherence::ImportState::kGone &&
          (absl::IsNotFound(st) || absl::IsFailedPrecondition(st))) {
        return absl::FailedPreconditionError(
            absl::StrCat("export '", imp->remote_name, "' gone: ", imp->gone_reason));
      }
      return st;
    }
  }
  std::shared_ptr<transport::PeerChannel> ch;
  uint64_t export_id, len, seq_before;
  bool zc;
  absl::Time zc_refresh_at;
  coherence::FetchTicket ticket;
  bool cache_usable;
  {
    absl::MutexLock l(&imp->mu);
    if (imp->channel == nullptr) {
      return absl::UnavailableError(absl::StrCat("import '", name, "' lost its connection"));
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
    return absl::OutOfRangeError(absl::StrFormat(
        "read of %u bytes at offset %u is past the end of '%s' (%u bytes)", dst.size(), offset, name, len));
  }
  if (fill && cache_->capacity() == 0) {
    // A mapping's fault would never be satisfied.
    return absl::FailedPreconditionError("this importer keeps no cache (--cache-mb 0): nothing can be mapped");
  }
  const uint64_t first = offset / kPageSize;
  const uint64_t last = (offset + dst.size() - 1) / kPageSize;
  const uint64_t n = last - first + 1;
  if (zc && !dst.empty() && !fill) {
    // Zero-copy: one-sided READs of the exporter's live pages, straight into
    // dst. Never cached: a cached copy could not follow the exporter's
    // stores without its CPU hashing what was read (the staged path's Sync
    // bookkeeping), and the read is as cheap as a fetch.
    absl::Status st = ch->ReadRegion(export_id, offset, dst, opts_.fetch_timeout);
    if (absl::IsFailedPrecondition(st) && absl::Now() >= zc_refresh_at) {
      RefreshRegion(*imp, ch.get(), export_id);
      st = ch->ReadRegion(export_id, offset, dst, opts_.fetch_timeout);
    }
    if (st.ok()) {
      v1::ReadResponse resp;
      resp.set_len(dst.size());
      resp.set_seq(seq_before);
      resp.set_pages_fetched(n);
      counters_->Add("reads");
      counters_->Add("zero_copy_reads");
      counters_->Add("read_pages_fetched", n);
      return resp;
    }
    if (!absl::IsFailedPrecondition(st)) {
      if (!ch->alive()) OnChannelClosed(ch.get(), st);  // as for a fetch below
      return st;
    }
    // No region right now (withdrawn or being replaced): the staged path.
  }
  // An import the exporter offers zero-copy READs for is not cached (its
  // reads keep coming here and return to the READs once the region is
  // back), unless the pages must land in the cache (a mapping's fault).
  const bool install = !fresh && (fill || !zc);
  // Whole pages of a read that installs nothing land straight in dst. What
  // is installed comes from svmd's own buffer: dst may be a session's data
  // area, which its client can write while svmd reads it, and the shared
  // cache serves every client of the import. A read that starts or ends
  // inside a page goes through the buffer too.
  const bool direct = !install && offset % kPageSize == 0 && dst.size() % kPageSize == 0;
  std::vector<uint8_t> bounce(direct ? 0 : n * kPageSize);
  uint8_t* const buf = direct ? dst.data() : bounce.data();
  std::vector<bool> have(n, false);
  v1::ReadResponse resp;
  uint64_t min_seq = UINT64_MAX;
  if (!fresh && !cache_usable) counters_->Add("reads_past_lease");
  if (!fresh && cache_usable) {
    for (uint64_t i = 0; i < n; ++i) {
      have[i] = cache_->Lookup(imp->id, first + i, absl::MakeSpan(buf + i * kPageSize, kPageSize));
    }
  }
  // Every missing run, in pieces of at most the channel's piece size, is on
  // the wire at once: the exporter copies one piece while another travels.
  const uint64_t piece = std::clamp<uint64_t>(ch->capabilities().fetch_piece_pages, 1, transport::kMaxFetchPages);
  std::vector<transport::FetchOp> ops;
  for (uint64_t i = 0; i < n;) {
    if (have[i]) {
      resp.set_pages_from_cache(resp.pages_from_cache() + 1);
      ++i;
      continue;
    }
    uint64_t j = i + 1;
    while (j < n && !have[j] && j - i < piece) ++j;
    transport::FetchOp op;
    op.export_id = export_id;
    op.first_page = first + i;
    op.npages = static_cast<uint32_t>(j - i);
    op.track = !fresh;
    op.dst = absl::MakeSpan(buf + i * kPageSize, (j - i) * kPageSize);
    ops.push_back(op);
    i = j;
  }
  if (!ops.empty()) ch->FetchV(absl::MakeSpan(ops), opts_.fetch_timeout);
  for (const transport::FetchOp& op : ops) {
    const auto& seq = op.result;
    if (!seq.ok()) {
      if (absl::IsNotFound(seq.status())) {
        // Withdrawn on the exporter: reattach by name on the next read.
        absl::MutexLock l(&imp->mu);
        imp->coh.MarkGone();
        cache_->SetLease(imp->id, imp->coh.lease_until_ns());
        imp->gone_reason = "withdrawn by the exporter";
        return absl::FailedPreconditionError(
            absl::StrCat("export '", imp->remote_name, "' gone: ", seq.status().message()));
      }
      // The connection was given up (a peer that did not answer): nothing
      // cached from it may be served from now on, before this error
      // reaches the caller (the channel's reader reports the close too,
      // later, from its own thread; the second report finds nothing).
      if (!ch->alive()) OnChannelClosed(ch.get(), seq.status());
      return seq.status();
    }
    min_seq = std::min(min_seq, *seq);
    if (install) {
      absl::MutexLock l(&imp->mu);
      if (imp->channel == ch && imp->coh.MayInstall(ticket, *seq)) {
        for (uint32_t k = 0; k < op.npages; ++k) {
          cache_->Insert(imp->id, op.first_page + k, absl::MakeConstSpan(op.dst.data() + k * kPageSize, kPageSize));
        }
      } else {
        counters_->Add("fetches_not_cached_raced");
      }
    }
    resp.set_pages_fetched(resp.pages_fetched() + op.npages);
  }
  if (!direct) std::memcpy(dst.data(), buf + (offset - first * kPageSize), dst.size());
  resp.set_len(dst.size());
  if (min_seq == UINT64_MAX) {
    absl::MutexLock l(&imp->mu);
    min_seq = imp->coh.max_seq();
  }
  resp.set_seq(min_seq);
  counters_->Add("reads");
  counters_->Add("read_pages_from_cache", resp.pages_from_cache());
  counters_->Add("read_pages_fetched", resp.pages_fetched());
  return resp;
}

absl::StatusOr<v1::SyncResponse> ImportTable::Sync(const std::string& name) {
  auto imp = Find(name);
  if (!imp) return absl::NotFoundError(absl::StrCat("no export or import named '", name, "'"));
  grpc::ClientContext ctx;
  // The exporter waits up to its sync timeout for acknowledgements.
  PrepareCall(&ctx, absl::Seconds(10));
  v1::PeerSyncRequest req;
  req.set_name(imp->remote_name);
  v1::PeerSyncResponse presp;
  if (auto st = FromGrpc(imp->link->stub->Sync(&ctx, req, &presp), absl::StrCat("peer ", imp->link->peer));
      !st.ok()) {
    return st;
  }
  v1::SyncResponse r;
  r.set_pages_invalidated(presp.pages_invalidated());
  r.set_seq(presp.seq());
  r.set_subscribers_acked(presp.subscribers_acked());
  return r;
}

void ImportTable::RenewLocked(ImportEntry& imp) {
  imp.coh.Renew(static_cast<int64_t>(source::MonotonicNs()), absl::ToInt64Nanoseconds(opts_.lease));
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
    absl::MutexLock il(&link->info_mu);
    if (link->up_channel != ch) continue;
    // Declared lost: callers fail fast for a back-off instead of each
    // waiting for a Hello to a peer that may not answer.
    link->up_channel = nullptr;
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
