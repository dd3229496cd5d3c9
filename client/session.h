// libsvm's end of the client data plane (daemon/session/abi.h): the
// session's rings and data area, and views of imports' shared caches.
// Internal to libsvm; not installed.
#ifndef SVM_CLIENT_SESSION_H_
#define SVM_CLIENT_SESSION_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <set>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "daemon/session/abi.h"

namespace svm::internal {

// An open import or export. For an import, its shared cache mapped read-only.
struct View {
  uint32_t handle = 0;
  session::abi::HandleKind kind = session::abi::kExport;
  uint64_t len = 0;
  const uint8_t* data = nullptr;  // the cached pages (imports)
  const session::abi::CacheHeader* header = nullptr;
  const std::atomic<uint64_t>* words = nullptr;
  size_t data_map = 0, words_map = 0;
  int data_fd = -1;  // the cache's pages, read-only (Map() maps it again)
  ~View();
  bool retired() const {
    return header != nullptr && header->retired.load(std::memory_order_acquire) != 0;
  }
};

// A mapping of an import's cache made by Map(): it faults through the
// session's userfaultfd. (A view's own mapping, which Read copies from,
// does not: a Read never takes SIGBUS.)
struct MappedRange {
  std::shared_ptr<View> view;
  const uint8_t* base = nullptr;
  size_t len = 0;
  size_t readahead = 0;
  std::atomic<uint64_t> faults{0};
  std::atomic<uint64_t> fetched{0};
  // The fault thread's read-ahead state.
  uint64_t last_page = 0;
  uint64_t window_end = 0;
};

class Session {
 public:
  // path: svmd's session socket.
  static absl::StatusOr<std::unique_ptr<Session>> Connect(const std::string& path);
  ~Session();

  // The view of name, opened once and again when svmd retired its cache.
  absl::StatusOr<std::shared_ptr<View>> Open(const std::string& name);

  // One read through the ring; len at most chunk().
  struct Op {
    uint32_t handle = 0;
    uint64_t offset = 0;
    uint64_t len = 0;
    bool fresh = false;
    bool fill = false;  // the pages must land in the shared cache
    uint8_t* dst = nullptr;  // null: the bytes are not wanted (a fill)
    // The op's import, for a read svmd may complete in the shared cache
    // (abi::kInCache): Run then copies the pages from the view, checked
    // against their version words. null: the bytes come in the data area.
    const View* view = nullptr;
  };
  struct Result {
    absl::Status status;
    uint64_t seq = 0;
    uint64_t pages_from_cache = 0;
    uint64_t pages_fetched = 0;
  };
  // Runs every op, as many in flight at once as the data area allows, and
  // copies each one's bytes to its dst. Safe to call from several threads.
  std::vector<Result> Run(absl::Span<const Op> ops);
  uint64_t chunk() const { return slot_size_; }
  // Reads completed in the cache whose copy failed its check (a page
  // invalidated or evicted between svmd's install and the copy) and were
  // read again through the data area.
  uint64_t in_cache_retries() {
    absl::MutexLock l(&mu_);
    return retried_;
  }
  // Counts reads (and their pages) of the handle's import that this
  // process served from the shared cache without a message: svmd adds them
  // to the import's metrics (abi::ClientCounters).
  void CountCacheHits(uint32_t handle, uint64_t reads, uint64_t pages) {
    if (handle >= ctr_entries_) return;
    ctr_[handle].reads.fetch_add(reads, std::memory_order_relaxed);
    ctr_[handle].pages_from_cache.fetch_add(pages, std::memory_order_relaxed);
  }
  // Unique over the process's sessions (never reused).
  uint64_t id() const { return id_; }
  // True in a child forked after Connect: every call fails with
  // ForkedError() (the rings and mappings are the parent's; they are not
  // inherited).
  bool forked() const;
  static absl::Status ForkedError();

  // Maps view's cache again (read-only) and registers it for faults;
  // UnmapRange undoes it.
  absl::StatusOr<std::shared_ptr<MappedRange>> MapRange(std::shared_ptr<View> view, size_t readahead);
  void UnmapRange(const std::shared_ptr<MappedRange>& r);
  // Hands svmd a svm_shim range fd (kDeposit); the token an ExportRequest
  // names it by. The caller keeps (and closes) its own fd.
  // object_fd (>= 0): the object the range maps, handed over beside it.
  absl::StatusOr<uint64_t> Deposit(int range_fd, int object_fd = -1);
  // Registers a watch of name (events from now on); its id.
  absl::StatusOr<uint32_t> Watch(const std::string& name);
  // The watch's next event; DEADLINE_EXCEEDED after timeout, UNAVAILABLE
  // when svmd closed the session.
  absl::StatusOr<session::abi::Event> NextEvent(uint32_t watch, absl::Duration timeout);
  // Ends the watch: svmd stops sending its events, and those already sent
  // are dropped.
  void ForgetWatch(uint32_t watch);

  // Makes svmd install pages [first, first + n) of the view's import in its
  // cache (what a fault and Prefetch do).
  absl::Status FetchPages(const View& view, uint64_t first, uint64_t n);

