// The coherence core (daemon/coherence) against a reference model of the
// world it runs in: an exporting process whose pages change (mapping
// changes the source reports, late; stores in place that nothing reports),
// an exporter daemon, and importers whose data channels deliver
// invalidations and fetch replies in order while their subscription
// acknowledgements travel on another path (gRPC) and arrive whenever.
// Random interleavings of subscribe, fetch issue, copy, reply, install,
// invalidation, scrub, zero-copy READs, acknowledgements, disconnect and
// reconnect, seeded and reproducible (SVM_MODEL_SEED=N runs one seed).
//
// Checked after every step:
//  I1  no cached page outlives an invalidation that covers it: a page an
//      importer caches is never older than the content the page had when
//      an invalidation covering it, already delivered to that importer,
//      was issued (versions are drawn from one increasing counter);
//  I2  every invalidation delivered on a current subscription is applied
//      (counted, published), also before the subscription's
//      acknowledgement arrived;
//  I3  rule 5: a retired zero-copy region is released only when no READ
//      against it is in flight anywhere;
//  I5  right after a scrub, every cached page that differs from the
//      exporter's memory has an invalidation on its way (stores fire no
//      notifier: the comparison of served versions must find them all).
// Checked at the end of every run, after changes stop, a scrub, and a
// drain of every channel:
//  I4  convergence: every cached page equals the exporter's memory.
#include "daemon/coherence/coherence.h"

#include <cstdlib>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace svm::coherence {
namespace {

constexpr uint64_t kPages = 8;
constexpr int kImporters = 3;

struct Msg {
  enum Kind { kInval, kReply } kind;
  uint64_t seq = 0;
  uint64_t first = 0, n = 0;
  bool drops_region = false;
  std::vector<uint64_t> floor;  // kInval: content of each page when issued
  uint64_t fetch = 0;           // kReply
  std::vector<uint64_t> versions;
};

struct Fetch {
  FetchTicket ticket;
  uint64_t first = 0, n = 0;
};

// An exporter-side serve in progress: sampled, then copied, then recorded
// and answered (three steps, as ExportTable::ServeFetch).
struct Serve {
  int importer;
  uint64_t channel;
  uint64_t fetch;
  uint64_t first, n;
  uint64_t seq;
  std::optional<std::vector<uint64_t>> copy;
};

struct Read {
  uint64_t region;  // exporter region id the READ targets
  uint64_t epoch;   // importer-side region epoch
};

struct Importer {
  uint64_t sub_id = 0;  // exporter-side subscriber id of the current channel
  uint64_t channel = 0; // 0: none
  bool subscribed_at_exporter = false;
  std::optional<uint64_t> sub_ack;  // the exporter's answer, not delivered yet
  uint64_t sub_epoch = 0;
  ImportCoherence coh;
  std::map<uint64_t, uint64_t> cache;  // page -> version
  std::map<uint64_t, uint64_t> floor;  // page -> I1 floor
  std::deque<Msg> queue;               // the data channel, exporter -> importer
  std::map<uint64_t, Fetch> fetches;
  // Zero-copy.
  ZeroCopyRegionState zc;
  std::optional<uint64_t> zc_region;  // exporter region id behind zc's current epoch
  std::vector<Read> reads;
  struct HeldAck {
    uint64_t seq;
    std::optional<uint64_t> drain;
  };
  std::deque<HeldAck> acks;
  uint64_t delivered_current = 0, applied = 0;
};

class World {
 public:
  explicit World(uint64_t seed) : rng_(seed) {
    for (uint64_t p = 0; p < kPages; ++p) content_[p] = ++version_;
    region_ = ++next_region_;
  }

