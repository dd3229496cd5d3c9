// The coherence core: the rules of the mirror contract (docs/design.md,
// "The mirror contract") as pure state machines. No I/O, no threads, no
// locks, no clock of its own (time is passed in): the export and import
// tables own one of these per export or import, call it under their own
// lock, and do what it answers. Everything that decides whether a cached
// page may exist lives here, so it can be tested exhaustively against a
// reference model (tests/unit/coherence_model_test.cc).
//
// One sequence space per export: the exporter's sequence is advanced by
// every invalidation the export sends (mapping changes reported by the
// mirror source, content changes found by comparison, exit, unexport). The
// shim's own notifier sequence is not carried over the wire: the shim
// source turns each notifier event into exactly one Invalidate() here, so
// the export sequence counts the shim's events (plus the daemon's own
// content and lifecycle invalidations) and is the only sequence importers
// see.
#ifndef SVM_DAEMON_COHERENCE_COHERENCE_H_
#define SVM_DAEMON_COHERENCE_COHERENCE_H_

#include <cstdint>
#include <map>
#include <set>
#include <vector>

#include "absl/time/time.h"
#include "absl/types/span.h"

namespace svm::coherence {

// ---------------------------------------------------------------------------
// Exporter side: one per export.
//
// Rules enforced:
//  - sequence: every invalidation advances it; a fetch reply carries the
//    value sampled before the copy (BeginServe), which is what importers
//    compare (rule 4);
//  - served versions: per page, the version (content hash) handed to caching
//    importers, whichever importer it went to. Serving a page whose content
//    differs from the version last served is proof of a change no notifier
//    reported: RecordServed returns such pages and the caller invalidates
//    them (every holder of the old version drops it);
//  - subscriptions: an importer is live for invalidations from Subscribe on;
//    its acknowledgements drive Sync and retirement;
//  - retirement (rule 5): a resource replaced by an invalidation at sequence
//    q is released only when every subscriber that held it has acknowledged
//    q (acknowledging means: invalidation applied and accesses issued before
//    it finished) or has left.
class ExportCoherence {
 public:
  uint64_t seq() const { return seq_; }

  // --- invalidation -------------------------------------------------------
  // Pages [first, first + n) changed: advances the sequence, forgets their
  // served versions. Returns the new sequence (the invalidation's).
  uint64_t Invalidate(uint64_t first, uint64_t n);

  // --- serving ------------------------------------------------------------
  // Sampled before a fetch copies pages: the reply's sequence.
  uint64_t BeginServe() const { return seq_; }
  // After the copy, for an importer that caches the pages: versions[i] is
  // the version of page first + i as copied, served_at what BeginServe
  // returned. Nothing is recorded when an invalidation happened since
  // served_at: the importer receives it before the reply and will not
  // install the pages. Otherwise returns the pages whose version differs
  // from the one last served (the caller must Invalidate them; they are not
  // recorded) and records the rest.
  std::vector<uint64_t> RecordServed(uint64_t first, absl::Span<const uint64_t> versions,
                                     uint64_t served_at);
  // Up to max served pages (page, version) from cursor on, wrapping; for
  // comparison passes. Advances cursor.
  std::vector<std::pair<uint64_t, uint64_t>> ServedBatch(uint64_t* cursor, size_t max) const;
  std::vector<std::pair<uint64_t, uint64_t>> AllServed() const {
    return {served_.begin(), served_.end()};
  }
  // Of (page, version) pairs a comparison pass sampled (ServedBatch,
  // AllServed) and found changed, the pages still served at that version:
  // those the pass must invalidate. The others were invalidated since the
  // sample (by another pass, a notifier), or served again at a version of
  // their own, which the next pass compares: two passes at once (Sync and
  // the scrubber) thus invalidate one change once.
  std::vector<uint64_t> StillServed(absl::Span<const std::pair<uint64_t, uint64_t>> sampled) const;
  size_t served_pages() const { return served_.size(); }

  // --- subscribers --------------------------------------------------------
  // Live for invalidations from now on; returns the sequence it starts at.
  uint64_t Subscribe(uint64_t sub);
  // Left (disconnected, or closed for not acknowledging): it holds nothing.
  void Unsubscribe(uint64_t sub);
  void OnAck(uint64_t sub, uint64_t seq);
  bool subscribed(uint64_t sub) const { return subs_.count(sub) != 0; }
  size_t subscribers() const { return subs_.size(); }
  // Subscribers that have not acknowledged target yet.
  std::vector<uint64_t> Laggards(uint64_t target) const;

  // --- retirement (rule 5) ------------------------------------------------
  // Resource `id` was replaced by the invalidation at sequence at_seq (the
  // one returned by the Invalidate that replaced it). It becomes releasable
  // when every subscriber of that moment has acknowledged at_seq or left.
  void Retire(uint64_t id, uint64_t at_seq, absl::Time now);
  // Ids that may be released now (removed from the retired set).
  std::vector<uint64_t> TakeReleasable();
  // Subscribers holding a retirement older than deadline (now - patience):
  // they stopped acknowledging; the caller closes them (which releases).
  std::vector<uint64_t> RetirementLaggards(absl::Time deadline) const;
  size_t retired() const { return retired_.size(); }

 private:
  struct Retired {
    uint64_t id, at_seq;
    absl::Time since;
    std::set<uint64_t> holders;  // subscribers that still have to acknowledge
  };
  void Settle();

