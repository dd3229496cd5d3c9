// The watchdog pings only after a probe of the daemon ran: a daemon whose
// executor stalls stops the pings (so systemd restarts it), and pings
// resume once the probe runs.
#include "daemon/systemd/watchdog.h"

#include <gtest/gtest.h>

#include <deque>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"

namespace svm::systemd {
namespace {

class Recorder {
 public:
  void Send(const std::string& m) {
    absl::MutexLock l(&mu_);
    messages_.push_back(m);
  }
  int Count(absl::string_view what) {
    absl::MutexLock l(&mu_);
    int n = 0;
    for (const auto& m : messages_) n += absl::StrContains(m, what);
    return n;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> messages_ ABSL_GUARDED_BY(mu_);
};

// A probe target that runs posted probes only while it is not stalled.
class FakeDaemon {
 public:
  void Post(std::function<void()> done) {
    absl::MutexLock l(&mu_);
    if (stalled_) {
      held_.push_back(std::move(done));
    } else {
      done();
    }
  }
  void Stall(bool stalled) {
    std::deque<std::function<void()>> run;
    {
      absl::MutexLock l(&mu_);
      stalled_ = stalled;
      if (!stalled) run.swap(held_);
    }
    for (auto& f : run) f();
  }
  size_t held() {
    absl::MutexLock l(&mu_);
    return held_.size();
  }

 private:
  absl::Mutex mu_;
  bool stalled_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::function<void()>> held_ ABSL_GUARDED_BY(mu_);
};

std::unique_ptr<Watchdog> StartWatchdog(FakeDaemon& d, Recorder& r, absl::Duration interval) {
  return Watchdog::Start({.interval = interval},
                         [&d](std::function<void()> done) { d.Post(std::move(done)); },
                         [] { return std::string("1 export"); },
                         [&r](const std::string& m) { r.Send(m); });
}

// Waits until r has seen `what` n times (or 30 s passed: the check after
// it fails). The tests wait for what must happen rather than sleep a fixed
// time: a loaded machine (or a sanitizer build) may run the watchdog's
// thread late, never early.
void WaitForCount(Recorder& r, absl::string_view what, int n) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (r.Count(what) < n && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
}

TEST(Watchdog, PingsWithTheStatusWhileProbesRun) {
  FakeDaemon d;
  Recorder r;
  const absl::Time t0 = absl::Now();
  auto w = StartWatchdog(d, r, absl::Milliseconds(100));  // a ping every 50 ms
  WaitForCount(r, "WATCHDOG=1\nSTATUS=1 export", 3);
  w.reset();
  const int64_t ticks = (absl::Now() - t0) / absl::Milliseconds(50);
  EXPECT_GE(r.Count("WATCHDOG=1\nSTATUS=1 export"), 3);
  EXPECT_LE(r.Count("WATCHDOG=1"), ticks + 2);  // one per tick, not a busy loop
}

TEST(Watchdog, AStalledDaemonGetsNoPingsUntilItMakesProgress) {
  FakeDaemon d;
  Recorder r;
  d.Stall(true);
  auto w = StartWatchdog(d, r, absl::Milliseconds(100));
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(r.Count("WATCHDOG=1"), 0);
  EXPECT_EQ(r.Count("STATUS=stalled"), 1);  // said once, not per tick
  EXPECT_EQ(d.held(), 1u) << "probes must not pile up on a stalled daemon";
  d.Stall(false);
  WaitForCount(r, "WATCHDOG=1", 2);
  w.reset();
  EXPECT_GE(r.Count("WATCHDOG=1"), 2);
}

TEST(Watchdog, WithoutWatchdogSecOnlyTheStatusIsSent) {
  FakeDaemon d;
  Recorder r;
  auto w = Watchdog::Start({.interval = absl::ZeroDuration(), .status_every = absl::Milliseconds(30)},
                           [&d](std::function<void()> done) { d.Post(std::move(done)); },
                           [] { return std::string("idle"); },
                           [&r](const std::string& m) { r.Send(m); });
  WaitForCount(r, "STATUS=idle", 2);
  w.reset();
  EXPECT_GE(r.Count("STATUS=idle"), 2);
  EXPECT_EQ(r.Count("WATCHDOG"), 0);
}

TEST(Watchdog, StopsPromptlyEvenWithALongInterval) {
  FakeDaemon d;
  Recorder r;
  auto w = StartWatchdog(d, r, absl::Seconds(60));
  const absl::Time t0 = absl::Now();
  w.reset();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
}

}  // namespace
}  // namespace svm::systemd
