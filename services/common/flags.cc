#include "services/common/flags.h"

#include <charconv>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace prehoc {
namespace {

template <typename T>
bool ParseInt(const std::string& s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size() && !s.empty();
}

std::string ValueString(
    const std::variant<std::string*, int*, int64_t*, uint64_t*, double*, bool*>& d) {
  if (auto p = std::get_if<std::string*>(&d)) return "\"" + **p + "\"";
  if (auto p = std::get_if<int*>(&d)) return std::to_string(**p);
  if (auto p = std::get_if<int64_t*>(&d)) return std::to_string(**p);
  if (auto p = std::get_if<uint64_t*>(&d)) return std::to_string(**p);
  if (auto p = std::get_if<double*>(&d)) {
    std::ostringstream os;
    os << **p;
    return os.str();
  }
  return *std::get<bool*>(d) ? "true" : "false";
}

}  // namespace

void FlagSet::String(const std::string& name, std::string* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}
void FlagSet::Int(const std::string& name, int* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}
void FlagSet::Int64(const std::string& name, int64_t* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}
void FlagSet::Uint64(const std::string& name, uint64_t* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}
void FlagSet::Double(const std::string& name, double* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}
void FlagSet::Bool(const std::string& name, bool* dest, const std::string& help) {
  flags_.push_back({name, dest, help, ValueString(dest)});
}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

absl::Status FlagSet::Set(Flag* flag, const std::string& value, const std::string& origin) {
  auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": invalid value '", value, "' for --", flag->name));
  };
  if (auto p = std::get_if<std::string*>(&flag->dest)) {
    **p = value;
  } else if (auto p = std::get_if<int*>(&flag->dest)) {
    if (!ParseInt(value, *p)) return bad();
  } else if (auto p = std::get_if<int64_t*>(&flag->dest)) {
    if (!ParseInt(value, *p)) return bad();
  } else if (auto p = std::get_if<uint64_t*>(&flag->dest)) {
    if (!ParseInt(value, *p)) return bad();
  } else if (auto p = std::get_if<double*>(&flag->dest)) {
    try {
      size_t pos = 0;
      const double v = std::stod(value, &pos);
      if (pos != value.size()) return bad();
      **p = v;
    } catch (...) {
      return bad();
    }
  } else {
    bool* b = std::get<bool*>(flag->dest);
    if (value == "true" || value == "1") {
      *b = true;
    } else if (value == "false" || value == "0") {
      *b = false;
    } else {
      return bad();
    }
  }
  set_.insert(flag->name);
  return absl::OkStatus();
}

absl::Status FlagSet::ApplyConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--config: cannot read '", path, "'"));
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--config: '", path, "' is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("--config: '", path, "' must hold an object"));
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    Flag* f = Find(it.key());
    if (f == nullptr || it.key() == "config") {
      return absl::InvalidArgumentError(
          absl::StrCat("--config: '", path, "': unknown key '", it.key(), "'"));
    }
    std::string value;
    if (it->is_string()) {
      value = it->get<std::string>();
    } else if (it->is_boolean()) {
      value = it->get<bool>() ? "true" : "false";
    } else if (it->is_number()) {
      value = it->dump();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--config: '", path, "': key '", it.key(),
                                                     "' must be a string, number or boolean"));
    }
    absl::Status s = Set(f, value, absl::StrCat("--config '", path, "'"));
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args, size_t first, bool* help) {
  *help = false;
  set_.clear();
  // Pass 1: --config (so that command-line flags override it).
  for (size_t i = first; i < args.size(); ++i) {
    const std::string& a = args[i];
    std::string path;
    if (a == "--config") {
      if (i + 1 >= args.size()) return absl::InvalidArgumentError("--config needs a value");
      path = args[++i];
    } else if (a.rfind("--config=", 0) == 0) {
      path = a.substr(9);
    } else {
      continue;
    }
    absl::Status s = ApplyConfigFile(path);
    if (!s.ok()) return s;
  }
  for (size_t i = first; i < args.size(); ++i) {
    std::string name = args[i];
    if (name == "--help" || name == "-h") {
      *help = true;
      continue;
    }
    if (name.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", name, "'"));
    }
    name = name.substr(2);
    std::optional<std::string> value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (name == "config") {
      if (!value) ++i;
      continue;
    }
    Flag* f = Find(name);
    if (f == nullptr && name.rfind("no-", 0) == 0 && !value) {
      Flag* b = Find(name.substr(3));
      if (b != nullptr && std::holds_alternative<bool*>(b->dest)) {
        *std::get<bool*>(b->dest) = false;
        set_.insert(b->name);
        continue;
      }
    }
    if (f == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag '--", name, "'"));
    if (!value) {
      if (std::holds_alternative<bool*>(f->dest)) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    }
    absl::Status s = Set(f, *value, "command line");
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string out = header_;
  if (!out.empty() && out.back() != '\n') out += '\n';
  out += "\nFlags:\n";
  for (const Flag& f : flags_) {
    absl::StrAppend(&out, "  --", f.name, "\n      ", f.help, " (default: ", f.default_value,
                    ")\n");
  }
  absl::StrAppend(&out,
                  "  --config FILE\n      JSON object of flag values, e.g. {\"port\": 50051}; "
                  "command-line flags override it.\n  --help\n      Show this message.\n");
  return out;
}

int FlagSet::ParseCommand(const std::vector<std::string>& args, size_t first,
                          const std::string& command, const std::string& usage, std::ostream& out,
                          std::ostream& err) {
  bool help = false;
  if (absl::Status s = Parse(args, first, &help); !s.ok()) {
    err << command << ": " << s.message() << "\n\n" << usage;
    return 2;
  }
  if (help) {
    out << usage;
    return 0;
  }
  return -1;
}

absl::Status FlagSet::CheckNonNegative(const std::vector<std::string>& names) const {
  for (const std::string& name : names) {
    for (const Flag& f : flags_) {
      const auto* p = std::get_if<int*>(&f.dest);
      if (f.name != name || p == nullptr || **p >= 0) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("invalid value '", **p, "' for --", name));
    }
  }
  return absl::OkStatus();
}

void PromptFlags::Register(FlagSet* flags) {
  flags->String("prompt", &text, "prompt text");
  flags->String("prompt-file", &file, "prompt text read from a file");
  flags->String("prompt-ids", &ids, "prompt as comma-separated token ids");
}

std::string PromptFlags::Resolve(const FlagSet& flags, std::optional<std::string>* text_out,
                                 std::optional<std::string>* ids_out) const {
  if (flags.IsSet("prompt")) *text_out = text;
  if (flags.IsSet("prompt-file")) {
    if (text_out->has_value()) return "--prompt and --prompt-file are mutually exclusive";
    std::ifstream in(file, std::ios::binary);
    if (!in) return absl::StrCat("--prompt-file: cannot read '", file, "'");
    std::stringstream buf;
    buf << in.rdbuf();
    *text_out = buf.str();
  }
  if (flags.IsSet("prompt-ids")) *ids_out = ids;
  if (text_out->has_value() && ids_out->has_value()) {
    return "--prompt and --prompt-ids are mutually exclusive";
  }
  return "";
}

}  // namespace prehoc