  // One random step; returns a description for failure messages.
  std::string Step(bool mutate) {
    const int what = Pick(14);
    const int i = Pick(kImporters);
    Importer& im = imps_[i];
    switch (what) {
      case 0:  // a mapping change the source reports (late, see case 1)
        if (!mutate || Pick(4) != 0) return "";
        {
          const uint64_t p = Pick(kPages), n = 1 + Pick(std::min<uint64_t>(3, kPages - p));
          for (uint64_t k = 0; k < n; ++k) content_[p + k] = ++version_;
          unreported_.push_back({p, n});
          return absl::StrCat("remap ", p, "+", n);
        }
      case 1:  // the source reports a change
        if (unreported_.empty()) return "";
        {
          auto [p, n] = unreported_.front();
          unreported_.pop_front();
          Invalidate(p, n, /*drops_region=*/true);
          return absl::StrCat("invalidate ", p, "+", n);
        }
      case 2:  // a store in place: no notifier
        if (!mutate || Pick(4) != 0) return "";
        {
          const uint64_t p = Pick(kPages);
          content_[p] = ++version_;
          return absl::StrCat("store ", p);
        }
      case 3:  // scrub: compare served versions with the content
        if (Pick(8) != 0) return "";
        Scrub();
        CheckScrubbed();
        return "scrub";
      case 4:  // (re)subscribe
        if (im.channel != 0 && Pick(16) != 0) return "";
        if (im.channel != 0 && Pick(4) != 0) {
          // Again on the same data channel (an import reattached after its
          // export was gone, or by a second reader): replies to fetches of
          // the old subscription still arrive on it.
          im.subscribed_at_exporter = false;
          im.sub_ack.reset();
          im.cache.clear();
          im.sub_epoch = im.coh.BeginSubscribe();
          return absl::StrCat("resubscribe ", i);
        }
        Connect(i);
        return absl::StrCat("connect ", i);
      case 5:  // the exporter handles the subscription
        if (im.channel == 0 || im.subscribed_at_exporter) return "";
        im.sub_ack = exp_.Subscribe(im.sub_id);
        im.subscribed_at_exporter = true;
        return absl::StrCat("exporter subscribes ", i);
      case 6:  // the subscription's answer arrives (gRPC: any time)
        if (!im.sub_ack) return "";
        im.coh.CompleteSubscribe(im.sub_epoch, *im.sub_ack);
        im.sub_ack.reset();
        if (im.coh.state() == ImportState::kLive && !im.zc_region) OfferRegion(im);
        return absl::StrCat("subscribed ", i);
      case 7:  // issue a fetch
        if (im.coh.state() != ImportState::kLive) return "";
        {
          const uint64_t p = Pick(kPages), n = 1 + Pick(std::min<uint64_t>(3, kPages - p));
          const uint64_t id = ++next_fetch_;
          im.fetches[id] = Fetch{im.coh.BeginFetch(), p, n};
          serves_.push_back(Serve{i, im.channel, id, p, n, exp_.BeginServe(), std::nullopt});
          return absl::StrCat("fetch ", i, " ", p, "+", n);
        }
      case 8:  // a serve copies, or records and answers
        if (serves_.empty()) return "";
        return AdvanceServe(Pick(serves_.size()));
      case 9:  // deliver the next message on a data channel
        return Deliver(i);
      case 10:  // the connection is lost
        if (im.channel == 0 || Pick(64) != 0) return "";
        Disconnect(i);
        return absl::StrCat("disconnect ", i);
      case 11:  // a zero-copy READ starts
        if (im.zc.state() != RegionState::kUsable) return "";
        im.reads.push_back(Read{*im.zc_region, im.zc.BeginRead()});
        return absl::StrCat("read start ", i);
      case 12:  // a zero-copy READ completes
        if (im.reads.empty()) return "";
        {
          const size_t k = Pick(im.reads.size());
          EXPECT_FALSE(released_.count(im.reads[k].region))
              << "I3: a READ completed against released region " << im.reads[k].region;
          im.zc.EndRead(im.reads[k].epoch);
          im.reads.erase(im.reads.begin() + static_cast<long>(k));
          FlushAcks(im);
          return absl::StrCat("read end ", i);
        }
      case 13:  // the importer asks for the current region again
        if (im.coh.state() != ImportState::kLive || im.zc.state() == RegionState::kUsable) return "";
        OfferRegion(im);
        return absl::StrCat("describe ", i);
    }
    return "";
  }

