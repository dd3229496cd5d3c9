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
//
// Who calls decides how much TSan is told (Caller below). A call from
// instrumented code (the executable, svm's own libraries) gets the mutex
// annotations above: TSan checks svm's locking in full (lock sets in
// reports, lock-order inversions, unlocking a mutex not held, destroying a
// locked one). A call from a system library (Debian's gRPC, gpr, abseil's
// flags, ...: none is built with TSan) only orders memory: unlock is a
// __tsan_release on the mutex's address, lock an __tsan_acquire. The mutex
// annotations would read and write the mutex's own bytes as TSan sees them,
// and those mutexes live in objects the library allocated on one thread and
// handed to another through synchronisation TSan cannot see (its atomics),
// so every such lock was reported as a race with the allocation (46 reports
// in gRPC's tcp endpoints); and a mutex the library locks and frees or
// reuses in ways TSan misses looked "destroyed while locked" (abseil's flag
// parser). Acquire and release touch no memory, and they keep the
// happens-before that gRPC's locks give svm's data handed through gRPC
// (a request parsed on one thread, handled on another).

#include <dlfcn.h>
#include <link.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

thread_local int depth = 0;

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

// The executable segments of system libraries (a path under /usr/lib or
// /lib: Debian packages, none built with TSan), found once. svm's own
// libraries (build tree, instrumented) and the executable are not in it.
struct Range {
  uintptr_t begin;
  uintptr_t end;
};

const std::vector<Range>& SystemCode() {
  static const std::vector<Range>* ranges = [] {
    auto* found = new std::vector<Range>;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) {
          std::string_view name = info->dlpi_name != nullptr ? info->dlpi_name : "";
          if (!name.starts_with("/usr/lib/") && !name.starts_with("/lib/")) return 0;
          for (int i = 0; i < info->dlpi_phnum; ++i) {
            const ElfW(Phdr)& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD || (ph.p_flags & PF_X) == 0) continue;
            uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
            static_cast<std::vector<Range>*>(out)->push_back({begin, begin + ph.p_memsz});
          }
          return 0;
        },
        found);
    return found;
  }();
  return *ranges;
}

bool InSystemCode(const void* pc) {
  auto a = reinterpret_cast<uintptr_t>(pc);
  for (const Range& r : SystemCode()) {
    if (a >= r.begin && a < r.end) return true;
  }
  return false;
}

// What to tell TSan about the outermost interposed call on a thread, given
// its return address.
enum class Mode {
  kNested,  // inside another interposed call: nothing
  kMutex,   // from instrumented code: the mutex annotations
  kOrder,   // from a system library: acquire / release only
};

// Outermost-call guard with the caller's mode.
class Caller {
 public:
  explicit Caller(const void* ret)
      : mode_(depth++ != 0 ? Mode::kNested : InSystemCode(ret) ? Mode::kOrder : Mode::kMutex) {}
  ~Caller() { --depth; }
  Caller(const Caller&) = delete;
  Caller& operator=(const Caller&) = delete;
  bool mutex() const { return mode_ == Mode::kMutex; }
  bool order() const { return mode_ == Mode::kOrder; }
  bool annotate() const { return mode_ != Mode::kNested; }

 private:
  Mode mode_;
};

void Acquire(const void* p) { __tsan_acquire(const_cast<void*>(p)); }
void Release(const void* p) { __tsan_release(const_cast<void*>(p)); }

}  // namespace

// `caller` is the outermost-call guard; __builtin_return_address must be
// taken in the interposed member itself.
#define SVM_REAL(type, mangled)                  \
  static const auto real = Real<type>(mangled); \
  Caller caller(__builtin_return_address(0))

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5MutexD2Ev");
  if (caller.mutex()) __tsan_mutex_destroy(this, 0);
  real(this);
}

void Mutex::Lock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex4LockEv");
  if (caller.mutex()) PreLock(this, 0);
  real(this);
  if (caller.mutex()) PostLock(this, 0);
  if (caller.order()) Acquire(this);
}

