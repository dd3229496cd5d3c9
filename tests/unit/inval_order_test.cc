// Invalidations of one page that reach an importer out of order, twice, or
// interleaved with a fetch of that page: the importer's coherence core
// (ImportCoherence) and its shared cache (SharedCache's claim/publish
// protocol), driven in the order ImportTable drives them:
//   an INVAL:     coh.OnInvalidation(seq); if it applies, cache.Drop(pages)
//                 (ImportTable::OnInvalidation);
//   a fetch:      ticket = coh.BeginFetch(); cache.Claim(pages), before the
//                 request is sent (ImportTable::ReadAttached);
//   its reply:    coh.MayInstall(ticket, reply_seq) ? cache.Publish
//                                                   : cache.Abandon
//                 (ImportTable::FinishFetch).
// ImportTable calls these under ImportEntry::mu, one at a time, which a
// single thread here reproduces.
//
// Where two events for one store come from: the exporter's Sync and the
// procfs source's periodic scrub both compare the served versions, and each
// finds the store (seen under TSan: "invalidate 'c' pages 3+1 (write) seq 2"
// logged 5 ms before "... seq 1"). ExportTable::Invalidate advances the
// sequence and queues the INVAL to every subscriber under the export's lock,
// so the wire carries them in sequence order (merged into one frame with the
// higher seq when the first is still queued); only its log line and the
// exporter's own Watch publish come after the lock. The cases below deliver
// them in every order anyway (a duplicate, a reordering), so the importer's
// rules do not depend on that.
//
// Checked in every case:
//  - every event delivered is applied (counted), however old its seq: none
//    is dropped as "old" (a lower seq may cover pages a higher one does not);
//  - after the last event, no cached page is older than the exporter's
//    content at the last event (a fetch reply carries the content as it was
//    when its seq was sampled: the oldest it may have copied);
//  - a fetch after the last event installs again (the rules do not refuse
//    forever).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "daemon/coherence/coherence.h"
#include "daemon/session/shared_cache.h"
#include "daemon/source/mirror_source.h"
#include "gtest/gtest.h"

namespace svm::coherence {
namespace {

using source::kPageSize;

constexpr uint64_t kImport = 1;
constexpr uint64_t kImportPages = 8;
// The pages the fetch reads (and the events cover some of).
constexpr uint64_t kFirst = 3, kN = 2;

struct Event {
  uint64_t seq, first, n;
};

// What the exporter did: its events (seq 1..) and, for each sequence s, the
// content of pages kFirst.. kFirst + kN when s became the export's sequence
// (content[0]: before any). A content is a fill byte.
struct Scenario {
  std::string name;
  std::vector<Event> events;  // by seq: events[s - 1].seq == s
  std::vector<std::vector<uint8_t>> content;
};

std::vector<Scenario> Scenarios() {
  return {
      // One store to page 3, found twice (Sync and the scrub).
      {"one store, two events",
       {{1, 3, 1}, {2, 3, 1}},
       {{0x10, 0x40}, {0x11, 0x40}, {0x11, 0x40}}},
      // Two stores to page 3, one event each.
      {"two stores",
       {{1, 3, 1}, {2, 3, 1}},
       {{0x10, 0x40}, {0x11, 0x40}, {0x12, 0x40}}},
      // One store to pages 3 and 4; the second finder saw page 3 only: the
      // lower seq covers a page the higher one does not.
      {"the lower seq covers more",
       {{1, 3, 2}, {2, 3, 1}},
       {{0x10, 0x40}, {0x11, 0x41}, {0x11, 0x41}}},
  };
}

// Orders in which the importer receives the scenario's events (by seq):
// in order, reordered, and with duplicates.
const std::vector<std::vector<uint64_t>>& Deliveries() {
  static const std::vector<std::vector<uint64_t>> d = {
      {1, 2}, {2, 1}, {1, 1, 2}, {1, 2, 2}, {2, 2, 1}, {2, 1, 1}, {1, 2, 1}, {2, 1, 2},
  };
  return d;
}

// One importer: its coherence core and its shared cache, as ImportTable
// drives them.
class Importer {
 public:
  Importer() : cache_(64) {
    EXPECT_TRUE(cache_.Reset(kImport, kImportPages * kPageSize).ok());
    const uint64_t epoch = coh_.BeginSubscribe();
    EXPECT_TRUE(coh_.CompleteSubscribe(epoch, 0));
    coh_.Renew(0, INT64_MAX / 2);
  }

  // ImportTable::OnInvalidation. Returns whether it applied.
  bool Deliver(const Event& e) {
    if (!coh_.OnInvalidation(e.seq, /*terminal=*/false)) return false;
    cache_.Drop(kImport, e.first, e.n);
    cache_.SetSeq(kImport, coh_.max_seq());
    return true;
  }

  // ImportTable::ReadAttached: the ticket and the claim, before the FETCH
  // is sent. False when nothing could be claimed (pages cached already).
  bool StartFetch() {
    ticket_ = coh_.BeginFetch();
    landing_ = cache_.Claim(kImport, kFirst, kN);
    return landing_ != nullptr;
  }

  // ImportTable::FinishFetch: the reply, answered at reply_seq with the
  // pages' content (fill bytes), landed in the claimed pages. Returns
  // whether the install rule let it in.
  bool Reply(uint64_t reply_seq, const std::vector<uint8_t>& content) {
    if (landing_ == nullptr) return false;
    absl::Span<uint8_t> dst = landing_->span();
    for (uint64_t i = 0; i < landing_->npages(); ++i) {
      std::fill_n(dst.data() + i * kPageSize, kPageSize, content[landing_->first_page() - kFirst + i]);
    }
    bool installed = false;
    if (coh_.MayInstall(ticket_, reply_seq)) {
      installed = true;
      cache_.Publish(*landing_);
    } else {
      cache_.Abandon(*landing_);
    }
    landing_.reset();
    return installed;
  }

