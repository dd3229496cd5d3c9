// daemon/session/shared_cache: the importer's bounded LRU cache of pages,
// shared with clients through memfds.
#include "daemon/session/shared_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "daemon/source/mirror_source.h"
#include "daemon/transport/transport.h"
#include "common/check.h"
#include "gtest/gtest.h"

namespace svm::session {
namespace {

using source::kPageSize;

constexpr uint64_t kImportPages = 64;

// A cache with imports 1, 2 and 3 of kImportPages pages each.
class TestCache : public SharedCache {
 public:
  explicit TestCache(uint64_t capacity) : SharedCache(capacity) {
    for (uint64_t id = 1; id <= 3; ++id) SVM_CHECK(Reset(id, kImportPages * kPageSize).ok());
  }
};

std::vector<uint8_t> PageOf(uint8_t fill) { return std::vector<uint8_t>(kPageSize, fill); }

// Whether (import, page) is cached, and with which fill byte (checking that
// the whole page carries it).
int CachedFill(SharedCache& c, uint64_t import_id, uint64_t page) {
  std::vector<uint8_t> buf(kPageSize, 0xEE);
  if (!c.Lookup(import_id, page, absl::MakeSpan(buf))) return -1;
  for (uint8_t b : buf) {
    if (b != buf[0]) return -2;
  }
  return buf[0];
}

TEST(SharedCache, MissOnEmpty) {
  TestCache c(4);
  std::vector<uint8_t> buf(kPageSize, 7);
  EXPECT_FALSE(c.Lookup(1, 0, absl::MakeSpan(buf)));
  EXPECT_EQ(buf[0], 7) << "a miss must not touch dst";
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.capacity(), 4u);
}

TEST(SharedCache, InsertThenLookup) {
  TestCache c(4);
  auto p = PageOf(0xAB);
  p[100] = 0xAB;
  c.Insert(1, 5, p);
  EXPECT_EQ(CachedFill(c, 1, 5), 0xAB);
  EXPECT_EQ(CachedFill(c, 1, 4), -1);
  EXPECT_EQ(CachedFill(c, 2, 5), -1) << "pages are per import";
  EXPECT_EQ(c.size(), 1u);
  EXPECT_EQ(c.CountImport(1), 1u);
  EXPECT_EQ(c.CountImport(2), 0u);
}

TEST(SharedCache, InsertCopiesTheData) {
  TestCache c(4);
  auto p = PageOf(1);
  c.Insert(1, 0, p);
  p.assign(kPageSize, 2);  // the caller's buffer is reused
  EXPECT_EQ(CachedFill(c, 1, 0), 1);
}

TEST(SharedCache, InsertReplaces) {
  TestCache c(4);
  c.Insert(1, 0, PageOf(1));
  c.Insert(1, 0, PageOf(2));
  EXPECT_EQ(CachedFill(c, 1, 0), 2);
  EXPECT_EQ(c.size(), 1u);
}

TEST(SharedCache, EvictsLeastRecentlyInsertedAtCapacity) {
  TestCache c(3);
  for (uint64_t p = 0; p < 3; ++p) c.Insert(1, p, PageOf(static_cast<uint8_t>(p + 10)));
  EXPECT_EQ(c.size(), 3u);
  c.Insert(1, 3, PageOf(13));
  EXPECT_EQ(c.size(), 3u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1) << "the oldest page goes first";
  EXPECT_EQ(CachedFill(c, 1, 1), 11);
  EXPECT_EQ(CachedFill(c, 1, 2), 12);
  EXPECT_EQ(CachedFill(c, 1, 3), 13);
}

TEST(SharedCache, LookupRefreshesRecency) {
  TestCache c(3);
  for (uint64_t p = 0; p < 3; ++p) c.Insert(1, p, PageOf(static_cast<uint8_t>(p)));
  EXPECT_EQ(CachedFill(c, 1, 0), 0);  // 0 becomes the most recent; 1 is now the oldest
  c.Insert(1, 3, PageOf(3));
  EXPECT_EQ(CachedFill(c, 1, 1), -1);
  EXPECT_EQ(CachedFill(c, 1, 0), 0);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
  EXPECT_EQ(CachedFill(c, 1, 3), 3);
}

TEST(SharedCache, ReplaceRefreshesRecency) {
  TestCache c(2);
  c.Insert(1, 0, PageOf(0));
  c.Insert(1, 1, PageOf(1));
  c.Insert(1, 0, PageOf(9));  // 1 is now the oldest
  c.Insert(1, 2, PageOf(2));
  EXPECT_EQ(CachedFill(c, 1, 1), -1);
  EXPECT_EQ(CachedFill(c, 1, 0), 9);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
}

TEST(SharedCache, EvictionCrossesImports) {
  TestCache c(2);
  c.Insert(1, 0, PageOf(1));
  c.Insert(2, 0, PageOf(2));
  c.Insert(3, 0, PageOf(3));
  EXPECT_EQ(c.size(), 2u);
  EXPECT_EQ(c.CountImport(1), 0u);
  EXPECT_EQ(CachedFill(c, 2, 0), 2);
  EXPECT_EQ(CachedFill(c, 3, 0), 3);
}

TEST(SharedCache, CapacityZeroCachesNothing) {
  TestCache c(0);
  c.Insert(1, 0, PageOf(1));
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1);
  EXPECT_EQ(c.Drop(1, 0, 10), 0u);
}

