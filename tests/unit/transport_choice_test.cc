// CommonTransports: which transports an importer tries for a peer, in order.
#include <string>
#include <vector>

#include "daemon/core/import_table.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace svm::core {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using V = std::vector<std::string>;

TEST(CommonTransports, BothAutoTryRdmaThenTcp) {
  EXPECT_THAT(CommonTransports(V{"rdma", "tcp"}, V{"rdma", "tcp"}), ElementsAre("rdma", "tcp"));
}

TEST(CommonTransports, LocalPreferenceOrderWinsOverThePeers) {
  EXPECT_THAT(CommonTransports(V{"rdma", "tcp"}, V{"tcp", "rdma"}), ElementsAre("rdma", "tcp"));
  EXPECT_THAT(CommonTransports(V{"tcp"}, V{"rdma", "tcp"}), ElementsAre("tcp"));
}

TEST(CommonTransports, ATcpOnlyPeerIsReachedOverTcpWithoutTryingRdma) {
  EXPECT_THAT(CommonTransports(V{"rdma", "tcp"}, V{"tcp"}), ElementsAre("tcp"));
}

TEST(CommonTransports, RdmaOnlyEndsHaveNothingToFallBackTo) {
  EXPECT_THAT(CommonTransports(V{"rdma"}, V{"rdma", "tcp"}), ElementsAre("rdma"));
  EXPECT_THAT(CommonTransports(V{"rdma"}, V{"tcp"}), IsEmpty());
  EXPECT_THAT(CommonTransports(V{"tcp"}, V{"rdma"}), IsEmpty());
}

TEST(CommonTransports, APeerThatListsNothingOffersTcp) {
  EXPECT_THAT(CommonTransports(V{"rdma", "tcp"}, V{}), ElementsAre("tcp"));
  EXPECT_THAT(CommonTransports(V{"rdma"}, V{}), IsEmpty());
}

TEST(CommonTransports, UnknownAndRepeatedNamesAreIgnored) {
  EXPECT_THAT(CommonTransports(V{"rdma", "tcp", "tcp"}, V{"carrier-pigeon", "tcp", "tcp"}),
              ElementsAre("tcp"));
}

}  // namespace
}  // namespace svm::core