  void CheckInvariants() {
    for (int i = 0; i < kImporters; ++i) {
      Importer& im = imps_[i];
      for (auto [p, v] : im.cache) {
        auto f = im.floor.find(p);
        ASSERT_TRUE(f == im.floor.end() || v >= f->second)
            << "I1: importer " << i << " caches page " << p << " version " << v
            << " after an invalidation issued at version " << f->second;
      }
      ASSERT_EQ(im.delivered_current, im.applied)
          << "I2: importer " << i << " skipped an invalidation of its current subscription";
    }
  }

  // I5, right after a scrub: every cached page that differs from the
  // content is covered by an invalidation on its way, or by a mapping
  // change the source has not reported yet (a scrub announces every store
  // made before it).
  void CheckScrubbed() {
    for (int i = 0; i < kImporters; ++i) {
      const Importer& im = imps_[i];
      for (auto [p, v] : im.cache) {
        if (v == content_[p]) continue;
        bool covered = false;
        for (const Msg& m : im.queue) {
          covered = covered || (m.kind == Msg::kInval && p >= m.first && p < m.first + m.n);
        }
        for (auto [f, n] : unreported_) covered = covered || (p >= f && p < f + n);
        ASSERT_TRUE(covered) << "I5: after a scrub importer " << i << " still caches page " << p
                             << " version " << v << " (content " << content_[p]
                             << ") and nothing tells it";
      }
    }
  }

  // Changes stopped: report everything, compare, deliver everything.
  void Quiesce() {
    while (!unreported_.empty()) {
      auto [p, n] = unreported_.front();
      unreported_.pop_front();
      Invalidate(p, n, true);
    }
    for (int round = 0; round < 4; ++round) {
      while (!serves_.empty()) AdvanceServe(0);
      for (int i = 0; i < kImporters; ++i) {
        Importer& im = imps_[i];
        if (im.channel != 0 && !im.subscribed_at_exporter) {
          im.sub_ack = exp_.Subscribe(im.sub_id);
          im.subscribed_at_exporter = true;
        }
        if (im.sub_ack) {
          im.coh.CompleteSubscribe(im.sub_epoch, *im.sub_ack);
          im.sub_ack.reset();
        }
        while (!im.reads.empty()) {
          im.zc.EndRead(im.reads.back().epoch);
          im.reads.pop_back();
        }
        FlushAcks(im);
        while (!im.queue.empty()) Deliver(i);
      }
      Scrub();
      for (int i = 0; i < kImporters; ++i) {
        while (!imps_[i].queue.empty()) Deliver(i);
      }
    }
    Release();
  }

  void CheckConverged() {
    for (int i = 0; i < kImporters; ++i) {
      for (auto [p, v] : imps_[i].cache) {
        EXPECT_EQ(v, content_[p]) << "I4: importer " << i << " page " << p << " is stale";
      }
    }
    EXPECT_EQ(exp_.retired(), 0u) << "I3: a retired region was never released";
  }

  uint64_t installs() const { return installs_; }

 private:
  uint64_t Pick(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }

  void Invalidate(uint64_t p, uint64_t n, bool drops_region) {
    const uint64_t seq = exp_.Invalidate(p, n);
    if (drops_region) {
      // As ExportTable: the registration is replaced before the
      // invalidation leaves and retired at its sequence.
      exp_.Retire(region_, seq, absl::InfinitePast());
      region_ = ++next_region_;
      region_seq_ = seq;
    }
    Msg m{Msg::kInval, seq, p, n, drops_region, {}, 0, {}};
    for (uint64_t k = 0; k < n; ++k) m.floor.push_back(content_[p + k]);
    for (Importer& im : imps_) {
      if (im.channel != 0 && exp_.subscribed(im.sub_id)) im.queue.push_back(m);
    }
    Release();
  }

