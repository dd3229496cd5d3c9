#include "daemon/core/export_table.h"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/algorithm/container.h"
#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/check.h"
#include "common/log.h"
#include "common/random.h"
#include "daemon/service/requests.h"
#include "daemon/source/shared_mapping.h"

namespace svm::core {

using source::Change;
using source::ChangeKind;
using service::CheckAllowed;  // the access-list rule (daemon/service/requests.h)
using source::kPageSize;

namespace {

uint64_t HashPage(const uint8_t* p) {
  return absl::HashOf(std::string_view(reinterpret_cast<const char*>(p), kPageSize));
}

// A withdrawn zero-copy export is tried again at most this often, and
// only after the source reported a change of the exporter's mapping.
constexpr absl::Duration kZeroCopyRetry = absl::Seconds(1);

// Why a pinned registration never covers DAX memory (SharedMapping::dax).
constexpr char kDaxPinRule[] =
    "the kernel refuses FOLL_LONGTERM pins of fsdax, and device-dax frees its pages at unbind "
    "without waiting for pins; only an ODP registration may cover it";

// The refusals of a data connection's request for an export it may not
// have: one answer whether the id exists or not, naming nothing of it.
absl::Status FetchRefused() {
  return absl::PermissionDeniedError(
      "fetch refused: this data connection holds no subscription to that export");
}
absl::Status SubscribeRefused() {
  return absl::PermissionDeniedError(
      "no export with this id is served to this peer (unknown, or the peer is not on its access "
      "list)");
}

UniqueFd DupFd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

// A change that may mean the range maps something else now (a CPU write
// does not).
bool MappingMayHaveChanged(ChangeKind k) { return k != ChangeKind::kWrite; }

}  // namespace

// The exporter's zero-copy region of one export (ExportEntry::zc_state).
enum class ExportTable::ZcState {
  // No region: the range is not shareable, or the region was withdrawn
  // (zc_reason says why). A withdrawn region (zc_retry) is tried again only
  // after the source reports a change of the exporter's mapping
  // (zc_changed), at most every kZeroCopyRetry: like a CPU access, svmd
  // never re-opens an object on its own after it was withdrawn (its device
  // may be gone).
  kNone,
  // Registered and valid: offered in the export's descriptor.
  kUsable,
  // ODP: an invalidation may have changed what the range maps; the worker
  // checks it and offers it again, or withdraws it.
  kValidating,
  // Pinned: the old registration was retired at an invalidation; the
  // worker checks the mapping and registers it again.
  kRepinning,
};

struct ExportTable::ZeroCopy {
  std::shared_ptr<source::SharedMapping> mapping;  // outlives the registration
  // Shared: Describe registers a peer's view of it (RemoteFor) outside the
  // entry's lock.
  std::shared_ptr<transport::RegisteredRegion> region;
};

struct ExportTable::ExportEntry {
  // Random, never 0 (kHeartbeatExportId): a fetch names the export by it,
  // and only DescribeExport, behind the access list, reveals it.
  uint64_t id = 0;
  std::string name;
  std::vector<std::string> allow;  // peer identities; empty: any peer
  // The deposited object and a duplicate of the range fd the kernel checks
  // it against (SharedMapping::OpenObject); both invalid without a deposit.
  UniqueFd object, object_range;
  pid_t pid = 0;
  uint64_t addr = 0, len = 0, npages = 0;
  uid_t owner = 0;
  bool scrub = false;
  ExportStats stats;  // relaxed atomics, no lock

  // Held by Invalidate from before it takes mu (where the sequence number
  // is assigned and pushed to subscribers) until the local watchers have
  // the event: they see the export's invalidations in sequence order, as
  // the subscribers' connections do, whatever threads raise them.
  absl::Mutex publish_mu ABSL_ACQUIRED_BEFORE(mu);
  absl::Mutex mu;  // guards everything below
  std::shared_ptr<source::MirrorRange> range ABSL_GUARDED_BY(mu);
  // Sequence, served versions, acknowledgements, retirement: the rules.
  coherence::ExportCoherence coh ABSL_GUARDED_BY(mu);
  bool gone ABSL_GUARDED_BY(mu) = false;     // process exited
  bool removed ABSL_GUARDED_BY(mu) = false;  // unexported
  uint64_t scrub_cursor ABSL_GUARDED_BY(mu) = 0;
  std::map<uint64_t, std::shared_ptr<transport::Subscriber>> subs ABSL_GUARDED_BY(mu);
  // Zero-copy: the registration importers READ, when there is one.
  std::unique_ptr<ZeroCopy> zc ABSL_GUARDED_BY(mu);
  ZcState zc_state ABSL_GUARDED_BY(mu) = ZcState::kNone;
  // kRepinning: the mapping to register again.
  std::shared_ptr<source::SharedMapping> zc_repin ABSL_GUARDED_BY(mu);
  // Replaced registrations by retirement id, released when every
  // subscriber has acknowledged the invalidation that replaced them (rule 5).
  std::map<uint64_t, std::unique_ptr<ZeroCopy>> retired ABSL_GUARDED_BY(mu);
  uint64_t next_retire_id ABSL_GUARDED_BY(mu) = 1;
  std::string zc_reason ABSL_GUARDED_BY(mu);   // why there is none
  bool zc_retry ABSL_GUARDED_BY(mu) = false;    // withdrawn: try again after a change
  bool zc_changed ABSL_GUARDED_BY(mu) = false;  // the mapping changed since the last try
  absl::Time zc_retry_at ABSL_GUARDED_BY(mu);   // not before
};

ExportTable::ExportTable(source::MirrorSource* source, WatchHub* hub, Counters* counters,
                         ExportLimits limits, std::string path)
    : source_(source), hub_(hub), counters_(counters), limits_(limits), path_(std::move(path)) {}

void ExportTable::EnableZeroCopy(transport::Transport* t) {
  zero_copy_ = t;
  if (!worker_.joinable()) worker_ = std::thread([this] { ZeroCopyWorker(); });
}

ExportTable::~ExportTable() {
  {
    absl::MutexLock l(&work_mu_);
    stop_work_ = true;
  }
  if (worker_.joinable()) worker_.join();
  std::vector<std::shared_ptr<ExportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, e] : by_name_) all.push_back(e);
    by_name_.clear();
    by_id_.clear();
  }
  for (auto& e : all) {
    std::shared_ptr<source::MirrorRange> r;
    absl::MutexLock l(&e->mu);
    r = std::move(e->range);
  }
}

