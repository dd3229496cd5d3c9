// The exporter side: exports of local processes, their invalidation
// sequence, the importers subscribed to them, and the pages importers hold.
//
// Coherence bookkeeping per export:
//  - seq: incremented for every invalidation; a fetch reply carries the seq
//    sampled before the copy (the distributed read_begin/read_retry rule);
//  - served: the pages handed to importers that cache them, with a hash of
//    the content handed out. Sync (and, for sources that cannot see every
//    mapping change, a periodic scrub) compares the live content with it:
//    CPU stores fire no notifier, so this is how written pages are found.
//
// Zero-copy (with a transport that has one-sided access): an export whose
// range is a shared mapping of a file-like object gets that object mapped
// into svmd (source::SharedMapping) and registered for remote READs; its
// region travels in the export descriptor. Every invalidation other than a
// write re-validates it before the invalidation is sent: still the same
// object, then a pinned registration is replaced (ODP follows the pages by
// itself); otherwise it is withdrawn. The check and the re-pinning run on
// the zero-copy worker, never on the mirror source's thread: meanwhile the
// region is not offered (importers take the staged path). Importers drop a region on every such
// invalidation and acknowledge it only after their READs against it have
// completed; a replaced registration is released when every subscriber has
// acknowledged (or left): invalidate, drain, then retire (rule 5). A
// subscriber that holds one longer than the sync timeout is disconnected.
//
// LOCKING: mu_ guards the maps; ExportEntry::mu guards one export's state.
// Order: mu_ before ExportEntry::mu (Export's limit count, Scrub); never
// the reverse. ExportEntry::publish_mu (Invalidate: the local watchers get
// an export's events in sequence order; a comparison pass decides which
// pages to invalidate under it, CompareServed) before ExportEntry::mu and the
// WatchHub's lock. peers_mu_ (the peers' data connections) after mu_ and
// before ExportEntry::mu (Subscribe's count), and before a data
// connection's own lock (AdmitFetch reads PendingFetches() of the caller's
// peer's connections under peers_mu_ alone, so a fetch never waits for the
// table; no transport calls the backend under a connection's lock). Neither is held across a mirror-source read, a registration
// or a deregistration; ExportEntry::mu is held while invalidations are
// pushed to subscribers (PushInvalidation never blocks).
#ifndef SVM_DAEMON_CORE_EXPORT_TABLE_H_
#define SVM_DAEMON_CORE_EXPORT_TABLE_H_

#include <sys/types.h>

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/fd.h"
#include "daemon/core/counters.h"
#include "daemon/core/limits.h"
#include "daemon/coherence/coherence.h"
#include "daemon/core/watch_hub.h"
#include "daemon/source/mirror_source.h"
#include "daemon/source/shared_mapping.h"
#include "daemon/transport/transport.h"
#include "svm/v1/control.pb.h"
#include "svm/v1/peer.pb.h"

namespace svm::core {

struct ExportLimits {
  // Exports and bytes per uid, imports (subscriptions) per importing node
  // and pending fetches per data connection: the live values (SIGHUP
  // replaces them), shared with the daemon.
  std::shared_ptr<Limits> live = std::make_shared<Limits>();
  absl::Duration sync_timeout = absl::Seconds(5);
  uint64_t scrub_pages_per_pass = 4096;
  // Fault injection for tests: hold every fetch reply this long after the
  // copy, widening the window in which an invalidation can overtake it.
  absl::Duration fault_fetch_delay = absl::ZeroDuration();
  // Fault injection for tests: when positive, every subscription is
  // followed by an invalidation of the export's first page, and the
  // subscription's answer is held this long, so the invalidation reaches
  // the importer's data channel before the answer reaches its gRPC call.
  absl::Duration fault_subscribe_inval = absl::ZeroDuration();
};

class ExportTable final : public transport::ExportBackend {
 public:
  ExportTable(source::MirrorSource* source, WatchHub* hub, Counters* counters, ExportLimits limits,
              std::string path);
  ~ExportTable() override;

