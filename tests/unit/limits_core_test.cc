// core::Limits: the refusal's status and message, the per-limit counters,
// the log's rate limit per (who, limit), and values replaced at run time.
#include "daemon/core/limits.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace svm::core {
namespace {

class LimitsTest : public ::testing::Test {
 protected:
  absl::Time now_ = absl::FromUnixSeconds(1000);
  Limits limits_{LimitValues{}, [this] { return now_; }};
};

TEST_F(LimitsTest, DefaultsAreTheDocumentedOnes) {
  const LimitValues v = limits_.Values();
  EXPECT_EQ(v.sessions_per_client, 256u);
  EXPECT_EQ(v.exports_per_client, 256u);
  EXPECT_EQ(v.export_bytes_per_client, uint64_t{1} << 40);
  EXPECT_EQ(v.imports_per_peer, 1024u);
  EXPECT_EQ(v.pending_fetches_per_peer, 4096u);
  EXPECT_EQ(v.sessions, 1024u);
  EXPECT_EQ(v.data_connections_per_peer, 16u);
}

TEST_F(LimitsTest, EveryLimitHasItsOwnNameFlagAndValue) {
  LimitValues v;
  for (size_t i = 0; i < kLimitCount; ++i) v.Of(static_cast<Limit>(i)) = 100 + i;
  limits_.Set(v);
  for (size_t i = 0; i < kLimitCount; ++i) {
    const auto l = static_cast<Limit>(i);
    EXPECT_EQ(limits_.Get(l), 100 + i) << Limits::Name(l);
    EXPECT_TRUE(absl::StartsWith(Limits::Flag(l), "max-")) << Limits::Flag(l);
    for (size_t j = 0; j < i; ++j) {
      EXPECT_NE(Limits::Name(l), Limits::Name(static_cast<Limit>(j)));
      EXPECT_NE(Limits::Flag(l), Limits::Flag(static_cast<Limit>(j)));
    }
  }
}

TEST_F(LimitsTest, ARefusalIsResourceExhaustedNamingWhoAndTheFlag) {
  absl::Status st = limits_.Refuse(Limit::kSessionsPerClient, "uid 1000", "already has 3 sessions open", 3);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "uid 1000 already has 3 sessions open (limit --max-sessions-per-client=3)");
  EXPECT_EQ(limits_.refusals(Limit::kSessionsPerClient), 1u);
  EXPECT_EQ(limits_.refusals(Limit::kExportsPerClient), 0u);
}

TEST_F(LimitsTest, OneLogLinePerWhoAndLimitPerInterval) {
  for (int i = 0; i < 100; ++i) (void)limits_.Refuse(Limit::kImportsPerPeer, "node b", "x", 1);
  EXPECT_EQ(limits_.refusals(Limit::kImportsPerPeer), 100u) << "every refusal counts";
  EXPECT_EQ(limits_.log_lines(), 1u) << "but only the first is logged";
  (void)limits_.Refuse(Limit::kImportsPerPeer, "node c", "x", 1);
  EXPECT_EQ(limits_.log_lines(), 2u) << "another peer has its own line";
  (void)limits_.Refuse(Limit::kPendingFetchesPerPeer, "node b", "x", 1);
  EXPECT_EQ(limits_.log_lines(), 3u) << "another limit has its own line";
  now_ += Limits::kLogInterval - absl::Seconds(1);
  (void)limits_.Refuse(Limit::kImportsPerPeer, "node b", "x", 1);
  EXPECT_EQ(limits_.log_lines(), 3u);
  now_ += absl::Seconds(1);
  (void)limits_.Refuse(Limit::kImportsPerPeer, "node b", "x", 1);
  EXPECT_EQ(limits_.log_lines(), 4u) << "a line again once the interval passed";
}

TEST_F(LimitsTest, TheLogForgetsTheOldestWhoBeyondItsBound) {
  // Named in descending order, so that the oldest is not the first by name.
  const size_t n = Limits::kMaxLogKeys + 10;
  auto who = [&](size_t i) { return absl::StrCat("uid ", 100000 + n - i); };
  for (size_t i = 0; i < n; ++i) {
    now_ += absl::Milliseconds(1);
    (void)limits_.Refuse(Limit::kSessionsPerClient, who(i), "x", 1);
  }
  EXPECT_EQ(limits_.log_lines(), n);
  // The first was forgotten (the oldest): it logs again; the newest does not.
  (void)limits_.Refuse(Limit::kSessionsPerClient, who(0), "x", 1);
  EXPECT_EQ(limits_.log_lines(), n + 1);
  (void)limits_.Refuse(Limit::kSessionsPerClient, who(n - 1), "x", 1);
  EXPECT_EQ(limits_.log_lines(), n + 1);
}

// --max-data-connections-per-peer: a slot counts from Admit until it is
// destroyed (the transport gives it back when the connection's resources
// are gone), per peer key; an offer never bound stops counting when it
// would have expired; a lowered limit refuses new slots only.
TEST(DataConnectionsTest, SlotsCountPerPeerUntilDestroyedOrTheirOfferExpires) {
  absl::Time now = absl::FromUnixSeconds(1000);
  auto limits = std::make_shared<Limits>(LimitValues{.data_connections_per_peer = 2},
                                         [&] { return now; });
  DataConnections conns(limits, [&] { return now; });
  auto a1 = conns.Admit("peer a");
  auto a2 = conns.Admit("peer a");
  ASSERT_TRUE(a1.ok() && a2.ok());
  (*a1)->Bind();
  auto a3 = conns.Admit("peer a");
  EXPECT_EQ(a3.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a3.status().message(),
            "peer a already holds 2 data connections to this node (limit --max-data-connections-per-peer=2)");
  EXPECT_EQ(limits->refusals(Limit::kDataConnectionsPerPeer), 1u);
  auto b = conns.Admit("node a");  // another key: its own count
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(conns.Held("node a"), 1u);

  a2->reset();  // closed (or its setup failed): the slot comes back, once
  EXPECT_EQ(conns.Held("peer a"), 1u);
  auto a4 = conns.Admit("peer a");
  ASSERT_TRUE(a4.ok());
  EXPECT_FALSE(conns.Admit("peer a").ok());

  // a4 never bound: past the offer's lifetime it stops counting though a
  // transport still holds it; the bound a1 counts on.
  now += DataConnections::kOfferLifetime;
  EXPECT_EQ(conns.Held("peer a"), 1u);
  auto a5 = conns.Admit("peer a");
  ASSERT_TRUE(a5.ok());
  a4->reset();  // pruned later: nothing counted twice, nothing left behind
  EXPECT_EQ(conns.Held("peer a"), 2u);

  limits->Set({.data_connections_per_peer = 1});  // a reload: held slots stay
  EXPECT_EQ(conns.Held("peer a"), 2u);
  EXPECT_FALSE(conns.Admit("peer a").ok());
  a1->reset();
  a5->reset();
  EXPECT_EQ(conns.Held("peer a"), 0u);
  EXPECT_TRUE(conns.Admit("peer a").ok());
}

TEST(DataConnectionsTest, ASlotMayOutliveItsTable) {
  auto limits = std::make_shared<Limits>();
  auto table = std::make_unique<DataConnections>(limits);
  auto slot = table->Admit("node a");
  ASSERT_TRUE(slot.ok());
  table.reset();
  slot->reset();  // no use after free (ASan tier)
}

}  // namespace
}  // namespace svm::core