std::shared_ptr<ExportTable::ExportEntry> ExportTable::Find(const std::string& name) const {
  absl::MutexLock l(&mu_);
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::shared_ptr<ExportTable::ExportEntry> ExportTable::FindId(uint64_t id) const {
  absl::MutexLock l(&mu_);
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

std::shared_ptr<ExportTable::ExportEntry> ExportTable::FindDraining(uint64_t id) const {
  absl::MutexLock l(&mu_);
  if (auto it = by_id_.find(id); it != by_id_.end()) return it->second;
  auto it = draining_.find(id);
  return it == draining_.end() ? nullptr : it->second;
}

bool ExportTable::Has(const std::string& name) const { return Find(name) != nullptr; }

v1::ExportInfo ExportTable::InfoOf(ExportEntry& e, bool with_mapped) const {
  v1::ExportInfo i;
  if (with_mapped) {
    std::shared_ptr<source::MirrorRange> range;
    {
      absl::MutexLock l(&e.mu);
      range = e.range;
    }
    // Outside e.mu: a SNAPSHOT walks the process's page tables.
    if (range != nullptr) {
      if (auto m = range->MappedPageSizes(); m.ok()) {
        for (const auto& [size, bytes] : *m) {
          v1::PageSizeBytes* p = i.add_mapped();
          p->set_page_size(size);
          p->set_bytes(bytes);
        }
      }
    }
  }
  i.set_name(e.name);
  i.set_pid(e.pid);
  i.set_addr(e.addr);
  i.set_len(e.len);
  i.set_page_size(kPageSize);
  i.set_source(std::string(source_->name()));
  i.set_path(path_);
  absl::MutexLock l(&e.mu);
  if (e.zc && e.zc_state == ZcState::kUsable) {
    i.set_path(absl::StrCat(e.zc->region->remote().odp ? "zero-copy/odp," : "zero-copy/pinned,",
                            i.path()));
    i.set_zero_copy_page_size(e.zc->mapping->page_size());
  }
  i.set_seq(e.coh.seq());
  for (const std::string& a : e.allow) i.add_allow(a);
  i.set_subscribers(static_cast<uint32_t>(e.subs.size()));
  i.set_gone(e.gone);
  return i;
}

absl::StatusOr<v1::ExportInfo> ExportTable::Export(const std::string& name, pid_t pid,
                                                   uint64_t addr, uint64_t len, uid_t owner,
                                                   std::vector<std::string> allow,
                                                   UniqueFd range_fd, UniqueFd object) {
  std::shared_ptr<struct ExportEntry> replaced;
  {
    absl::MutexLock l(&mu_);
    uint32_t count = 0;
    uint64_t bytes = 0;
    for (auto& [n, e] : by_name_) {
      if (e->owner != owner) continue;
      absl::MutexLock el(&e->mu);
      if (e->gone) continue;  // its process exited: it holds nothing any more
      ++count;
      bytes += e->len;
    }
    Limits& lim = *limits_.live;
    const uint64_t max_count = lim.Get(Limit::kExportsPerClient);
    const uint64_t max_bytes = lim.Get(Limit::kExportBytesPerClient);
    const std::string who = absl::StrCat("uid ", owner);
    if (count >= max_count) {
      return lim.Refuse(Limit::kExportsPerClient, who,
                        absl::StrFormat("already has %u exports", count), max_count);
    }
    if (bytes + len > max_bytes || bytes + len < bytes) {
      return lim.Refuse(Limit::kExportBytesPerClient, who,
                        absl::StrFormat("would export %u bytes more than its %u", len, bytes),
                        max_bytes);
    }
    auto it = by_name_.find(name);
    if (it != by_name_.end()) {
      absl::MutexLock el(&it->second->mu);
      if (!it->second->gone) {
        return absl::AlreadyExistsError(absl::StrCat("an export named '", name, "' exists"));
      }
      replaced = it->second;  // the process behind it exited: the name is free again
    }
  }
  auto e = std::make_shared<struct ExportEntry>();
  e->name = name;
  e->pid = pid;
  e->addr = addr;
  e->len = len;
  e->npages = len / kPageSize;
  e->owner = owner;
  e->allow = std::move(allow);
  if (object.valid() && range_fd.valid()) {
    e->object_range = DupFd(range_fd.get());
    if (e->object_range.valid()) e->object = std::move(object);
  }
  std::weak_ptr<struct ExportEntry> weak = e;
  source::ChangeSink sink = [this, weak](const Change& c) {
    if (auto ex = weak.lock()) Invalidate(*ex, c);
  };
  auto range = range_fd.valid() ? source_->Adopt(std::move(range_fd), pid, addr, len, std::move(sink))
                                : source_->Attach(pid, addr, len, std::move(sink));
  if (!range.ok()) return range.status();
  e->scrub = (*range)->NeedsScrub();
  {
    absl::MutexLock l(&e->mu);
    e->range = std::move(*range);
  }
  {
    absl::MutexLock l(&mu_);
    auto it = by_name_.find(name);
    if (it != by_name_.end() && it->second != replaced) {
      return absl::AlreadyExistsError(absl::StrCat("an export named '", name, "' exists"));
    }
    if (replaced) {
      by_id_.erase(replaced->id);
      draining_[replaced->id] = replaced;  // until its retired registrations are released
    }
    // Ids from an earlier run of this daemon, and withdrawn ones, must not
    // name new exports.
    do {
      e->id = RandomU64();
    } while (e->id == transport::kHeartbeatExportId || by_id_.contains(e->id) ||
             draining_.contains(e->id));
    by_name_[name] = e;
    by_id_[e->id] = e;
  }
  if (replaced) {
    std::shared_ptr<source::MirrorRange> old_range;
    {
      absl::MutexLock l(&replaced->mu);
      replaced->removed = true;
      old_range = std::move(replaced->range);
    }
    old_range.reset();  // detaches, outside every lock
  }
  counters_->Add("exports_created");
  spdlog::info("exported '{}': pid {} 0x{:x}+0x{:x} ({} pages, {})", name, pid, addr, len,
               e->npages, source_->name());
  TryZeroCopy(*e);
  return InfoOf(*e);
}

absl::Status ExportTable::Unexport(const std::string& name) {
  std::shared_ptr<struct ExportEntry> e;
  {
    absl::MutexLock l(&mu_);
    auto it = by_name_.find(name);
    if (it == by_name_.end()) return absl::NotFoundError(absl::StrCat("no export named '", name, "'"));
    e = it->second;
    by_name_.erase(it);
    by_id_.erase(e->id);
    draining_[e->id] = e;  // until its retired registrations are released
  }
  Invalidate(*e, Change{0, e->npages, ChangeKind::kUnexport, source::MonotonicNs()});
  std::shared_ptr<source::MirrorRange> range;
  {
    absl::MutexLock l(&e->mu);
    e->removed = true;
    range = std::move(e->range);
  }
  range.reset();  // detaches (outside every lock: the source may wait for its poller)
  spdlog::info("unexported '{}'", name);
  return absl::OkStatus();
}

std::vector<v1::ExportInfo> ExportTable::List() const {
  std::vector<std::shared_ptr<struct ExportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [n, e] : by_name_) all.push_back(e);
  }
  std::vector<v1::ExportInfo> out;
  for (auto& e : all) out.push_back(InfoOf(*e, /*with_mapped=*/true));
  return out;
}

