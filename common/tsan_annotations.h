// ThreadSanitizer happens-before annotations for orderings TSan cannot see.
//
// gRPC's callback API orders a reactor's construction, its reactions (OnReadDone, OnWriteDone,
// OnCancel) and OnDone through its core completion queues and executors, which live in the
// uninstrumented libgrpc: TSan then reports a reactor's members as racing with, e.g., the
// `delete this` in OnDone or the `new` in the handler. gRPC guarantees that order (OnDone runs
// after every reaction has returned; reactions run after the handler returned the reactor), so
// reactors state it explicitly instead of suppressing the reports:
//
//   ReactorSync sync(this);       // in the constructor's last line: TsanRelease(this)
//   void OnReadDone(bool ok) override { ReactionScope r(this); ... }
//   void OnDone() override { TsanAcquire(this); delete this; }
//
// Outside TSan builds every function here is an empty inline.
#ifndef PREHOC_COMMON_TSAN_ANNOTATIONS_H_
#define PREHOC_COMMON_TSAN_ANNOTATIONS_H_

#if defined(__SANITIZE_THREAD__)
#define PREHOC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PREHOC_TSAN 1
#endif
#endif

#ifdef PREHOC_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace prehoc {

// Everything this thread did before TsanRelease(addr) happens before everything another thread
// does after a later TsanAcquire(addr).
inline void TsanRelease(const void* addr) {
#ifdef PREHOC_TSAN
  __tsan_release(const_cast<void*>(addr));
#else
  (void)addr;
#endif
}

inline void TsanAcquire(const void* addr) {
#ifdef PREHOC_TSAN
  __tsan_acquire(const_cast<void*>(addr));
#else
  (void)addr;
#endif
}

// Brackets one gRPC reaction: acquires what the constructor and earlier reactions released and
// releases everything this reaction did (including reads inside gRPC's own StartWrite/Finish)
// for later reactions and OnDone.
class ReactionScope {
 public:
  explicit ReactionScope(const void* reactor) : reactor_(reactor) { TsanAcquire(reactor_); }
  ~ReactionScope() { TsanRelease(reactor_); }
  ReactionScope(const ReactionScope&) = delete;
  ReactionScope& operator=(const ReactionScope&) = delete;

 private:
  const void* reactor_;
};

}  // namespace prehoc

#endif  // PREHOC_COMMON_TSAN_ANNOTATIONS_H_
