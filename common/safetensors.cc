#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/json_brief.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace prehoc {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts are not "
              "supported");

// nlohmann::json's objects are std::maps (O(log n) lookups); the header's key
// order is recorded separately while parsing (ordered_json would make the
// parse quadratic in the number of tensors).
using Json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, which
// also bounds the memory the JSON parser can be made to use.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr std::string_view kMetadataKey = "__metadata__";

// absl here is built with its own string_view (ABSL_OPTION_USE_STD_STRING_VIEW
// is 0), so std::string_view must be converted before reaching absl::StrCat.

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}


std::optional<DType> ParseDType(std::string_view name) {
  for (DType t :
       {DType::kF32, DType::kF16, DType::kBF16, DType::kI32, DType::kI64}) {
    if (name == DTypeName(t)) return t;
  }
  return std::nullopt;
}

// Reads a JSON integer that must be >= 0 and fit in uint64.
std::optional<uint64_t> NonNegativeInteger(const Json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i >= 0) return static_cast<uint64_t>(i);
  }
  return std::nullopt;
}

// Product of `dims` (1 for a scalar), or nullopt when it overflows uint64.
// REQUIRES: every dim >= 0.
std::optional<uint64_t> ElementCount(std::span<const int64_t> dims) {
  for (int64_t d : dims) {
    if (d == 0) return 0;
  }
  uint64_t n = 1;
  for (int64_t d : dims) {
    const uint64_t u = static_cast<uint64_t>(d);
    if (n > std::numeric_limits<uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

// Parses one header entry into `view` (everything but `data`) and returns its
// [begin, end) offsets into the byte buffer of `buffer_size` bytes.
absl::Status ParseTensorEntry(const std::string& path, const std::string& name,
                              const Json& entry, uint64_t buffer_size,
                              TensorView* view, uint64_t* begin) {
  auto error = [&](absl::StatusCode code, absl::string_view what) {
    return absl::Status(code, absl::StrCat("safetensors file '", path,
                                           "': tensor '", name, "': ", what));
  };
  auto invalid = [&](absl::string_view what) {
    return error(absl::StatusCode::kInvalidArgument, what);
  };
  if (!entry.is_object()) {
    return invalid(
        absl::StrCat("header entry must be an object, got ", BriefJson(entry)));
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) {
      return invalid(absl::StrCat("header entry is missing '", key, "'"));
    }
  }

  const Json& dtype = entry["dtype"];
  if (!dtype.is_string()) {
    return invalid(
        absl::StrCat("'dtype' must be a string, got ", BriefJson(dtype)));
  }
  const std::string& dtype_name = dtype.get_ref<const std::string&>();
  std::optional<DType> parsed = ParseDType(dtype_name);
  if (!parsed.has_value()) {
    return invalid(absl::StrCat("unsupported dtype '", dtype_name,
                                "' (supported: F32, F16, BF16, I32, I64)"));
  }

  const Json& shape = entry["shape"];
  if (!shape.is_array()) {
    return invalid(
        absl::StrCat("'shape' must be an array, got ", BriefJson(shape)));
  }
  std::vector<int64_t> dims;
  dims.reserve(shape.size());
  for (const Json& d : shape) {
    std::optional<uint64_t> dim = NonNegativeInteger(d);
    if (!dim.has_value() ||
        *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return invalid(
          absl::StrCat("'shape' entries must be non-negative integers, got ",
                       BriefJson(d), " in ", BriefJson(shape)));
    }
    dims.push_back(static_cast<int64_t>(*dim));
  }
  std::optional<uint64_t> elements = ElementCount(dims);
  if (!elements.has_value()) {
    return invalid(
        absl::StrCat("shape ", ShapeString(dims), " has too many elements"));
  }
  const uint64_t elem_size = static_cast<uint64_t>(DTypeSize(*parsed));
  if (*elements > std::numeric_limits<uint64_t>::max() / elem_size) {
    return invalid(
        absl::StrCat("shape ", ShapeString(dims), " has too many elements"));
  }
  const uint64_t expected_bytes = *elements * elem_size;

  const Json& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    return invalid(absl::StrCat(
        "'data_offsets' must be an array [begin, end], got ", BriefJson(offsets)));
  }
  std::optional<uint64_t> b = NonNegativeInteger(offsets[0]);
  std::optional<uint64_t> e = NonNegativeInteger(offsets[1]);
  if (!b.has_value() || !e.has_value()) {
    return invalid(absl::StrCat(
        "'data_offsets' must be non-negative integers, got ", BriefJson(offsets)));
  }
  if (*b > *e) {
    return invalid(absl::StrCat("'data_offsets' ", BriefJson(offsets),
                                " are reversed (begin > end)"));
  }
  if (*e > buffer_size) {
    return error(absl::StatusCode::kDataLoss,
                 absl::StrCat("'data_offsets' ", BriefJson(offsets),
                              " end past the byte buffer of ", buffer_size,
                              " bytes (truncated file?)"));
  }
  if (*e - *b != expected_bytes) {
    return invalid(absl::StrCat("dtype ", dtype_name, " shape ",
                                ShapeString(dims), " needs ", expected_bytes,
                                " bytes but 'data_offsets' ", BriefJson(offsets),
                                " span ", *e - *b));
  }

  view->name = name;
  view->dtype = *parsed;
  view->shape = std::move(dims);
  view->nbytes = static_cast<size_t>(expected_bytes);
  *begin = *b;
  return absl::OkStatus();
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  return (std::filesystem::path(dir) / name).string();
}

bool FileExists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

}  // namespace

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  auto prefix = [&]() { return absl::StrCat("safetensors file '", path, "'"); };

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat(prefix(), " not found"));
    }
    if (err == EACCES) {
      return absl::PermissionDeniedError(
          absl::StrCat(prefix(), ": ", std::strerror(err)));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), ": cannot open: ", std::strerror(err)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), ": fstat failed: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), " is not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return absl::DataLossError(
        absl::StrCat(prefix(), " is ", file_size,
                     " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ,
                     MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat(prefix(), ": mmap failed: ", std::strerror(map_errno)));
  }

  // From here on the destructor unmaps on every error path.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = static_cast<size_t>(file_size);
  const uint8_t* base = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, sizeof(header_len));  // little-endian host
  if (header_len > file_size - 8) {
    return absl::DataLossError(absl::StrCat(
        prefix(), ": header length ", header_len, " exceeds the file size of ",
        file_size, " bytes (truncated file?)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), ": header length ", header_len,
                     " exceeds the limit of ", kMaxHeaderBytes, " bytes"));
  }
  const char* header_begin = reinterpret_cast<const char*>(base + 8);
  const char* header_end = header_begin + header_len;
  const uint64_t buffer_offset = 8 + header_len;
  const uint64_t buffer_size = file_size - buffer_offset;

  // Top-level keys in header order (depth 1 = keys of the root object).
  std::vector<std::string> order;
  Json header;
  try {
    header = Json::parse(
        header_begin, header_end,
        [&order](int depth, Json::parse_event_t event, Json& parsed) {
          if (depth == 1 && event == Json::parse_event_t::key) {
            order.push_back(parsed.get<std::string>());
          }
          return true;
        });
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix(), ": header must be a JSON object, got ", BriefJson(header)));
  }
  if (order.size() != header.size()) {
    std::set<std::string_view> seen;
    for (const std::string& name : order) {
      if (!seen.insert(name).second) {
        return absl::InvalidArgumentError(absl::StrCat(
            prefix(), ": tensor '", name, "' appears twice in the header"));
      }
    }
    return absl::InternalError(
        absl::StrCat(prefix(), ": header key count mismatch (parser bug)"));
  }

  try {
    file->tensors_.reserve(header.size());
    for (const std::string& name : order) {
      const Json& entry = *header.find(name);
      if (name == kMetadataKey) {
        if (!entry.is_object()) {
          return absl::InvalidArgumentError(
              absl::StrCat(prefix(),
                           ": '__metadata__' must be an object of "
                           "strings, got ",
                           BriefJson(entry)));
        }
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) {
            return absl::InvalidArgumentError(
                absl::StrCat(prefix(), ": '__metadata__' value for '", key,
                             "' must be a string, got ", BriefJson(value)));
          }
          file->metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      TensorView view;
      uint64_t begin = 0;
      RETURN_IF_ERROR(
          ParseTensorEntry(path, name, entry, buffer_size, &view, &begin));
      view.data = base + buffer_offset + begin;
      file->index_.emplace(name, file->tensors_.size());
      file->tensors_.push_back(std::move(view));
    }
  } catch (const Json::exception& e) {
    // Not expected (every access is type-checked first); kept as a backstop so
    // that no JSON exception crosses the module boundary.
    return absl::InvalidArgumentError(
        absl::StrCat(prefix(), ": malformed header: ", e.what()));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return nullptr;
  return &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(
    const std::string& model_dir) {
  const std::string single = JoinPath(model_dir, "model.safetensors");
  const std::string index_path =
      JoinPath(model_dir, "model.safetensors.index.json");
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = model_dir;

  // Like transformers, a single model.safetensors takes precedence.
  if (FileExists(single)) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                     SafetensorsFile::Open(single));
    for (const TensorView& t : file->tensors()) ckpt->by_name_[t.name] = &t;
    ckpt->files_.push_back(std::move(file));
    return ckpt;
  }
  if (!FileExists(index_path)) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint '", model_dir,
                     "': neither model.safetensors nor "
                     "model.safetensors.index.json exists"));
  }

  auto index_error = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint index '", index_path, "': ", Av(what)));
  };
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile(index_path));
  // shard file -> tensors mapped to it (sorted)
  std::map<std::string, std::set<std::string>> shards;
  try {
    nlohmann::json index = nlohmann::json::parse(text);
    if (!index.is_object()) return index_error("must be a JSON object");
    auto wm = index.find("weight_map");
    if (wm == index.end()) return index_error("missing 'weight_map'");
    if (!wm->is_object()) {
      return index_error("'weight_map' must be an object");
    }
    if (wm->empty()) return index_error("'weight_map' is empty");
    for (const auto& [name, shard] : wm->items()) {
      if (!shard.is_string()) {
        return index_error(absl::StrCat("'weight_map' entry for tensor '", name,
                                        "' must be a string"));
      }
      const std::string& shard_name = shard.get_ref<const std::string&>();
      std::filesystem::path p(shard_name);
      bool escapes = shard_name.empty() || p.is_absolute();
      for (const auto& part : p) escapes |= (part == "..");
      if (escapes) {
        return index_error(absl::StrCat(
            "shard '", shard_name, "' for tensor '", name,
            "' must be a relative path inside the model directory"));
      }
      shards[shard_name].insert(name);
    }
  } catch (const nlohmann::json::exception& e) {
    return index_error(absl::StrCat("not valid JSON: ", e.what()));
  }

  for (const auto& [shard_name, names] : shards) {
    const std::string shard_path = JoinPath(model_dir, shard_name);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(shard_path);
    if (absl::IsNotFound(file.status())) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint '", model_dir, "': shard '", shard_name,
                       "' (holding tensor '", *names.begin(), "') is missing"));
    }
    if (!file.ok()) return file.status();
    for (const std::string& name : names) {
      const TensorView* view = (*file)->Find(name);
      if (view == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            "checkpoint '", model_dir, "': tensor '", name,
            "' is listed in model.safetensors.index.json under shard '",
            shard_name, "' but that shard does not contain it"));
      }
      ckpt->by_name_[name] = view;
    }
    ckpt->files_.push_back(*std::move(file));
  }
  return ckpt;
}

