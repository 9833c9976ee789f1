#include "common/json_brief.h"

#include <exception>

#include "absl/strings/str_cat.h"

namespace prehoc {
namespace {

void AppendBrief(const nlohmann::json& value, int depth, std::string* out) {
  using Json = nlohmann::json;
  constexpr size_t kMaxElements = 4;
  if (value.is_array() || value.is_object()) {
    const bool array = value.is_array();
    out->append(array ? "[" : "{");
    if (depth <= 0 && !value.empty()) {
      out->append("...");
    } else {
      size_t i = 0;
      for (auto it = value.begin(); it != value.end(); ++it, ++i) {
        if (i == kMaxElements) {
          out->append(", ...");
          break;
        }
        if (i > 0) out->append(", ");
        if (!array) {
          out->append(Json(it.key()).dump(-1, ' ', false, Json::error_handler_t::replace));
          out->append(": ");
        }
        AppendBrief(*it, depth - 1, out);
      }
    }
    out->append(array ? "]" : "}");
    return;
  }
  out->append(value.dump(-1, ' ', false, Json::error_handler_t::replace));
}

}  // namespace

std::string BriefJson(const nlohmann::json& value) {
  std::string s;
  try {
    AppendBrief(value, 2, &s);
  } catch (const std::exception&) {
    s = "<unprintable>";
  }
  if (s.size() > 80) s = absl::StrCat(s.substr(0, 77), "...");
  return s;
}

}  // namespace prehoc
