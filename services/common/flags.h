// A small flag parser for the server binaries and `prehoc serve` (no global flag registry, so
// everything is testable in-process). Flags are declared with a destination and help text:
//   FlagSet f("Usage: prehoc-worker [flags]");
//   f.String("model", &opts.model_dir, "Hugging Face model directory");
//   f.Int("port", &port, "gRPC port");
//   absl::Status s = f.Parse(args, 1, &help);
// Accepted forms: --name=value, --name value, --flag / --no-flag for booleans, and
// --config FILE: a JSON object {"name": value, ...} applied first, so command-line flags win.
#ifndef PREHOC_SERVICES_COMMON_FLAGS_H_
#define PREHOC_SERVICES_COMMON_FLAGS_H_

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"

namespace prehoc {

class FlagSet {
 public:
  explicit FlagSet(std::string header) : header_(std::move(header)) {}

  void String(const std::string& name, std::string* dest, const std::string& help);
  void Int(const std::string& name, int* dest, const std::string& help);
  void Int64(const std::string& name, int64_t* dest, const std::string& help);
  void Double(const std::string& name, double* dest, const std::string& help);
  void Bool(const std::string& name, bool* dest, const std::string& help);

  // Parses args[first..]. Sets *help when --help/-h was given (other flags are still applied).
  // INVALID_ARGUMENT naming the flag for an unknown flag, a missing or malformed value, or an
  // unreadable / malformed config file (naming the file and key).
  absl::Status Parse(const std::vector<std::string>& args, size_t first, bool* help);

  // The header followed by one line per flag with its help and current (default) value.
  std::string Usage() const;

 private:
  using Dest = std::variant<std::string*, int*, int64_t*, double*, bool*>;
  struct Flag {
    std::string name;
    Dest dest;
    std::string help;
    std::string default_value;
  };
  Flag* Find(const std::string& name);
  absl::Status Set(Flag* flag, const std::string& value, const std::string& origin);
  absl::Status ApplyConfigFile(const std::string& path);

  std::string header_;
  std::vector<Flag> flags_;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_FLAGS_H_
