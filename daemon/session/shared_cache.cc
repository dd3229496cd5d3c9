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

SharedCacheFile::~SharedCacheFile() {
  {
    absl::MutexLock l(&area_mu);
    area.reset();  // deregistered while base is still mapped
  }
  if (header != nullptr) ::munmap(header, abi::WordsFileSize(pages));
  if (base != nullptr) ::munmap(base, pages * kPageSize);
}

SharedCache::~SharedCache() {
  absl::MutexLock l(&mu_);
  for (auto& [id, f] : files_) f->header->retired.store(1, std::memory_order_release);
}

absl::StatusOr<std::shared_ptr<SharedCache::File>> SharedCache::Create(uint64_t len) {
  auto f = std::make_shared<File>();
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
  if (f->pages > 0) {
    // Landings write here. Reserving address space only: pages come into
    // being as fetches write them (and go again when punched).
    void* d = ::mmap(nullptr, f->pages * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                     f->data.get(), 0);
    if (d == MAP_FAILED) return ErrnoStatus(errno, "map the cache file");
    // Not inherited by children (svmd forks nothing, but a fork must not
    // take a writable view of every import's cache along).
    ::madvise(d, f->pages * kPageSize, MADV_DONTFORK);
    f->base = static_cast<uint8_t*>(d);
  }
  f->word = reinterpret_cast<std::atomic<uint64_t>*>(static_cast<uint8_t*>(m) + abi::kWordsOffset);
  f->header->magic = abi::kMagic;
  f->header->version = abi::kVersion;
  f->header->len = len;
  f->header->pages = f->pages;
  return f;
}

void SharedCache::PunchLocked(uint64_t import_id, File& f, uint64_t first, uint64_t end) {
  if (end > f.pages) end = f.pages;
  if (first >= end) return;
  // A claimed page is being written by a fetch: it is not punched under the
  // fetch (the write would go on into a page the file no longer holds, or
  // fault a new one in half-written); its word is 0 already, and the drop
  // is remembered so that Publish never installs it.
  auto c = claimed_.lower_bound(Key{import_id, first});
  uint64_t p = first;
  while (p < end) {
    while (c != claimed_.end() && c->first.import_id == import_id && c->first.page < p) ++c;
    const bool in_claim = c != claimed_.end() && c->first.import_id == import_id && c->first.page < end;
    const uint64_t run_end = in_claim ? c->first.page : end;
    if (run_end > p) PunchRun(f, p, run_end);
    if (!in_claim) break;
    if (files_.count(import_id) != 0 && files_.at(import_id).get() == &f) c->second = true;
    p = c->first.page + 1;
  }
}

