// Minimal structured logging to stderr: one line per event,
//   2026-11-23T05:13:37.123Z I worker/engine.cc:42] message key=value ...
// LOG(INFO) << ...; LOG(WARNING) << ...; LOG(ERROR) << ...; LOG(FATAL) aborts after writing.
// The minimum level is set once with SetMinLogLevel (main.cc reads --log-level); thread-safe.
#ifndef PREHOC_COMMON_LOGGING_H_
#define PREHOC_COMMON_LOGGING_H_

#include <sstream>
#include <string_view>

namespace prehoc {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();
// Parses "debug", "info", "warning", "error"; returns false on anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
// Used to discard a stream expression when the level is filtered out.
struct LogVoidify {
  void operator&(std::ostream&) {}
};
}  // namespace internal

}  // namespace prehoc

#define PREHOC_LOG_LEVEL_DEBUG ::prehoc::LogLevel::kDebug
#define PREHOC_LOG_LEVEL_INFO ::prehoc::LogLevel::kInfo
#define PREHOC_LOG_LEVEL_WARNING ::prehoc::LogLevel::kWarning
#define PREHOC_LOG_LEVEL_ERROR ::prehoc::LogLevel::kError
#define PREHOC_LOG_LEVEL_FATAL ::prehoc::LogLevel::kFatal

#define LOG(severity)                                                     \
  (PREHOC_LOG_LEVEL_##severity < ::prehoc::MinLogLevel())                 \
      ? (void)0                                                           \
      : ::prehoc::internal::LogVoidify() &                                \
            ::prehoc::internal::LogMessage(PREHOC_LOG_LEVEL_##severity,   \
                                           __FILE__, __LINE__)            \
                .stream()

#endif  // PREHOC_COMMON_LOGGING_H_
