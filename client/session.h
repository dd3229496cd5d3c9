// libsvm's end of the client data plane (daemon/session/abi.h): the
// session's rings and data area, and views of imports' shared caches.
// Internal to libsvm; not installed.
#ifndef SVM_CLIENT_SESSION_H_
#define SVM_CLIENT_SESSION_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "daemon/session/abi.h"

namespace svm::internal {

// An open import or export. For an import, its shared cache mapped read-only.
struct View {
  uint32_t handle = 0;
  session::abi::HandleKind kind = session::abi::kExport;
  uint64_t len = 0;
  const uint8_t* data = nullptr;  // the cached pages (imports)
  const session::abi::CacheHeader* header = nullptr;
  const std::atomic<uint64_t>* words = nullptr;
  size_t data_map = 0, words_map = 0;
  ~View();
  bool retired() const {
    return header != nullptr && header->retired.load(std::memory_order_acquire) != 0;
  }
};

class Session {
 public:
  // path: svmd's session socket.
  static absl::StatusOr<std::unique_ptr<Session>> Connect(const std::string& path);
  ~Session();

  // The view of name, opened once and again when svmd retired its cache.
  absl::StatusOr<std::shared_ptr<View>> Open(const std::string& name);

  // One read through the ring; len at most chunk().
  struct Op {
    uint32_t handle = 0;
    uint64_t offset = 0;
    uint64_t len = 0;
    bool fresh = false;
    uint8_t* dst = nullptr;
  };
  struct Result {
    absl::Status status;
    uint64_t seq = 0;
    uint64_t pages_from_cache = 0;
    uint64_t pages_fetched = 0;
  };
  // Runs every op, as many in flight at once as the data area allows, and
  // copies each one's bytes to its dst. Safe to call from several threads.
  std::vector<Result> Run(absl::Span<const Op> ops);
  uint64_t chunk() const { return slot_size_; }

 private:
  Session() = default;
  enum class SlotState { kFree, kBusy, kDone };
  struct Slot {
    SlotState state = SlotState::kFree;
    session::abi::Cqe cqe{};
  };
  // Moves completions into their slots; true when any moved.
  bool ReapLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits until pred holds: spins reaping, then sleeps on the completion
  // doorbell (one thread) or on cv_ (the others).
  void WaitFor(const std::function<bool()>& pred) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Submit(const session::abi::Sqe& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  int sock_ = -1;
  int sq_bell_ = -1;
  int cq_bell_ = -1;
  uint8_t* mem_ = nullptr;
  uint64_t mem_size_ = 0;
  session::abi::SessionHeader* hdr_ = nullptr;
  session::abi::Sqe* sq_ = nullptr;
  const session::abi::Cqe* cq_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t slot_size_ = 0;

  absl::Mutex open_mu_;  // serialises messages on the socket
  std::map<std::string, std::shared_ptr<View>> views_ ABSL_GUARDED_BY(open_mu_);

  absl::Mutex mu_;  // guards the rings' own indices and the slots
  absl::CondVar cv_;
  uint32_t sq_tail_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t cq_head_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  uint64_t reaped_ ABSL_GUARDED_BY(mu_) = 0;
  bool reaping_ ABSL_GUARDED_BY(mu_) = false;  // a thread sleeps on the doorbell
  bool broken_ ABSL_GUARDED_BY(mu_) = false;   // svmd closed the session
};

}  // namespace svm::internal

#endif  // SVM_CLIENT_SESSION_H_
