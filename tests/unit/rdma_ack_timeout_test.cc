// --rdma-ack-timeout-ms to the verbs ACK timeout exponent (4.096 us * 2^t):
// rounded up, never 0 ("infinite" in the verbs API), at most 31.
#include "absl/time/time.h"
#include "daemon/transport/rdma/verbs.h"
#include "gtest/gtest.h"

namespace svm::transport::rdma {
namespace {

TEST(AckTimeout, TheDefault67MsIsExponent14AndASecond18) {
  EXPECT_EQ(AckTimeoutExponent(absl::Milliseconds(67)), 14);  // --rdma-ack-timeout-ms's default
  EXPECT_EQ(QpCaps{}.ack_timeout, 14);
  EXPECT_EQ(AckTimeoutExponent(absl::Seconds(1)), 18);
  EXPECT_EQ(AckTimeoutOf(18), absl::Nanoseconds(int64_t{4096} << 18));  // 1.07 s
}

TEST(AckTimeout, RoundsUpToTheNextPowerOfTwo) {
  EXPECT_EQ(AckTimeoutExponent(AckTimeoutOf(14)), 14);
  EXPECT_EQ(AckTimeoutExponent(AckTimeoutOf(14) + absl::Nanoseconds(1)), 15);
  EXPECT_EQ(AckTimeoutExponent(absl::Milliseconds(100)), 15);
}

TEST(AckTimeout, NeverInfiniteAndNeverBeyond31) {
  EXPECT_EQ(AckTimeoutExponent(absl::ZeroDuration()), 1);
  EXPECT_EQ(AckTimeoutExponent(absl::Nanoseconds(1)), 1);
  EXPECT_EQ(AckTimeoutExponent(absl::Hours(24 * 365)), 31);
}

}  // namespace
}  // namespace svm::transport::rdma
