#include "daemon/session/shared_cache.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/log.h"

namespace svm::session {

using abi::kPageSize;

namespace {

absl::StatusOr<UniqueFd> SealedMemfd(const char* name, uint64_t size) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return ErrnoStatus(errno, "memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("size the cache file to ", size, " bytes"));
  }
  // Nobody may change the size: a mapping never reaches past the end.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return ErrnoStatus(errno, "seal the cache file");
  }
  return fd;
}

absl::StatusOr<UniqueFd> ReopenReadOnly(int fd) {
  UniqueFd ro(::open(absl::StrCat("/proc/self/fd/", fd).c_str(), O_RDONLY | O_CLOEXEC));
  if (!ro.valid()) return ErrnoStatus(errno, "reopen the cache file read-only");
  return ro;
}

}  // namespace

SharedCache::File::~File() {
  if (header != nullptr) ::munmap(header, abi::WordsFileSize(pages));
}

SharedCache::~SharedCache() {
  absl::MutexLock l(&mu_);
  for (auto& [id, f] : files_) f->header->retired.store(1, std::memory_order_release);
}

absl::StatusOr<std::unique_ptr<SharedCache::File>> SharedCache::Create(uint64_t len) {
  auto f = std::make_unique<File>();
  f->len = len;
  f->pages = (len + kPageSize - 1) / kPageSize;
  auto data = SealedMemfd("svm-cache", f->pages * kPageSize);
  if (!data.ok()) return data.status();
  auto words = SealedMemfd("svm-cache-words", abi::WordsFileSize(f->pages));
  if (!words.ok()) return words.status();
  f->data = std::move(*data);
  f->words = std::move(*words);
  void* m = ::mmap(nullptr, abi::WordsFileSize(f->pages), PROT_READ | PROT_WRITE, MAP_SHARED,
                   f->words.get(), 0);
  if (m == MAP_FAILED) return ErrnoStatus(errno, "map the cache's version words");
  f->header = static_cast<abi::CacheHeader*>(m);
  f->word = reinterpret_cast<std::atomic<uint64_t>*>(static_cast<uint8_t*>(m) + abi::kWordsOffset);
  f->header->magic = abi::kMagic;
  f->header->version = abi::kVersion;
  f->header->len = len;
  f->header->pages = f->pages;
  return f;
}

void SharedCache::Punch(File& f, uint64_t first, uint64_t end) {
  if (end > f.pages) end = f.pages;
  if (first >= end) return;
  for (uint64_t p = first; p < end; ++p) f.word[p].store(0, std::memory_order_seq_cst);
  if (::fallocate(f.data.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(first * kPageSize), static_cast<off_t>((end - first) * kPageSize)) != 0) {
    // The words say absent, so no reader uses the page; only memory is lost.
    spdlog::warn("cannot punch cached pages out: {}", std::strerror(errno));
  }
}

absl::Status SharedCache::Reset(uint64_t import_id, uint64_t len) {
  absl::MutexLock l(&mu_);
  auto it = files_.find(import_id);
  if (it != files_.end() && it->second->len == len) {
    DropLocked(import_id, 0, UINT64_MAX);
    return absl::OkStatus();
  }
  auto f = Create(len);
  if (!f.ok()) return f.status();
  if (it != files_.end()) {
    DropLocked(import_id, 0, UINT64_MAX);
    it->second->header->retired.store(1, std::memory_order_release);
    it->second = std::move(*f);
  } else {
    files_.emplace(import_id, std::move(*f));
  }
  return absl::OkStatus();
}

void SharedCache::Remove(uint64_t import_id) {
  absl::MutexLock l(&mu_);
  auto it = files_.find(import_id);
  if (it == files_.end()) return;
  DropLocked(import_id, 0, UINT64_MAX);
  it->second->header->retired.store(1, std::memory_order_release);
  files_.erase(it);
}

absl::StatusOr<CacheFiles> SharedCache::OpenForClient(uint64_t import_id) const {
  absl::MutexLock l(&mu_);
  auto it = files_.find(import_id);
  if (it == files_.end()) return absl::NotFoundError("the import has no cache");
  CacheFiles out;
  auto data = ReopenReadOnly(it->second->data.get());
  if (!data.ok()) return data.status();
  auto words = ReopenReadOnly(it->second->words.get());
  if (!words.ok()) return words.status();
  out.data = std::move(*data);
  out.words = std::move(*words);
  out.len = it->second->len;
  return out;
}

bool SharedCache::Lookup(uint64_t import_id, uint64_t page, absl::Span<uint8_t> dst) {
  SVM_CHECK(dst.size() == kPageSize);
  absl::MutexLock l(&mu_);
  auto it = pages_.find(Key{import_id, page});
  if (it == pages_.end()) return false;
  File& f = *files_.at(import_id);
  // Under mu_ nothing changes the page; pread does not fault a hole in.
  ssize_t n = ::pread(f.data.get(), dst.data(), kPageSize, static_cast<off_t>(page * kPageSize));
  if (n != static_cast<ssize_t>(kPageSize)) return false;
  lru_.splice(lru_.begin(), lru_, it->second);
  return true;
}