std::vector<ExportTable::StatsRef> ExportTable::Stats() const {
  absl::MutexLock l(&mu_);
  std::vector<StatsRef> out;
  for (const auto& [n, e] : by_name_) out.push_back({n, std::shared_ptr<const ExportStats>(e, &e->stats)});
  return out;
}

absl::Status ExportTable::Allowed(const std::string& name, absl::Span<const std::string> peer) const {
  auto e = Find(name);
  if (!e) return absl::NotFoundError(absl::StrCat("no export named '", name, "'"));
  return CheckAllowed(e->allow, peer);
}

absl::StatusOr<v1::ExportDescriptor> ExportTable::Describe(const std::string& name,
                                                           absl::Span<const std::string> peer) const {
  auto e = Find(name);
  if (!e) return absl::NotFoundError(absl::StrCat("no export named '", name, "'"));
  if (auto st = CheckAllowed(e->allow, peer); !st.ok()) return st;
  v1::ExportDescriptor d;
  d.set_export_id(e->id);
  d.set_name(e->name);
  d.set_len(e->len);
  d.set_page_size(kPageSize);
  d.set_path(path_);
  // The region and the mapping it covers, kept while the peer's
  // registration is made (it may pin pages: not under the entry's lock).
  // A region retired meanwhile is harmless: the descriptor's seq is older
  // than the invalidation that retired it, so the importer drops it.
  std::shared_ptr<transport::RegisteredRegion> region;
  std::shared_ptr<source::SharedMapping> mapping;
  {
    absl::MutexLock l(&e->mu);
    if (e->gone) return absl::FailedPreconditionError(absl::StrCat("export '", name, "' gone: the exporting process exited"));
    d.set_seq(e->coh.seq());
    if (e->zc && e->zc_state == ZcState::kUsable) {
      region = e->zc->region;
      mapping = e->zc->mapping;
    }
  }
  if (region) {
    // Only this peer's queue pairs can READ through the rkey it gets.
    auto r = region->RemoteFor(transport::ProtectionKey(peer));
    if (r.ok()) {
      d.mutable_zero_copy()->set_addr(r->addr);
      d.mutable_zero_copy()->set_rkey(r->rkey);
      d.mutable_zero_copy()->set_registration(r->odp ? "odp" : "pinned");
    } else {
      counters_->Add("zero_copy_peer_registration_failures");
      spdlog::warn("export '{}': no zero-copy path for peer '{}' (it uses the staged path): {}", name,
                   absl::StrJoin(peer, ","), r.status().message());
    }
  }
  return d;
}