  uint64_t seq_ = 0;
  std::map<uint64_t, uint64_t> served_;  // page -> version last served
  std::map<uint64_t, uint64_t> subs_;    // subscriber -> highest acknowledged seq
  std::vector<Retired> retired_;
};

// ---------------------------------------------------------------------------
// Importer side: one per import.
//
// States (an import's whole life):
enum class ImportState {
  // No subscription: nothing cached, nothing installs. Reads attach first.
  kDetached,
  // A subscription was sent on a data channel but not acknowledged yet.
  // Invalidations of the export that arrive on that channel are applied
  // (counted, published) from this instant: the exporter may push one
  // before its acknowledgement reaches us.
  kSubscribing,
  // Subscribed: fetched pages may be installed (under the install rule).
  kLive,
  // The export is gone (process exited, withdrawn): nothing installs;
  // reattached by name on the next read.
  kGone,
};
const char* ImportStateName(ImportState s);

// A fetch in flight: taken before it is issued, checked before install.
struct FetchTicket {
  uint64_t epoch = 0;
};

class ImportCoherence {
 public:
  ImportState state() const { return state_; }
  uint64_t epoch() const { return epoch_; }
  // Highest invalidation sequence received in this subscription.
  uint64_t max_seq() const { return max_seq_; }
  uint64_t invalidations() const { return invalidations_; }

  // A (re)subscription starts: everything cached before is void (the caller
  // drops it), every fetch issued before can no longer install. Returns the
  // subscription's epoch.
  uint64_t BeginSubscribe();
  // The exporter acknowledged the subscription at sequence seq. False when
  // another subscription (or a disconnect) overtook this one.
  bool CompleteSubscribe(uint64_t epoch, uint64_t seq);
  // An invalidation of the export arrived on the subscription's channel.
  // Returns whether it applies (the caller drops the pages, counts and
  // publishes it): always while subscribing, live or gone (still on its
  // channel). terminal: exit or unexport (the import becomes kGone).
  bool OnInvalidation(uint64_t seq, bool terminal);
  // The channel was lost: invalidations may be lost with it.
  void OnDisconnect();
  // A fetch answered that the export is gone.
  void MarkGone();

  // The lease (rule 6): cached pages may be served only while the exporter
  // was heard from recently. The exporter gives up on an importer that
  // does not acknowledge an invalidation within its sync timeout; an
  // importer that was stalled that long (stopped, partitioned) may not know
  // it was dropped, and must not serve its cache until it hears from the
  // exporter again. Anything received on the subscription's channel (an
  // invalidation, a heartbeat, the subscription's answer) renews it:
  // frames are ordered, so every invalidation sent before it was applied.
  // The lease must be shorter than the exporter's sync timeout.
  void Renew(int64_t now_ns, int64_t lease_ns) { lease_until_ns_ = now_ns + lease_ns; }
  int64_t lease_until_ns() const { return lease_until_ns_; }
  bool CacheUsable(int64_t now_ns) const {
    return state_ == ImportState::kLive && now_ns < lease_until_ns_;
  }

  FetchTicket BeginFetch() const { return FetchTicket{epoch_}; }
  // The install rule (rule 4): pages fetched under ticket, answered with
  // the exporter's sequence reply_seq, may be installed only if the same
  // subscription is live and no invalidation newer than reply_seq has been
  // received in it.
  bool MayInstall(const FetchTicket& t, uint64_t reply_seq) const {
    return state_ == ImportState::kLive && t.epoch == epoch_ && max_seq_ <= reply_seq;
  }

 private:
  ImportState state_ = ImportState::kDetached;
  uint64_t epoch_ = 0;
  uint64_t max_seq_ = 0;
  uint64_t invalidations_ = 0;
  int64_t lease_until_ns_ = 0;
};

// ---------------------------------------------------------------------------
// Zero-copy region, importer side: the exporter's registered region that
// one-sided READs target, with the epoch that rule 5 drains.
//
// An invalidation that can move pages (any kind but a write) drops the
// region; the importer acknowledges that invalidation only when every READ
// issued against the dropped region has completed, so the exporter may then
// deregister it (ExportCoherence::Retire).
enum class RegionState {
  kNone,     // no region offered, or dropped and not asked for again yet
  kUsable,   // set from a descriptor at least as new as every invalidation seen
};

class ZeroCopyRegionState {
 public:
  RegionState state() const { return state_; }
  uint64_t epoch() const { return epoch_; }
  // A descriptor described at sequence seq: usable unless an invalidation
  // that drops regions and is newer than seq arrived since. Returns whether
  // it was taken.
  bool Offer(uint64_t seq);
  // A READ against the current region starts: returns its epoch (the
  // caller passes it to EndRead). Only valid in kUsable.
  uint64_t BeginRead();
  void EndRead(uint64_t epoch);
  // An invalidation at seq that drops regions (not a write): the region is
  // dropped now; returns the epoch whose READs must drain before the
  // invalidation may be acknowledged.
  uint64_t Drop(uint64_t seq);
  // READs still in flight against epochs up to and including epoch.
  bool Drained(uint64_t epoch) const;

 private:
  RegionState state_ = RegionState::kNone;
  uint64_t epoch_ = 0;      // of the current (or last) region
  uint64_t dropped_at_ = 0; // sequence of the last dropping invalidation
  std::map<uint64_t, uint64_t> in_flight_;  // epoch -> READs in flight
};

}  // namespace svm::coherence

#endif  // SVM_DAEMON_COHERENCE_COHERENCE_H_
