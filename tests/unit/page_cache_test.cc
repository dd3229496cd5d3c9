// daemon/core/page_cache: the importer's bounded LRU cache of pages.
#include "daemon/core/page_cache.h"

#include <cstdint>
#include <vector>

#include "daemon/source/mirror_source.h"
#include "gtest/gtest.h"

namespace svm::core {
namespace {

using source::kPageSize;

std::vector<uint8_t> PageOf(uint8_t fill) { return std::vector<uint8_t>(kPageSize, fill); }

// Whether (import, page) is cached, and with which fill byte (checking that
// the whole page carries it).
int CachedFill(PageCache& c, uint64_t import_id, uint64_t page) {
  std::vector<uint8_t> buf(kPageSize, 0xEE);
  if (!c.Lookup(import_id, page, absl::MakeSpan(buf))) return -1;
  for (uint8_t b : buf) {
    if (b != buf[0]) return -2;
  }
  return buf[0];
}

TEST(PageCache, MissOnEmpty) {
  PageCache c(4);
  std::vector<uint8_t> buf(kPageSize, 7);
  EXPECT_FALSE(c.Lookup(1, 0, absl::MakeSpan(buf)));
  EXPECT_EQ(buf[0], 7) << "a miss must not touch dst";
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.capacity(), 4u);
}

TEST(PageCache, InsertThenLookup) {
  PageCache c(4);
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

TEST(PageCache, InsertCopiesTheData) {
  PageCache c(4);
  auto p = PageOf(1);
  c.Insert(1, 0, p);
  p.assign(kPageSize, 2);  // the caller's buffer is reused
  EXPECT_EQ(CachedFill(c, 1, 0), 1);
}

TEST(PageCache, InsertReplaces) {
  PageCache c(4);
  c.Insert(1, 0, PageOf(1));
  c.Insert(1, 0, PageOf(2));
  EXPECT_EQ(CachedFill(c, 1, 0), 2);
  EXPECT_EQ(c.size(), 1u);
}

TEST(PageCache, EvictsLeastRecentlyInsertedAtCapacity) {
  PageCache c(3);
  for (uint64_t p = 0; p < 3; ++p) c.Insert(1, p, PageOf(static_cast<uint8_t>(p + 10)));
  EXPECT_EQ(c.size(), 3u);
  c.Insert(1, 3, PageOf(13));
  EXPECT_EQ(c.size(), 3u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1) << "the oldest page goes first";
  EXPECT_EQ(CachedFill(c, 1, 1), 11);
  EXPECT_EQ(CachedFill(c, 1, 2), 12);
  EXPECT_EQ(CachedFill(c, 1, 3), 13);
}

TEST(PageCache, LookupRefreshesRecency) {
  PageCache c(3);
  for (uint64_t p = 0; p < 3; ++p) c.Insert(1, p, PageOf(static_cast<uint8_t>(p)));
  EXPECT_EQ(CachedFill(c, 1, 0), 0);  // 0 becomes the most recent; 1 is now the oldest
  c.Insert(1, 3, PageOf(3));
  EXPECT_EQ(CachedFill(c, 1, 1), -1);
  EXPECT_EQ(CachedFill(c, 1, 0), 0);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
  EXPECT_EQ(CachedFill(c, 1, 3), 3);
}

TEST(PageCache, ReplaceRefreshesRecency) {
  PageCache c(2);
  c.Insert(1, 0, PageOf(0));
  c.Insert(1, 1, PageOf(1));
  c.Insert(1, 0, PageOf(9));  // 1 is now the oldest
  c.Insert(1, 2, PageOf(2));
  EXPECT_EQ(CachedFill(c, 1, 1), -1);
  EXPECT_EQ(CachedFill(c, 1, 0), 9);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
}

TEST(PageCache, EvictionCrossesImports) {
  PageCache c(2);
  c.Insert(1, 0, PageOf(1));
  c.Insert(2, 0, PageOf(2));
  c.Insert(3, 0, PageOf(3));
  EXPECT_EQ(c.size(), 2u);
  EXPECT_EQ(c.CountImport(1), 0u);
  EXPECT_EQ(CachedFill(c, 2, 0), 2);
  EXPECT_EQ(CachedFill(c, 3, 0), 3);
}

TEST(PageCache, CapacityZeroCachesNothing) {
  PageCache c(0);
  c.Insert(1, 0, PageOf(1));
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1);
  EXPECT_EQ(c.Drop(1, 0, 10), 0u);
}

TEST(PageCache, CapacityOne) {
  PageCache c(1);
  c.Insert(1, 0, PageOf(1));
  c.Insert(1, 1, PageOf(2));
  EXPECT_EQ(c.size(), 1u);
  EXPECT_EQ(CachedFill(c, 1, 0), -1);
  EXPECT_EQ(CachedFill(c, 1, 1), 2);
}

class PageCacheDrop : public ::testing::Test {
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
  PageCache cache_{100};
};

TEST_F(PageCacheDrop, PartialRange) {
  EXPECT_EQ(cache_.Drop(1, 3, 4), 4u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 7, 8, 9}));
  EXPECT_EQ(cache_.CountImport(2), 10u) << "another import's pages stay";
  EXPECT_EQ(cache_.size(), 16u);
}

