#include "daemon/core/page_cache.h"

#include <cstring>

#include "common/check.h"
#include "daemon/source/mirror_source.h"

namespace svm::core {

using source::kPageSize;

bool PageCache::Lookup(uint64_t import_id, uint64_t page, absl::Span<uint8_t> dst) {
  SVM_CHECK(dst.size() == kPageSize);
  absl::MutexLock l(&mu_);
  auto it = pages_.find(Key{import_id, page});
  if (it == pages_.end()) return false;
  std::memcpy(dst.data(), it->second.data.get(), kPageSize);
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return true;
}

void PageCache::Insert(uint64_t import_id, uint64_t page, absl::Span<const uint8_t> data) {
  SVM_CHECK(data.size() == kPageSize);
  if (capacity_ == 0) return;
  absl::MutexLock l(&mu_);
  Key k{import_id, page};
  auto it = pages_.find(k);
  if (it != pages_.end()) {
    std::memcpy(it->second.data.get(), data.data(), kPageSize);
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return;
  }
  while (pages_.size() >= capacity_) EraseLocked(pages_.find(lru_.back()));
  Entry e;
  e.data = std::make_unique<uint8_t[]>(kPageSize);
  std::memcpy(e.data.get(), data.data(), kPageSize);
  lru_.push_front(k);
  e.lru = lru_.begin();
  pages_.emplace(k, std::move(e));
}

void PageCache::EraseLocked(std::map<Key, Entry>::iterator it) {
  lru_.erase(it->second.lru);
  pages_.erase(it);
}

uint64_t PageCache::Drop(uint64_t import_id, uint64_t first, uint64_t n) {
  absl::MutexLock l(&mu_);
  uint64_t dropped = 0;
  const uint64_t end = first + n < first ? UINT64_MAX : first + n;
  auto it = pages_.lower_bound(Key{import_id, first});
  while (it != pages_.end() && it->first.import_id == import_id && it->first.page < end) {
    auto next = std::next(it);
    EraseLocked(it);
    it = next;
    ++dropped;
  }
  return dropped;
}

uint64_t PageCache::DropImport(uint64_t import_id) { return Drop(import_id, 0, UINT64_MAX); }

uint64_t PageCache::CountImport(uint64_t import_id) const {
  absl::MutexLock l(&mu_);
  uint64_t n = 0;
  for (auto it = pages_.lower_bound(Key{import_id, 0});
       it != pages_.end() && it->first.import_id == import_id; ++it) {
    ++n;
  }
  return n;
}

uint64_t PageCache::size() const {
  absl::MutexLock l(&mu_);
  return pages_.size();
}

}  // namespace svm::core
