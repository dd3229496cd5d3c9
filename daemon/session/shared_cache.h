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
// Callers serialise Insert against invalidation of the same import
// (ImportEntry::mu), so that a page that raced an invalidation is never
// installed. Drop zeroes the words and punches the pages out before it
// returns: a client that begins a copy after that sees the page absent.
#ifndef SVM_DAEMON_SESSION_SHARED_CACHE_H_
#define SVM_DAEMON_SESSION_SHARED_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/fd.h"
#include "daemon/session/abi.h"

namespace svm::session {

// What a client gets to map: the two memfds reopened read-only.
struct CacheFiles {
  UniqueFd data;
  UniqueFd words;
  uint64_t len = 0;
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
  struct File {
    UniqueFd data;
    UniqueFd words;
    uint64_t len = 0;
    uint64_t pages = 0;
    abi::CacheHeader* header = nullptr;  // svmd's read-write mapping of words
    std::atomic<uint64_t>* word = nullptr;
    uint64_t next_version = 1;
    ~File();
  };
  struct Key {
    uint64_t import_id;
    uint64_t page;
    bool operator<(const Key& o) const {
      return import_id != o.import_id ? import_id < o.import_id : page < o.page;
    }
  };
  static absl::StatusOr<std::unique_ptr<File>> Create(uint64_t len);
  // Zeroes the words of [first, end) and punches those pages out.
  static void Punch(File& f, uint64_t first, uint64_t end);
  void EraseLocked(std::map<Key, std::list<Key>::iterator>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t DropLocked(uint64_t import_id, uint64_t first, uint64_t n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t capacity_;
  mutable absl::Mutex mu_;  // guards everything below
  std::map<uint64_t, std::unique_ptr<File>> files_ ABSL_GUARDED_BY(mu_);
  // The cached pages and their recency; front: most recently used.
  std::map<Key, std::list<Key>::iterator> pages_ ABSL_GUARDED_BY(mu_);
  std::list<Key> lru_ ABSL_GUARDED_BY(mu_);
  uint64_t strays_ ABSL_GUARDED_BY(mu_) = 0;

 public:
  uint64_t strays() const {
    absl::MutexLock l(&mu_);
    return strays_;
  }
};

}  // namespace svm::session

#endif  // SVM_DAEMON_SESSION_SHARED_CACHE_H_
