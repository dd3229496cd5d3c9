// Counts a transport's running connection threads, so that Stop() can wait
// until every one of them has finished (they are detached and hold their
// connection alive themselves).
#ifndef SVM_DAEMON_TRANSPORT_THREAD_COUNT_H_
#define SVM_DAEMON_TRANSPORT_THREAD_COUNT_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace svm::transport {

class ThreadCount {
 public:
  void Inc() {
    absl::MutexLock l(&mu_);
    ++n_;
  }
  void Dec() {
    absl::MutexLock l(&mu_);
    --n_;
  }
  void WaitZero() {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(+[](int* n) { return *n == 0; }, &n_));
  }

 private:
  absl::Mutex mu_;
  int n_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_THREAD_COUNT_H_
