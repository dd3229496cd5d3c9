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

TEST(Watchdog, PingsWithTheStatusWhileProbesRun) {
  FakeDaemon d;
  Recorder r;
  auto w = StartWatchdog(d, r, absl::Milliseconds(100));  // a ping every 50 ms
  absl::SleepFor(absl::Milliseconds(320));
  w.reset();
  EXPECT_GE(r.Count("WATCHDOG=1\nSTATUS=1 export"), 3);  // about 6
  EXPECT_LE(r.Count("WATCHDOG=1"), 8);  // one per tick, not a busy loop
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
  absl::SleepFor(absl::Milliseconds(200));
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
  absl::SleepFor(absl::Milliseconds(100));
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