  // The caller checked the requester's right to the memory: either by the
  // ptrace rule, or range_fd is a svm_shim range fd of exactly this range
  // that the client attached (source::InspectRangeFd), mirrored through it
  // when AcceptsRangeFds(). allow: the peer identities that may import it
  // (empty: every authenticated peer). object: the object the client says
  // the range maps (a memfd), handed over beside range_fd: the zero-copy
  // path maps it, on the kernel's word through range_fd
  // (SharedMapping::OpenObject), instead of opening /proc/PID/map_files
  // (CAP_SYS_ADMIN); ignored without range_fd.
  absl::StatusOr<v1::ExportInfo> Export(const std::string& name, pid_t pid, uint64_t addr,
                                        uint64_t len, uid_t owner,
                                        std::vector<std::string> allow = {},
                                        UniqueFd range_fd = UniqueFd(), UniqueFd object = UniqueFd());
  // Whether Export mirrors through a client's range fd (the shim source).
  bool AcceptsRangeFds() const { return source_->AcceptsRangeFds(); }
  absl::Status Unexport(const std::string& name);
  std::vector<v1::ExportInfo> List() const;
  // Every export's traffic figures (the metrics endpoint); each pointer
  // keeps its export's entry alive, not the export.
  struct StatsRef {
    std::string name;
    std::shared_ptr<const ExportStats> stats;
  };
  std::vector<StatsRef> Stats() const;
  bool Has(const std::string& name) const;
  // Access lists: peer is the identities a peer proved (empty: none). An
  // export with a list is refused with PERMISSION_DENIED, revealing nothing
  // of it, unless one of them is on the list.
  absl::Status Allowed(const std::string& name, absl::Span<const std::string> peer) const;
  absl::StatusOr<v1::ExportDescriptor> Describe(const std::string& name,
                                                absl::Span<const std::string> peer = {}) const;
  // Adds an importer's data connection; returns the seq it starts from.
  // Grants the connection fetches of the export (ServeFetch). An id no
  // export has is refused as a peer not on the list is (PERMISSION_DENIED,
  // the same message), so ids cannot be probed.
  // RESOURCE_EXHAUSTED when the connection's peer already holds
  // --max-imports-per-peer subscriptions (over every export and every data
  // connection of it). The peer is who it proved to be (peer: its TLS
  // identities) when it proved anything, else the node name its data
  // connection declared (without TLS anyone can claim any name, so that
  // limit is per name, not per machine: docs/operations.md "Limits").
  absl::StatusOr<uint64_t> Subscribe(uint64_t export_id, std::shared_ptr<transport::Subscriber> sub,
                                     absl::Span<const std::string> peer = {});
  absl::StatusOr<v1::SyncResponse> Sync(const std::string& name);
  // Reads an export on the exporting node itself; returns the seq.
  absl::StatusOr<uint64_t> ReadLocal(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst);
  // One pass of content comparison for sources that need it; also
  // releases retired zero-copy registrations and retries withdrawn ones.
  void Scrub();
  // Offers the zero-copy path through t (its RegisterRegion) to exports
  // created from now on. Call before serving.
  void EnableZeroCopy(transport::Transport* t);

  // Serves only a connection that Subscribe()d to the export (a grant that
  // lasts until the connection closes). Anything else, and an id no export
  // has, gets the same PERMISSION_DENIED before the export is looked at
  // (its size, state or content); the first such refusal per connection is
  // logged.
  absl::StatusOr<uint64_t> ServeFetch(const transport::Subscriber& from, uint64_t export_id,
                                      uint64_t first_page, uint32_t npages, bool track,
                                      absl::Span<uint8_t> dst) override;
  // --max-pending-fetches-per-peer: pending (from's own) plus the
  // PendingFetches() of every other data connection of from's peer (the
  // key its first Subscribe recorded), summed under peers_mu_ over that
  // peer's connections only (at most --max-data-connections-per-peer). A
  // connection that subscribed to nothing counts alone (its fetches are
  // refused anyway).
  absl::Status AdmitFetch(const transport::Subscriber& from, uint64_t pending) override;
  void OnAck(uint64_t subscriber_id, uint64_t export_id, uint64_t seq) override;
  void OnSubscriberClosed(uint64_t subscriber_id) override;
  // Sends a heartbeat to every subscriber (once per connection): it renews
  // their leases (coherence.h). Never blocks.
  void Heartbeat();

