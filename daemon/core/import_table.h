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
// Peer links are state machines (LinkState in import_table.cc) driven by
// the completions of asynchronous gRPC calls (the callback API): no thread
// waits for a peer's answer and no lock is held across a call. A link that
// lost its data connection or failed to connect fails callers fast for a
// short back-off, and while one attempt reconnects it the others fail fast
// instead of waiting for its Hello. An import's attachment (DescribeExport,
// Subscribe) is a chain of completions too; readers of a detached import
// wait for the one attachment in flight as continuations, not as threads.
// Reads hold no thread while their data travels: a transport's
// FetchVAsync and ReadRegionAsync complete them on its own threads, and a
// peer that does not answer fails them at the fetch timeout; a transport's
// BeginConnect and Connect run on a few connector threads of their own.
//
// LOCKING: mu_ guards the maps; calls_mu_ the calls in flight. Per import:
// mu guards the import's state, the attachment in flight and its waiters.
// Per link: Link::mu guards the link's state and its data channel. None of them is held across a peer call, a fetch or a
// completion callback (waiters run after the lock is released), and none
// is held while another is taken, except ImportEntry::mu before
// SharedCache's own lock and, in the destructor only, mu_ before Link::mu
// and ImportEntry::mu. A PeerChannel's last reference is not dropped under
// these locks (its destruction joins a reader that calls back in), except
// by that reader itself in OnChannelClosed (the transport detaches it).
#ifndef SVM_DAEMON_CORE_IMPORT_TABLE_H_
#define SVM_DAEMON_CORE_IMPORT_TABLE_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
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
#include "daemon/core/peer_token.h"
#include "daemon/core/watch_hub.h"
#include "daemon/session/shared_cache.h"
#include "daemon/transport/transport.h"
#include "svm/v1/control.pb.h"
#include "svm/v1/peer.grpc.pb.h"

namespace svm::core {

struct ImportOptions {
  std::string node;
  // The token presented to peers (re-read on SIGHUP); null or "": none.
  std::shared_ptr<const PeerToken> peer_token;
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

  // The calls below are asynchronous: done runs exactly once, on a gRPC
  // completion thread, a worker of this table or, for an answer known at
  // once, the caller's thread before the call returns. done must not block.
  using ImportDone = std::function<void(absl::StatusOr<v1::ImportInfo>)>;
  using ReadDone = std::function<void(absl::StatusOr<v1::ReadResponse>)>;
  using SyncDone = std::function<void(absl::StatusOr<v1::SyncResponse>)>;

  void Import(const std::string& peer, const std::string& name, const std::string& as,
              ImportDone done);
  std::vector<v1::ImportInfo> List() const;
  // Every import's traffic figures (the metrics endpoint); each pointer
  // keeps its import's entry alive, not the import.
  struct StatsRef {
    std::string name;
    std::shared_ptr<const ImportStats> stats;
  };
  std::vector<StatsRef> Stats() const;
  // Adds reads a client served from the import's shared cache without
  // asking svmd (libsvm counts them in its session; session::Server
  // harvests them) to the import's reads and cache hits.
  void CountClientHits(const std::string& name, uint64_t reads, uint64_t pages);
  bool Has(const std::string& name) const;
  // Reads dst.size() bytes at offset of the import, from the cache where
  // valid, fetching the rest; dst must stay valid until done ran. fresh:
  // neither use nor fill the cache. fill: the pages must end up in the
  // cache (the staged path even where the exporter offers zero-copy READs,
  // which are never cached).
  void Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh,
            bool fill, ReadDone done);
  // Read, for a session whose client can copy from the shared cache itself
  // (abi::kInCache). in_cache: when the read installs its pages in the
  // cache (not fresh, not a fill, the staged path with a cache), nothing is
  // copied into dst: the pages it fetched are published in the cache, the
  // pages found there stay there, and done's second argument is true. The
  // client then copies every page checked against its version word (a page
  // that raced an invalidation was never published: its word fails the
  // check and the client reads it again without in_cache). Otherwise (or
  // with in_cache false) as Read, and done's second argument is false.
  // dst_areas (may be null): dst's memory, registered on the import's
  // channel for READs (transport::LandingUse::kReads), so that zero-copy
  // READs of whole pages land in dst itself with no copy by svmd. (The
  // staged path's WRITEs do not: the exporter would need remote write
  // access to memory that other exporters' reads use too.)
  using SessionReadDone = std::function<void(absl::StatusOr<v1::ReadResponse>, bool in_cache)>;
  void ReadInCache(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh,
                   bool fill, bool in_cache, SessionReadDone done,
                   transport::LandingAreas* dst_areas = nullptr);
  // The shared cache of import `name`, read-only, for a local client.
  absl::StatusOr<session::CacheFiles> OpenCache(const std::string& name) const;
  // Forwards Sync to the exporting daemon.
  void Sync(const std::string& name, SyncDone done);
  // Drops the cached pages of imports whose lease ran out: mapped imports
  // (Client::Map) read pages without asking, so their pages must go.
  void ExpireLeases();
  // Peer links whose data connection is up.
  uint32_t peers() const;

