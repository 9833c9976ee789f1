// Reader for the safetensors format (https://github.com/huggingface/safetensors):
//   [u64 little-endian header length N][N bytes of JSON header][byte buffer]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end)} (offsets relative
// to the start of the byte buffer) plus an optional "__metadata__" string map.
//
// Files are memory-mapped read-only. Everything in the header is validated against the file before
// any tensor is handed out: a truncated or corrupt file is an error naming the file and the tensor,
// never a crash.
#ifndef PREHOC_COMMON_SAFETENSORS_H_
#define PREHOC_COMMON_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace prehoc {

// A view of one tensor inside a mapped file. `data` stays valid while the owning
// SafetensorsFile (or Checkpoint) is alive.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // not necessarily aligned
  size_t nbytes = 0;

  int64_t num_elements() const;
};

// One mapped .safetensors file. Thread-safe for concurrent reads after Open.
class SafetensorsFile {
 public:
  // Maps `path` and validates the header: header length within the file, valid JSON object,
  // known dtype (F32, F16, BF16, I32, I64; anything else is an error naming the tensor and dtype),
  // non-negative shape dims, data_offsets in order, inside the buffer, and
  // end - begin == product(shape) * dtype size. Returns NOT_FOUND if the file does not exist,
  // INVALID_ARGUMENT (or DATA_LOSS for truncation) with the file and tensor name otherwise.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensors in header order.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // Returns nullptr when absent.
  const TensorView* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// A Hugging Face model directory's weights: either `model.safetensors`, or
// `model.safetensors.index.json` ({"weight_map": {tensor: shard file}}) plus its shards.
class Checkpoint {
 public:
  // Opens every file the directory's weights need. Errors: NOT_FOUND when neither file exists;
  // INVALID_ARGUMENT for a malformed index (naming the problem), a shard that is missing
  // (naming the shard and a tensor mapped to it), or a tensor listed in the index but absent from
  // its shard; plus every SafetensorsFile::Open error.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);

  bool Has(std::string_view name) const;
  // NOT_FOUND naming the tensor and directory when absent.
  absl::StatusOr<const TensorView*> Get(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> Names() const;

  // Returns the tensor converted to float32 (F32/F16/BF16 sources; integer dtypes are an error),
  // after checking that its shape equals `expected_shape` exactly. Errors are INVALID_ARGUMENT
  // naming the tensor, the expected and the actual shape / dtype.
  absl::StatusOr<std::vector<float>> ReadFloat32(std::string_view name,
                                                 std::span<const int64_t> expected_shape) const;
  // Same, without a shape check.
  absl::StatusOr<std::vector<float>> ReadFloat32(std::string_view name) const;

 private:
  Checkpoint() = default;
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> by_name_;
};

// Converts `n` elements of `dtype` at `src` to float. REQUIRES: dtype is F32, F16 or BF16.
void ConvertToFloat32(DType dtype, const uint8_t* src, size_t n, float* dst);

// Writes a safetensors file (used by tests and tools). Tensors are written in the given order.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian data, size must equal product(shape) * DTypeSize
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace prehoc

#endif  // PREHOC_COMMON_SAFETENSORS_H_
