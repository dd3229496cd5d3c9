#include "common/executor.h"

#include <algorithm>

namespace svm {

Executor::Executor(int threads, int max_threads) : max_threads_(std::max(threads, max_threads)) {
  absl::MutexLock l(&mu_);
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

Executor::~Executor() {
  std::vector<std::thread> threads;
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    threads.swap(threads_);  // no thread is added once stopping
  }
  for (auto& t : threads) t.join();
}

void Executor::Submit(std::function<void()> task) {
  absl::MutexLock l(&mu_);
  tasks_.push_back(std::move(task));
  if (!stopping_ && static_cast<size_t>(idle_) < tasks_.size() &&
      static_cast<int>(threads_.size()) < max_threads_) {
    threads_.emplace_back([this] { Loop(); });
  }
}

int Executor::threads() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(threads_.size());
}

void Executor::Loop() {
  for (;;) {
    std::function<void()> task;
    {
      absl::MutexLock l(&mu_);
      ++idle_;
      mu_.Await(absl::Condition(
          +[](Executor* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
            return e->stopping_ || !e->tasks_.empty();
          },
          this));
      --idle_;
      if (tasks_.empty()) return;  // stopping and drained
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

}  // namespace svm
