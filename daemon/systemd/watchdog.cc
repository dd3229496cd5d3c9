#include "daemon/systemd/watchdog.h"

#include <systemd/sd-daemon.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace svm::systemd {

absl::Duration WatchdogInterval() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) <= 0) return absl::ZeroDuration();
  return absl::Microseconds(usec);
}

void Notify(const std::string& message) { sd_notify(0, message.c_str()); }

std::unique_ptr<Watchdog> Watchdog::Start(Options opts, Probe probe, Summary summary, Send send) {
  std::unique_ptr<Watchdog> w(new Watchdog());
  w->opts_ = opts;
  w->probe_ = std::move(probe);
  w->summary_ = std::move(summary);
  w->send_ = std::move(send);
  w->thread_ = std::thread([p = w.get()] { p->Loop(); });
  return w;
}

Watchdog::~Watchdog() {
  {
    absl::MutexLock l(&state_->mu);
    state_->stop = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Watchdog::Loop() {
  const bool pings = opts_.interval > absl::ZeroDuration();
  const absl::Duration tick = pings ? opts_.interval / 2 : opts_.status_every;
  State& st = *state_;
  uint64_t posted = 0;  // the number of the last probe posted
  bool stalled = false;
  for (absl::Time tick_end = absl::Now() + tick;; tick_end += tick) {
    bool done;
    {
      absl::MutexLock l(&st.mu);
      if (st.stop) return;
      done = st.probes_done == posted;
    }
    if (done) {  // else: the previous probe is still pending; do not pile up more
      const uint64_t n = ++posted;
      probe_([state = state_, n] {
        absl::MutexLock l(&state->mu);
        state->probes_done = std::max(state->probes_done, n);
      });
    }
    {
      absl::MutexLock l(&st.mu);
      auto ran_or_stop = [&st, posted]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu) {
        return st.stop || st.probes_done == posted;
      };
      st.mu.AwaitWithDeadline(absl::Condition(&ran_or_stop), tick_end);
      if (st.stop) return;
      done = st.probes_done == posted;
    }
    if (done) {
      if (stalled) spdlog::warn("watchdog: the daemon makes progress again");
      stalled = false;
      std::string msg = absl::StrCat("STATUS=", summary_());
      if (pings) msg = absl::StrCat("WATCHDOG=1\n", msg);
      send_(msg);
      absl::MutexLock l(&st.mu);
      auto stop = [&st]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu) { return st.stop; };
      if (st.mu.AwaitWithDeadline(absl::Condition(&stop), tick_end)) return;
    } else if (!stalled) {
      stalled = true;
      // Logged where it is decided; systemd logs the restart itself.
      spdlog::error("watchdog: a probe of the daemon's executor and tables has not run for {} ms; "
                    "withholding the watchdog ping",
                    absl::ToInt64Milliseconds(tick));
      send_("STATUS=stalled: the daemon's executor or tables make no progress");
    }
  }
}

}  // namespace svm::systemd