TEST(SharedCache, CapacityOne) {
  TestCache c(1);
  c.Insert(1, 0, PageOf(1));
  c.Insert(1, 1, PageOf(2));
  EXPECT_EQ(c.size(), 1u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1);
  EXPECT_EQ(CachedFill(c, 1, 1), 2);
}

class SharedCacheDrop : public ::testing::Test {
 protected:
  void SetUp() override {
    for (uint64_t p = 0; p < 10; ++p) {
      cache_.Insert(1, p, PageOf(static_cast<uint8_t>(p)));
      cache_.Insert(2, p, PageOf(static_cast<uint8_t>(100 + p)));
    }
  }
  std::vector<uint64_t> Cached(uint64_t import_id) {
    std::vector<uint64_t> out;
    for (uint64_t p = 0; p < 12; ++p) {
      if (CachedFill(cache_, import_id, p) >= 0) out.push_back(p);
    }
    return out;
  }
  TestCache cache_{100};
};

TEST_F(SharedCacheDrop, PartialRange) {
  EXPECT_EQ(cache_.Drop(1, 3, 4), 4u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 7, 8, 9}));
  EXPECT_EQ(cache_.CountImport(2), 10u) << "another import's pages stay";
  EXPECT_EQ(cache_.size(), 16u);
}

TEST_F(SharedCacheDrop, ZeroPages) {
  EXPECT_EQ(cache_.Drop(1, 3, 0), 0u);
  EXPECT_EQ(cache_.CountImport(1), 10u);
}