void Mutex::ReaderLock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex10ReaderLockEv");
  if (caller.mutex()) PreLock(this, __tsan_mutex_read_lock);
  real(this);
  if (caller.mutex()) PostLock(this, __tsan_mutex_read_lock);
  if (caller.order()) Acquire(this);
}

bool Mutex::TryLock() {
  SVM_REAL(bool (*)(Mutex*), "_ZN4absl@5Mutex7TryLockEv");
  unsigned flags = __tsan_mutex_try_lock;
  if (caller.mutex()) PreLock(this, flags);
  bool ok = real(this);
  if (caller.mutex()) PostLock(this, flags | (ok ? 0 : __tsan_mutex_try_lock_failed));
  if (caller.order() && ok) Acquire(this);
  return ok;
}

bool Mutex::ReaderTryLock() {
  SVM_REAL(bool (*)(Mutex*), "_ZN4absl@5Mutex13ReaderTryLockEv");
  unsigned flags = __tsan_mutex_read_lock | __tsan_mutex_try_lock;
  if (caller.mutex()) PreLock(this, flags);
  bool ok = real(this);
  if (caller.mutex()) PostLock(this, flags | (ok ? 0 : __tsan_mutex_try_lock_failed));
  if (caller.order() && ok) Acquire(this);
  return ok;
}

void Mutex::Unlock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex6UnlockEv");
  if (caller.mutex()) __tsan_mutex_pre_unlock(this, 0);
  if (caller.order()) Release(this);
  real(this);
  if (caller.mutex()) __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderUnlock() {
  SVM_REAL(void (*)(Mutex*), "_ZN4absl@5Mutex12ReaderUnlockEv");
  if (caller.mutex()) __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  if (caller.order()) Release(this);
  real(this);
  if (caller.mutex()) __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

// LockWhen*: returns holding the mutex (also on a timeout).

void Mutex::LockWhen(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl@5Mutex8LockWhenERKNS0_9ConditionE");
  if (caller.mutex()) PreLock(this, 0);
  real(this, cond);
  if (caller.mutex()) PostLock(this, 0);
  if (caller.order()) Acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl@5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  if (caller.mutex()) PreLock(this, __tsan_mutex_read_lock);
  real(this, cond);
  if (caller.mutex()) PostLock(this, __tsan_mutex_read_lock);
  if (caller.order()) Acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), "_ZN4absl@5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  if (caller.mutex()) PreLock(this, 0);
  bool ok = real(this, cond, timeout);
  if (caller.mutex()) PostLock(this, 0);
  if (caller.order()) Acquire(this);
  return ok;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), "_ZN4absl@5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  if (caller.mutex()) PreLock(this, __tsan_mutex_read_lock);
  bool ok = real(this, cond, timeout);
  if (caller.mutex()) PostLock(this, __tsan_mutex_read_lock);
  if (caller.order()) Acquire(this);
  return ok;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time), "_ZN4absl@5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  if (caller.mutex()) PreLock(this, 0);
  bool ok = real(this, cond, deadline);
  if (caller.mutex()) PostLock(this, 0);
  if (caller.order()) Acquire(this);
  return ok;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time), "_ZN4absl@5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  if (caller.mutex()) PreLock(this, __tsan_mutex_read_lock);
  bool ok = real(this, cond, deadline);
  if (caller.mutex()) PostLock(this, __tsan_mutex_read_lock);
  if (caller.order()) Acquire(this);
  return ok;
}

// Await*: called holding the mutex; it is released while waiting and held
// again on return (also on a timeout).

