// The transport seam (UCX's uct layering is the model): one interface, tcp
// and rdma behind it. The core above talks only to these interfaces; gRPC
// only carries the setup (SessionOffer and the importer's endpoint, as
// opaque bytes the transports encode themselves).
#ifndef SVM_DAEMON_TRANSPORT_TRANSPORT_H_
#define SVM_DAEMON_TRANSPORT_TRANSPORT_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/numbers.h"
#include "daemon/source/mirror_source.h"

namespace svm::transport {

struct InvalRecord {
  uint64_t export_id = 0;
  uint64_t first_page = 0;
  uint64_t npages = 0;
  uint64_t seq = 0;
  source::ChangeKind kind = source::ChangeKind::kOther;
  uint64_t detected_ns = 0;
};

// An InvalRecord with this export id is a heartbeat: the exporter is still
// sending on the channel (it renews the importer's lease; no export has
// this id). Sent with kind kWrite, no pages and sequence 0.
inline constexpr uint64_t kHeartbeatExportId = 0;

// Exporter side: one connected importer that receives invalidations.
class Subscriber {
 public:
  virtual ~Subscriber() = default;
  virtual uint64_t id() const = 0;
  virtual const std::string& node() const = 0;
  // Queues an invalidation behind everything already queued (responses
  // included: order on the connection is the order of these calls). Never
  // blocks. Returns false when the connection is closed.
  virtual bool PushInvalidation(const InvalRecord& r) = 0;
  // Ends the connection (an importer that stopped acknowledging).
  virtual void Close() = 0;
  // Fetches of this connection that wait, counted by
  // --max-pending-fetches-per-peer (tcp: responses queued and not yet
  // sent; rdma: FETCHes waiting for one of its staging buffers). Never
  // calls the backend; may take the connection's own lock.
  virtual uint64_t PendingFetches() const { return 0; }
};

// Exporter side: one data connection's place under the daemon's
// --max-data-connections-per-peer, from SetupData on. The transport keeps
// it as long as the connection's resources exist (tcp: the offered token
// in its session registry, then the connection until it is destroyed;
// rdma: the queue pair and its registered buffers) and destroys it then:
// that is how the daemon learns that a data connection is gone.
class ConnectionSlot {
 public:
  virtual ~ConnectionSlot() = default;
  // The connection's resources exist beyond the offer: the slot counts
  // until it is destroyed even once the offer would have expired (tcp: at
  // the HELLO that claims the token; rdma: when the queue pair is made).
  virtual void Bind() = 0;
};

// Exporter side: what the transport asks of the daemon.
class ExportBackend {
 public:
  virtual ~ExportBackend() = default;
  // Copies npages pages of the export into dst (npages * page size bytes)
  // and returns the export's invalidation sequence sampled before the copy.
  // track: the importer will cache the pages, so later changes must reach it.
  // from: the data connection that asks (its session). Served only when
  // from holds a subscription to the export (granted by the peer service's
  // access-checked Subscribe); else PERMISSION_DENIED, the same answer as
  // for an id no export has, before anything of the export is read.
  virtual absl::StatusOr<uint64_t> ServeFetch(const Subscriber& from, uint64_t export_id,
                                              uint64_t first_page, uint32_t npages, bool track,
                                              absl::Span<uint8_t> dst) = 0;
  // Whether from, with `pending` fetches waiting (its PendingFetches()),
  // may have one more served; an error (RESOURCE_EXHAUSTED) is the fetch's
  // answer instead, and nothing is copied. Called with no lock of from
  // held: the backend may call PendingFetches() of from's other
  // connections (lock order: the backend's lock before a connection's).
  virtual absl::Status AdmitFetch(const Subscriber& /*from*/, uint64_t /*pending*/) {
    return absl::OkStatus();
  }
  virtual void OnAck(uint64_t subscriber_id, uint64_t export_id, uint64_t seq) = 0;
  virtual void OnSubscriberClosed(uint64_t subscriber_id) = 0;
};

class PeerChannel;

// What a transport or a channel can do beyond staged fetches, as data.
struct Capabilities {
  // Zero-copy path: the transport registers regions of an export
  // (Transport::RegisterRegion) and its channels read the exporter's regions
  // with one-sided READs (PeerChannel::SetRegion/ReadRegion). rdma only.
  bool one_sided = false;
  // The pieces a read's missing pages are cut into, all in flight at once
  // (PeerChannel::FetchV): small enough that the exporter copies one while
  // another travels, large enough that per-request costs stay small. tcp:
  // 256 KiB (the session's largest request: one piece each); rdma: one receive slot (1 MiB, its own unit of pipelining).
  uint32_t fetch_piece_pages = 32;
};

// Exporter -> importer: what PrepareSession offers for one data connection,
// carried by SetupData and handed to the importer's Connect.
struct SessionOffer {
  // One-time: the first data connection that presents it owns the session
  // (Subscribe finds it by this token); refused after that, and once it
  // expires unclaimed (30 s).
  std::string token;
  // The exporter's end of the connection, encoded by its transport
  // (proto/svm/v1/transport.proto); opaque to everything else.
  std::string endpoint;
};

// Zero-copy path, exporter side: memory of an export registered with the
// device for one-sided remote READs (RDMA only). Destroying it deregisters.
//
// Protection: a peer's data connections reach only what was opened for its
// protection key (ProtectionKey: the identities it proved). rdma keeps one
// protection domain per key: the connections PrepareSession makes for a key
// and the region's registration for that key (RemoteFor) live in it, so a
// peer that learned, or guessed, another peer's rkey and address still
// cannot READ through its own queue pairs. Peers that proved nothing (no
// TLS) share the key "".
struct RemoteRegion {
  uint64_t addr = 0;
  uint64_t len = 0;
  uint32_t rkey = 0;
  bool odp = false;  // else pinned
};
class RegisteredRegion {
 public:
  virtual ~RegisteredRegion() = default;
  // The registration as made by RegisterRegion (its mode and extent); its
  // rkey is readable by no peer.
  virtual RemoteRegion remote() const = 0;
  // What the peers of protection key read: registered for that key on
  // first use (pinned: the pages are pinned once more; may take a while for
  // a large region) and kept until this is destroyed. Thread-safe.
  virtual absl::StatusOr<RemoteRegion> RemoteFor(const std::string& protection_key) = 0;
};

// The protection key of a peer that proved names (its certificate's
// identities, in the order its certificate lists them); "" when it proved
// none.
inline std::string ProtectionKey(absl::Span<const std::string> names) {
  return absl::StrJoin(names, ",");
}

// Importer side: what the transport delivers to the daemon.
class ImportBackend {
 public:
  virtual ~ImportBackend() = default;
  // Drops whatever the invalidation covers. The channel acknowledges it to
  // the exporter only after this returns.
  virtual void OnInvalidation(PeerChannel* ch, const InvalRecord& r) = 0;
  // The connection ended: every invalidation from now on is unknown.
  virtual void OnChannelClosed(PeerChannel* ch, const absl::Status& why) = 0;
};

// Importer side: memory of this daemon registered so that fetches land in
// it with no copy by the transport (rdma: one per import's shared cache
// file, ODP; PeerChannel::RegisterLanding). Destroying it deregisters: only
// once no fetch can write into it any more (no batch naming it is
// outstanding). It may outlive the channel that made it.
class LandingArea {
 public:
  virtual ~LandingArea() = default;
};

// What a landing area is for (PeerChannel::RegisterLanding).
enum class LandingUse {
  kFetches,  // the exporter's WRITEs land in it: writable by this channel's peer (a cache file)
  kReads,    // only this node's own READs land in it: no remote access (a session's data area)
};

// One fetch of a batch (PeerChannel::FetchV).
struct FetchOp {
  uint64_t export_id = 0;
  uint64_t first_page = 0;
  uint32_t npages = 0;     // 1 to kMaxFetchPages (frame.h)
  bool track = false;      // the importer will cache the pages
  absl::Span<uint8_t> dst;  // npages * page size bytes; written only until the batch completes
  // A registration of this channel's transport that covers dst, or null.
  // rdma: the exporter's WRITE lands in dst itself (else in a receive slot,
  // copied out into dst).
  const LandingArea* area = nullptr;
  // Set by FetchV: the exporter's sequence at read time, or why not.
  absl::StatusOr<uint64_t> result = absl::UnknownError("not fetched");
  // Set by FetchV: bytes the transport itself copied into dst (rdma: out of
  // its receive slots, when no area covers dst; 0 when the NIC or the socket
  // wrote dst).
  uint64_t transport_copied = 0;
};

// Runs once when a FetchVAsync completed.
using FetchDone = absl::AnyInvocable<void() &&>;
// Runs once when a ReadRegionAsync completed: its status, and the bytes the
// transport copied into dst.
using ReadRegionDone = absl::AnyInvocable<void(absl::Status, uint64_t copied) &&>;

// Importer side: one data connection to an exporter daemon.
class PeerChannel {
 public:
  virtual ~PeerChannel() = default;
  const Capabilities& capabilities() const { return caps_; }
  // Fetches npages pages into dst; returns the exporter's sequence at read
  // time. UNAVAILABLE when the connection is lost or the peer does not
  // answer within timeout (the connection is then closed). Blocks: a
  // wrapper around FetchVAsync.
  absl::StatusOr<uint64_t> Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages, bool track,
                                 absl::Span<uint8_t> dst, absl::Duration timeout) {
    FetchOp op{export_id, first_page, npages, track, dst};
    FetchV(absl::MakeSpan(&op, 1), timeout);
    return op.result;
  }
  // Pipelined fetches, completed asynchronously: every op is on the wire at
  // once (tcp: all of them; rdma: as many as the connection has receive
  // slots, the next issued as one completes), each lands in its own dst.
  // Returns at once; done runs exactly once, when every op has its result,
  // on the transport's own thread (tcp: the connection's reader; rdma: its
  // completion thread), or on the caller's when the connection is already
  // closed. The exporter serves them in order, so its copy of one overlaps
  // the transfer of the one before. A lost connection or the timeout (for
  // the whole batch) fails every op that had not completed with
  // UNAVAILABLE, and the connection is then closed. A failed op may end
  // the batch early: the ops after it that were not issued yet fail with
  // CANCELLED (rdma). ops and their dst must stay valid until done runs;
  // no dst is written once it has begun. done must not block (it runs where
  // other connections' completions wait) and is called with no lock of the
  // channel held.
  virtual void FetchVAsync(absl::Span<FetchOp> ops, absl::Duration timeout, FetchDone done) = 0;
  // FetchVAsync, waiting for done.
  void FetchV(absl::Span<FetchOp> ops, absl::Duration timeout) {
    auto n = std::make_shared<absl::Notification>();
    FetchVAsync(ops, timeout, [n] { n->Notify(); });
    n->WaitForNotification();
  }
  // Registers [addr, addr + len) (page-aligned) for fetches to land in
  // (FetchOp::area). UNIMPLEMENTED where the transport receives in place
  // anyway (tcp); FAILED_PRECONDITION where landing would not be safe (rdma
  // with pinned data buffers: a pinned registration keeps the pages a
  // punch removes from the cache file, docs/design.md).
  virtual absl::StatusOr<std::unique_ptr<LandingArea>> RegisterLanding(void* /*addr*/, size_t /*len*/,
                                                                       LandingUse /*use*/ = LandingUse::kFetches) {
    return absl::UnimplementedError("this transport receives in place");
  }
  virtual bool alive() const = 0;
  virtual void Close() = 0;
  virtual const char* path() const = 0;

