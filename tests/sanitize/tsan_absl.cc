// ThreadSanitizer builds only (-DSVM_TSAN_ABSL=ON, set by
// tests/sanitize/run-sanitized.sh tsan): tells TSan about absl::Mutex,
// absl::CondVar, absl::Notification and absl::BlockingCounter.
//
// Why: Debian's libabsl_synchronization is not built with -fsanitize=thread,
// so TSan sees neither the lock and unlock inside it nor the release/acquire
// that Notification publishes, and reports every access guarded by an
// absl::Mutex as a race. This file defines the out-of-line members that svm,
// gRPC and abseil itself call (`nm -DC --undefined-only` over them lists
// them; calls inside libabsl_synchronization go through its PLT, so they land
// here too). Each one forwards to the real function in the library
// (dlsym(RTLD_NEXT)) and brackets it with TSan's public mutex annotations
// (<sanitizer/tsan_interface.h>), the same calls abseil makes itself when it
// is compiled with TSan (ABSL_TSAN_MUTEX_* in its mutex.cc):
//   lock:   __tsan_mutex_pre_lock, real, __tsan_mutex_post_lock (acquire)
//   unlock: __tsan_mutex_pre_unlock (release), real, __tsan_mutex_post_unlock
//   wait:   unlock annotation, real wait (which unlocks and relocks inside),
//           lock annotation
// Members that are inline in the headers (WriterLock, the constructor's
// __tsan_mutex_create, HasBeenNotified's acquire load) are compiled into
// svm's instrumented code and need nothing here.
//
// The library is linked, first, into every target of the TSan build (the top
// CMakeLists.txt), so the executable's lookup scope finds these definitions
// before libabsl_synchronization's. It is compiled without -fsanitize=thread:
// its own accesses are not svm's.
//
// A public member may call another through the PLT (LockWhenWithTimeout ->
// LockWhenWithDeadline, Notify -> Lock/Unlock): only the outermost call on a
// thread is annotated (depth), so TSan never sees a mutex locked twice.

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

thread_local int depth = 0;

// Outermost-call guard: annotate() is true for the outermost interposed call
// on this thread.
class Scope {
 public:
  Scope() : outer_(depth++ == 0) {}
  ~Scope() { --depth; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  bool annotate() const { return outer_; }

 private:
  bool outer_;
};

#define SVM_STR2(x) #x
#define SVM_STR(x) SVM_STR2(x)

// The real member, found once by its mangled name in the next object after
// this one in lookup order (libabsl_synchronization). `@` in `mangled` stands
// for abseil's inline namespace (Debian 12: "debian3", mangled 7debian3).
template <typename Fn>
Fn Real(const char* mangled) {
  std::string_view ns = SVM_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  std::string name;
  for (const char* c = mangled; *c != '\0'; ++c) {
    if (*c == '@') {
      name += std::to_string(ns.size());
      name += ns;
    } else {
      name += *c;
    }
  }
  void* p = dlsym(RTLD_NEXT, name.c_str());
  if (p == nullptr) {
    std::fprintf(stderr, "svm tsan_absl: %s not found: %s\n", name.c_str(), dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

// How the calling thread holds `mu` (it does, when it calls Await or a
// CondVar wait): abseil's word has kMuWriter (0x08) set while a writer holds
// it (mutex.cc, "mu_ word bits"; checked by tsan_absl_test).
unsigned HeldFlags(const absl::Mutex* mu) {
  static_assert(sizeof(absl::Mutex) == sizeof(intptr_t));
  constexpr intptr_t kMuWriter = 0x0008;
  auto word = reinterpret_cast<const std::atomic<intptr_t>*>(mu)->load(std::memory_order_relaxed);
  return (word & kMuWriter) != 0 ? 0u : static_cast<unsigned>(__tsan_mutex_read_lock);
}

void PreLock(const void* mu, unsigned flags) { __tsan_mutex_pre_lock(const_cast<void*>(mu), flags); }
void PostLock(const void* mu, unsigned flags) {
  __tsan_mutex_post_lock(const_cast<void*>(mu), flags, 0);
}
// Await and CondVar waits, as abseil annotates them itself: released (as
// TSan sees it) before the real call can let another thread in, then, once
// it returns holding the mutex again, acquired. TSan ignores the thread's
// accesses from pre_unlock to post_lock: that covers the Conditions abseil
// evaluates inside (it holds the mutex then, but TSan cannot know).
void PreWait(const void* mu, unsigned flags) { __tsan_mutex_pre_unlock(const_cast<void*>(mu), flags); }
void PostWait(const void* mu, unsigned flags) {
  __tsan_mutex_post_unlock(const_cast<void*>(mu), flags);
  __tsan_mutex_pre_lock(const_cast<void*>(mu), flags);
  __tsan_mutex_post_lock(const_cast<void*>(mu), flags, 0);
}

// A Notification is {Mutex mutex_; std::atomic<bool> notified_yet_;}
// (notification.h). The inline HasBeenNotified() is an instrumented acquire
// load of notified_yet_, so Notify releases on that address.
void* NotifiedYet(const absl::Notification* n) {
  static_assert(sizeof(absl::Notification) == 2 * sizeof(absl::Mutex));
  return const_cast<char*>(reinterpret_cast<const char*>(n)) + sizeof(absl::Mutex);
}

}  // namespace

#define SVM_REAL(type, mangled)                  \
  static const auto real = Real<type>(mangled); \
  Scope scope

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5MutexD2Ev");
  if (scope.annotate()) __tsan_mutex_destroy(this, 0);
  real(this);
}

void Mutex::Lock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex4LockEv");
  if (!scope.annotate()) return real(this);
  PreLock(this, 0);
  real(this);
  PostLock(this, 0);
}

void Mutex::ReaderLock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex10ReaderLockEv");
  if (!scope.annotate()) return real(this);
  PreLock(this, __tsan_mutex_read_lock);
  real(this);
  PostLock(this, __tsan_mutex_read_lock);
}

