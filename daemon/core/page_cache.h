// The importer's mirror cache: pages of imports that were read, kept while
// valid, bounded in size (least recently used pages go first). Callers
// serialise Insert against invalidation of the same import (Import::mu), so
// that a page that raced an invalidation is never installed.
#ifndef SVM_DAEMON_CORE_PAGE_CACHE_H_
#define SVM_DAEMON_CORE_PAGE_CACHE_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace svm::core {

class PageCache {
 public:
  explicit PageCache(uint64_t capacity_pages) : capacity_(capacity_pages) {}

  // Copies the page into dst (one page) and marks it recently used.
  bool Lookup(uint64_t import_id, uint64_t page, absl::Span<uint8_t> dst);
  // Installs or replaces one page; evicts the least recently used beyond capacity.
  void Insert(uint64_t import_id, uint64_t page, absl::Span<const uint8_t> data);
  // Drops [first, first + n) of an import; returns how many pages were cached.
  uint64_t Drop(uint64_t import_id, uint64_t first, uint64_t n);
  uint64_t DropImport(uint64_t import_id);
  uint64_t CountImport(uint64_t import_id) const;
  uint64_t size() const;
  uint64_t capacity() const { return capacity_; }

 private:
  struct Key {
    uint64_t import_id;
    uint64_t page;
    bool operator<(const Key& o) const {
      return import_id != o.import_id ? import_id < o.import_id : page < o.page;
    }
  };
  struct Entry {
    std::unique_ptr<uint8_t[]> data;
    std::list<Key>::iterator lru;
  };
  void EraseLocked(std::map<Key, Entry>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t capacity_;
  mutable absl::Mutex mu_;  // guards pages_ and lru_
  std::map<Key, Entry> pages_ ABSL_GUARDED_BY(mu_);
  std::list<Key> lru_ ABSL_GUARDED_BY(mu_);  // front: most recently used
};

}  // namespace svm::core

#endif  // SVM_DAEMON_CORE_PAGE_CACHE_H_