  // Zero-copy path (capabilities().one_sided; the defaults say "not here").
  bool one_sided() const { return caps_.one_sided; }
  // Makes the region the exporter described at sequence seq readable with
  // ReadRegion. Ignored (false) when the channel already received an
  // invalidation of the export newer than seq other than a write: the
  // region may have been replaced since.
  virtual bool SetRegion(uint64_t /*export_id*/, const RemoteRegion& /*r*/, uint64_t /*seq*/) {
    return false;
  }
  // Reads dst.size() bytes at byte offset of the export with one-sided
  // READs, completed asynchronously: done runs exactly once, on the
  // transport's own thread (rdma: its completion thread) or on the
  // caller's when the read is refused at once, with no lock of the channel
  // held, and must not block. FAILED_PRECONDITION when the channel holds no
  // region for it (none set, or dropped by an invalidation: any kind but a
  // write drops it before the invalidation is delivered, and a read it
  // dropped midway fails with it); UNAVAILABLE as Fetch (the connection is
  // then closed). copied: the bytes the transport itself copied into dst
  // (rdma: what the READs landed in its receive slots). area: a
  // registration of this channel (RegisterLanding) that covers dst, or
  // null; when dst is whole pages inside it the READs land in dst itself
  // and nothing is copied. dst must stay valid until done runs; nothing
  // writes it after.
  virtual void ReadRegionAsync(uint64_t /*export_id*/, uint64_t /*offset*/, absl::Span<uint8_t> /*dst*/,
                               absl::Duration /*timeout*/, const LandingArea* /*area*/, ReadRegionDone done) {
    std::move(done)(absl::FailedPreconditionError("no zero-copy path on this channel"), 0);
  }
  // ReadRegionAsync, waiting for done.
  absl::Status ReadRegion(uint64_t export_id, uint64_t offset, absl::Span<uint8_t> dst, absl::Duration timeout,
                          uint64_t* copied = nullptr, const LandingArea* area = nullptr) {
    struct Result {
      absl::Notification n;
      absl::Status st;
      uint64_t copied = 0;
    };
    auto r = std::make_shared<Result>();
    ReadRegionAsync(export_id, offset, dst, timeout, area, [r](absl::Status st, uint64_t c) {
      r->st = std::move(st);
      r->copied = c;
      r->n.Notify();
    });
    r->n.WaitForNotification();
    if (copied != nullptr) *copied = r->copied;
    return r->st;
  }

