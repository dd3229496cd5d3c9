// The importer side: imports of remote exports, the connection to each
// exporter daemon (a gRPC channel for setup, a data channel for pages and
// invalidations) and the mirror cache.
//
// The distributed retry rule (coherence::ImportCoherence::MayInstall): a
// fetched page is installed into the cache only if the subscription it was
// fetched under is still live and no invalidation newer than the reply's
// sequence has been received in it (checked under ImportEntry::mu, the lock
// invalidations take), so data that raced an invalidation is returned to
// the reader but never kept. An import is live for invalidations from the
// moment its subscription is sent, before it is acknowledged.
//
// Peer links are state machines (LinkState in import_table.cc): a link that
// lost its data connection or failed to connect fails reads fast for a
// short back-off, and while one caller reconnects it the others fail fast
// instead of queueing behind its Hello. Reads of a link's imports run on
// the link's own executor, so a peer that does not answer holds up nobody
// else's reads.
//
// LOCKING: mu_ guards the maps. Per import: attach_mu serialises
// attachment (held across peer RPCs; only readers of that import wait on
// it), mu guards the import's state (never held across a call). Per link:
// Link::mu serialises (re)connection (held across Hello/SetupData),
// Link::info_mu guards what listing shows and the link's state. Order: attach_mu, then
// Link::mu, then ImportEntry::mu, then SharedCache's own lock; mu_ is taken
// alone (its holders copy what they need and release it).
#ifndef SVM_DAEMON_CORE_IMPORT_TABLE_H_
#define SVM_DAEMON_CORE_IMPORT_TABLE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/security/credentials.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/executor.h"
#include "daemon/coherence/coherence.h"
#include "daemon/core/counters.h"
#include "daemon/core/watch_hub.h"
#include "daemon/session/shared_cache.h"
#include "daemon/transport/transport.h"
#include "svm/v1/control.pb.h"
#include "svm/v1/peer.grpc.pb.h"

namespace svm::core {

struct ImportOptions {
  std::string node;
  std::string peer_token;                        // empty: peers unauthenticated
  // Credentials of channels to peers (mutual TLS: service::PeerTls); null:
  // plain TCP.
  std::shared_ptr<grpc::ChannelCredentials> peer_credentials;
  absl::Duration rpc_timeout = absl::Seconds(2);   // every peer gRPC call
  absl::Duration fetch_timeout = absl::Milliseconds(1500);
  // How long cached pages stay usable after the exporter was last heard
  // from (coherence.h: the lease). Shorter than every exporter's sync
  // timeout (default 5 s), longer than their heartbeat interval.
  absl::Duration lease = absl::Seconds(2);
};

// Transport choice for one peer link: the local transports (names, in
// preference order) that the peer also offers, in local preference order. A
// peer that lists none is taken to offer tcp (the only transport before the
// list existed). The importer tries them in order: a failed rdma setup falls
// back to the next.
std::vector<std::string> CommonTransports(const std::vector<std::string>& local,
                                          const std::vector<std::string>& peer);

class ImportTable final : public transport::ImportBackend {
 public:
  // transports: the running ones in preference order (not empty).
  ImportTable(std::vector<transport::Transport*> transports, WatchHub* hub, session::SharedCache* cache,
              Counters* counters, ImportOptions opts);
  ~ImportTable() override;

  absl::StatusOr<v1::ImportInfo> Import(const std::string& peer, const std::string& name,
                                        const std::string& as);
  std::vector<v1::ImportInfo> List() const;
  bool Has(const std::string& name) const;
  // Reads dst.size() bytes at offset of the import, from the cache where
  // valid, fetching the rest. fresh: neither use nor fill the cache. fill:
  // the pages must end up in the cache (the staged path even where the
  // exporter offers zero-copy READs, which are never cached).
  absl::StatusOr<v1::ReadResponse> Read(const std::string& name, uint64_t offset,
                                        absl::Span<uint8_t> dst, bool fresh, bool fill = false);
  // The shared cache of import `name`, read-only, for a local client.
  absl::StatusOr<session::CacheFiles> OpenCache(const std::string& name) const;
  // Forwards Sync to the exporting daemon.
  absl::StatusOr<v1::SyncResponse> Sync(const std::string& name);
  // Drops the cached pages of imports whose lease ran out: mapped imports
  // (Client::Map) read pages without asking, so their pages must go.
  void ExpireLeases();
  // Peer links whose data connection is up.
  uint32_t peers() const;
  // The executor reads of import `name` run on (its peer link's), or null
  // when there is no such import.
  Executor* ReadExecutor(const std::string& name) const;

  void OnInvalidation(transport::PeerChannel* ch, const transport::InvalRecord& r) override;
  void OnChannelClosed(transport::PeerChannel* ch, const absl::Status& why) override;

 private:
  struct Link;
  struct ImportEntry;
  // Deadline and authentication of every peer call.
  void PrepareCall(grpc::ClientContext* ctx, absl::Duration timeout) const;
  std::shared_ptr<Link> GetLink(const std::string& peer);
  // Whether a caller may try to (re)connect the link now; UNAVAILABLE with
  // the reason while the link is down or being reconnected.
  absl::Status Gate(Link& link);
  // Makes sure the link has a live data channel; returns it (and its generation).
  // Tries the transports both ends run in preference order; a failed rdma
  // setup is logged, counted (rdma_fallbacks) and falls back to tcp.
  absl::StatusOr<std::shared_ptr<transport::PeerChannel>> Connect(Link& link, uint64_t* generation);
  // The attempt itself, under Link::mu.
  absl::StatusOr<std::shared_ptr<transport::PeerChannel>> ConnectLocked(Link& link,
                                                                        uint64_t* generation);
  // BeginConnect, SetupData, Connect on one transport; sets *token.
  absl::StatusOr<std::unique_ptr<transport::PeerChannel>> ConnectWith(Link& link,
                                                                      transport::Transport& t,
                                                                      std::string* token);
  // (Re)attaches an import: describe by name, subscribe on the current channel.
  absl::Status Attach(ImportEntry& imp);
  // Zero-copy: asks the exporter for the export's current region and hands
  // it to the channel.
  void RefreshRegion(ImportEntry& imp, transport::PeerChannel* ch, uint64_t export_id);
  std::shared_ptr<ImportEntry> Find(const std::string& name) const;
  v1::ImportInfo InfoOf(ImportEntry& imp) const;
  // Renews the lease of an import (under its mu) and publishes it to clients.
  void RenewLocked(ImportEntry& imp);
  void Publish(ImportEntry& imp, uint64_t first, uint64_t n, uint64_t seq, source::ChangeKind kind,
               uint64_t detected_ns);

  const std::vector<transport::Transport*> transports_;
  WatchHub* const hub_;
  session::SharedCache* const cache_;
  Counters* const counters_;
  const ImportOptions opts_;

  mutable absl::Mutex mu_;  // guards the maps below
  std::map<std::string, std::shared_ptr<Link>> links_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<ImportEntry>> imports_ ABSL_GUARDED_BY(mu_);
  uint64_t next_import_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_IMPORT_TABLE_H_
