// The TSan build's absl annotations (tsan_absl.cc), run as unit tests of that
// build only. Each test hands data between threads the way svm does, through
// an absl primitive only; without the annotations TSan reports every one of
// them as a race (halt_on_error: the test process exits 66 and fails).
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/flags/parse.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

TEST(TsanAbsl, MutexOrdersAGuardedCounter) {
  absl::Mutex mu;
  int64_t counter = 0;  // guarded by mu
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        absl::MutexLock lock(&mu);
        ++counter;
      }
    });
  }
  for (auto& t : threads) t.join();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(counter, 4000);
}

TEST(TsanAbsl, ReaderLockSeesTheWriter) {
  absl::Mutex mu;
  int value = 0;  // guarded by mu
  std::thread writer([&] {
    absl::MutexLock lock(&mu);
    value = 7;
  });
  int seen = 0;
  while (seen == 0) {
    absl::ReaderMutexLock lock(&mu);
    seen = value;
  }
  writer.join();
  EXPECT_EQ(seen, 7);
}

TEST(TsanAbsl, CondVarHandsOverUnderTheMutex) {
  absl::Mutex mu;
  absl::CondVar cv;
  std::vector<int> queue;  // guarded by mu
  std::thread producer([&] {
    for (int i = 1; i <= 100; ++i) {
      absl::MutexLock lock(&mu);
      queue.push_back(i);
      cv.Signal();
    }
  });
  int sum = 0;
  for (int got = 0; got < 100;) {
    absl::MutexLock lock(&mu);
    while (queue.empty()) cv.WaitWithTimeout(&mu, absl::Seconds(1));
    for (int v : queue) sum += v;
    got += static_cast<int>(queue.size());
    queue.clear();
  }
  producer.join();
  EXPECT_EQ(sum, 5050);
}

TEST(TsanAbsl, AwaitSeesTheConditionsWriter) {
  absl::Mutex mu;
  bool ready = false;  // guarded by mu
  int payload = 0;     // written before ready, read after
  std::thread writer([&] {
    payload = 42;
    absl::MutexLock lock(&mu);
    ready = true;
  });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&ready));
    EXPECT_EQ(payload, 42);
  }
  writer.join();
}

TEST(TsanAbsl, LockWhenSeesTheConditionsWriter) {
  absl::Mutex mu;
  bool ready = false;  // guarded by mu
  int payload = 0;     // written before ready, read after
  std::thread writer([&] {
    payload = 43;
    absl::MutexLock lock(&mu);
    ready = true;
  });
  EXPECT_TRUE(mu.LockWhenWithTimeout(absl::Condition(&ready), absl::Seconds(30)));
  EXPECT_EQ(payload, 43);
  mu.Unlock();
  writer.join();
}

TEST(TsanAbsl, WaitForNotificationPublishes) {
  int payload = 0;
  absl::Notification done;
  std::thread writer([&] {
    payload = 1;
    done.Notify();
  });
  done.WaitForNotification();
  EXPECT_EQ(payload, 1);
  writer.join();
}

// HasBeenNotified() is inline: its acquire load pairs with Notify's release.
TEST(TsanAbsl, HasBeenNotifiedPublishes) {
  int payload2 = 0;
  absl::Notification done2;
  std::thread writer2([&] {
    payload2 = 2;
    done2.Notify();
  });
  while (!done2.HasBeenNotified()) std::this_thread::yield();
  EXPECT_EQ(payload2, 2);
  writer2.join();
}

TEST(TsanAbsl, BlockingCounterWaitSeesEveryDecrement) {
  std::vector<int> slots(4, 0);
  absl::BlockingCounter counter(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      slots[t] = t + 1;
      counter.DecrementCount();
    });
  }
  counter.Wait();
  EXPECT_EQ(slots[0] + slots[1] + slots[2] + slots[3], 10);
  for (auto& t : threads) t.join();
}

// tsan_absl.cc reads how a thread holds the mutex from abseil's word
// (kMuWriter); pin that layout.
TEST(TsanAbsl, WriterBitOfTheMutexWord) {
  absl::Mutex mu;
  auto word = [&] { return reinterpret_cast<std::atomic<intptr_t>*>(&mu)->load(); };
  mu.Lock();
  EXPECT_NE(word() & 0x8, 0);
  mu.Unlock();
  mu.ReaderLock();
  EXPECT_EQ(word() & 0x8, 0);
  EXPECT_NE(word(), 0);
  mu.ReaderUnlock();
  EXPECT_EQ(word(), 0);
}

// A lock that abseil takes itself (the caller is a system library) is told
// to TSan as acquire/release only (tsan_absl.cc, Caller). As a TSan mutex,
// the flag parser's lock looked destroyed while still locked when a usage
// error ends the process inside the parser (svmd --bogus exited 66 with
// that report instead of its usage error).
TEST(TsanAbsl, AbseilsFlagParserKeepsItsLocksToItself) {
  char arg0[] = "tsan_absl_test";
  char arg1[] = "--tsan_absl_test_no_such_flag";
  char* argv[] = {arg0, arg1, nullptr};
  EXPECT_EXIT(absl::ParseCommandLine(2, argv), ::testing::ExitedWithCode(1),
              "Unknown command line flag 'tsan_absl_test_no_such_flag'");
}

}  // namespace