TEST_F(SharedCacheDrop, BeyondEnd) {
  EXPECT_EQ(cache_.Drop(1, 8, 100), 2u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(cache_.Drop(1, 50, 10), 0u);
  EXPECT_EQ(cache_.CountImport(2), 10u);
}

TEST_F(SharedCacheDrop, MaxLengthDoesNotWrap) {
  // first + UINT64_MAX wraps around: it must mean "to the end", not "nothing".
  EXPECT_EQ(cache_.Drop(1, 4, UINT64_MAX), 6u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_EQ(cache_.CountImport(2), 10u);
  EXPECT_EQ(cache_.Drop(2, 0, UINT64_MAX), 10u);
  EXPECT_EQ(cache_.size(), 4u);
}

TEST_F(SharedCacheDrop, RangeNearTheTopDoesNotWrap) {
  EXPECT_EQ(cache_.Drop(1, UINT64_MAX - 5, 100), 0u) << "a wrapped end must not reach low pages";
  EXPECT_EQ(cache_.CountImport(1), 10u);
}

TEST_F(SharedCacheDrop, PagesPastTheEndAreNotCached) {
  cache_.Insert(1, kImportPages, PageOf(1));
  cache_.Insert(4, 0, PageOf(1));  // an import without files
  EXPECT_EQ(CachedFill(cache_, 1, kImportPages), -1);
  EXPECT_EQ(CachedFill(cache_, 4, 0), -1);
  EXPECT_EQ(cache_.size(), 20u);
}

TEST_F(SharedCacheDrop, DropImportIsolation) {
  EXPECT_EQ(cache_.DropImport(1), 10u);
  EXPECT_EQ(cache_.CountImport(1), 0u);
  EXPECT_EQ(cache_.CountImport(2), 10u);
  EXPECT_EQ(Cached(2).size(), 10u);
  EXPECT_EQ(cache_.DropImport(1), 0u);
  EXPECT_EQ(cache_.DropImport(3), 0u) << "an unknown import";
  EXPECT_EQ(cache_.size(), 10u);
}

TEST_F(SharedCacheDrop, DroppedSlotsAreReused) {
  TestCache c(2);
  c.Insert(1, 0, PageOf(0));
  c.Insert(1, 1, PageOf(1));
  EXPECT_EQ(c.Drop(1, 0, 1), 1u);
  c.Insert(1, 2, PageOf(2));  // fits without evicting page 1
  EXPECT_EQ(CachedFill(c, 1, 1), 1);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
}


// What a client does: maps the read-only files and copies pages checked
// against their version words.
class ClientView {
 public:
  explicit ClientView(CacheFiles f) : files_(std::move(f)) {
    pages_ = (files_.len + kPageSize - 1) / kPageSize;
    data_ = static_cast<uint8_t*>(::mmap(nullptr, pages_ * kPageSize, PROT_READ, MAP_SHARED, files_.data.get(), 0));
    words_ = static_cast<uint8_t*>(
        ::mmap(nullptr, abi::WordsFileSize(pages_), PROT_READ, MAP_SHARED, files_.words.get(), 0));
    SVM_CHECK(data_ != MAP_FAILED && words_ != MAP_FAILED);
  }
  ~ClientView() {
    ::munmap(data_, pages_ * kPageSize);
    ::munmap(words_, abi::WordsFileSize(pages_));
  }
  const abi::CacheHeader& header() const { return *reinterpret_cast<const abi::CacheHeader*>(words_); }
  // The fill byte of a valid page, -1 when the client must fetch it.
  int Fill(uint64_t page, uint64_t* version = nullptr) {
    std::vector<uint8_t> buf(kPageSize);
    uint64_t v = 0;
    auto* word = reinterpret_cast<const std::atomic<uint64_t>*>(words_ + abi::kWordsOffset) + page;
    if (!abi::TryCopyPage(word, data_ + page * kPageSize, buf.data(), kPageSize, &v)) return -1;
    if (version) *version = v;
    return buf[0];
  }
  // The page's version word: what a mapping's pager checks before it maps
  // a page present in the file (UFFDIO_CONTINUE only while non-zero).
  uint64_t Word(uint64_t page) const {
    return (reinterpret_cast<const std::atomic<uint64_t>*>(words_ + abi::kWordsOffset) + page)
        ->load(std::memory_order_acquire);
  }
  // Bytes of memory the data file holds (punched pages hold none).
  uint64_t resident() const {
    struct stat st {};
    SVM_CHECK(::fstat(files_.data.get(), &st) == 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
  const CacheFiles& files() const { return files_; }

 private:
  CacheFiles files_;
  uint64_t pages_ = 0;
  uint8_t* data_ = nullptr;
  uint8_t* words_ = nullptr;
};

TEST(SharedCacheClient, SeesInsertedPagesAndNotDroppedOnes) {
  TestCache c(100);
  auto f = c.OpenForClient(1);
  ASSERT_TRUE(f.ok()) << f.status();
  ClientView v(std::move(*f));
  EXPECT_EQ(v.header().magic, abi::kMagic);
  EXPECT_EQ(v.header().len, kImportPages * kPageSize);
  EXPECT_EQ(v.Fill(3), -1);
  c.Insert(1, 3, PageOf(0x33));
  c.Insert(1, 4, PageOf(0x44));
  EXPECT_EQ(v.Fill(3), 0x33);
  EXPECT_EQ(v.Fill(4), 0x44);
  EXPECT_EQ(v.resident(), 2 * kPageSize);
  c.Drop(1, 3, 1);
  EXPECT_EQ(v.Fill(3), -1) << "a dropped page must not be served to clients";
  EXPECT_EQ(v.Fill(4), 0x44);
  EXPECT_EQ(v.resident(), kPageSize) << "a dropped page is punched out of the memfd";
  c.SetSeq(1, 42);
  EXPECT_EQ(v.header().seq.load(), 42u);
}

TEST(SharedCacheClient, AReplacedPageHasANewVersion) {
  TestCache c(100);
  ClientView v(*c.OpenForClient(1));
  uint64_t v1 = 0, v2 = 0;
  c.Insert(1, 0, PageOf(1));
  ASSERT_EQ(v.Fill(0, &v1), 1);
  c.Drop(1, 0, 1);
  c.Insert(1, 0, PageOf(2));
  ASSERT_EQ(v.Fill(0, &v2), 2);
  EXPECT_NE(v1, v2) << "a copy that spans a drop and a refill must see the word change";
  c.Insert(1, 0, PageOf(3));
  uint64_t v3 = 0;
  ASSERT_EQ(v.Fill(0, &v3), 3);
  EXPECT_NE(v2, v3);
}

TEST(SharedCacheClient, EvictionIsSeenByClients) {
  TestCache c(2);
  ClientView v(*c.OpenForClient(1));
  c.Insert(1, 0, PageOf(1));
  c.Insert(1, 1, PageOf(2));
  c.Insert(1, 2, PageOf(3));
  EXPECT_EQ(v.Fill(0), -1);
  EXPECT_EQ(v.Fill(2), 3);
}

TEST(SharedCacheClient, ResetEmptiesAndAnotherLengthRetires) {
  TestCache c(100);
  ClientView v(*c.OpenForClient(1));
  c.Insert(1, 0, PageOf(1));
  ASSERT_TRUE(c.Reset(1, kImportPages * kPageSize).ok());
  EXPECT_EQ(v.Fill(0), -1);
  EXPECT_EQ(v.header().retired.load(), 0u) << "the same length keeps the files";
  c.Insert(1, 0, PageOf(1));
  ASSERT_TRUE(c.Reset(1, 2 * kPageSize).ok());
  EXPECT_EQ(v.header().retired.load(), 1u);
  EXPECT_EQ(v.Fill(0), -1) << "a retired cache serves nothing";
  ClientView w(*c.OpenForClient(1));
  EXPECT_EQ(w.header().len, 2 * kPageSize);
  c.Remove(1);
  EXPECT_EQ(w.header().retired.load(), 1u);
  EXPECT_FALSE(c.OpenForClient(1).ok());
}

TEST(SharedCacheClient, StrayPagesAClientFaultedInArePunchedOut) {
  TestCache c(100);
  c.Insert(1, 0, PageOf(7));
  auto f = c.OpenForClient(1);
  ASSERT_TRUE(f.ok());
  // A read of a hole through a private mapping allocates a zero page in
  // the shared file (what a copy that raced a punch does).
  auto* m = static_cast<const volatile uint8_t*>(
      ::mmap(nullptr, kImportPages * kPageSize, PROT_READ, MAP_PRIVATE, f->data.get(), 0));
  ASSERT_NE(m, MAP_FAILED);
  (void)m[5 * kPageSize];
  ClientView v(std::move(*f));
  EXPECT_EQ(v.resident(), 2 * kPageSize);
  c.PunchStrays();
  EXPECT_EQ(v.resident(), kPageSize) << "the stray page is still there";
  EXPECT_EQ(c.strays(), 1u);
  EXPECT_EQ(v.Fill(0), 7) << "a cached page is not a stray";
  ::munmap(const_cast<uint8_t*>(m), kImportPages * kPageSize);
}


// ---- fetches landing in the cache file (the protocol in shared_cache.h) ----

// What a fetch does to its landing: writes every byte of the claimed pages.
void LandInto(SharedCache::Landing& l, uint8_t fill) { std::memset(l.span().data(), fill, l.span().size()); }

TEST(SharedCacheLanding, ClaimedPagesAreAbsentUntilPublished) {
  TestCache c(100);
  ClientView v(*c.OpenForClient(1));
  auto l = c.Claim(1, 4, 2);
  ASSERT_NE(l, nullptr);
  EXPECT_EQ(l->first_page(), 4u);
  EXPECT_EQ(l->npages(), 2u);
  EXPECT_EQ(l->span().size(), 2 * kPageSize);
  LandInto(*l, 0x5A);
  EXPECT_EQ(v.resident(), 2 * kPageSize) << "the fetch writes the cache file itself";
  for (uint64_t p : {4, 5}) {
    EXPECT_EQ(v.Word(p), 0u) << "a mapping would map page " << p << " before the install rule said yes";
    EXPECT_EQ(v.Fill(p), -1) << "a client copies page " << p << " before the install rule said yes";
    EXPECT_EQ(CachedFill(c, 1, p), -1);
  }
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.claimed(), 2u);
  EXPECT_EQ(c.Publish(*l), 2u);
  EXPECT_NE(v.Word(4), 0u);
  EXPECT_NE(v.Word(5), v.Word(4)) << "every published page has a version of its own";
  EXPECT_EQ(v.Fill(4), 0x5A);
  EXPECT_EQ(v.Fill(5), 0x5A);
  EXPECT_EQ(CachedFill(c, 1, 5), 0x5A);
  EXPECT_EQ(c.size(), 2u);
  EXPECT_EQ(c.claimed(), 0u);
}

TEST(SharedCacheLanding, ClaimStopsAtCachedAndClaimedPages) {
  TestCache c(100);
  c.Insert(1, 3, PageOf(3));
  auto a = c.Claim(1, 0, 8);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->npages(), 3u) << "the run stops before the cached page 3";
  EXPECT_EQ(c.Claim(1, 3, 1), nullptr) << "a cached page is never landed over in place";
  EXPECT_EQ(c.Claim(1, 1, 1), nullptr) << "two fetches never land in one page";
  auto b = c.Claim(1, 4, 1000);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->npages(), kImportPages - 4) << "a claim ends at the end of the import";
  EXPECT_EQ(c.Claim(1, kImportPages, 1), nullptr);
  c.Insert(1, 5, PageOf(9));
  EXPECT_EQ(CachedFill(c, 1, 5), -1) << "Insert must leave a page alone while a fetch lands in it";
  EXPECT_EQ(c.Claim(9, 0, 1), nullptr) << "an import without files";
  TestCache none(0);
  EXPECT_EQ(none.Claim(1, 0, 1), nullptr) << "--cache-mb 0 caches nothing";
}

// The raced fetch: an invalidation of the page arrives while the fetch is
// writing it, and the install rule says no. Neither a client's checked copy
// (TryCopyPage over its mapping of the file) nor a mapping's pager (maps a
// page present in the file only while its word is non-zero) ever sees the
// page as valid: not while the fetch writes it, not after.
TEST(SharedCacheLanding, AFetchThatRacedAnInvalidationIsNeverVisible) {
  TestCache c(100);
  ClientView v(*c.OpenForClient(1));
  constexpr uint64_t kPage = 7;
  auto l = c.Claim(1, kPage, 1);
  ASSERT_NE(l, nullptr);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> looks{0}, seen_valid{0}, seen_word{0};
  std::thread reader([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      if (v.Word(kPage) != 0) seen_word.fetch_add(1);
      if (v.Fill(kPage) != -1) seen_valid.fetch_add(1);
      looks.fetch_add(1);
    }
  });
  // The fetch, written in pieces as a socket or a NIC writes it, with the
  // invalidation (svmd's OnInvalidation: SharedCache::Drop under the
  // import's lock) in the middle of it.
  uint8_t* page = l->span().data();
  for (int round = 0; round < 200; ++round) {
    for (uint64_t at = 0; at < kPageSize; at += 512) std::memset(page + at, round & 0xff, 512);
    if (round == 100) {
      EXPECT_EQ(c.Drop(1, kPage, 1), 0u) << "a landing page is not cached yet";
    }
    while (looks.load() < static_cast<uint64_t>(round)) std::this_thread::yield();
  }
  // The install rule said no (the invalidation is newer than the reply).
  c.Abandon(*l);
  for (int i = 0; i < 1000; ++i) {
    if (v.Word(kPage) != 0) seen_word.fetch_add(1);
    if (v.Fill(kPage) != -1) seen_valid.fetch_add(1);
  }
  stop = true;
  reader.join();
  EXPECT_EQ(seen_word.load(), 0u) << "a mapping could have mapped the raced page";
  EXPECT_EQ(seen_valid.load(), 0u) << "a client copied the raced page as valid";
  EXPECT_EQ(CachedFill(c, 1, kPage), -1);
  EXPECT_EQ(v.resident(), 0u) << "the raced page is punched once the fetch stopped writing";
  EXPECT_EQ(c.claimed(), 0u);
}