void SharedCache::Insert(uint64_t import_id, uint64_t page, absl::Span<const uint8_t> data) {
  SVM_CHECK(data.size() == kPageSize);
  if (capacity_ == 0) return;
  absl::MutexLock l(&mu_);
  auto fit = files_.find(import_id);
  if (fit == files_.end() || page >= fit->second->pages) return;
  File& f = *fit->second;
  Key k{import_id, page};
  auto it = pages_.find(k);
  if (it != pages_.end()) {
    // A page is never rewritten in place: a client copying it would see a mix.
    Punch(f, page, page + 1);
    lru_.splice(lru_.begin(), lru_, it->second);
  } else {
    while (pages_.size() >= capacity_) {
      const Key victim = lru_.back();
      DropLocked(victim.import_id, victim.page, 1);
    }
    lru_.push_front(k);
    pages_.emplace(k, lru_.begin());
  }
  ssize_t n = ::pwrite(f.data.get(), data.data(), kPageSize, static_cast<off_t>(page * kPageSize));
  if (n != static_cast<ssize_t>(kPageSize)) {
    spdlog::warn("cannot install a page in the shared cache: {}", n < 0 ? std::strerror(errno) : "short write");
    Punch(f, page, page + 1);
    EraseLocked(pages_.find(k));
    return;
  }
  f.word[page].store(f.next_version++, std::memory_order_release);
}

void SharedCache::EraseLocked(std::map<Key, std::list<Key>::iterator>::iterator it) {
  lru_.erase(it->second);
  pages_.erase(it);
}

uint64_t SharedCache::DropLocked(uint64_t import_id, uint64_t first, uint64_t n) {
  uint64_t dropped = 0;
  const uint64_t end = first + n < first ? UINT64_MAX : first + n;
  auto fit = files_.find(import_id);
  auto it = pages_.lower_bound(Key{import_id, first});
  // Punch contiguous runs of cached pages with one call each.
  uint64_t run_first = 0, run_end = 0;
  while (it != pages_.end() && it->first.import_id == import_id && it->first.page < end) {
    const uint64_t p = it->first.page;
    if (run_end != p) {
      if (run_end > run_first && fit != files_.end()) Punch(*fit->second, run_first, run_end);
      run_first = p;
    }
    run_end = p + 1;
    auto next = std::next(it);
    EraseLocked(it);
    it = next;
    ++dropped;
  }
  if (run_end > run_first && fit != files_.end()) Punch(*fit->second, run_first, run_end);
  // The whole import: also what clients faulted in by reading holes.
  if (first == 0 && end == UINT64_MAX && fit != files_.end()) Punch(*fit->second, 0, fit->second->pages);
  return dropped;
}

uint64_t SharedCache::Drop(uint64_t import_id, uint64_t first, uint64_t n) {
  absl::MutexLock l(&mu_);
  return DropLocked(import_id, first, n);
}

uint64_t SharedCache::DropImport(uint64_t import_id) { return Drop(import_id, 0, UINT64_MAX); }

void SharedCache::SetSeq(uint64_t import_id, uint64_t seq) {
  absl::MutexLock l(&mu_);
  auto it = files_.find(import_id);
  if (it != files_.end()) it->second->header->seq.store(seq, std::memory_order_release);
}

void SharedCache::PunchStrays() {
  absl::MutexLock l(&mu_);
  for (auto& [id, f] : files_) {
    const off_t size = static_cast<off_t>(f->pages * kPageSize);
    off_t pos = 0;
    while (pos < size) {
      const off_t data = ::lseek(f->data.get(), pos, SEEK_DATA);
      if (data < 0 || data >= size) break;
      off_t hole = ::lseek(f->data.get(), data, SEEK_HOLE);
      if (hole < 0 || hole > size) hole = size;
      for (uint64_t p = static_cast<uint64_t>(data) / kPageSize; p * kPageSize < static_cast<uint64_t>(hole);
           ++p) {
        if (f->word[p].load(std::memory_order_relaxed) != 0) continue;
        if (::fallocate(f->data.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        static_cast<off_t>(p * kPageSize), static_cast<off_t>(kPageSize)) == 0) {
          ++strays_;
        }
      }
      pos = hole;
    }
  }
}

void SharedCache::SetLease(uint64_t import_id, int64_t until_ns) {
  absl::MutexLock l(&mu_);
  auto it = files_.find(import_id);
  if (it != files_.end()) it->second->header->lease_until_ns.store(until_ns, std::memory_order_release);
}

uint64_t SharedCache::CountImport(uint64_t import_id) const {
  absl::MutexLock l(&mu_);
  uint64_t n = 0;
  for (auto it = pages_.lower_bound(Key{import_id, 0});
       it != pages_.end() && it->first.import_id == import_id; ++it) {
    ++n;
  }
  return n;
}

uint64_t SharedCache::size() const {
  absl::MutexLock l(&mu_);
  return pages_.size();
}

}  // namespace svm::session
