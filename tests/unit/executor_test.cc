// common/executor: a task blocked on a slow peer does not hold up tasks
// submitted after it while the pool can grow; at its limit, tasks queue.
#include "common/executor.h"

#include <atomic>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace svm {
namespace {

TEST(Executor, GrowsPastBlockedTasksUpToItsLimit) {
  absl::Notification release;
  std::atomic<int> done{0};
  {
    Executor ex(1, 3);
    for (int i = 0; i < 2; ++i) {
      ex.Submit([&] {
        release.WaitForNotification();
        ++done;
      });
    }
    absl::Notification ran;
    ex.Submit([&] { ran.Notify(); });
    EXPECT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(5)))
        << "two blocked tasks held up a third although the pool may grow to 3";
    EXPECT_EQ(ex.threads(), 3);
    // At the limit: the next tasks wait for a thread.
    for (int i = 0; i < 3; ++i) {
      ex.Submit([&] {
        release.WaitForNotification();
        ++done;
      });
    }
    absl::Notification queued;
    ex.Submit([&] { queued.Notify(); });
    EXPECT_FALSE(queued.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
    EXPECT_EQ(ex.threads(), 3);
    release.Notify();
    EXPECT_TRUE(queued.WaitForNotificationWithTimeout(absl::Seconds(5)));
  }
  EXPECT_EQ(done.load(), 5) << "the destructor runs every submitted task";
}

TEST(Executor, AFixedPoolDoesNotGrow) {
  absl::Notification release;
  Executor ex(1);
  ex.Submit([&] { release.WaitForNotification(); });
  absl::Notification ran;
  ex.Submit([&] { ran.Notify(); });
  EXPECT_FALSE(ran.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  EXPECT_EQ(ex.threads(), 1);
  release.Notify();
  EXPECT_TRUE(ran.WaitForNotificationWithTimeout(absl::Seconds(5)));
}

}  // namespace
}  // namespace svm