  void Scrub() {
    std::vector<uint64_t> changed;
    for (auto [p, v] : exp_.AllServed()) {
      if (content_[p] != v) changed.push_back(p);
    }
    for (uint64_t p : changed) Invalidate(p, 1, false);
  }

  std::string AdvanceServe(size_t k) {
    Serve& s = serves_[k];
    Importer& im = imps_[s.importer];
    if (!s.copy) {
      s.copy.emplace();
      for (uint64_t q = 0; q < s.n; ++q) s.copy->push_back(content_[s.first + q]);
      return absl::StrCat("copy for ", s.importer);
    }
    Serve done = std::move(s);
    serves_.erase(serves_.begin() + static_cast<long>(k));
    if (im.channel != done.channel) return "serve for a lost channel";
    // Versions are the content itself: two copies of one version compare equal.
    for (uint64_t p : exp_.RecordServed(done.first, *done.copy, done.seq)) Invalidate(p, 1, false);
    im.queue.push_back(Msg{Msg::kReply, done.seq, done.first, done.n, false, {}, done.fetch, *done.copy});
    return absl::StrCat("reply to ", done.importer);
  }

  std::string Deliver(int i) {
    Importer& im = imps_[i];
    if (im.queue.empty()) return "";
    Msg m = std::move(im.queue.front());
    im.queue.pop_front();
    if (m.kind == Msg::kInval) {
      ++im.delivered_current;
      std::optional<uint64_t> drain;
      if (m.drops_region) {
        const uint64_t epoch = im.zc.Drop(m.seq);
        im.zc_region.reset();
        if (!im.zc.Drained(epoch)) drain = epoch;
      }
      if (im.coh.OnInvalidation(m.seq, false)) {
        ++im.applied;
        for (uint64_t k = 0; k < m.n; ++k) im.cache.erase(m.first + k);
      }
      for (uint64_t k = 0; k < m.n; ++k) {
        uint64_t& f = im.floor[m.first + k];
        f = std::max(f, m.floor[k]);
      }
      im.acks.push_back({m.seq, drain});
      FlushAcks(im);
      return absl::StrCat("deliver inval #", m.seq, " to ", i);
    }
    auto it = im.fetches.find(m.fetch);
    if (it == im.fetches.end()) return "reply without fetch";
    if (im.coh.MayInstall(it->second.ticket, m.seq)) {
      for (uint64_t k = 0; k < m.n; ++k) im.cache[m.first + k] = m.versions[k];
      ++installs_;
    }
    im.fetches.erase(it);
    return absl::StrCat("deliver reply #", m.seq, " to ", i);
  }

  void FlushAcks(Importer& im) {
    while (!im.acks.empty()) {
      auto& a = im.acks.front();
      if (a.drain && !im.zc.Drained(*a.drain)) break;
      exp_.OnAck(im.sub_id, a.seq);
      im.acks.pop_front();
    }
    Release();
  }

  void Release() {
    for (uint64_t id : exp_.TakeReleasable()) {
      for (const Importer& im : imps_) {
        for (const Read& r : im.reads) {
          ASSERT_NE(r.region, id) << "I3: region " << id << " released with a READ in flight";
        }
      }
      released_.insert(id);
    }
  }

  void OfferRegion(Importer& im) {
    // DescribeExport answers the current region at the current sequence.
    if (im.zc.Offer(exp_.seq())) im.zc_region = region_;
  }

  void Connect(int i) {
    Importer& im = imps_[i];
    if (im.channel != 0) Disconnect(i);
    im.channel = ++next_channel_;
    im.sub_id = im.channel;
    im.subscribed_at_exporter = false;
    im.sub_ack.reset();
    im.cache.clear();
    im.sub_epoch = im.coh.BeginSubscribe();
    im.zc = ZeroCopyRegionState();
    im.zc_region.reset();
  }