void Mutex::Await(const Condition& cond) {
  SVM_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl@5Mutex5AwaitERKNS0_9ConditionE");
  unsigned flags = caller.mutex() ? HeldFlags(this) : 0;
  if (caller.mutex()) PreWait(this, flags);
  if (caller.order()) Release(this);
  real(this, cond);
  if (caller.mutex()) PostWait(this, flags);
  if (caller.order()) Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), "_ZN4absl@5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  unsigned flags = caller.mutex() ? HeldFlags(this) : 0;
  if (caller.mutex()) PreWait(this, flags);
  if (caller.order()) Release(this);
  bool ok = real(this, cond, timeout);
  if (caller.mutex()) PostWait(this, flags);
  if (caller.order()) Acquire(this);
  return ok;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  SVM_REAL(bool (*)(Mutex*, const Condition&, absl::Time), "_ZN4absl@5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  unsigned flags = caller.mutex() ? HeldFlags(this) : 0;
  if (caller.mutex()) PreWait(this, flags);
  if (caller.order()) Release(this);
  bool ok = real(this, cond, deadline);
  if (caller.mutex()) PostWait(this, flags);
  if (caller.order()) Acquire(this);
  return ok;
}

// CondVar waits: the mutex is released while waiting and held on return.

void CondVar::Wait(Mutex* mu) {
  SVM_REAL(void (*)(CondVar*, Mutex*), "_ZN4absl@7CondVar4WaitEPNS0_5MutexE");
  unsigned flags = caller.mutex() ? HeldFlags(mu) : 0;
  if (caller.mutex()) PreWait(mu, flags);
  if (caller.order()) Release(mu);
  real(this, mu);
  if (caller.mutex()) PostWait(mu, flags);
  if (caller.order()) Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  SVM_REAL(bool (*)(CondVar*, Mutex*, absl::Duration), "_ZN4absl@7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  unsigned flags = caller.mutex() ? HeldFlags(mu) : 0;
  if (caller.mutex()) PreWait(mu, flags);
  if (caller.order()) Release(mu);
  bool timed_out = real(this, mu, timeout);
  if (caller.mutex()) PostWait(mu, flags);
  if (caller.order()) Acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  SVM_REAL(bool (*)(CondVar*, Mutex*, absl::Time), "_ZN4absl@7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  unsigned flags = caller.mutex() ? HeldFlags(mu) : 0;
  if (caller.mutex()) PreWait(mu, flags);
  if (caller.order()) Release(mu);
  bool timed_out = real(this, mu, deadline);
  if (caller.mutex()) PostWait(mu, flags);
  if (caller.order()) Acquire(mu);
  return timed_out;
}

// Notification: Notify releases, a wait that saw the notification acquires
// (the inline HasBeenNotified() acquires by itself, see NotifiedYet).
void Notification::Notify() {
  SVM_REAL(void (*)(Notification*), "_ZN4absl@12Notification6NotifyEv");
  if (caller.annotate()) __tsan_release(NotifiedYet(this));
  real(this);
}

void Notification::WaitForNotification() const {
  SVM_REAL(void (*)(const Notification*), "_ZNK4absl@12Notification19WaitForNotificationEv");
  real(this);
  if (caller.annotate()) __tsan_acquire(NotifiedYet(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  SVM_REAL(bool (*)(const Notification*, absl::Duration),
           "_ZNK4absl@12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  bool notified = real(this, timeout);
  if (notified && caller.annotate()) __tsan_acquire(NotifiedYet(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  SVM_REAL(bool (*)(const Notification*, absl::Time),
           "_ZNK4absl@12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  bool notified = real(this, deadline);
  if (notified && caller.annotate()) __tsan_acquire(NotifiedYet(this));
  return notified;
}

// BlockingCounter: every DecrementCount releases, Wait acquires them all
// (only the last decrement takes the counter's mutex inside abseil).
bool BlockingCounter::DecrementCount() {
  SVM_REAL(bool (*)(BlockingCounter*), "_ZN4absl@15BlockingCounter14DecrementCountEv");
  if (caller.annotate()) __tsan_release(this);
  return real(this);
}

void BlockingCounter::Wait() {
  SVM_REAL(void (*)(BlockingCounter*), "_ZN4absl@15BlockingCounter4WaitEv");
  real(this);
  if (caller.annotate()) __tsan_acquire(this);
}

ABSL_NAMESPACE_END
}  // namespace absl