bool Mutex::TryLock() {
  SVM_REAL(bool (*)(Mutex*), "_ZN4absl@5Mutex7TryLockEv");
  if (!scope.annotate()) return real(this);
  PreLock(this, __tsan_mutex_try_lock);
  bool ok = real(this);
  PostLock(this, __tsan_mutex_try_lock | (ok ? 0 : __tsan_mutex_try_lock_failed));
  return ok;
}

bool Mutex::ReaderTryLock() {
  SVM_REAL(bool (*)(Mutex*), "_ZN4absl@5Mutex13ReaderTryLockEv");
  if (!scope.annotate()) return real(this);
  unsigned flags = __tsan_mutex_read_lock | __tsan_mutex_try_lock;
  PreLock(this, flags);
  bool ok = real(this);
  PostLock(this, flags | (ok ? 0 : __tsan_mutex_try_lock_failed));
  return ok;
}

void Mutex::Unlock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex6UnlockEv");
  if (!scope.annotate()) return real(this);
  __tsan_mutex_pre_unlock(this, 0);
  real(this);
  __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderUnlock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex12ReaderUnlockEv");
  if (!scope.annotate()) return real(this);
  __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

// LockWhen*: returns holding the mutex (also on a timeout).
void Mutex::LockWhen(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl@5Mutex8LockWhenERKNS0_9ConditionE");
  if (!scope.annotate()) return real(this, cond);
  PreLock(this, 0);
  real(this, cond);
  PostLock(this, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&),
           "_ZN4absl@5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  if (!scope.annotate()) return real(this, cond);
  PreLock(this, __tsan_mutex_read_lock);
  real(this, cond);
  PostLock(this, __tsan_mutex_read_lock);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
           "_ZN4absl@5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  if (!scope.annotate()) return real(this, cond, timeout);
  PreLock(this, 0);
  bool ok = real(this, cond, timeout);
  PostLock(this, 0);
  return ok;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
           "_ZN4absl@5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  if (!scope.annotate()) return real(this, cond, timeout);
  PreLock(this, __tsan_mutex_read_lock);
  bool ok = real(this, cond, timeout);
  PostLock(this, __tsan_mutex_read_lock);
  return ok;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
           "_ZN4absl@5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  if (!scope.annotate()) return real(this, cond, deadline);
  PreLock(this, 0);
  bool ok = real(this, cond, deadline);
  PostLock(this, 0);
  return ok;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
           "_ZN4absl@5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  if (!scope.annotate()) return real(this, cond, deadline);
  PreLock(this, __tsan_mutex_read_lock);
  bool ok = real(this, cond, deadline);
  PostLock(this, __tsan_mutex_read_lock);
  return ok;
}