// The object the client deposited, on the kernel's word (no capability
// needed); else the one /proc/PID/map_files names (CAP_SYS_ADMIN), for
// operator exports and a client that remapped its range since.
absl::StatusOr<std::unique_ptr<source::SharedMapping>> ExportTable::OpenShared(ExportEntry& e,
                                                                            bool writable) {
  absl::Status deposited;
  if (e.object.valid()) {
    UniqueFd object = DupFd(e.object.get()), range = DupFd(e.object_range.get());
    if (!object.valid() || !range.valid()) return absl::ErrnoToStatus(errno, "dup the deposited object");
    auto m = source::SharedMapping::OpenObject(std::move(object), std::move(range), e.len, writable);
    if (m.ok()) return m;
    deposited = m.status();
  }
  auto m = source::SharedMapping::Open(e.pid, e.addr, e.len, writable);
  if (!m.ok() && !deposited.ok()) return deposited;
  return m;
}

void ExportTable::TryZeroCopy(ExportEntry& e) {
  transport::Transport* t = zero_copy_.load();
  if (t == nullptr) return;
  uint64_t seq;
  {
    absl::MutexLock l(&e.mu);
    if (e.gone || e.removed || e.zc_state != ZcState::kNone) return;
    seq = e.coh.seq();
    e.zc_changed = false;  // a change from now on is seen by the next try
  }
  // Mapping and (pinned) registration can take a while: no lock held.
  auto z = std::make_unique<ZeroCopy>();
  absl::Status st;
  bool shareable = false;
  // Read-only first; kernels before 6.2 pin read-only registrations as
  // forced writes (EFAULT on a read-only shared mapping): then writable.
  for (bool writable : {false, true}) {
    auto m = OpenShared(e, writable);
    if (!m.ok()) {
      if (!writable) st = m.status();  // else: keep the registration's error
      break;
    }
    shareable = true;
    z->mapping = std::move(*m);
    auto r = t->RegisterRegion(z->mapping->data(), e.len);
    if (r.ok() && !(*r)->remote().odp && z->mapping->dax()) {
      // Released at once, while the device is certainly still there.
      r->reset();
      st = absl::FailedPreconditionError(absl::StrCat(
          z->mapping->object(), " is DAX memory, which must not be pinned long-term: ", kDaxPinRule));
      z->mapping.reset();
      break;
    }
    if (r.ok()) {
      z->region = std::move(*r);
      st = absl::OkStatus();
      break;
    }
    if (z->mapping->dax()) {
      st = absl::FailedPreconditionError(absl::StrCat(
          z->mapping->object(), " is DAX memory, which must not be pinned long-term (a pinned "
          "registration failed: ", r.status().message(), "): ", kDaxPinRule));
      z->mapping.reset();
      break;
    }
    st = r.status();
    z->mapping.reset();
    if (!absl::StrContains(st.message(), std::strerror(EFAULT))) break;
  }
  counters_->Add("zero_copy_opens");
  absl::MutexLock l(&e.mu);
  if (!st.ok()) {
    if (e.zc_reason != st.message()) {
      spdlog::info("export '{}': no zero-copy path ({}); importers use the staged path", e.name,
                   st.message());
    }
    e.zc_reason = std::string(st.message());
    // A registration that failed (memory limits) is not retried every
    // second; an object that is not (yet) usable again is.
    e.zc_retry = e.zc_retry && !shareable;
    e.zc_retry_at = absl::Now() + kZeroCopyRetry;
    return;
  }
  if (e.gone || e.removed || e.coh.seq() != seq) {
    e.zc_retry = true;  // changed meanwhile (zc_changed is set): validate again later
    e.zc_retry_at = absl::Now();
    return;
  }
  const transport::RemoteRegion r = z->region->remote();
  spdlog::info("export '{}': zero-copy path, {} ({} bytes in pages of {}) registered {} (each peer "
               "identity reads a registration of its own)",
               e.name, z->mapping->object(), e.len, z->mapping->page_size(), r.odp ? "odp" : "pinned");
  counters_->Add("zero_copy_registrations");
  e.zc = std::move(z);
  e.zc_state = ZcState::kUsable;
  e.zc_reason.clear();
  e.zc_retry = false;
}

void ExportTable::Retire(ExportEntry& e, std::unique_ptr<ZeroCopy> z, uint64_t at_seq) {
  if (!z) return;
  const uint64_t id = e.next_retire_id++;
  e.retired[id] = std::move(z);
  e.coh.Retire(id, at_seq, absl::Now());
}

std::vector<std::unique_ptr<ExportTable::ZeroCopy>> ExportTable::TakeReleasable(ExportEntry& e) {
  std::vector<std::unique_ptr<ZeroCopy>> out;
  for (uint64_t id : e.coh.TakeReleasable()) {
    auto it = e.retired.find(id);
    SVM_CHECK(it != e.retired.end());
    out.push_back(std::move(it->second));
    e.retired.erase(it);
  }
  if (!out.empty()) counters_->Add("zero_copy_retired_released", out.size());
  return out;
}