TEST(SharedCacheLanding, PublishAfterADropInstallsNothing) {
  // The table asks the install rule first; this is the cache's own guard:
  // a landing that a Drop met during the fetch never becomes valid.
  TestCache c(100);
  ClientView v(*c.OpenForClient(1));
  auto l = c.Claim(1, 2, 3);
  ASSERT_NE(l, nullptr);
  LandInto(*l, 0x21);
  c.Drop(1, 3, 1);
  EXPECT_EQ(c.Publish(*l), 2u);
  EXPECT_EQ(v.Fill(2), 0x21);
  EXPECT_EQ(v.Fill(3), -1) << "the page an invalidation met during the fetch was published";
  EXPECT_EQ(v.Word(3), 0u);
  EXPECT_EQ(v.Fill(4), 0x21);
  EXPECT_EQ(v.resident(), 2 * kPageSize);
  // A whole-import drop (a lost connection, an expired lease) meets every
  // landing of the import.
  auto m = c.Claim(1, 10, 2);
  ASSERT_NE(m, nullptr);
  LandInto(*m, 0x22);
  c.DropImport(1);
  EXPECT_EQ(c.Publish(*m), 0u);
  EXPECT_EQ(v.Fill(10), -1);
  EXPECT_EQ(v.resident(), 0u);
}