bool Checkpoint::Has(std::string_view name) const {
  return by_name_.find(name) != by_name_.end();
}

absl::StatusOr<const TensorView*> Checkpoint::Get(std::string_view name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::NotFoundError(absl::StrCat(
        "tensor '", Av(name), "' not found in checkpoint '", dir_, "'"));
  }
  return it->second;
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& [name, view] : by_name_) names.push_back(name);
  return names;  // std::map iteration order is sorted
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat32(
    std::string_view name, std::span<const int64_t> expected_shape) const {
  ASSIGN_OR_RETURN(const TensorView* view, Get(name));
  if (!std::equal(view->shape.begin(), view->shape.end(),
                  expected_shape.begin(), expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", Av(name), "' in checkpoint '", dir_, "': expected shape ",
        ShapeString(expected_shape), ", got ", ShapeString(view->shape)));
  }
  return ReadFloat32(name);
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat32(
    std::string_view name) const {
  ASSIGN_OR_RETURN(const TensorView* view, Get(name));
  if (view->dtype != DType::kF32 && view->dtype != DType::kF16 &&
      view->dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", Av(name), "' in checkpoint '", dir_,
                     "': expected dtype F32, ", "F16 or BF16, got ",
                     Av(DTypeName(view->dtype))));
  }
  const size_t n = view->nbytes / static_cast<size_t>(DTypeSize(view->dtype));
  std::vector<float> out(n);
  ConvertToFloat32(view->dtype, view->data, n, out.data());
  return out;
}

