// ThreadSanitizer support for Debian's absl (built without TSan): the synchronisation primitives
// in libabsl_synchronization.so are invisible to TSan, so every absl::Mutex-protected access
// looks like a data race. This library, linked first into every target of a
// -DPREHOC_SANITIZE=thread build, interposes the exported absl entry points, forwards to the
// real ones (dlsym RTLD_NEXT) and tells TSan about the happens-before edges:
//   lock-type calls   real call, then __tsan_acquire(mutex)
//   unlock-type calls __tsan_release(mutex), then real call
//   Await / CondVar::Wait (which unlock and relock inside): release before, acquire after
//   Notification::Notify / BlockingCounter::DecrementCount: release; their waits: acquire.
//   Conditions passed to Await / LockWhen are wrapped to acquire before they are evaluated, and
//   published (release before the wait; every unlock-type call acquires first) because absl may
//   evaluate a waiter's condition object in the thread that unlocks.
//   absl::Status's out-of-line Unref (refcount decrement + delete, in libabsl_status.so) runs
//   under one process-wide std::mutex, which TSan sees, so the final delete is ordered after
//   every earlier release of the same status.
// Reader locks are annotated like writer locks (over-synchronises, never under-synchronises).
// Built only for TSan builds; never part of a release binary.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/status/status.h"
#include "absl/synchronization/notification.h"

