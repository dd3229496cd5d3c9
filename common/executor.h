// A pool of threads for work that may block (reads over the network, Sync
// waiting for acknowledgements), so gRPC reactors never block. The pool
// starts with `threads` threads and grows, one thread per submitted task
// that finds every thread busy, up to `max_threads`: a task blocked on a
// slow peer does not hold up tasks submitted after it while the pool can
// grow. Threads are kept until the executor is destroyed.
#ifndef SVM_COMMON_EXECUTOR_H_
#define SVM_COMMON_EXECUTOR_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace svm {

class Executor {
 public:
  explicit Executor(int threads, int max_threads = 0);
  // Runs every task already submitted, then joins.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  void Submit(std::function<void()> task);
  int threads() const;

 private:
  void Loop();

  const int max_threads_;
  mutable absl::Mutex mu_;  // guards everything below
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  int idle_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm

#endif  // SVM_COMMON_EXECUTOR_H_
