// The importer's mirror cache, shared with local clients: per import a
// sparse memfd of the import's length holding the cached pages at their
// offsets, and a memfd of version words (layout in abi.h). svmd fills and
// drops pages; clients map both read-only and copy cached pages without a
// message to svmd, checking the page's word before and after the copy.
//
// Bounded in pages over all imports; the least recently inserted or looked
// up (by svmd) pages go first. Clients' own hits are not seen by svmd, so
// under client-only traffic eviction is first in, first out.
//
// Callers serialise Insert and Publish against invalidation of the same
// import (ImportEntry::mu), so that a page that raced an invalidation is
// never installed. Drop zeroes the words and punches the pages out before it
// returns: a client that begins a copy after that sees the page absent.
//
// Fetches land in the cache file itself (no copy in svmd), under this
// protocol (docs/design.md, "Fetches land in the shared cache"):
//  1. Claim (svmd, under mu_): pages that are neither cached nor claimed
//     become this landing's. Their words are 0 and stay 0 until step 3:
//     clients treat the page as absent (TryCopyPage fails, the pager does
//     not UFFDIO_CONTINUE onto it) however much of it the fetch has written.
//  2. The fetch writes the pages through svmd's read-write mapping of the
//     data memfd (tcp: recv into it; rdma: the NIC, through one ODP
//     registration of that mapping per file, Landing::Area; on pinned
//     devices the transport copies from its receive slots). Nothing else
//     writes, punches or evicts a claimed
//     page meanwhile: Drop, eviction and PunchStrays skip it and Drop marks
//     it dropped instead (the invalidation happened during the fetch).
//  3. After the fetch completed (the transport wrote its last byte and
//     released the buffer: invalidate, drain, then retire), the caller asks
//     the install rule (MayInstall, under ImportEntry::mu) and then, still
//     under it, calls Publish: every claimed page not dropped gets a fresh
//     version word, stored with release order after the data (a client that
//     loads the word with acquire order sees the whole page), and becomes
//     cached; dropped ones are punched and stay at 0. Abandon (the rule said
//     no, or the fetch failed) punches them all. A page is never published
//     before the install rule said yes.
#ifndef SVM_DAEMON_SESSION_SHARED_CACHE_H_
#define SVM_DAEMON_SESSION_SHARED_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/fd.h"
#include "daemon/session/abi.h"
#include "daemon/transport/transport.h"

namespace svm::session {

// What a client gets to map: the two memfds reopened read-only.
struct CacheFiles {
  UniqueFd data;
  UniqueFd words;
  uint64_t len = 0;
};

// One import's files and svmd's mappings of them.
struct SharedCacheFile {
  UniqueFd data;
  UniqueFd words;
  uint64_t len = 0;
  uint64_t pages = 0;
  abi::CacheHeader* header = nullptr;  // svmd's read-write mapping of words
  std::atomic<uint64_t>* word = nullptr;
  uint8_t* base = nullptr;  // svmd's read-write mapping of data (landings write here)
  uint64_t next_version = 1;
  // The transport's registration of base (made at the first landing that
  // asks, Landing::Area). Destroyed with the file, before base is unmapped:
  // after the last landing in the file ended, so after every fetch that
  // could write through it completed (invalidate, drain, then retire).
  absl::Mutex area_mu;
  std::unique_ptr<transport::LandingArea> area ABSL_GUARDED_BY(area_mu);
  ~SharedCacheFile();
};

class SharedCache {
 public:
  explicit SharedCache(uint64_t capacity_pages) : capacity_(capacity_pages) {}
  ~SharedCache();

  // Makes the import's cache empty and len bytes long. A new import, or a
  // length other than the current one, gets new files; the old ones are
  // marked retired for the clients that still map them.
  absl::Status Reset(uint64_t import_id, uint64_t len);
  // Drops the import's pages and files (retired for clients).
  void Remove(uint64_t import_id);
  // The import's files, read-only, for a client; NOT_FOUND without Reset.
  absl::StatusOr<CacheFiles> OpenForClient(uint64_t import_id) const;

  // A run of pages claimed for a fetch to land in (the protocol above). The
  // claim ends with Publish or Abandon (or, as Abandon, on destruction).
  class Landing {
   public:
    ~Landing();
    Landing(const Landing&) = delete;
    Landing& operator=(const Landing&) = delete;
    uint64_t import_id() const { return import_id_; }
    uint64_t first_page() const { return first_; }
    uint64_t npages() const { return n_; }
    // svmd's read-write mapping of the claimed pages: the fetch's dst.
    absl::Span<uint8_t> span() const { return span_; }
    using RegisterArea =
        absl::FunctionRef<absl::StatusOr<std::unique_ptr<transport::LandingArea>>(void* addr, size_t len)>;
    // The registration of the whole cache file that span() lies in, made
    // with register_area at the file's first call (and again after a
    // failure); null when it failed (the fetch lands through the
    // transport's own buffers). Valid while this landing lives.
    const transport::LandingArea* Area(RegisterArea register_area);