absl::StatusOr<uint64_t> ExportTable::Subscribe(uint64_t export_id,
                                                std::shared_ptr<transport::Subscriber> sub,
                                                absl::Span<const std::string> peer) {
  auto e = FindId(export_id);
  if (!e || !CheckAllowed(e->allow, peer).ok()) return SubscribeRefused();
  uint64_t seq;
  // Who the limit counts: the proved identity, else the declared node.
  const std::string who = PeerKey(peer, sub->node());
  {
    // The count and the insertion under mu_ (before ExportEntry::mu), so
    // that concurrent subscriptions cannot overshoot the limit.
    absl::MutexLock tl(&mu_);
    Limits& lim = *limits_.live;
    const uint64_t max = lim.Get(Limit::kImportsPerPeer);
    uint64_t held = 0;
    bool again = false;  // this connection re-subscribes: it holds the slot already
    absl::MutexLock pl(&peers_mu_);
    for (const auto& [id, x] : by_id_) {
      absl::MutexLock xl(&x->mu);
      if (x->gone) continue;  // holds nothing any more
      for (const auto& [sid, s] : x->subs) {
        auto p = peer_of_.find(sid);
        if ((p != peer_of_.end() ? p->second : PeerKey({}, s->node())) != who) continue;
        ++held;
        if (x == e && sid == sub->id()) again = true;
      }
    }
    if (!again && held >= max) {
      return lim.Refuse(Limit::kImportsPerPeer, who,
                        absl::StrFormat("already holds %u imports of this node's exports", held), max);
    }
    if (peer_of_.try_emplace(sub->id(), who).second) by_peer_[who][sub->id()] = sub;
    absl::MutexLock l(&e->mu);
    if (e->gone) return absl::FailedPreconditionError(absl::StrCat("export '", e->name, "' gone"));
    e->subs[sub->id()] = sub;
    seq = e->coh.Subscribe(sub->id());
  }
  {
    // Before the answer leaves: the importer fetches only after it.
    absl::MutexLock l(&mu_);
    grants_.insert({sub->id(), export_id});
  }
  spdlog::info("node {} subscribed to '{}' at seq {}", sub->node(), e->name, seq);
  if (limits_.fault_subscribe_inval > absl::ZeroDuration()) {
    Invalidate(*e, Change{0, 1, ChangeKind::kOther, source::MonotonicNs()});
    absl::SleepFor(limits_.fault_subscribe_inval);
  }
  return seq;
}

void ExportTable::Invalidate(ExportEntry& e, const Change& c) {
  absl::MutexLock publishing(&e.publish_mu);
  InvalidatePublishing(e, c);
}

void ExportTable::InvalidatePublishing(ExportEntry& e, const Change& c) {
  v1::Invalidation ev;
  {
    absl::MutexLock l(&e.mu);
    if (e.removed) return;
    if (e.gone) return;  // everything was invalidated when the process exited
    if (c.kind == ChangeKind::kExit) e.gone = true;
    std::unique_ptr<ZeroCopy> replaced;
    bool work = false;
    if (MappingMayHaveChanged(c.kind)) e.zc_changed = true;
    if (e.zc && c.kind != ChangeKind::kWrite) {
      // Importers drop the region when this invalidation reaches them and
      // describe the export again; it is offered again only once it is
      // known to be valid. Nothing slow happens here (this is the mirror
      // source's thread): the worker re-validates, and re-pins.
      if (c.kind == ChangeKind::kExit || c.kind == ChangeKind::kUnexport) {
        replaced = std::move(e.zc);
        e.zc_state = ZcState::kNone;
        e.zc_reason = c.kind == ChangeKind::kExit ? "the process exited" : "unexported";
        e.zc_retry = false;
        counters_->Add("zero_copy_withdrawals");
      } else if (e.zc->region->remote().odp) {
        e.zc_state = ZcState::kValidating;  // ODP follows the object's pages by itself
        work = true;
      } else {
        // Pinned pages may have left the object: the old registration is
        // retired at this invalidation, the mapping pinned again.
        e.zc_repin = e.zc->mapping;
        replaced = std::move(e.zc);
        e.zc_state = ZcState::kRepinning;
        work = true;
      }
    }
    if (work) QueueZeroCopyWork(e);
    const uint64_t seq = e.coh.Invalidate(c.first_page, c.npages);
    // Released once every subscriber acknowledged this invalidation (it
    // drops the region before it acknowledges, after its READs drained).
    Retire(e, std::move(replaced), seq);
    transport::InvalRecord rec{e.id, c.first_page, c.npages, seq, c.kind, c.detected_ns};
    for (auto it = e.subs.begin(); it != e.subs.end();) {
      if (!it->second->PushInvalidation(rec)) {
        e.coh.Unsubscribe(it->first);
        it = e.subs.erase(it);  // closed: it invalidates everything when it reconnects
      } else {
        ++it;
      }
    }
    ev.set_name(e.name);
    ev.set_first_page(c.first_page);
    ev.set_npages(c.npages);
    ev.set_seq(seq);
    ev.set_kind(static_cast<v1::InvalidationKind>(c.kind));
    ev.set_detected_ns(c.detected_ns);
  }
  counters_->Add("invalidations_sent");
  spdlog::debug("invalidate '{}' pages {}+{} ({}) seq {}", e.name, c.first_page, c.npages,
                source::ChangeKindName(c.kind), ev.seq());
  hub_->Publish(ev);
}

