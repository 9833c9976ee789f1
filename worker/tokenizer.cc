#include "worker/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace prehoc {

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromModelDir(const std::string& model_dir,
                                                                       int vocab_size) {
  const std::string path = (std::filesystem::path(model_dir) / "prehoc_tokenizer.json").string();
  std::ifstream in(path);
  if (!in) return std::unique_ptr<Tokenizer>();
  std::stringstream buf;
  buf << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  if (!j.contains("type") || !j["type"].is_string() || j["type"].get<std::string>() != "byte") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"type\" must be \"byte\" (the only tokenizer prehoc implements)"));
  }
  int ids[4];
  const char* keys[4] = {"bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"};
  for (int i = 0; i < 4; ++i) {
    ids[i] = -1;
    if (!j.contains(keys[i]) || j[keys[i]].is_null()) continue;
    if (!j[keys[i]].is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": \"", keys[i], "\" must be an integer"));
    }
    ids[i] = j[keys[i]].get<int>();
    if (ids[i] < 256 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": \"", keys[i], "\" = ", ids[i],
                                                     " must be in [256, vocab_size=", vocab_size,
                                                     ")"));
    }
  }
  if (vocab_size < 256) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": byte tokenizer needs vocab_size >= 256, model has ", vocab_size));
  }
  return std::make_unique<Tokenizer>(ids[0], ids[1], ids[2], ids[3]);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 1);
  if (add_bos && bos_ >= 0) ids.push_back(bos_);
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
  }
  return out;
}

}  // namespace prehoc