 private:
  // Unmaps a mapping so that no fault in flight is ever filled from the
  // cache file behind the pager's back (session.cc says how).
  void RetireMapping(const MappedRange& r);
  Session() = default;
  // Sends a kOpen or kWatch for name and takes the kOpenOk answer (and its
  // descriptors, up to 4).
  absl::Status Ask(uint32_t type, const std::string& name, session::abi::OpenOkMsg* ok, int* fds, int* nfds)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(open_mu_);
  // The fault thread: serves the userfaultfd of every MappedRange.
  absl::Status StartPager() ABSL_EXCLUSIVE_LOCKS_REQUIRED(open_mu_);
  absl::Status Register(const std::shared_ptr<MappedRange>& r);
  void PagerLoop();
  // A fault read from the userfaultfd, and what serving it took.
  struct Fault {
    uint64_t page_addr = 0;
    uint32_t tid = 0;
    std::shared_ptr<MappedRange> range;  // null: not a live mapping (just wake)
    uint64_t page = 0, npages = 0;      // the pages to fetch (read-ahead included)
    absl::Status status;
    bool done = false;
  };
  Fault ResolveFault(uint64_t addr, uint32_t tid);
  // A minor fault (the page is in the cache file): maps it, and the
  // current pages after it, when its version word says it is installed;
  // false: serve it as a missing page.
  bool MapIfCurrent(uint64_t addr);
  // Fetches every fault's pages in one batch, then signals or wakes each.
  void ServeFaults(std::vector<Fault>& faults);
  // The kFill ops that install pages [first, first + n) of view's import.
  void AppendFillOps(const View& view, uint64_t first, uint64_t n, std::vector<Op>* ops) const;
  enum class SlotState { kFree, kBusy, kDone };
  struct Slot {
    SlotState state = SlotState::kFree;
    session::abi::Cqe cqe{};
  };
  // Moves completions into their slots; true when any moved.
  bool ReapLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies [offset, offset + len) of v's import from its shared cache into
  // dst, every page checked against its version word; false when any page
  // is not there or changed (or the lease ran out).
  static bool CopyFromCache(const View& v, uint64_t offset, uint8_t* dst, uint64_t len);
  // Waits until pred holds: spins reaping, then sleeps on the completion
  // doorbell (one thread) or on cv_ (the others).
  void WaitFor(const std::function<bool()>& pred) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Submit(const session::abi::Sqe& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  uint64_t id_ = 0;
  uint64_t forks_ = 0;  // the fork count when connected
  int sock_ = -1;
  int ev_bell_ = -1;
  const session::abi::Event* ev_ = nullptr;
  absl::Mutex ev_mu_;  // the event ring's head and the per-watch queues
  absl::CondVar ev_cv_;
  uint32_t ev_head_ ABSL_GUARDED_BY(ev_mu_) = 0;
  bool ev_sleeping_ ABSL_GUARDED_BY(ev_mu_) = false;  // a thread waits on the doorbell
  bool ev_broken_ ABSL_GUARDED_BY(ev_mu_) = false;
  std::map<uint32_t, std::deque<session::abi::Event>> ev_queues_ ABSL_GUARDED_BY(ev_mu_);
  // Watch ids count up from 0 and are never reused: an event whose watch
  // has no queue is kept only when its id is not answered yet (a Watch in
  // progress); otherwise its watch was forgotten.
  uint32_t ev_next_id_ ABSL_GUARDED_BY(ev_mu_) = 0;
  void DrainEventsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ev_mu_);
  int sq_bell_ = -1;
  int cq_bell_ = -1;
  uint8_t* mem_ = nullptr;
  uint64_t mem_size_ = 0;
  session::abi::SessionHeader* hdr_ = nullptr;
  session::abi::Sqe* sq_ = nullptr;
  const session::abi::Cqe* cq_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t slot_size_ = 0;
  session::abi::ClientCounters* ctr_ = nullptr;
  uint32_t ctr_entries_ = 0;

  absl::Mutex open_mu_;  // serialises messages on the socket
  std::map<std::string, std::shared_ptr<View>> views_ ABSL_GUARDED_BY(open_mu_);

  // userfaultfd and its thread, started with the first import opened.
  int uffd_ = -1;
  bool minor_faults_ = false;  // the kernel reports minor faults on shmem
  int pager_stop_ = -1;  // eventfd
  std::thread pager_;
  absl::Mutex ranges_mu_;
  std::map<uintptr_t, std::shared_ptr<MappedRange>> ranges_ ABSL_GUARDED_BY(ranges_mu_);  // by base

  absl::Mutex mu_;  // guards the rings' own indices and the slots
  absl::CondVar cv_;
  uint32_t sq_tail_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t cq_head_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  uint64_t reaped_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t retried_ ABSL_GUARDED_BY(mu_) = 0;  // in_cache_retries()
  bool reaping_ ABSL_GUARDED_BY(mu_) = false;  // a thread sleeps on the doorbell
  bool broken_ ABSL_GUARDED_BY(mu_) = false;   // svmd closed the session
};

}  // namespace svm::internal

#endif  // SVM_CLIENT_SESSION_H_