 private:
  struct ExportEntry;
  std::shared_ptr<ExportEntry> Find(const std::string& name) const;
  std::shared_ptr<ExportEntry> FindId(uint64_t id) const;
  // Invalidates pages at every subscriber and local watcher.
  void Invalidate(ExportEntry& e, const source::Change& c);
  // The same, for a caller that holds e.publish_mu.
  void InvalidatePublishing(ExportEntry& e, const source::Change& c)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(e.publish_mu);
  // Compares the live content of served pages with what was handed out;
  // invalidates the changed ones (and the unreadable ones if asked) that
  // are still served as sampled: a change another pass invalidated
  // meanwhile is not invalidated again. Returns how many it invalidated.
  uint64_t CompareServed(ExportEntry& e, const std::vector<std::pair<uint64_t, uint64_t>>& pages,
                         bool unreadable_changed);
  // with_mapped: also the bytes mapped by page size (a SNAPSHOT of the
  // whole range: ListExports only).
  v1::ExportInfo InfoOf(ExportEntry& e, bool with_mapped = false) const;
  // Maps and registers the export's object when it is shareable; installs
  // it unless the export changed meanwhile.
  void TryZeroCopy(ExportEntry& e);
  absl::StatusOr<std::unique_ptr<source::SharedMapping>> OpenShared(ExportEntry& e, bool writable);
  struct ZeroCopy;
  enum class ZcState;
  // Re-validation (ODP) and re-pinning after an invalidation, on the
  // zero-copy worker thread (never the mirror source's).
  void QueueZeroCopyWork(ExportEntry& e);
  void ZeroCopyWorker();
  void Revalidate(ExportEntry& e);
  // Keeps a replaced or withdrawn registration until every subscriber has
  // acknowledged the invalidation at_seq that replaced it (rule 5).
  void Retire(ExportEntry& e, std::unique_ptr<ZeroCopy> z, uint64_t at_seq)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(e.mu);
  // Retired registrations that may be released now; the caller destroys
  // them outside e.mu.
  std::vector<std::unique_ptr<ZeroCopy>> TakeReleasable(ExportEntry& e)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(e.mu);
  // Invalidates pages (sorted) in runs of consecutive pages.
  void InvalidateRuns(ExportEntry& e, const std::vector<uint64_t>& pages, source::ChangeKind kind,
                      uint64_t detected_ns) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e.publish_mu);
  // By id, also exports withdrawn but still draining retired registrations.
  std::shared_ptr<ExportEntry> FindDraining(uint64_t id) const;

  source::MirrorSource* const source_;
  WatchHub* const hub_;
  Counters* const counters_;
  const ExportLimits limits_;
  const std::string path_;
  std::atomic<transport::Transport*> zero_copy_{nullptr};

  absl::Mutex work_mu_;  // guards work_ and stop_work_; taken alone or under ExportEntry::mu
  std::deque<uint64_t> work_ ABSL_GUARDED_BY(work_mu_);  // export ids to revalidate
  bool stop_work_ ABSL_GUARDED_BY(work_mu_) = false;
  std::thread worker_;  // started by EnableZeroCopy

  mutable absl::Mutex mu_;  // guards the maps; never held across a source call
  std::map<std::string, std::shared_ptr<ExportEntry>> by_name_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<ExportEntry>> by_id_ ABSL_GUARDED_BY(mu_);
  // Withdrawn exports whose retired registrations are not released yet.
  std::map<uint64_t, std::shared_ptr<ExportEntry>> draining_ ABSL_GUARDED_BY(mu_);
  // (subscriber, export id): what Subscribe granted a data connection,
  // until it closes (OnSubscriberClosed). Outlives the export, so that a
  // subscriber learns of a withdrawal (NOT_FOUND) and nobody else does.
  std::set<std::pair<uint64_t, uint64_t>> grants_ ABSL_GUARDED_BY(mu_);
  // The peer each subscribed data connection counts under (PeerKey: "peer
  // ID" or "node NAME"), set by its first Subscribe, until it closes; and
  // by key, the connections, for the per-peer sum of pending fetches
  // (AdmitFetch walks one peer's connections).
  absl::Mutex peers_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::map<uint64_t, std::string> peer_of_ ABSL_GUARDED_BY(peers_mu_);
  std::map<std::string, std::map<uint64_t, std::weak_ptr<transport::Subscriber>>> by_peer_
      ABSL_GUARDED_BY(peers_mu_);
  // Connections whose refused fetch was logged (once each, until they close).
  std::set<uint64_t> refusals_logged_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_EXPORT_TABLE_H_
