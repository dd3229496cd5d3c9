// daemon/transport/session_registry: the one table of one-time session
// tokens behind both transports. Hermetic: a fake clock for expiry.
#include "daemon/transport/session_registry.h"

#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace svm::transport {
namespace {

class FakeConn final : public Subscriber {
 public:
  explicit FakeConn(uint64_t id) : id_(id) {}
  uint64_t id() const override { return id_; }
  const std::string& node() const override { return node_; }
  bool PushInvalidation(const InvalRecord&) override { return true; }
  void Close() override {}

 private:
  uint64_t id_;
  std::string node_ = "fake";
};

class SessionRegistryTest : public ::testing::Test {
 protected:
  absl::Time now_ = absl::FromUnixSeconds(1000);
  SessionRegistry reg_{absl::Seconds(30), [this] { return now_; }};
};

TEST_F(SessionRegistryTest, TokensAreRandomAndDistinct) {
  std::set<std::string> seen;
  for (int i = 0; i < 200; ++i) {
    auto t = reg_.Issue("n");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->size(), SessionRegistry::kTokenBytes);
    EXPECT_TRUE(seen.insert(*t).second) << "a token was issued twice";
  }
  EXPECT_EQ(reg_.size(), 200u);
}

TEST_F(SessionRegistryTest, ClaimReturnsTheNodeAndFindReturnsTheConnection) {
  auto t = reg_.Issue("importer-1");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(reg_.Find(*t), nullptr) << "an unclaimed token has no connection";
  auto c = std::make_shared<FakeConn>(1);
  auto node = reg_.Claim(*t, c);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ(*node, "importer-1");
  EXPECT_EQ(reg_.Find(*t), c);
}

TEST_F(SessionRegistryTest, OnlyTheFirstConnectionClaimsAToken) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  auto first = std::make_shared<FakeConn>(1);
  auto second = std::make_shared<FakeConn>(2);
  ASSERT_TRUE(reg_.Claim(*t, first).ok());
  EXPECT_EQ(reg_.Claim(*t, second).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(reg_.Find(*t), first) << "a refused claim rebound the token";
  EXPECT_EQ(reg_.Claim(*t, first).status().code(), absl::StatusCode::kPermissionDenied)
      << "claimed twice by the same connection";
}

TEST_F(SessionRegistryTest, ATokenWhoseConnectionDiedIsNotClaimableAgain) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  {
    auto first = std::make_shared<FakeConn>(1);
    ASSERT_TRUE(reg_.Claim(*t, first).ok());
  }
  EXPECT_EQ(reg_.Find(*t), nullptr) << "the registry kept a dead connection alive";
  EXPECT_FALSE(reg_.Claim(*t, std::make_shared<FakeConn>(2)).ok());
}

TEST_F(SessionRegistryTest, ConcurrentClaimsHaveOneWinner) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  std::vector<std::shared_ptr<FakeConn>> conns;
  for (int i = 0; i < 8; ++i) conns.push_back(std::make_shared<FakeConn>(i));
  std::atomic<int> won{0};
  std::vector<std::thread> ts;
  for (auto& c : conns) {
    ts.emplace_back([&, c] {
      if (reg_.Claim(*t, c).ok()) ++won;
    });
  }
  for (auto& th : ts) th.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_NE(reg_.Find(*t), nullptr);
}

TEST_F(SessionRegistryTest, UnknownTokensAreRefused) {
  auto c = std::make_shared<FakeConn>(1);
  EXPECT_EQ(reg_.Claim("", c).status().code(), absl::StatusCode::kPermissionDenied);
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  std::string forged = *t;
  forged.back() ^= 1;
  EXPECT_FALSE(reg_.Claim(forged, c).ok());
  EXPECT_EQ(reg_.Find(forged), nullptr);
  EXPECT_TRUE(reg_.Claim(*t, c).ok()) << "a refused forgery burned the real token";
}

// The constant-time comparison every token check goes through (both
// transports' HELLO, the rdma liveness socket, Subscribe): equal only when
// every byte and the length are; an empty issued token matches nothing.
TEST(TokensEqual, EveryByteAndTheLengthCount) {
  const std::string t = "0123456789abcdef";
  EXPECT_TRUE(TokensEqual(t, t));
  for (size_t i = 0; i < t.size(); ++i) {
    std::string f = t;
    f[i] ^= 0x40;
    EXPECT_FALSE(TokensEqual(f, t)) << i;
  }
  EXPECT_FALSE(TokensEqual(t.substr(0, 15), t));
  EXPECT_FALSE(TokensEqual(t + "x", t));
  EXPECT_FALSE(TokensEqual("", ""));
  EXPECT_FALSE(TokensEqual(std::string("\0", 1), std::string()));
}

TEST_F(SessionRegistryTest, ATokenIsFoundAmongMany) {
  std::vector<std::string> tokens;
  for (int i = 0; i < 50; ++i) tokens.push_back(*reg_.Issue("n"));
  auto c = std::make_shared<FakeConn>(1);
  ASSERT_TRUE(reg_.Claim(tokens[37], c).ok());
  EXPECT_EQ(reg_.Find(tokens[37]), c);
  EXPECT_EQ(reg_.Find(tokens[36]), nullptr);  // issued, unclaimed
}

TEST_F(SessionRegistryTest, UnclaimedTokensExpire) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  now_ += absl::Seconds(31);
  EXPECT_EQ(reg_.Claim(*t, std::make_shared<FakeConn>(1)).status().code(),
            absl::StatusCode::kPermissionDenied);
  // Pruned by the next Issue.
  ASSERT_TRUE(reg_.Issue("n").ok());
  EXPECT_EQ(reg_.size(), 1u);
}

TEST_F(SessionRegistryTest, AClaimedTokenDoesNotExpire) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  now_ += absl::Seconds(29);
  auto c = std::make_shared<FakeConn>(1);
  ASSERT_TRUE(reg_.Claim(*t, c).ok()) << "claimed within its lifetime";
  now_ += absl::Hours(1);
  ASSERT_TRUE(reg_.Issue("other").ok());  // prunes
  EXPECT_EQ(reg_.Find(*t), c);
}

TEST_F(SessionRegistryTest, ForgetRemovesTheSession) {
  auto t = reg_.Issue("n");
  ASSERT_TRUE(t.ok());
  auto c = std::make_shared<FakeConn>(1);
  ASSERT_TRUE(reg_.Claim(*t, c).ok());
  reg_.Forget(*t);
  EXPECT_EQ(reg_.Find(*t), nullptr);
  EXPECT_FALSE(reg_.Claim(*t, c).ok()) << "a forgotten token came back";
  EXPECT_EQ(reg_.size(), 0u);
  reg_.Forget("never issued");  // harmless
}

}  // namespace
}  // namespace svm::transport