TEST(SharedCacheLanding, NothingPunchesThePagesUnderTheFetch) {
  // Drop, eviction and PunchStrays leave a landing's pages in the file
  // while the fetch writes them: a punch under a socket's or a NIC's write
  // loses what was written before it (a pinned registration keeps writing
  // into a page the file no longer holds).
  TestCache c(2);
  ClientView v(*c.OpenForClient(1));
  auto l = c.Claim(1, 0, 1);
  ASSERT_NE(l, nullptr);
  std::memset(l->span().data(), 0x31, kPageSize / 2);
  c.Drop(1, 0, 1);
  c.DropImport(1);  // punches the whole file, holes and strays included
  c.PunchStrays();  // its word is 0: it looks like a stray
  c.Insert(1, 1, PageOf(1));
  c.Insert(1, 2, PageOf(2));
  c.Insert(1, 3, PageOf(3));  // evicts, at capacity 2
  EXPECT_EQ(c.strays(), 0u) << "PunchStrays punched a landing";
  std::memset(l->span().data() + kPageSize / 2, 0x32, kPageSize / 2);
  std::vector<uint8_t> got(kPageSize);
  ASSERT_EQ(::pread(v.files().data.get(), got.data(), kPageSize, 0), static_cast<ssize_t>(kPageSize));
  EXPECT_EQ(got[0], 0x31) << "the first half of the fetch was punched out from under it";
  EXPECT_EQ(got[kPageSize - 1], 0x32);
  c.Abandon(*l);
  EXPECT_EQ(v.resident(), 2 * kPageSize) << "pages 2 and 3 only";
  // Without a drop, the fetch is published whole.
  auto m = c.Claim(1, 5, 1);
  ASSERT_NE(m, nullptr);
  LandInto(*m, 0x55);
  c.PunchStrays();
  EXPECT_EQ(c.Publish(*m), 1u);
  EXPECT_EQ(v.Fill(5), 0x55);
  EXPECT_EQ(c.size(), 2u) << "publishing evicts down to the capacity";
}