void ConvertToFloat32(DType dtype, const uint8_t* src, size_t n, float* dst) {
  // Sources may be unaligned: every load goes through memcpy.
  switch (dtype) {
    case DType::kF32:
      if (n != 0) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = F16ToFloat(h);
      }
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = Bf16ToFloat(h);
      }
      return;
    // Outside the contract (REQUIRES: a float dtype); converted numerically
    // rather than left undefined.
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, src + 4 * i, sizeof(v));
        dst[i] = static_cast<float>(v);
      }
      return;
    case DType::kI64:
      for (size_t i = 0; i < n; ++i) {
        int64_t v;
        std::memcpy(&v, src + 8 * i, sizeof(v));
        dst[i] = static_cast<float>(v);
      }
      return;
  }
}

absl::Status WriteSafetensors(
    const std::string& path, const std::vector<TensorToWrite>& tensors,
    const std::map<std::string, std::string>& metadata) {
  // The header is assembled as text so that its key order is the order of
  // `tensors` ("__metadata__" first, as the reference writer does).
  std::string header_text = "{";
  try {
    auto dump = [](const Json& j) {
      return j.dump(-1, ' ', false, Json::error_handler_t::strict);
    };
    if (!metadata.empty()) {
      Json meta = Json::object();
      for (const auto& [k, v] : metadata) meta[k] = v;
      absl::StrAppend(&header_text, dump(Json(std::string(kMetadataKey))), ":",
                      dump(meta));
    }
    uint64_t offset = 0;
    std::set<std::string_view> seen;
    for (const TensorToWrite& t : tensors) {
      auto invalid = [&](absl::string_view what) {
        return absl::InvalidArgumentError(absl::StrCat(
            "WriteSafetensors '", path, "': tensor '", t.name, "': ", what));
      };
      if (t.name == kMetadataKey) return invalid("reserved name");
      if (!seen.insert(t.name).second) return invalid("duplicate name");
      for (int64_t d : t.shape) {
        if (d < 0) {
          return invalid(
              absl::StrCat("negative dim in shape ", ShapeString(t.shape)));
        }
      }
      const std::optional<uint64_t> elements = ElementCount(t.shape);
      const uint64_t size = static_cast<uint64_t>(DTypeSize(t.dtype));
      if (!elements.has_value() || *elements > t.bytes.size() ||
          *elements * size != t.bytes.size()) {
        return invalid(absl::StrCat("shape ", ShapeString(t.shape), " dtype ",
                                    Av(DTypeName(t.dtype)), " does not match ",
                                    t.bytes.size(), " bytes of data"));
      }
      // Same key order and compact form as the reference writer.
      absl::StrAppend(
          &header_text, header_text.size() > 1 ? "," : "", dump(Json(t.name)),
          ":{\"dtype\":\"", Av(DTypeName(t.dtype)),
          "\",\"shape\":", dump(Json(t.shape)), ",\"data_offsets\":[", offset,
          ",", offset + t.bytes.size(), "]}");
      offset += t.bytes.size();
    }
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "WriteSafetensors '", path, "': cannot encode header: ", e.what()));
  }
  header_text.append("}");
  // Pad with spaces so that the byte buffer starts 8-byte aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_len = header_text.size();

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("WriteSafetensors: cannot create '", path,
                     "': ", std::strerror(errno)));
  }
  bool ok = std::fwrite(&header_len, sizeof(header_len), 1, f) == 1 &&
            std::fwrite(header_text.data(), 1, header_text.size(), f) ==
                header_text.size();
  for (const TensorToWrite& t : tensors) {
    if (!ok) break;
    if (!t.bytes.empty()) {
      ok = std::fwrite(t.bytes.data(), 1, t.bytes.size(), f) == t.bytes.size();
    }
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    return absl::InternalError(
        absl::StrCat("WriteSafetensors: error writing '", path, "'"));
  }
  return absl::OkStatus();
}

}  // namespace prehoc