absl::StatusOr<uint64_t> ExportTable::ServeFetch(const transport::Subscriber& from,
                                                 uint64_t export_id, uint64_t first_page,
                                                 uint32_t npages, bool track,
                                                 absl::Span<uint8_t> dst) {
  std::shared_ptr<struct ExportEntry> e;
  {
    absl::MutexLock l(&mu_);
    if (!grants_.contains({from.id(), export_id})) {
      // Decided here, before the id is looked up: an unknown id and a
      // listed export answer alike.
      if (refusals_logged_.insert(from.id()).second) {
        spdlog::warn("data connection {} from node {} fetched export id {}, which it did not "
                     "subscribe to; refused (further refusals on this connection are not logged)",
                     from.id(), service::LogSafe(from.node()), export_id);
      }
      counters_->Add("fetches_refused");
      return FetchRefused();
    }
    if (auto it = by_id_.find(export_id); it != by_id_.end()) e = it->second;
  }
  if (!e) return absl::NotFoundError("no such export (it was withdrawn)");
  if (first_page >= e->npages || npages > e->npages - first_page) {
    return absl::OutOfRangeError(absl::StrFormat("pages %u+%u are beyond the export's %u pages",
                                                 first_page, npages, e->npages));
  }
  std::shared_ptr<source::MirrorRange> range;
  uint64_t seq;
  {
    absl::MutexLock l(&e->mu);
    if (e->gone || e->removed) {
      return absl::FailedPreconditionError(absl::StrCat("export '", e->name, "' gone"));
    }
    range = e->range;
    seq = e->coh.BeginServe();
  }
  if (auto st = range->Read(first_page * kPageSize, dst); !st.ok()) return st;
  if (limits_.fault_fetch_delay > absl::ZeroDuration()) absl::SleepFor(limits_.fault_fetch_delay);
  if (track) {
    std::vector<uint64_t> versions(npages);
    for (uint32_t i = 0; i < npages; ++i) {
      versions[i] = HashPage(dst.data() + static_cast<size_t>(i) * kPageSize);
    }
    std::vector<uint64_t> changed;
    {
      absl::MutexLock l(&e->mu);
      changed = e->coh.RecordServed(first_page, versions, seq);
    }
    // Content other importers hold differs from this copy: a change no
    // notifier reported. Invalidated before this reply is queued, so the
    // requester (which receives the invalidation first) does not install it.
    if (!changed.empty()) {
      counters_->Add("served_version_invalidations", changed.size());
      absl::MutexLock publishing(&e->publish_mu);
      InvalidateRuns(*e, changed, ChangeKind::kWrite, source::MonotonicNs());
    }
  }
  counters_->Add("fetches_served");
  counters_->Add("pages_served", npages);
  e->stats.fetches.fetch_add(1, std::memory_order_relaxed);
  e->stats.bytes_served.fetch_add(dst.size(), std::memory_order_relaxed);
  return seq;
}

absl::Status ExportTable::AdmitFetch(const transport::Subscriber& from, uint64_t pending) {
  Limits& lim = *limits_.live;
  const uint64_t max = lim.Get(Limit::kPendingFetchesPerPeer);
  // The other connections' last references are dropped after mu_.
  std::vector<std::shared_ptr<transport::Subscriber>> others;
  std::string who;
  uint64_t total = pending;
  {
    absl::MutexLock l(&peers_mu_);
    auto self = peer_of_.find(from.id());
    who = self != peer_of_.end() ? self->second : PeerKey({}, from.node());
    if (auto b = self != peer_of_.end() ? by_peer_.find(who) : by_peer_.end(); b != by_peer_.end()) {
      for (const auto& [id, conn] : b->second) {
        if (id == from.id()) continue;
        if (auto c = conn.lock()) {
          total += c->PendingFetches();
          others.push_back(std::move(c));
        }
      }
    }
  }
  if (total < max) return absl::OkStatus();
  return lim.Refuse(Limit::kPendingFetchesPerPeer, who,
                    absl::StrFormat("has %u fetches waiting on its %u data connections to this node",
                                    total, others.size() + 1),
                    max);
}

void ExportTable::OnAck(uint64_t subscriber_id, uint64_t export_id, uint64_t seq) {
  auto e = FindDraining(export_id);
  if (!e) return;
  std::vector<std::unique_ptr<ZeroCopy>> released;  // deregistered outside the lock
  {
    absl::MutexLock l(&e->mu);
    e->coh.OnAck(subscriber_id, seq);
    released = TakeReleasable(*e);
  }
}

void ExportTable::Heartbeat() {
  std::vector<std::shared_ptr<struct ExportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, e] : by_id_) all.push_back(e);
    for (auto& [id, e] : draining_) all.push_back(e);
  }
  std::map<uint64_t, std::shared_ptr<transport::Subscriber>> subs;
  for (auto& e : all) {
    absl::MutexLock l(&e->mu);
    for (auto& [id, sub] : e->subs) subs.emplace(id, sub);
  }
  const transport::InvalRecord beat{transport::kHeartbeatExportId, 0, 0, 0, source::ChangeKind::kWrite,
                                    source::MonotonicNs()};
  // A closed subscriber is removed by the next invalidation or its close.
  for (auto& [id, sub] : subs) sub->PushInvalidation(beat);
}