// Await*: called holding the mutex; it is released while waiting and held
// again on return (also on a timeout).
void Mutex::Await(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl@5Mutex5AwaitERKNS0_9ConditionE");
  if (!scope.annotate()) return real(this, cond);
  unsigned flags = HeldFlags(this);
  PreWait(this, flags);
  real(this, cond);
  PostWait(this, flags);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
           "_ZN4absl@5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  if (!scope.annotate()) return real(this, cond, timeout);
  unsigned flags = HeldFlags(this);
  PreWait(this, flags);
  bool ok = real(this, cond, timeout);
  PostWait(this, flags);
  return ok;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
           "_ZN4absl@5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  if (!scope.annotate()) return real(this, cond, deadline);
  unsigned flags = HeldFlags(this);
  PreWait(this, flags);
  bool ok = real(this, cond, deadline);
  PostWait(this, flags);
  return ok;
}

// CondVar waits: the mutex is released while waiting and held on return.
void CondVar::Wait(Mutex* mu) {
  SVM_REAL(void (*)(CondVar*, Mutex*), "_ZN4absl@7CondVar4WaitEPNS0_5MutexE");
  if (!scope.annotate()) return real(this, mu);
  unsigned flags = HeldFlags(mu);
  PreWait(mu, flags);
  real(this, mu);
  PostWait(mu, flags);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  SVM_REAL(bool (*)(CondVar*, Mutex*, absl::Duration),
           "_ZN4absl@7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  if (!scope.annotate()) return real(this, mu, timeout);
  unsigned flags = HeldFlags(mu);
  PreWait(mu, flags);
  bool timed_out = real(this, mu, timeout);
  PostWait(mu, flags);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  SVM_REAL(bool (*)(CondVar*, Mutex*, absl::Time),
           "_ZN4absl@7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  if (!scope.annotate()) return real(this, mu, deadline);
  unsigned flags = HeldFlags(mu);
  PreWait(mu, flags);
  bool timed_out = real(this, mu, deadline);
  PostWait(mu, flags);
  return timed_out;
}

// Notification: Notify releases, a wait that saw the notification acquires
// (the inline HasBeenNotified() acquires by itself, see NotifiedYet).
void Notification::Notify() {
  SVM_REAL(void (*)(Notification*), "_ZN4absl@12Notification6NotifyEv");
  if (scope.annotate()) __tsan_release(NotifiedYet(this));
  real(this);
}

void Notification::WaitForNotification() const {
  SVM_REAL(void (*)(const Notification*), "_ZNK4absl@12Notification19WaitForNotificationEv");
  real(this);
  if (scope.annotate()) __tsan_acquire(NotifiedYet(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  SVM_REAL(bool (*)(const Notification*, absl::Duration),
           "_ZNK4absl@12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  bool notified = real(this, timeout);
  if (notified && scope.annotate()) __tsan_acquire(NotifiedYet(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  SVM_REAL(bool (*)(const Notification*, absl::Time),
           "_ZNK4absl@12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  bool notified = real(this, deadline);
  if (notified && scope.annotate()) __tsan_acquire(NotifiedYet(this));
  return notified;
}

// BlockingCounter: every DecrementCount releases, Wait acquires them all
// (only the last decrement takes the counter's mutex inside abseil).
bool BlockingCounter::DecrementCount() {
  SVM_REAL(bool (*)(BlockingCounter*), "_ZN4absl@15BlockingCounter14DecrementCountEv");
  if (scope.annotate()) __tsan_release(this);
  return real(this);
}

void BlockingCounter::Wait() {
  SVM_REAL(void (*)(BlockingCounter*), "_ZN4absl@15BlockingCounter4WaitEv");
  real(this);
  if (scope.annotate()) __tsan_acquire(this);
}

ABSL_NAMESPACE_END
}  // namespace absl