TEST_F(PageCacheDrop, ZeroPages) {
  EXPECT_EQ(cache_.Drop(1, 3, 0), 0u);
  EXPECT_EQ(cache_.CountImport(1), 10u);
}

TEST_F(PageCacheDrop, BeyondEnd) {
  EXPECT_EQ(cache_.Drop(1, 8, 100), 2u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(cache_.Drop(1, 50, 10), 0u);
  EXPECT_EQ(cache_.CountImport(2), 10u);
}

TEST_F(PageCacheDrop, MaxLengthDoesNotWrap) {
  // first + UINT64_MAX wraps around: it must mean "to the end", not "nothing".
  EXPECT_EQ(cache_.Drop(1, 4, UINT64_MAX), 6u);
  EXPECT_EQ(Cached(1), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_EQ(cache_.CountImport(2), 10u);
  EXPECT_EQ(cache_.Drop(2, 0, UINT64_MAX), 10u);
  EXPECT_EQ(cache_.size(), 4u);
}

TEST_F(PageCacheDrop, RangeNearTheTopDoesNotWrap) {
  const uint64_t top = (1ull << 52) - 1;  // the last page of a 64-bit address space
  cache_.Insert(1, top, PageOf(1));
  EXPECT_EQ(cache_.Drop(1, UINT64_MAX - 5, 100), 0u) << "a wrapped end must not reach low pages";
  EXPECT_EQ(cache_.CountImport(1), 11u);
  EXPECT_EQ(cache_.Drop(1, top, UINT64_MAX), 1u);
  EXPECT_EQ(cache_.CountImport(1), 10u);
}

TEST_F(PageCacheDrop, DropImportIsolation) {
  EXPECT_EQ(cache_.DropImport(1), 10u);
  EXPECT_EQ(cache_.CountImport(1), 0u);
  EXPECT_EQ(cache_.CountImport(2), 10u);
  EXPECT_EQ(Cached(2).size(), 10u);
  EXPECT_EQ(cache_.DropImport(1), 0u);
  EXPECT_EQ(cache_.DropImport(3), 0u) << "an unknown import";
  EXPECT_EQ(cache_.size(), 10u);
}

TEST_F(PageCacheDrop, DroppedSlotsAreReused) {
  PageCache c(2);
  c.Insert(1, 0, PageOf(0));
  c.Insert(1, 1, PageOf(1));
  EXPECT_EQ(c.Drop(1, 0, 1), 1u);
  c.Insert(1, 2, PageOf(2));  // fits without evicting page 1
  EXPECT_EQ(CachedFill(c, 1, 1), 1);
  EXPECT_EQ(CachedFill(c, 1, 2), 2);
}

}  // namespace
}  // namespace svm::core