  void OnInvalidation(transport::PeerChannel* ch, const transport::InvalRecord& r) override;
  void OnChannelClosed(transport::PeerChannel* ch, const absl::Status& why) override;

 private:
  struct Link;
  struct ImportEntry;
  struct Connected;
  struct ConnectAttempt;
  struct PendingCall;
  struct ReadOp;
  using ConnectDone = std::function<void(absl::StatusOr<Connected>)>;
  using AttachDone = std::function<void(absl::Status)>;

  // Starts one asynchronous peer call (deadline and authentication set
  // here): start(stub->async(), ctx, req, resp, callback) issues it, done
  // gets the response or the error (DEADLINE_EXCEEDED as UNAVAILABLE,
  // prefixed with what). Once the table is being destroyed, done gets
  // CANCELLED at once.
  template <typename Resp, typename Req, typename Start>
  void CallPeer(Link& link, absl::Duration timeout, const Req& req, std::string what, Start start,
                std::function<void(absl::StatusOr<Resp>)> done);
  std::shared_ptr<Link> GetLink(const std::string& peer);
  // Hands done the link's live data channel, or starts an attempt to
  // (re)connect it (Hello, then SetupData and the data connection on each
  // transport both ends run, in preference order; a failed rdma setup is
  // logged, counted (rdma_fallbacks) and falls back to tcp), or fails fast
  // while the link is down or being reconnected.
  void Connect(const std::shared_ptr<Link>& link, ConnectDone done);
  void OnHello(const std::shared_ptr<Link>& link, absl::StatusOr<v1::HelloResponse> hello);
  // BeginConnect and SetupData on the attempt's current transport (on a worker).
  void SetupNext(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt);
  // The transport's Connect after SetupData answered (on a worker).
  void ConnectData(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt,
                   std::string begin, absl::StatusOr<v1::SetupDataResponse> setup);
  // The attempt failed on its current transport: the next one, or the end.
  void NextOrFail(const std::shared_ptr<Link>& link, std::shared_ptr<ConnectAttempt> attempt,
                  absl::Status why);
  void FinishConnect(const std::shared_ptr<Link>& link, absl::StatusOr<Connected> result,
                     const std::string& fallback_reason);
  // (Re)attaches an import: describe by name, subscribe on the link's
  // current channel. Concurrent callers wait for the one in flight.
  void Attach(const std::shared_ptr<ImportEntry>& imp, AttachDone done);
  void Subscribe(const std::shared_ptr<ImportEntry>& imp, const Connected& c,
                 const v1::ExportDescriptor& desc);
  void FinishAttach(ImportEntry& imp, const absl::Status& st);
  // A read of an attached import: ReadAttached on the caller's thread (its
  // fetches and READs complete on the transport's thread).
  void RunRead(std::shared_ptr<ReadOp> op, bool may_refresh);
  // The part of a read after the import is attached: completes op, or asks
  // for the zero-copy region first (RefreshRegion, then RunRead again with
  // may_refresh false), or issues the staged fetches (FetchVAsync), whose
  // completion (FinishFetch) installs what may be and completes op.
  void ReadAttached(const std::shared_ptr<ReadOp>& op, bool may_refresh);
  // Drops a reference to a channel on the transport's thread: destroying a
  // channel joins that thread, so a (nearly) last reference goes to a worker.
  void ReleaseChannel(std::shared_ptr<transport::PeerChannel> ch);
  // A zero-copy read's completion (on the transport's thread): completes
  // op, or refreshes the region, or takes the staged path.
  void FinishZeroCopyRead(const std::shared_ptr<ReadOp>& op, std::shared_ptr<transport::PeerChannel> ch,
                          bool may_refresh, absl::Time zc_refresh_at, uint64_t seq_before, uint64_t n,
                          absl::Time read_start, absl::Status st, uint64_t transport_copied);
  struct Fetching;
  void FinishFetch(Fetching& f);
  // Zero-copy: asks the exporter for the export's current region, hands it
  // to the channel, then runs then.
  void RefreshRegion(const std::shared_ptr<ImportEntry>& imp, std::function<void()> then);
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

  // Staged reads whose fetches are outstanding: the table outlives their
  // completions (they run on transports' threads).
  absl::Mutex fetching_mu_;
  int fetching_ ABSL_GUARDED_BY(fetching_mu_) = 0;

  absl::Mutex calls_mu_;  // guards the peer calls in flight
  std::vector<std::shared_ptr<PendingCall>> calls_ ABSL_GUARDED_BY(calls_mu_);
  bool stopping_ ABSL_GUARDED_BY(calls_mu_) = false;

  // The data plane's blocking work: the release of channels off their own
  // threads (workers_), data connections' BeginConnect and Connect and the release
  // of replaced ones (connectors_). Declared last: destroyed first, while
  // everything their tasks use exists; connectors_ before workers_, which
  // its tasks may queue reads on.
  Executor workers_;
  Executor connectors_;
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_IMPORT_TABLE_H_
