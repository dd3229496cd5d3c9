// svmd's side of the systemd service protocol (sd_notify(3)): periodic
// STATUS= lines and, when the unit sets WatchdogSec=, WATCHDOG=1 pings that
// reflect real liveness. A ping is sent only after a probe posted to the
// daemon has run (a no-op task on its executor that also lists the export
// and import tables, so a deadlocked table or an executor that no longer
// runs tasks stops the pings, and systemd restarts svmd).
#ifndef SVM_DAEMON_SYSTEMD_WATCHDOG_H_
#define SVM_DAEMON_SYSTEMD_WATCHDOG_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace svm::systemd {

// The watchdog interval systemd asked for (WatchdogSec=, via WATCHDOG_USEC
// and WATCHDOG_PID), or zero when there is none.
absl::Duration WatchdogInterval();

// Sends one sd_notify message (e.g. "READY=1"); nothing when svmd does not
// run under systemd (no NOTIFY_SOCKET).
void Notify(const std::string& message);

class Watchdog {
 public:
  struct Options {
    // WatchdogSec=; zero: STATUS= updates only, no pings.
    absl::Duration interval;
    // How often STATUS= is refreshed when there is no watchdog.
    absl::Duration status_every = absl::Seconds(10);
  };
  // Starts a check of the daemon's progress; the check calls done() once it
  // has run. done may be called from any thread, at most once.
  using Probe = std::function<void(std::function<void()> done)>;
  // The one-line STATUS= summary.
  using Summary = std::function<std::string()>;
  // Delivers a notification message (Notify in svmd; a recorder in tests).
  using Send = std::function<void(const std::string& message)>;

  // The thread ticks every interval/2 (systemd's recommendation): it posts
  // a probe, waits up to the tick for it, and pings with the summary once
  // it ran. A probe still pending at the next tick is not replaced: no
  // pings until it runs.
  static std::unique_ptr<Watchdog> Start(Options opts, Probe probe, Summary summary, Send send);
  // Stops the thread; a probe still pending may run later (it holds no
  // reference to the watchdog).
  ~Watchdog();

 private:
  Watchdog() = default;
  void Loop();

  // Shared with probes, which may run after the watchdog is gone.
  struct State {
    absl::Mutex mu;  // guards the fields below
    uint64_t probes_done ABSL_GUARDED_BY(mu) = 0;  // the highest probe number that ran
    bool stop ABSL_GUARDED_BY(mu) = false;
  };

  Options opts_;
  Probe probe_;
  Summary summary_;
  Send send_;
  std::shared_ptr<State> state_ = std::make_shared<State>();
  std::thread thread_;
};

}  // namespace svm::systemd

#endif  // SVM_DAEMON_SYSTEMD_WATCHDOG_H_
