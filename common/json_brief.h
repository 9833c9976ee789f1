// Short, bounded renderings of JSON values for error messages.
#ifndef PREHOC_COMMON_JSON_BRIEF_H_
#define PREHOC_COMMON_JSON_BRIEF_H_

#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace prehoc {

// `value` rendered at most 2 levels deep, 4 elements wide and 80 characters long (nlohmann's
// dump() recurses without bound, and a hostile file can nest arbitrarily deep). Never throws.
std::string BriefJson(const nlohmann::json& value);

// std::string_view → absl::string_view (Debian's Abseil has its own string_view type, which
// absl::StrCat needs).
inline absl::string_view Av(std::string_view s) { return {s.data(), s.size()}; }

}  // namespace prehoc

#endif  // PREHOC_COMMON_JSON_BRIEF_H_