TEST(SharedCacheLanding, AReplacedOrRemovedFileOutlivesItsLandings) {
  TestCache c(100);
  auto l = c.Claim(1, 0, 2);
  ASSERT_NE(l, nullptr);
  ASSERT_TRUE(c.Reset(1, 2 * kImportPages * kPageSize).ok());  // another length: new files
  LandInto(*l, 0x41);  // the fetch still writes: the old file stays mapped
  EXPECT_EQ(c.Publish(*l), 0u) << "a landing in a replaced file was published";
  EXPECT_EQ(CachedFill(c, 1, 0), -1);
  auto m = c.Claim(1, 0, 1);
  ASSERT_NE(m, nullptr) << "the old file's claims block the new one";
  auto n = c.Claim(2, 0, 1);
  ASSERT_NE(n, nullptr);
  c.Remove(2);
  LandInto(*n, 0x42);
  c.Abandon(*n);
  {
    auto gone = c.Claim(3, 0, 4);
    ASSERT_NE(gone, nullptr);
    LandInto(*gone, 0x43);
  }  // destroyed unfinished: abandoned
  EXPECT_EQ(c.claimed(), 1u);  // m only
  EXPECT_EQ(CachedFill(c, 3, 0), -1);
  ClientView v(*c.OpenForClient(3));
  EXPECT_EQ(v.resident(), 0u);
}