void SharedCache::PunchRun(File& f, uint64_t first, uint64_t end) {
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
    // Landings in the old file end with it (EndLanding sees it replaced).
    ForgetClaimsLocked(import_id);
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
  ForgetClaimsLocked(import_id);
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

bool SharedCache::Touch(uint64_t import_id, uint64_t page) {
  absl::MutexLock l(&mu_);
  auto it = pages_.find(Key{import_id, page});
  if (it == pages_.end()) return false;
  lru_.splice(lru_.begin(), lru_, it->second);
  return true;
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
  if (claimed_.count(k) != 0) return;  // a fetch is landing in it
  auto it = pages_.find(k);
  if (it != pages_.end()) {
    // A page is never rewritten in place: a client copying it would see a mix.
    PunchLocked(import_id, f, page, page + 1);
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
    PunchLocked(import_id, f, page, page + 1);
    EraseLocked(pages_.find(k));
    return;
  }
  f.word[page].store(f.next_version++, std::memory_order_release);
}

void SharedCache::ForgetClaimsLocked(uint64_t import_id) {
  claimed_.erase(claimed_.lower_bound(Key{import_id, 0}), claimed_.lower_bound(Key{import_id + 1, 0}));
}

SharedCache::Landing::~Landing() {
  if (!done_ && cache_ != nullptr) cache_->Abandon(*this);
}

const transport::LandingArea* SharedCache::Landing::Area(RegisterArea register_area) {
  File& f = *file_;
  absl::MutexLock l(&f.area_mu);
  if (f.area == nullptr) {
    auto a = register_area(f.base, f.pages * kPageSize);
    if (!a.ok()) return nullptr;
    f.area = std::move(*a);
  }
  return f.area.get();
}

std::unique_ptr<SharedCache::Landing> SharedCache::Claim(uint64_t import_id, uint64_t first, uint64_t n) {
  if (capacity_ == 0 || n == 0) return nullptr;
  absl::MutexLock l(&mu_);
  auto fit = files_.find(import_id);
  if (fit == files_.end() || fit->second->base == nullptr || first >= fit->second->pages) return nullptr;
  File& f = *fit->second;
  n = std::min(n, f.pages - first);
  uint64_t k = 0;
  while (k < n) {
    const Key key{import_id, first + k};
    if (pages_.count(key) != 0 || claimed_.count(key) != 0) break;
    ++k;
  }
  if (k == 0) return nullptr;
  // A page present in the file without a word is a stray (a client's read
  // of a hole faulted a zero page in): a fetch overwrites it whole before
  // it is published, so it needs no punch first.
  for (uint64_t i = 0; i < k; ++i) claimed_.emplace(Key{import_id, first + i}, false);
  auto land = std::unique_ptr<Landing>(new Landing());
  land->cache_ = this;
  land->file_ = fit->second;
  land->import_id_ = import_id;
  land->first_ = first;
  land->n_ = k;
  land->span_ = absl::MakeSpan(f.base + first * kPageSize, k * kPageSize);
  return land;
}

uint64_t SharedCache::Publish(Landing& l) {
  uint64_t published = 0;
  EndLanding(l, /*publish=*/true, &published);
  return published;
}

void SharedCache::Abandon(Landing& l) { EndLanding(l, /*publish=*/false, nullptr); }

void SharedCache::EndLanding(Landing& l, bool publish, uint64_t* published) {
  SVM_CHECK(!l.done_);
  l.done_ = true;
  absl::MutexLock lock(&mu_);
  auto fit = files_.find(l.import_id_);
  // The import's files were replaced or removed meanwhile: the pages go
  // with the old file (its last reference is the landing's).
  const bool current = fit != files_.end() && fit->second == l.file_;
  for (uint64_t i = 0; i < l.n_; ++i) {
    const uint64_t page = l.first_ + i;
    const Key k{l.import_id_, page};
    auto c = claimed_.find(k);
    bool dropped = true;
    if (current && c != claimed_.end()) {
      dropped = c->second;
      claimed_.erase(c);
    }
    if (!current) continue;
    if (!publish || dropped) {
      PunchRun(*l.file_, page, page + 1);
      continue;
    }
    while (pages_.size() >= capacity_) {
      const Key victim = lru_.back();
      DropLocked(victim.import_id, victim.page, 1);
    }
    lru_.push_front(k);
    pages_.emplace(k, lru_.begin());
    // Release: the page's bytes (written by this thread's recv, or by the
    // NIC before the completion this thread polled) before the word.
    l.file_->word[page].store(l.file_->next_version++, std::memory_order_release);
    if (published != nullptr) ++*published;
  }
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
      if (run_end > run_first && fit != files_.end()) PunchLocked(import_id, *fit->second, run_first, run_end);
      run_first = p;
    }
    run_end = p + 1;
    auto next = std::next(it);
    EraseLocked(it);
    it = next;
    ++dropped;
  }
  if (run_end > run_first && fit != files_.end()) PunchLocked(import_id, *fit->second, run_first, run_end);
  // Landings in the range: the invalidation happened during their fetch.
  if (fit != files_.end()) {
    for (auto c = claimed_.lower_bound(Key{import_id, first});
         c != claimed_.end() && c->first.import_id == import_id && c->first.page < end; ++c) {
      c->second = true;
    }
  }
  // The whole import: also what clients faulted in by reading holes.
  if (first == 0 && end == UINT64_MAX && fit != files_.end()) {
    PunchLocked(import_id, *fit->second, 0, fit->second->pages);
  }
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
        if (claimed_.count(Key{id, p}) != 0) continue;  // a fetch is landing in it
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
