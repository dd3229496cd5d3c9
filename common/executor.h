// A fixed pool of threads for work that may block (reads over the network,
// Sync waiting for acknowledgements), so gRPC reactors never block.
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
  explicit Executor(int threads);
  // Runs every task already submitted, then joins.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  void Submit(std::function<void()> task);

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace svm

#endif  // SVM_COMMON_EXECUTOR_H_