void ExportTable::OnSubscriberClosed(uint64_t subscriber_id) {
  std::vector<std::shared_ptr<struct ExportEntry>> all;
  {
    absl::MutexLock l(&mu_);
    grants_.erase(grants_.lower_bound({subscriber_id, 0}),
                  grants_.upper_bound({subscriber_id, UINT64_MAX}));
    refusals_logged_.erase(subscriber_id);
    {
      absl::MutexLock pl(&peers_mu_);
      if (auto p = peer_of_.find(subscriber_id); p != peer_of_.end()) {
        if (auto b = by_peer_.find(p->second); b != by_peer_.end()) {
          b->second.erase(subscriber_id);
          if (b->second.empty()) by_peer_.erase(b);
        }
        peer_of_.erase(p);
      }
    }
    for (auto& [id, e] : by_id_) all.push_back(e);
    for (auto& [id, e] : draining_) all.push_back(e);
  }
  for (auto& e : all) {
    std::vector<std::unique_ptr<ZeroCopy>> released;
    {
      absl::MutexLock l(&e->mu);
      e->subs.erase(subscriber_id);
      e->coh.Unsubscribe(subscriber_id);
      released = TakeReleasable(*e);
    }
  }
}

uint64_t ExportTable::CompareServed(ExportEntry& e,
                                    const std::vector<std::pair<uint64_t, uint64_t>>& pages,
                                    bool unreadable_changed) {
  std::shared_ptr<source::MirrorRange> range;
  {
    absl::MutexLock l(&e.mu);
    range = e.range;
  }
  if (!range) return 0;
  range->Refresh();
  std::vector<uint8_t> buf(kPageSize);
  std::vector<std::pair<uint64_t, uint64_t>> changed;
  const uint64_t started = source::MonotonicNs();
  for (auto [page, hash] : pages) {
    auto st = range->Read(page * kPageSize, absl::MakeSpan(buf));
    if (st.ok() ? HashPage(buf.data()) != hash : unreadable_changed) changed.emplace_back(page, hash);
  }
  if (changed.empty()) return 0;
  // Decided and published under publish_mu: of two passes that found one
  // change (Sync and the scrubber, each from its own sample), the second
  // finds the page no longer served as it sampled it.
  absl::MutexLock publishing(&e.publish_mu);
  std::vector<uint64_t> still;
  {
    absl::MutexLock l(&e.mu);
    still = e.coh.StillServed(changed);
  }
  InvalidateRuns(e, still, ChangeKind::kWrite, started);
  return still.size();
}

void ExportTable::InvalidateRuns(ExportEntry& e, const std::vector<uint64_t>& pages, ChangeKind kind,
                                 uint64_t detected_ns) {
  size_t i = 0;
  while (i < pages.size()) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    InvalidatePublishing(e, Change{pages[i], j - i, kind, detected_ns});
    i = j;
  }
}

absl::StatusOr<v1::SyncResponse> ExportTable::Sync(const std::string& name) {
  auto e = Find(name);
  if (!e) return absl::NotFoundError(absl::StrCat("no export named '", name, "'"));
  std::vector<std::pair<uint64_t, uint64_t>> pages;
  {
    absl::MutexLock l(&e->mu);
    if (e->gone) return absl::FailedPreconditionError(absl::StrCat("export '", name, "' gone"));
    pages = e->coh.AllServed();
  }
  const uint64_t changed = CompareServed(*e, pages, /*unreadable_changed=*/true);
  // Wait until every subscriber acknowledged everything up to now.
  v1::SyncResponse r;
  std::vector<std::shared_ptr<transport::Subscriber>> laggards;
  {
    absl::MutexLock l(&e->mu);
    const uint64_t target = e->coh.seq();
    auto all_acked = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu) {
      return e->coh.Laggards(target).empty();
    };
    e->mu.AwaitWithTimeout(absl::Condition(&all_acked), limits_.sync_timeout);
    for (uint64_t id : e->coh.Laggards(target)) {
      if (auto it = e->subs.find(id); it != e->subs.end()) laggards.push_back(it->second);
    }
    r.set_seq(target);
    r.set_subscribers_acked(static_cast<uint32_t>(e->subs.size() - laggards.size()));
  }
  // An importer that does not acknowledge in time is disconnected: when it
  // reconnects it invalidates everything it held, so Sync's promise holds.
  for (auto& s : laggards) {
    spdlog::warn("node {} did not acknowledge invalidations of '{}' within {}; disconnecting it",
                 s->node(), name, absl::FormatDuration(limits_.sync_timeout));
    s->Close();
  }
  r.set_pages_invalidated(changed);
  counters_->Add("syncs");
  return r;
}

absl::StatusOr<uint64_t> ExportTable::ReadLocal(const std::string& name, uint64_t offset,
                                                absl::Span<uint8_t> dst) {
  auto e = Find(name);
  if (!e) return absl::NotFoundError(absl::StrCat("no export or import named '", name, "'"));
  if (offset > e->len || dst.size() > e->len - offset) {
    return absl::OutOfRangeError(absl::StrFormat("read of %u bytes at %u is past the end (%u bytes)",
                                                 dst.size(), offset, e->len));
  }
  std::shared_ptr<source::MirrorRange> range;
  uint64_t seq;
  {
    absl::MutexLock l(&e->mu);
    if (e->gone) return absl::FailedPreconditionError(absl::StrCat("export '", name, "' gone: the exporting process exited"));
    range = e->range;
    seq = e->coh.seq();
  }
  if (auto st = range->Read(offset, dst); !st.ok()) return st;
  e->stats.local_reads.fetch_add(1, std::memory_order_relaxed);
  e->stats.bytes_served.fetch_add(dst.size(), std::memory_order_relaxed);
  return seq;
}

void ExportTable::QueueZeroCopyWork(ExportEntry& e) {
  absl::MutexLock l(&work_mu_);
  work_.push_back(e.id);
}