namespace {

template <typename Fn>
Fn Real(const char* mangled) {
  void* p = dlsym(RTLD_NEXT, mangled);
  if (p == nullptr) {
    std::fprintf(stderr, "tsan absl shim: cannot find %s\n", mangled);
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

#define PREHOC_REAL(type, mangled)            \
  static const auto real = Real<type>(mangled)

// absl evaluates a waiter's Condition inside Await / LockWhen (in the waiter, after relocking
// internally, or in the thread that unlocks). The wrapper acquires the mutex's TSan clock before
// and releases it after, so the condition's reads are ordered with every other critical section.
struct WrappedCondition {
  const absl::Condition* cond;
  void* mu;
};
bool EvalWrapped(WrappedCondition* w) {
  __tsan_acquire(w->mu);
  const bool r = w->cond->Eval();
  __tsan_release(w->mu);  // the evaluator may now sleep, releasing the lock inside absl
  return r;
}

// absl's own lock-order checker keeps its graph under an internal spin lock TSan cannot see;
// TSan checks lock order itself, so switch absl's off.
[[maybe_unused]] const bool kNoAbslDeadlockDetection = [] {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return true;
}();

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  PREHOC_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex4LockEv");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderLock() {
  PREHOC_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex10ReaderLockEv");
  real(this);
  __tsan_acquire(this);
}

bool Mutex::TryLock() {
  PREHOC_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex7TryLockEv");
  const bool ok = real(this);
  if (ok) __tsan_acquire(this);
  return ok;
}

bool Mutex::ReaderTryLock() {
  PREHOC_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex13ReaderTryLockEv");
  const bool ok = real(this);
  if (ok) __tsan_acquire(this);
  return ok;
}

void Mutex::Unlock() {
  PREHOC_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex6UnlockEv");
  __tsan_release(this);
  __tsan_acquire(this);  // waiters' conditions, which absl may evaluate inside the unlock
  real(this);
}

void Mutex::ReaderUnlock() {
  PREHOC_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex12ReaderUnlockEv");
  __tsan_release(this);
  __tsan_acquire(this);  // waiters' conditions, which absl may evaluate inside the unlock
  real(this);
}

void Mutex::LockWhen(const Condition& cond) {
  PREHOC_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  const Condition wrapped(&EvalWrapped, &w);
  __tsan_release(this);  // publishes `wrapped` to the unlocker that evaluates it
  real(this, wrapped);
  __tsan_acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  PREHOC_REAL(void (*)(Mutex*, const Condition&),
              "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  const Condition wrapped(&EvalWrapped, &w);
  __tsan_release(this);
  real(this, wrapped);
  __tsan_acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  PREHOC_REAL(bool (*)(Mutex*, const Condition&, Duration),
              "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  WrappedCondition wc{&cond, this};
  const Condition wrapped(&EvalWrapped, &wc);
  __tsan_release(this);
  const bool r = real(this, wrapped, timeout);
  __tsan_acquire(this);  // the lock is held whatever the result
  return r;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  PREHOC_REAL(bool (*)(Mutex*, const Condition&, Time),
              "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  WrappedCondition wc{&cond, this};
  const Condition wrapped(&EvalWrapped, &wc);
  __tsan_release(this);
  const bool r = real(this, wrapped, deadline);
  __tsan_acquire(this);
  return r;
}

void Mutex::Await(const Condition& cond) {
  PREHOC_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  const Condition wrapped(&EvalWrapped, &w);
  __tsan_release(this);
  __tsan_acquire(this);  // absl unlocks inside and may evaluate other waiters' conditions
  real(this, wrapped);
  __tsan_acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  PREHOC_REAL(bool (*)(Mutex*, const Condition&, Duration),
              "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  WrappedCondition wc{&cond, this};
  const Condition wrapped(&EvalWrapped, &wc);
  __tsan_release(this);
  __tsan_acquire(this);  // absl unlocks inside and may evaluate other waiters' conditions
  const bool r = real(this, wrapped, timeout);
  __tsan_acquire(this);
  return r;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  PREHOC_REAL(bool (*)(Mutex*, const Condition&, Time),
              "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  WrappedCondition wc{&cond, this};
  const Condition wrapped(&EvalWrapped, &wc);
  __tsan_release(this);
  __tsan_acquire(this);  // absl unlocks inside and may evaluate other waiters' conditions
  const bool r = real(this, wrapped, deadline);
  __tsan_acquire(this);
  return r;
}

void CondVar::Wait(Mutex* mu) {
  PREHOC_REAL(void (*)(CondVar*, Mutex*), "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  __tsan_release(mu);
  __tsan_acquire(mu);  // absl unlocks inside and may evaluate waiters' conditions
  real(this, mu);
  __tsan_acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  PREHOC_REAL(bool (*)(CondVar*, Mutex*, Duration),
              "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  __tsan_release(mu);
  __tsan_acquire(mu);
  const bool r = real(this, mu, timeout);
  __tsan_acquire(mu);
  return r;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  PREHOC_REAL(bool (*)(CondVar*, Mutex*, Time),
              "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  __tsan_release(mu);
  __tsan_acquire(mu);
  const bool r = real(this, mu, deadline);
  __tsan_acquire(mu);
  return r;
}

void Notification::Notify() {
  PREHOC_REAL(void (*)(Notification*), "_ZN4absl7debian312Notification6NotifyEv");
  __tsan_release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  PREHOC_REAL(void (*)(const Notification*), "_ZNK4absl7debian312Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  PREHOC_REAL(bool (*)(const Notification*, Duration),
              "_ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  const bool r = real(this, timeout);
  if (r) __tsan_acquire(const_cast<Notification*>(this));
  return r;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  PREHOC_REAL(bool (*)(const Notification*, Time),
              "_ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  const bool r = real(this, deadline);
  if (r) __tsan_acquire(const_cast<Notification*>(this));
  return r;
}

bool BlockingCounter::DecrementCount() {
  PREHOC_REAL(bool (*)(BlockingCounter*), "_ZN4absl7debian315BlockingCounter14DecrementCountEv");
  __tsan_release(this);
  return real(this);
}

void BlockingCounter::Wait() {
  PREHOC_REAL(void (*)(BlockingCounter*), "_ZN4absl7debian315BlockingCounter4WaitEv");
  real(this);
  __tsan_acquire(this);
}

void Status::UnrefNonInlined(uintptr_t rep) {
  PREHOC_REAL(void (*)(uintptr_t), "_ZN4absl7debian36Status15UnrefNonInlinedEm");
  static std::mutex* const mu = new std::mutex;
  std::lock_guard<std::mutex> l(*mu);
  real(rep);
}

ABSL_NAMESPACE_END
}  // namespace absl