  // The fill byte of a cached page, -1 when not cached, -2 when torn.
  int Cached(uint64_t page) {
    std::vector<uint8_t> buf(kPageSize);
    if (!coh_.CacheUsable(1)) return -1;
    if (!cache_.Lookup(kImport, page, absl::MakeSpan(buf))) return -1;
    for (uint8_t b : buf) {
      if (b != buf[0]) return -2;
    }
    return buf[0];
  }

  const ImportCoherence& coh() const { return coh_; }

 private:
  ImportCoherence coh_;
  session::SharedCache cache_;
  FetchTicket ticket_;
  std::unique_ptr<session::SharedCache::Landing> landing_;
};

std::string Describe(const Scenario& sc, const std::vector<uint64_t>& order, size_t start, size_t reply,
                     uint64_t reply_seq) {
  return absl::StrCat(sc.name, "; events delivered in seq order ", absl::StrJoin(order, ","),
                      "; fetch started after ", start, " of them, answered at seq ", reply_seq,
                      ", its reply received after ", reply, " of them");
}

// Every scenario, every delivery order, a fetch started before, between or
// after the events and answered (at every seq the exporter could have
// sampled) before, between or after them.
TEST(InvalidationOrder, NoPageIsStaleAfterTheLastEventWhateverTheOrder) {
  int cases = 0, installed_cases = 0;
  for (const Scenario& sc : Scenarios()) {
    const uint64_t last_seq = sc.events.size();
    const std::vector<uint8_t>& final_content = sc.content[last_seq];
    for (const std::vector<uint64_t>& order : Deliveries()) {
      for (size_t start = 0; start <= order.size(); ++start) {
        for (size_t reply = start; reply <= order.size(); ++reply) {
          for (uint64_t reply_seq = 0; reply_seq <= last_seq; ++reply_seq) {
            SCOPED_TRACE(Describe(sc, order, start, reply, reply_seq));
            ++cases;
            Importer imp;
            bool installed = false;
            for (size_t k = 0; k <= order.size(); ++k) {
              if (k == start) {
                ASSERT_TRUE(imp.StartFetch());
              }
              if (k == reply) installed = imp.Reply(reply_seq, sc.content[reply_seq]);
              if (k < order.size()) {
                EXPECT_TRUE(imp.Deliver(sc.events[order[k] - 1]))
                    << "event seq " << order[k] << " (delivery " << k << ") was not applied";
              }
            }
            installed_cases += installed;
            EXPECT_EQ(imp.coh().invalidations(), order.size()) << "an event was dropped";
            EXPECT_EQ(imp.coh().max_seq(), last_seq);
            for (uint64_t i = 0; i < kN; ++i) {
              const int got = imp.Cached(kFirst + i);
              if (got != -1) {
                EXPECT_EQ(got, final_content[i])
                    << "page " << kFirst + i << " is served stale after the last event"
                    << (installed ? " (the fetch installed it)" : "");
              }
            }
            // A fetch after the last event installs what is not cached, and
            // then every page is what the exporter has.
            if (imp.StartFetch()) {
              EXPECT_TRUE(imp.Reply(last_seq, final_content)) << "a fetch after the last event was refused";
            }
            for (uint64_t i = 0; i < kN; ++i) EXPECT_EQ(imp.Cached(kFirst + i), final_content[i]);
          }
        }
      }
    }
  }
  // The enumeration includes installs (a reply received before the events
  // that cover it), so "nothing stale" is not "nothing cached".
  EXPECT_GT(installed_cases, 0);
  RecordProperty("cases", cases);
}

// The core alone: a lower seq after a higher one still applies and does not
// lower what the install rule compares against.
TEST(InvalidationOrder, ALowerSeqAfterAHigherAppliesAndKeepsTheHighest) {
  ImportCoherence c;
  const uint64_t epoch = c.BeginSubscribe();
  ASSERT_TRUE(c.CompleteSubscribe(epoch, 0));
  const FetchTicket t = c.BeginFetch();
  EXPECT_TRUE(c.OnInvalidation(2, false));
  EXPECT_TRUE(c.OnInvalidation(1, false));
  EXPECT_TRUE(c.OnInvalidation(1, false)) << "a duplicate applies too";
  EXPECT_EQ(c.invalidations(), 3u);
  EXPECT_EQ(c.max_seq(), 2u);
  // A reply answered between the two (at seq 1) copied what may predate the
  // change seq 2 reports.
  EXPECT_FALSE(c.MayInstall(t, 1));
  EXPECT_TRUE(c.MayInstall(t, 2));
}

// The shared cache's part: an event that arrives while a fetch of the page
// is landing marks the claim dropped, whatever its seq, so the page is not
// published even when the install rule (a reply answered after every event
// so far) says yes.
TEST(InvalidationOrder, AnEventDuringTheLandingKeepsThePageOutEvenIfTheRuleSaysYes) {
  Importer imp;
  ASSERT_TRUE(imp.StartFetch());
  EXPECT_TRUE(imp.Deliver({2, 3, 1}));
  EXPECT_TRUE(imp.Deliver({1, 3, 1}));
  EXPECT_TRUE(imp.Reply(2, {0x12, 0x40}));
  EXPECT_EQ(imp.Cached(3), -1) << "page 3 was published although an event met its landing";
  EXPECT_EQ(imp.Cached(4), 0x40) << "page 4 no event covered";
}

}  // namespace
}  // namespace svm::coherence
