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
#include <optional>
#include <ostream>
#include <set>
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
  void Uint64(const std::string& name, uint64_t* dest, const std::string& help);
  void Double(const std::string& name, double* dest, const std::string& help);
  void Bool(const std::string& name, bool* dest, const std::string& help);

  // Parses args[first..]. Sets *help when --help/-h was given (other flags are still applied).
  // INVALID_ARGUMENT naming the flag for an unknown flag, a missing or malformed value, or an
  // unreadable / malformed config file (naming the file and key).
  absl::Status Parse(const std::vector<std::string>& args, size_t first, bool* help);

  // Parse for a CLI command: on an error writes "<command>: <message>" and the usage to `err` and
  // returns 2; on --help writes the usage to `out` and returns 0; otherwise returns -1 (go on).
  int ParseCommand(const std::vector<std::string>& args, size_t first, const std::string& command,
                   const std::string& usage, std::ostream& out, std::ostream& err);

  // INVALID_ARGUMENT "invalid value 'V' for --name" for the first of the named Int flags whose
  // value is negative.
  absl::Status CheckNonNegative(const std::vector<std::string>& names) const;

  // True when the last Parse set flag `name` (command line or config file): tells an explicit
  // value from the default, e.g. for mutually exclusive flags.
  bool IsSet(const std::string& name) const { return set_.contains(name); }

  // The header followed by one line per flag with its help and current (default) value.
  std::string Usage() const;

 private:
  using Dest = std::variant<std::string*, int*, int64_t*, uint64_t*, double*, bool*>;
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
  std::set<std::string> set_;  // flags the last Parse set
};

// The --prompt / --prompt-file / --prompt-ids flags of `prehoc generate` and `prehoc diffuse`.
struct PromptFlags {
  std::string text, file, ids;
  void Register(FlagSet* flags);
  // After Parse: *text from --prompt or --prompt-file (the file's bytes), *ids from --prompt-ids,
  // each unset when not given. Returns an error message ("" when fine): --prompt together with
  // --prompt-file or --prompt-ids, an unreadable file.
  std::string Resolve(const FlagSet& flags, std::optional<std::string>* text,
                      std::optional<std::string>* ids) const;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_FLAGS_H_