void ExportTable::ZeroCopyWorker() {
  for (;;) {
    uint64_t id;
    {
      absl::MutexLock l(&work_mu_);
      work_mu_.Await(absl::Condition(
          +[](ExportTable* t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->work_mu_) {
            return t->stop_work_ || !t->work_.empty();
          },
          this));
      if (stop_work_) return;
      id = work_.front();
      work_.pop_front();
    }
    if (auto e = FindId(id)) Revalidate(*e);
  }
}

void ExportTable::Revalidate(ExportEntry& e) {
  std::shared_ptr<source::SharedMapping> mapping;
  ZcState state;
  uint64_t seq;
  {
    absl::MutexLock l(&e.mu);
    state = e.zc_state;
    if (state == ZcState::kValidating) {
      mapping = e.zc->mapping;
    } else if (state == ZcState::kRepinning) {
      mapping = e.zc_repin;
    } else {
      return;  // settled meanwhile (exit, unexport, or an earlier pass)
    }
    seq = e.coh.seq();
  }
  // Slow parts, no lock held: the object behind the range, and pinning.
  absl::Status st = mapping->Validate(e.pid, e.addr);
  std::unique_ptr<transport::RegisteredRegion> fresh;
  if (st.ok() && state == ZcState::kRepinning) {
    auto r = zero_copy_.load()->RegisterRegion(mapping->data(), e.len);
    if (r.ok()) {
      fresh = std::move(*r);
    } else {
      st = r.status();
    }
  }
  std::unique_ptr<ZeroCopy> withdrawn;
  {
    absl::MutexLock l(&e.mu);
    if (e.zc_state != state || e.gone || e.removed) return;  // fresh (never offered) is released
    if (e.coh.seq() != seq) {
      // Another invalidation arrived meanwhile: check again.
      QueueZeroCopyWork(e);
      return;
    }
    if (st.ok()) {
      if (state == ZcState::kRepinning) {
        e.zc = std::make_unique<ZeroCopy>();
        e.zc->mapping = std::move(e.zc_repin);
        e.zc->region = std::move(fresh);
        counters_->Add("zero_copy_reregistrations");
      }
      e.zc_state = ZcState::kUsable;
      return;
    }
    spdlog::info("export '{}': zero-copy path withdrawn ({})", e.name, st.message());
    counters_->Add("zero_copy_withdrawals");
    e.zc_reason = std::string(st.message());
    e.zc_retry = true;
    e.zc_changed = false;  // the check saw every change up to seq
    e.zc_retry_at = absl::Now() + kZeroCopyRetry;
    e.zc_repin.reset();
    e.zc_state = ZcState::kNone;
    // Importers dropped it at the invalidation that started the check, or
    // at a later one: released once they acknowledged the current one.
    withdrawn = std::move(e.zc);
    Retire(e, std::move(withdrawn), e.coh.seq());
  }
}

void ExportTable::Scrub() {
  // Zero-copy upkeep: release retired registrations whose holders all
  // acknowledged or left (outside the locks: deregistering takes time),
  // disconnect subscribers that hold one for too long without
  // acknowledging, try withdrawn exports whose mapping changed again.
  std::vector<std::unique_ptr<ZeroCopy>> released;
  std::vector<std::shared_ptr<transport::Subscriber>> stuck;
  std::vector<std::shared_ptr<struct ExportEntry>> all, retry, draining;
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, e] : by_id_) {
      all.push_back(e);
      absl::MutexLock el(&e->mu);
      if (e->zc_retry && e->zc_changed && e->zc_state == ZcState::kNone && !e->gone &&
          absl::Now() >= e->zc_retry_at) {
        retry.push_back(e);
      }
    }
    for (auto& [id, e] : draining_) draining.push_back(e);
  }
  const absl::Time patience = absl::Now() - limits_.sync_timeout;
  auto upkeep = [&](ExportEntry& e) {
    absl::MutexLock l(&e.mu);
    for (auto& z : TakeReleasable(e)) released.push_back(std::move(z));
    for (uint64_t id : e.coh.RetirementLaggards(patience)) {
      if (auto it = e.subs.find(id); it != e.subs.end()) stuck.push_back(it->second);
    }
    return e.retired.empty();
  };
  for (auto& e : all) upkeep(*e);
  for (auto& e : draining) {
    if (upkeep(*e)) {
      absl::MutexLock l(&mu_);
      draining_.erase(e->id);
    }
  }
  released.clear();
  for (auto& s : stuck) {
    spdlog::warn("node {} did not acknowledge the replacement of a zero-copy registration within {}; "
                 "disconnecting it", s->node(), absl::FormatDuration(limits_.sync_timeout));
    s->Close();
  }
  for (auto& e : retry) TryZeroCopy(*e);
  for (auto& e : all) {
    if (!e->scrub) continue;
    std::vector<std::pair<uint64_t, uint64_t>> pages;
    {
      absl::MutexLock l(&e->mu);
      if (e->gone || e->coh.served_pages() == 0) continue;
      pages = e->coh.ServedBatch(&e->scrub_cursor, limits_.scrub_pages_per_pass);
    }
    // A page that cannot be read any more left the mapping or lost its
    // protection: the source reports that, with its proper kind.
    if (uint64_t n = CompareServed(*e, pages, /*unreadable_changed=*/false); n > 0) {
      counters_->Add("scrub_invalidations", n);
    }
  }
}

}  // namespace svm::core