   private:
    friend class SharedCache;
    Landing() = default;
    SharedCache* cache_ = nullptr;
    std::shared_ptr<SharedCacheFile> file_;
    uint64_t import_id_ = 0, first_ = 0, n_ = 0;
    absl::Span<uint8_t> span_;
    bool done_ = false;
  };
  // Claims the longest run of [first, first + n) that starts at first and
  // whose pages are neither cached nor claimed by another landing; nullptr
  // when first itself is not claimable (or the import has no files, or the
  // cache holds nothing: --cache-mb 0).
  std::unique_ptr<Landing> Claim(uint64_t import_id, uint64_t first, uint64_t n);
  // The install rule said yes: the claimed pages that no Drop met during the
  // landing become cached with fresh versions (evicting the least recently
  // used beyond capacity); the others are punched. Returns how many were
  // published. Call only after the fetch stopped writing.
  uint64_t Publish(Landing& l);
  // The install rule said no, or the fetch failed: the pages are punched
  // and stay absent. Call only after the fetch stopped writing.
  void Abandon(Landing& l);

  // Whether the page is cached; marks it recently used (Lookup without the copy).
  bool Touch(uint64_t import_id, uint64_t page);
  // Copies the page into dst (one page) and marks it recently used.
  bool Lookup(uint64_t import_id, uint64_t page, absl::Span<uint8_t> dst);
  // Installs or replaces one page (ignored for an import without files or
  // a page past its end); evicts the least recently used beyond capacity.
  void Insert(uint64_t import_id, uint64_t page, absl::Span<const uint8_t> data);
  // Drops [first, first + n) of an import; returns how many pages were cached.
  uint64_t Drop(uint64_t import_id, uint64_t first, uint64_t n);
  uint64_t DropImport(uint64_t import_id);
  // Publishes the import's newest applied invalidation sequence to clients.
  void SetSeq(uint64_t import_id, uint64_t seq);
  // Punches out pages that are in a cache file but not cached: zero pages
  // a client's read faulted in when it raced a punch. Until then a mapping
  // (Client::Map) of that page shows zeros instead of faulting.
  void PunchStrays();
  // Publishes the import's lease (CLOCK_MONOTONIC ns) to clients.
  void SetLease(uint64_t import_id, int64_t until_ns);
  uint64_t CountImport(uint64_t import_id) const;
  uint64_t size() const;
  uint64_t capacity() const { return capacity_; }

 private:
  using File = SharedCacheFile;
  struct Key {
    uint64_t import_id;
    uint64_t page;
    bool operator<(const Key& o) const {
      return import_id != o.import_id ? import_id < o.import_id : page < o.page;
    }
  };
  static absl::StatusOr<std::shared_ptr<File>> Create(uint64_t len);
  // Zeroes the words of [first, end) and punches those pages out, except
  // pages claimed by a landing (marked dropped instead).
  void PunchLocked(uint64_t import_id, File& f, uint64_t first, uint64_t end) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void PunchRun(File& f, uint64_t first, uint64_t end);
  void EndLanding(Landing& l, bool publish, uint64_t* published);
  void ForgetClaimsLocked(uint64_t import_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseLocked(std::map<Key, std::list<Key>::iterator>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t DropLocked(uint64_t import_id, uint64_t first, uint64_t n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t capacity_;
  mutable absl::Mutex mu_;  // guards everything below
  // Shared with the landings in flight: a file replaced or removed during a
  // fetch stays mapped until the fetch ended.
  std::map<uint64_t, std::shared_ptr<File>> files_ ABSL_GUARDED_BY(mu_);
  // Pages claimed by landings; true once a Drop met the page.
  std::map<Key, bool> claimed_ ABSL_GUARDED_BY(mu_);
  // The cached pages and their recency; front: most recently used.
  std::map<Key, std::list<Key>::iterator> pages_ ABSL_GUARDED_BY(mu_);
  std::list<Key> lru_ ABSL_GUARDED_BY(mu_);
  uint64_t strays_ ABSL_GUARDED_BY(mu_) = 0;

 public:
  uint64_t strays() const {
    absl::MutexLock l(&mu_);
    return strays_;
  }
  uint64_t claimed() const {
    absl::MutexLock l(&mu_);
    return claimed_.size();
  }
};

}  // namespace svm::session

#endif  // SVM_DAEMON_SESSION_SHARED_CACHE_H_
