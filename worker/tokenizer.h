// Byte-level tokenizer declared by a model directory's `prehoc_tokenizer.json`:
//   {"type": "byte", "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
//    "mask_token_id": 259}
// Ids 0..255 are the bytes of the UTF-8 text; the specials follow.
#ifndef PREHOC_WORKER_TOKENIZER_H_
#define PREHOC_WORKER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace prehoc {

class Tokenizer {
 public:
  // Reads `<model_dir>/prehoc_tokenizer.json`. Returns nullptr (not an error) when the file does
  // not exist; INVALID_ARGUMENT naming the file and key when it is malformed, of an unknown type,
  // or declares a special id < 256 or >= vocab_size.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromModelDir(const std::string& model_dir,
                                                                     int vocab_size);
  // A byte tokenizer with the given special ids (-1 = absent).
  Tokenizer(int bos, int eos, int pad, int mask) : bos_(bos), eos_(eos), pad_(pad), mask_(mask) {}

  // Text -> ids, prefixed with BOS when `add_bos` and the tokenizer has one.
  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const;
  // Ids -> text; special ids are dropped. Bytes are concatenated as is (may be partial UTF-8).
  std::string Decode(std::span<const int32_t> ids) const;

  int bos_id() const { return bos_; }
  int eos_id() const { return eos_; }
  int pad_id() const { return pad_; }
  int mask_id() const { return mask_; }

 private:
  int bos_, eos_, pad_, mask_;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_TOKENIZER_H_