  void Disconnect(int i) {
    Importer& im = imps_[i];
    exp_.Unsubscribe(im.sub_id);
    im.channel = 0;
    im.queue.clear();
    im.fetches.clear();
    im.cache.clear();
    im.coh.OnDisconnect();
    im.sub_ack.reset();
    im.subscribed_at_exporter = false;
    // Its queue pair is gone: nothing it had in flight reaches memory.
    im.reads.clear();
    im.acks.clear();
    im.zc = ZeroCopyRegionState();
    im.zc_region.reset();
    im.delivered_current = im.applied = 0;
    Release();
  }

  std::mt19937_64 rng_;
  std::map<uint64_t, uint64_t> content_;
  uint64_t version_ = 0;
  std::deque<std::pair<uint64_t, uint64_t>> unreported_;
  ExportCoherence exp_;
  uint64_t region_ = 0, next_region_ = 0, region_seq_ = 0;
  std::set<uint64_t> released_;
  Importer imps_[kImporters];
  std::vector<Serve> serves_;
  uint64_t next_fetch_ = 0, next_channel_ = 0, installs_ = 0;
};

TEST(CoherenceModel, RandomInterleavingsNeverKeepAStalePage) {
  constexpr int kSeeds = 200;
  constexpr int kSteps = 5000;
  std::vector<uint64_t> seeds;
  if (const char* s = std::getenv("SVM_MODEL_SEED")) {
    seeds.push_back(std::strtoull(s, nullptr, 10));
  } else {
    for (int k = 1; k <= kSeeds; ++k) seeds.push_back(static_cast<uint64_t>(k));
  }
  uint64_t steps = 0, installs = 0;
  for (uint64_t seed : seeds) {
    World w(seed);
    std::deque<std::string> trail;  // the last steps, for the failure message
    for (int k = 0; k < kSteps; ++k) {
      std::string what = w.Step(/*mutate=*/k < kSteps * 9 / 10);
      if (!what.empty()) {
        trail.push_back(std::move(what));
        if (trail.size() > 30) trail.pop_front();
      }
      w.CheckInvariants();
      if (::testing::Test::HasFailure()) {
        std::string t;
        for (auto& s : trail) absl::StrAppend(&t, "\n  ", s);
        FAIL() << "seed " << seed << " step " << k << "; last steps:" << t;
      }
      ++steps;
    }
    w.Quiesce();
    w.CheckConverged();
    if (::testing::Test::HasFailure()) FAIL() << "seed " << seed << " did not converge";
    installs += w.installs();
  }
  // The model must exercise installs, or it proves nothing.
  EXPECT_GT(installs, steps / 400) << "of " << steps << " steps";
  RecordProperty("steps", static_cast<int>(steps));
}

// The rules one at a time, for readers of the core.
TEST(ImportCoherence, InvalidationsApplyWhileSubscribing) {
  ImportCoherence c;
  const uint64_t e = c.BeginSubscribe();
  EXPECT_TRUE(c.OnInvalidation(7, false)) << "pushed before the subscription's answer arrived";
  EXPECT_TRUE(c.CompleteSubscribe(e, 5));
  EXPECT_EQ(c.max_seq(), 7u) << "the answer's older sequence must not lower it";
  EXPECT_FALSE(c.MayInstall(c.BeginFetch(), 6));
  EXPECT_TRUE(c.MayInstall(c.BeginFetch(), 7));
}

TEST(ImportCoherence, AFetchFromAnEarlierSubscriptionNeverInstalls) {
  ImportCoherence c;
  c.CompleteSubscribe(c.BeginSubscribe(), 3);
  const FetchTicket old = c.BeginFetch();
  c.CompleteSubscribe(c.BeginSubscribe(), 3);
  EXPECT_FALSE(c.MayInstall(old, 3));
  EXPECT_TRUE(c.MayInstall(c.BeginFetch(), 3));
  c.OnDisconnect();
  EXPECT_FALSE(c.MayInstall(c.BeginFetch(), 3));
}

TEST(ImportCoherence, TheCacheServesOnlyWithinTheLeaseOfALiveSubscription) {
  ImportCoherence c;
  const uint64_t e = c.BeginSubscribe();
  c.Renew(1000, 500);
  EXPECT_FALSE(c.CacheUsable(1100)) << "not live yet";
  ASSERT_TRUE(c.CompleteSubscribe(e, 3));
  c.Renew(1000, 500);
  EXPECT_TRUE(c.CacheUsable(1499));
  EXPECT_FALSE(c.CacheUsable(1500)) << "the exporter may have given up on us";
  c.Renew(2000, 500);
  EXPECT_TRUE(c.CacheUsable(2100)) << "heard from again";
  c.OnDisconnect();
  EXPECT_FALSE(c.CacheUsable(2100));
  const uint64_t e2 = c.BeginSubscribe();
  ASSERT_TRUE(c.CompleteSubscribe(e2, 3));
  c.Renew(3000, 500);
  c.MarkGone();
  EXPECT_FALSE(c.CacheUsable(3100));
}

TEST(ExportCoherence, ServingAnotherVersionIsAChange) {
  ExportCoherence e;
  const uint64_t s = e.BeginServe();
  EXPECT_TRUE(e.RecordServed(0, {10, 11}, s).empty());
  EXPECT_EQ(e.RecordServed(1, {12}, s), std::vector<uint64_t>{1});
  EXPECT_EQ(e.served_pages(), 1u) << "page 1 is forgotten until served after its invalidation";
  e.Invalidate(1, 1);
  EXPECT_TRUE(e.RecordServed(1, {12}, s).empty()) << "raced an invalidation: not recorded";
  EXPECT_EQ(e.served_pages(), 1u);
}

TEST(ExportCoherence, AComparisonPassInvalidatesOnlyPagesStillServedAsItSampledThem) {
  ExportCoherence e;
  ASSERT_TRUE(e.RecordServed(0, {10, 11, 12, 13}, e.BeginServe()).empty());
  const auto sampled = e.AllServed();  // a pass's sample
  e.Invalidate(1, 1);                  // another pass invalidated page 1 meanwhile
  e.Invalidate(2, 1);                  // and page 2, which was then served again
  ASSERT_TRUE(e.RecordServed(2, {22}, e.BeginServe()).empty());
  // The pass found every page changed: only 0 and 3 are still its to invalidate.
  EXPECT_EQ(e.StillServed(sampled), (std::vector<uint64_t>{0, 3}));
  EXPECT_TRUE(e.StillServed({{7, 70}}).empty()) << "never served";
}

TEST(ExportCoherence, RetiredIsReleasedAfterEveryHolderAcknowledgedOrLeft) {
  ExportCoherence e;
  e.Subscribe(1);
  e.Subscribe(2);
  const uint64_t q = e.Invalidate(0, 1);
  e.Retire(42, q, absl::UnixEpoch());
  EXPECT_TRUE(e.TakeReleasable().empty());
  e.OnAck(1, q);
  EXPECT_TRUE(e.TakeReleasable().empty());
  EXPECT_EQ(e.RetirementLaggards(absl::UnixEpoch()), std::vector<uint64_t>{2});
  e.Unsubscribe(2);
  EXPECT_EQ(e.TakeReleasable(), std::vector<uint64_t>{42});
}

TEST(ZeroCopyRegionState, DropWaitsForReadsOfTheDroppedEpoch) {
  ZeroCopyRegionState z;
  ASSERT_TRUE(z.Offer(0));
  const uint64_t r = z.BeginRead();
  const uint64_t dropped = z.Drop(5);
  EXPECT_FALSE(z.Drained(dropped));
  EXPECT_FALSE(z.Offer(4)) << "described before the invalidation that dropped it";
  ASSERT_TRUE(z.Offer(5));
  const uint64_t r2 = z.BeginRead();
  z.EndRead(r);
  EXPECT_TRUE(z.Drained(dropped)) << "reads of the new epoch do not hold the old one";
  z.EndRead(r2);
}

}  // namespace
}  // namespace svm::coherence