 protected:
  explicit PeerChannel(Capabilities caps) : caps_(caps) {}

 private:
  const Capabilities caps_;
};

// Importer side: one piece of svmd's memory that reads land in (a client
// session's data area), registered for use on each channel it is read over
// (PeerChannel::RegisterLanding), so that the NIC writes into it and svmd
// copies nothing. Thread-safe. Destroy it only once nothing can land in the
// memory any more.
class LandingAreas {
 public:
  LandingAreas(void* base, size_t len, LandingUse use) : base_(base), len_(len), use_(use) {}
  LandingAreas(const LandingAreas&) = delete;
  LandingAreas& operator=(const LandingAreas&) = delete;
  // The memory's registration on ch, made on first use; null where ch
  // cannot land in it (tcp receives in place anyway; rdma refuses pinned
  // landing areas, or the device refused the registration). A refusal is
  // remembered for the channel: it is not asked again on every read. The
  // entries of channels that are gone are dropped here.
  const LandingArea* For(const std::shared_ptr<PeerChannel>& ch);

 private:
  struct Entry {
    std::weak_ptr<PeerChannel> ch;
    const PeerChannel* key = nullptr;
    std::unique_ptr<LandingArea> area;  // null: refused
  };
  void* const base_;
  const size_t len_;
  const LandingUse use_;
  absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

// What `svmctl status` shows about an RDMA transport's device.
struct DeviceStatus {
  std::string device;        // e.g. "rxe0"
  uint32_t port = 0;
  std::string port_state;    // live (ibv_query_port), as ibv_port_state_str(): "active", "down", ...
  std::string gid;           // the selected GID, printable, with its index and type
  uint32_t active_mtu = 0;   // bytes
  bool odp_rc_read = false;  // the device reports ODP for RC RDMA READ
  std::string odp_check;     // "passed", "not run" or "failed: WHY"
  std::string registration;  // what data buffers are registered as: "odp" or "pinned"
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  const Capabilities& capabilities() const { return caps_; }
  // Starts accepting data connections for exports served by backend.
  virtual absl::Status Start(const HostPort& listen, ExportBackend* backend) = 0;
  virtual std::string listen_address() const = 0;
  // Importer: the first step of a connection, before SetupData. Returns
  // opaque bytes for SetupDataRequest.importer_endpoint (rdma: the endpoint
  // of a queue pair created for this connection; tcp: empty). Each call must
  // be followed by Connect() with the same bytes; abandoned ones expire.
  // peer: the exporter it is for (its address); rdma puts every connection
  // to one exporter, and the landing areas registered on them, in a
  // protection domain of their own, which no other exporter reaches.
  virtual absl::StatusOr<std::string> BeginConnect(const std::string& /*peer*/ = "") {
    return std::string();
  }
  // Importer: gives up a BeginConnect() whose SetupData failed.
  virtual void AbortConnect(const std::string& /*begin*/) {}
  // Exporter: SetupData. Returns the endpoint and a one-time token for a
  // data connection from node. importer: the importer's BeginConnect() bytes.
  // slot (may be null): the connection's place under the per-peer bound,
  // kept as long as the connection's resources exist (ConnectionSlot);
  // dropped at once when this fails. protection: the peer's protection key
  // (see RemoteRegion): the connection reaches only the regions opened for
  // it.
  virtual absl::StatusOr<SessionOffer> PrepareSession(const std::string& node,
                                                      const std::string& importer = "",
                                                      std::unique_ptr<ConnectionSlot> slot = nullptr,
                                                      const std::string& protection = "") = 0;
  // Exporter: the connected importer that presented token, if any.
  virtual std::shared_ptr<Subscriber> FindSubscriber(const std::string& token) = 0;
  // Importer: opens the data connection the exporter on peer_host offered;
  // begin is what BeginConnect() returned for it. FAILED_PRECONDITION or
  // INVALID_ARGUMENT when offer.endpoint is not this transport's,
  // UNAVAILABLE when the exporter refuses the token or cannot be reached.
  virtual absl::StatusOr<std::unique_ptr<PeerChannel>> Connect(const std::string& peer_host,
                                                               const SessionOffer& offer,
                                                               ImportBackend* backend,
                                                               const std::string& begin = "") = 0;
  // Closes every connection and joins their threads.
  virtual void Stop() = 0;
  // Zero-copy path, exporter side: registers [addr, addr + len) of this
  // process (a shared mapping of the export's object) for remote READs.
  // UNIMPLEMENTED on transports without one-sided access
  // (!capabilities().one_sided).
  virtual absl::StatusOr<std::unique_ptr<RegisteredRegion>> RegisterRegion(void* /*addr*/,
                                                                           size_t /*len*/) {
    return absl::UnimplementedError("no zero-copy path on this transport");
  }

  // The RDMA device behind this transport, for `svmctl status`; nullopt for
  // transports without one (tcp). Queries the port's state live.
  virtual std::optional<DeviceStatus> device_status() const { return std::nullopt; }

 protected:
  explicit Transport(Capabilities caps) : caps_(caps) {}

 private:
  const Capabilities caps_;
};

std::unique_ptr<Transport> CreateTcpTransport();

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_TRANSPORT_H_