// The transport's registration of a cache file (Landing::Area) is
// destroyed only after the last landing in the file ended (a fetch may
// still be writing through it until then) and before the file's mapping
// goes (deregistering memory that is no longer mapped is the order the
// NIC must never see): invalidate, drain, then retire.
struct AreaLog {
  int registered = 0;
  int destroyed = 0;
  bool mapped_at_destruction = false;
};

class RecordingArea : public transport::LandingArea {
 public:
  RecordingArea(AreaLog* log, void* addr) : log_(log), addr_(addr) {}
  ~RecordingArea() override {
    ++log_->destroyed;
    unsigned char vec = 0;
    // mincore fails with ENOMEM on an address that is not mapped.
    log_->mapped_at_destruction = ::mincore(addr_, kPageSize, &vec) == 0;
  }

 private:
  AreaLog* log_;
  void* addr_;
};

absl::StatusOr<std::unique_ptr<transport::LandingArea>> Register(AreaLog* log, void* addr, size_t) {
  ++log->registered;
  return std::make_unique<RecordingArea>(log, addr);
}

TEST(SharedCacheLanding, TheFileRegistrationGoesAfterTheLastLandingAndBeforeTheUnmap) {
  for (const bool remove : {true, false}) {
    SCOPED_TRACE(remove ? "the import removed" : "the import reset to another length");
    TestCache c(100);
    AreaLog log;
    auto reg = [&log](void* addr, size_t len) { return Register(&log, addr, len); };
    auto l = c.Claim(1, 0, 2);
    auto m = c.Claim(1, 8, 2);
    ASSERT_NE(l, nullptr);
    ASSERT_NE(m, nullptr);
    const transport::LandingArea* a = l->Area(reg);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(m->Area(reg), a) << "one registration per file";
    EXPECT_EQ(log.registered, 1);
    if (remove) {
      c.Remove(1);
    } else {
      ASSERT_TRUE(c.Reset(1, 2 * kImportPages * kPageSize).ok());
    }
    LandInto(*l, 0x61);  // still writing through the registration
    EXPECT_EQ(log.destroyed, 0) << "deregistered while two fetches could still land";
    c.Abandon(*l);
    l.reset();
    EXPECT_EQ(log.destroyed, 0) << "deregistered while a fetch could still land";
    LandInto(*m, 0x62);
    m.reset();  // destroyed unfinished: abandoned, the file's last reference
    EXPECT_EQ(log.destroyed, 1) << "the registration outlived the file";
    EXPECT_TRUE(log.mapped_at_destruction) << "the file was unmapped before its registration was destroyed";
  }
}

TEST(SharedCacheLanding, AnIdleFileRegistrationGoesWithTheFile) {
  TestCache c(100);
  AreaLog log;
  {
    auto l = c.Claim(2, 3, 1);
    ASSERT_NE(l, nullptr);
    ASSERT_NE(l->Area([&log](void* addr, size_t len) { return Register(&log, addr, len); }), nullptr);
    LandInto(*l, 0x63);
    EXPECT_EQ(c.Publish(*l), 1u);
  }
  EXPECT_EQ(log.destroyed, 0) << "the registration went while its file is in use";
  c.Remove(2);
  EXPECT_EQ(log.destroyed, 1);
  EXPECT_TRUE(log.mapped_at_destruction);
}

TEST(SharedCacheClient, ClientFilesAreReadOnly) {
  TestCache c(100);
  auto f = c.OpenForClient(1);
  ASSERT_TRUE(f.ok());
  for (int fd : {f->data.get(), f->words.get()}) {
    char b = 0;
    EXPECT_EQ(::pwrite(fd, &b, 1, 0), -1);
    EXPECT_EQ(::ftruncate(fd, 0), -1);
    void* m = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    EXPECT_EQ(m, MAP_FAILED) << "a client must not be able to write the cache";
  }
}

}  // namespace
}  // namespace svm::session
