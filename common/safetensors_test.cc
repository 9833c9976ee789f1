#include "common/safetensors.h"

#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Creates a fresh directory under the test temp dir; removes it afterwards.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "safetensors_test_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string Path(const std::string& name) const {
    return (std::filesystem::path(dir_) / name).string();
  }

  std::string dir_;
};

template <typename T>
std::string Bytes(const std::vector<T>& values) {
  std::string s(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(s.data(), values.data(), s.size());
  return s;
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// [u64 header_len][header][data]
std::string RawSafetensors(const std::string& header, const std::string& data,
                           uint64_t header_len) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &header_len, 8);
  return s + header + data;
}
std::string RawSafetensors(const std::string& header,
                           const std::string& data = "") {
  return RawSafetensors(header, data, header.size());
}

TEST_F(SafetensorsTest, RoundTripsEveryDtype) {
  const std::vector<float> f32 = {1.5f,
                                  -2.25f,
                                  0.0f,
                                  3.0e-40f /*subnormal*/,
                                  std::numeric_limits<float>::infinity(),
                                  65504.0f};
  // 1, -2, 65504, 2^-24 (subnormal), -0.5
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff, 0x0001, 0xb800};
  // 1, -3, 2^-133 (subnormal), 0.5
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc040, 0x0001, 0x3f00};
  const std::vector<int32_t> i32 = {1, -2, 2147483647, -2147483647 - 1};
  const std::vector<int64_t> i64 = {-1, int64_t{1} << 40};

  const std::vector<TensorToWrite> tensors = {
      {"z.f32", DType::kF32, {2, 3}, Bytes(f32)},
      {"b.f16", DType::kF16, {5}, Bytes(f16)},
      {"x.bf16", DType::kBF16, {2, 1, 2}, Bytes(bf16)},
      {"d.i32", DType::kI32, {4}, Bytes(i32)},
      {"a.i64", DType::kI64, {1, 2}, Bytes(i64)},
  };
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_THAT(
      (*file)->metadata(),
      ElementsAre(std::pair<const std::string, std::string>("format", "pt")));
  const auto& views = (*file)->tensors();
  ASSERT_EQ(views.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].name);
    EXPECT_EQ(views[i].name, tensors[i].name);  // header order
    EXPECT_EQ(views[i].dtype, tensors[i].dtype);
    EXPECT_EQ(views[i].shape, tensors[i].shape);
    EXPECT_EQ(views[i].nbytes, tensors[i].bytes.size());
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(views[i].data),
                          views[i].nbytes),
              tensors[i].bytes);
    EXPECT_EQ((*file)->Find(tensors[i].name), &views[i]);
  }
  EXPECT_EQ(views[0].num_elements(), 6);
  EXPECT_EQ((*file)->Find("nope"), nullptr);

  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_THAT((*ckpt)->Names(),
              ElementsAre("a.i64", "b.f16", "d.i32", "x.bf16", "z.f32"));
  EXPECT_TRUE((*ckpt)->Has("x.bf16"));
  EXPECT_FALSE((*ckpt)->Has("c"));

  const int64_t f32_shape[] = {2, 3};
  auto got_f32 = (*ckpt)->ReadFloat32("z.f32", f32_shape);
  ASSERT_TRUE(got_f32.ok()) << got_f32.status();
  EXPECT_EQ(*got_f32, f32);

  auto got_f16 = (*ckpt)->ReadFloat32("b.f16");
  ASSERT_TRUE(got_f16.ok()) << got_f16.status();
  EXPECT_THAT(*got_f16,
              ElementsAre(1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24), -0.5f));

  const int64_t bf16_shape[] = {2, 1, 2};
  auto got_bf16 = (*ckpt)->ReadFloat32("x.bf16", bf16_shape);
  ASSERT_TRUE(got_bf16.ok()) << got_bf16.status();
  EXPECT_THAT(*got_bf16,
              ElementsAre(1.0f, -3.0f, std::ldexp(1.0f, -133), 0.5f));

  // Integer tensors are refused by ReadFloat32, naming tensor and dtype.
  auto got_i32 = (*ckpt)->ReadFloat32("d.i32");
  EXPECT_EQ(got_i32.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got_i32.status().message(), HasSubstr("d.i32"));
  EXPECT_THAT(got_i32.status().message(), HasSubstr("I32"));
  // ...but the raw bytes are exact.
  auto i32_view = (*ckpt)->Get("d.i32");
  ASSERT_TRUE(i32_view.ok());
  std::vector<int32_t> i32_back(4);
  std::memcpy(i32_back.data(), (*i32_view)->data, 16);
  EXPECT_EQ(i32_back, i32);
}

TEST_F(SafetensorsTest, HeaderIsPaddedToEightBytes) {
  // Vary the name length so that the unpadded header length takes every
  // residue mod 8.
  for (int len = 1; len <= 8; ++len) {
    const std::string path = Path("pad.safetensors");
    const std::string name(len, 'x');
    ASSERT_TRUE(
        WriteSafetensors(
            path, {{name, DType::kF32, {1}, Bytes(std::vector<float>{7.0f})}})
            .ok());
    const std::string raw = ReadFile(path);
    ASSERT_GE(raw.size(), 8u);
    uint64_t n = 0;
    std::memcpy(&n, raw.data(), 8);
    EXPECT_EQ(n % 8, 0u) << len;
    ASSERT_EQ(raw.size(), 8 + n + 4);
    const std::string header = raw.substr(8, n);
    EXPECT_EQ(header.front(), '{');
    EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    float v;
    std::memcpy(&v, (*file)->Find(name)->data, 4);
    EXPECT_EQ(v, 7.0f);
  }
}

TEST_F(SafetensorsTest, ScalarAndEmptyTensors) {
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(
          path, {{"scalar", DType::kF32, {}, Bytes(std::vector<float>{2.5f})},
                 {"empty", DType::kBF16, {0, 3}, ""}})
          .ok());
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto scalar = (*ckpt)->ReadFloat32("scalar", std::span<const int64_t>());
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_THAT(*scalar, ElementsAre(2.5f));
  const int64_t empty_shape[] = {0, 3};
  auto empty = (*ckpt)->ReadFloat32("empty", empty_shape);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty());
  EXPECT_EQ((*(*ckpt)->Get("empty"))->num_elements(), 0);
  EXPECT_EQ((*(*ckpt)->Get("scalar"))->num_elements(), 1);
}

TEST_F(SafetensorsTest, AcceptsReferenceStyleFileWithoutPadding) {
  // An unpadded header and an unaligned byte buffer are valid.
  const std::string header =
      R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})";
  ASSERT_NE(header.size() % 8, 0u);
  const std::string path = Path("raw.safetensors");
  WriteFile(path, RawSafetensors(header,
                                 Bytes(std::vector<uint16_t>{0x3f80, 0x4000})));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> out(2);
  ConvertToFloat32(DType::kBF16, (*file)->Find("w")->data, 2, out.data());
  EXPECT_THAT(out, ElementsAre(1.0f, 2.0f));
  EXPECT_TRUE((*file)->metadata().empty());
}

TEST(ConvertToFloat32Test, HandlesUnalignedSources) {
  const float values[] = {1.0f, -0.5f, 3.25f};
  uint8_t buf[1 + sizeof(values)];
  std::memcpy(buf + 1, values, sizeof(values));
  float out[3];
  ConvertToFloat32(DType::kF32, buf + 1, 3, out);
  EXPECT_THAT(out, ElementsAre(1.0f, -0.5f, 3.25f));

  const uint16_t halves[] = {0x3c00, 0x0001, 0x7c00};
  uint8_t hbuf[1 + sizeof(halves)];
  std::memcpy(hbuf + 1, halves, sizeof(halves));
  ConvertToFloat32(DType::kF16, hbuf + 1, 3, out);
  EXPECT_THAT(out, ElementsAre(1.0f, std::ldexp(1.0f, -24),
                               std::numeric_limits<float>::infinity()));
  ConvertToFloat32(DType::kBF16, hbuf + 1, 3, out);
  EXPECT_EQ(out[0], Bf16ToFloat(0x3c00));
  EXPECT_EQ(out[1], Bf16ToFloat(0x0001));
  EXPECT_EQ(out[2], Bf16ToFloat(0x7c00));
}

// ---- Corrupt files ----------------------------------------------------------

struct CorruptCase {
  std::string name;  // test name
  std::string contents;
  absl::StatusCode code;
  std::vector<std::string> substrings;  // besides the file path
};

std::string Entry(const std::string& body) {
  return "{\"weight\":" + body + "}";
}

std::vector<CorruptCase> CorruptCases() {
  const std::string kData(16, '\x01');
  const auto ia = absl::StatusCode::kInvalidArgument;
  const auto dl = absl::StatusCode::kDataLoss;
  std::vector<CorruptCase> cases = {
      {"EmptyFile", "", dl, {"shorter than the 8-byte header length"}},
      {"FiveBytes", "\x01\x02\x03\x04\x05", dl, {"5 bytes"}},
      {"HeaderLongerThanFile",
       RawSafetensors("{}", "", 1000),
       dl,
       {"header length 1000", "exceeds the file size"}},
      {"HeaderLengthHuge",
       RawSafetensors("{}", "", std::numeric_limits<uint64_t>::max()),
       dl,
       {"header length 18446744073709551615"}},
      {"HeaderLengthOverflowsWithEight",
       RawSafetensors("{}", "", std::numeric_limits<uint64_t>::max() - 7),
       dl,
       {"header length"}},
      {"OnlyHeaderLength", RawSafetensors("", "", 0), ia, {"not valid JSON"}},
      {"NotJson", RawSafetensors("hello world"), ia, {"not valid JSON"}},
      {"TruncatedJson",
       RawSafetensors(R"({"weight": {"dtype": )"),
       ia,
       {"not valid JSON"}},
      {"InvalidUtf8", RawSafetensors("{\"w\xff\": 1}"), ia, {"not valid JSON"}},
      {"JsonArray", RawSafetensors("[1, 2]"), ia, {"must be a JSON object"}},
      {"JsonString", RawSafetensors("\"abc\""), ia, {"must be a JSON object"}},
      {"DeeplyNested",
       RawSafetensors(std::string(100000, '[') + std::string(100000, ']')),
       ia,
       {"must be a JSON object"}},
      {"DeeplyNestedShape",
       RawSafetensors(
           Entry(R"({"dtype":"F32","data_offsets":[0,8],"shape":)" +
                 std::string(100000, '[') + std::string(100000, ']') + "}"),
           kData),
       ia,
       {"'weight'", "non-negative integers", "[[[...]]]"}},
      {"DuplicateTensor",
       RawSafetensors(
           R"({"weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
           R"("weight":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
           kData),
       ia,
       {"'weight'", "appears twice"}},
      {"EntryNotObject",
       RawSafetensors(Entry("3")),
       ia,
       {"'weight'", "must be an object"}},
      {"MissingDtype",
       RawSafetensors(Entry(R"({"shape":[2],"data_offsets":[0,8]})"), kData),
       ia,
       {"'weight'", "missing 'dtype'"}},
      {"MissingShape",
       RawSafetensors(Entry(R"({"dtype":"F32","data_offsets":[0,8]})"), kData),
       ia,
       {"'weight'", "missing 'shape'"}},
      {"MissingDataOffsets",
       RawSafetensors(Entry(R"({"dtype":"F32","shape":[2]})"), kData),
       ia,
       {"'weight'", "missing 'data_offsets'"}},
      {"DtypeNotString",
       RawSafetensors(Entry(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})"),
                      kData),
       ia,
       {"'weight'", "'dtype' must be a string"}},
      {"DtypeF64",
       RawSafetensors(
           Entry(R"({"dtype":"F64","shape":[2],"data_offsets":[0,16]})"),
           kData),
       ia,
       {"'weight'", "unsupported dtype 'F64'"}},
      {"DtypeI8",
       RawSafetensors(
           Entry(R"({"dtype":"I8","shape":[2],"data_offsets":[0,2]})"), kData),
       ia,
       {"'weight'", "unsupported dtype 'I8'"}},
      {"DtypeU8",
       RawSafetensors(
           Entry(R"({"dtype":"U8","shape":[2],"data_offsets":[0,2]})"), kData),
       ia,
       {"'weight'", "unsupported dtype 'U8'"}},
      {"DtypeLowercase",
       RawSafetensors(
           Entry(R"({"dtype":"f32","shape":[2],"data_offsets":[0,8]})"), kData),
       ia,
       {"'weight'", "unsupported dtype 'f32'"}},
      {"ShapeNotArray",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"), kData),
       ia,
       {"'weight'", "'shape' must be an array"}},
      {"ShapeString",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})"),
           kData),
       ia,
       {"'weight'", "non-negative integers"}},
      {"ShapeFloat",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"),
           kData),
       ia,
       {"'weight'", "non-negative integers"}},
      {"ShapeNegative",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"),
           kData),
       ia,
       {"'weight'", "non-negative integers", "-2"}},
      {"ShapeHugeDim",
       RawSafetensors(Entry(R"({"dtype":"F32","shape":[18446744073709551615],)"
                            R"("data_offsets":[0,8]})"),
                      kData),
       ia,
       {"'weight'", "non-negative integers"}},
      {"ShapeOverflows",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[4294967296,4294967296,2],)"
                 R"("data_offsets":[0,8]})"),
           kData),
       ia,
       {"'weight'", "too many elements"}},
      {"ShapeTimesDtypeOverflows",
       RawSafetensors(Entry(R"({"dtype":"I64","shape":[4611686018427387904],)"
                            R"("data_offsets":[0,8]})"),
                      kData),
       ia,
       {"'weight'", "too many elements"}},
      {"OffsetsNotArray",
       RawSafetensors(Entry(R"({"dtype":"F32","shape":[2],"data_offsets":8})"),
                      kData),
       ia,
       {"'weight'", "'data_offsets' must be an array"}},
      {"OffsetsOneElement",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2],"data_offsets":[8]})"), kData),
       ia,
       {"'weight'", "'data_offsets' must be an array"}},
      {"OffsetsNegative",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})"),
           kData),
       ia,
       {"'weight'", "non-negative integers"}},
      {"OffsetsStrings",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2],"data_offsets":["0","8"]})"),
           kData),
       ia,
       {"'weight'", "non-negative integers"}},
      {"OffsetsReversed",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})"), kData),
       ia,
       {"'weight'", "reversed"}},
      {"OffsetsPastEnd",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[2],"data_offsets":[12,20]})"),
           kData),
       dl,
       {"'weight'", "past the byte buffer of 16 bytes"}},
      {"OffsetsHuge",
       RawSafetensors(
           Entry(
               R"({"dtype":"F32","shape":[2],)"
               R"("data_offsets":[18446744073709551608,18446744073709551615]})"),
           kData),
       dl,
       {"'weight'", "past the byte buffer"}},
      {"SizeMismatch",
       RawSafetensors(
           Entry(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), kData),
       ia,
       {"'weight'", "needs 12 bytes", "span 8"}},
      {"MetadataNotObject",
       RawSafetensors(R"({"__metadata__": [1]})"),
       ia,
       {"__metadata__"}},
      {"MetadataNonString",
       RawSafetensors(R"({"__metadata__": {"format": 1}})"),
       ia,
       {"__metadata__", "'format'"}},
  };
  return cases;
}

class CorruptFileTest : public SafetensorsTest,
                        public ::testing::WithParamInterface<CorruptCase> {};

TEST_P(CorruptFileTest, IsRejectedWithSpecificError) {
  const CorruptCase& c = GetParam();
  const std::string path = Path("model.safetensors");
  WriteFile(path, c.contents);
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), c.code) << file.status();
  EXPECT_THAT(file.status().message(), HasSubstr(path));
  for (const std::string& s : c.substrings) {
    EXPECT_THAT(file.status().message(), HasSubstr(s));
  }
  // The same error comes out of Checkpoint::Open.
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status(), file.status());
}

INSTANTIATE_TEST_SUITE_P(All, CorruptFileTest,
                         ::testing::ValuesIn(CorruptCases()),
                         [](const ::testing::TestParamInfo<CorruptCase>& info) {
                           return info.param.name;
                         });

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const std::string path = Path("nope.safetensors");
  auto file = SafetensorsFile::Open(path);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(file.status().message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, DirectoryIsRejected) {
  auto file = SafetensorsFile::Open(dir_);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr("not a regular file"));
}

TEST_F(SafetensorsTest, EveryTruncationIsAnErrorNotACrash) {
  const std::string path = Path("t.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(
          path,
          {{"a", DType::kF32, {3}, Bytes(std::vector<float>(3))},
           {"b", DType::kBF16, {2, 2}, Bytes(std::vector<uint16_t>(4))}},
          {{"k", "v"}})
          .ok());
  const std::string full = ReadFile(path);
  for (size_t len = 0; len < full.size(); ++len) {
    WriteFile(path, full.substr(0, len));
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << "prefix of " << len << " bytes was accepted";
    EXPECT_THAT(file.status().message(), HasSubstr(path));
  }
  WriteFile(path, full);
  EXPECT_TRUE(SafetensorsFile::Open(path).ok());
}

TEST_F(SafetensorsTest, RandomHeaderCorruptionNeverCrashes) {
  const std::string path = Path("r.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(
          path, {{"a", DType::kF32, {3}, Bytes(std::vector<float>(3))},
                 {"b", DType::kF16, {5}, Bytes(std::vector<uint16_t>(5))},
                 {"c", DType::kI64, {1}, Bytes(std::vector<int64_t>(1))}})
          .ok());
  const std::string full = ReadFile(path);
  uint64_t header_len;
  std::memcpy(&header_len, full.data(), 8);
  std::mt19937 rng(12345);
  const char kAlphabet[] = "0123456789-[]{},:\" .eEF";
  int accepted = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string mutated = full;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) {
      // Mostly the header text, sometimes the length prefix.
      const size_t pos = (rng() % 10 == 0) ? rng() % 8 : 8 + rng() % header_len;
      mutated[pos] = (rng() % 2) ? kAlphabet[rng() % (sizeof(kAlphabet) - 1)]
                                 : static_cast<char>(rng() & 0xff);
    }
    WriteFile(path, mutated);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      EXPECT_THAT(file.status().message(), HasSubstr(path));
      continue;
    }
    ++accepted;
    // Whatever was accepted must lie inside the file and be readable in full
    // (ASan checks the bounds of the reads).
    for (const TensorView& t : (*file)->tensors()) {
      ASSERT_LE(t.nbytes, mutated.size());
      volatile uint32_t sum = 0;
      for (size_t i = 0; i < t.nbytes; ++i) sum = sum + t.data[i];
    }
  }
  // Some mutations (e.g. in padding spaces or names) keep the file valid.
  EXPECT_GT(accepted, 0);
}

// ---- Checkpoints ------------------------------------------------------------

class CheckpointTest : public SafetensorsTest {
 protected:
  // Two shards: shard 1 holds "embed" (F32 [2,2]) and "norm" (BF16 [2]),
  // shard 2 holds "lm_head" (F16 [2,2]).
  void WriteShards() {
    ASSERT_TRUE(
        WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                         {{"embed",
                           DType::kF32,
                           {2, 2},
                           Bytes(std::vector<float>{1, 2, 3, 4})},
                          {"norm",
                           DType::kBF16,
                           {2},
                           Bytes(std::vector<uint16_t>{0x3f80, 0x4000})}})
            .ok());
    ASSERT_TRUE(
        WriteSafetensors(
            Path("model-00002-of-00002.safetensors"),
            {{"lm_head",
              DType::kF16,
              {2, 2},
              Bytes(std::vector<uint16_t>{0x3c00, 0x4000, 0x4200, 0x4400})}})
            .ok());
  }
  void WriteIndex(const std::string& text) {
    WriteFile(Path("model.safetensors.index.json"), text);
  }
  static constexpr char kIndex[] = R"({
    "metadata": {"total_size": 32},
    "weight_map": {
      "embed": "model-00001-of-00002.safetensors",
      "norm": "model-00001-of-00002.safetensors",
      "lm_head": "model-00002-of-00002.safetensors"
    }
  })";
};

TEST_F(CheckpointTest, OpensShardedCheckpoint) {
  WriteShards();
  WriteIndex(kIndex);
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_THAT((*ckpt)->Names(), ElementsAre("embed", "lm_head", "norm"));
  EXPECT_TRUE((*ckpt)->Has("lm_head"));
  const int64_t shape22[] = {2, 2};
  auto embed = (*ckpt)->ReadFloat32("embed", shape22);
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_THAT(*embed, ElementsAre(1.0f, 2.0f, 3.0f, 4.0f));
  auto head = (*ckpt)->ReadFloat32("lm_head", shape22);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_THAT(*head, ElementsAre(1.0f, 2.0f, 3.0f, 4.0f));
  const int64_t shape2[] = {2};
  auto norm = (*ckpt)->ReadFloat32("norm", shape2);
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_THAT(*norm, ElementsAre(1.0f, 2.0f));

  auto missing = (*ckpt)->Get("missing.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("missing.weight"));
  EXPECT_THAT(missing.status().message(), HasSubstr(dir_));
  EXPECT_EQ((*ckpt)->ReadFloat32("missing.weight").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(CheckpointTest, ReadFloat32ShapeMismatchNamesTensorAndShapes) {
  WriteShards();
  WriteIndex(kIndex);
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const int64_t wrong[] = {4, 1};
  auto r = (*ckpt)->ReadFloat32("embed", wrong);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("'embed'"));
  EXPECT_THAT(r.status().message(), HasSubstr("expected shape [4, 1]"));
  EXPECT_THAT(r.status().message(), HasSubstr("got [2, 2]"));
  const int64_t wrong_rank[] = {2, 2, 1};
  EXPECT_EQ((*ckpt)->ReadFloat32("embed", wrong_rank).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CheckpointTest, MissingShardNamesShardAndTensor) {
  WriteShards();
  std::filesystem::remove(Path("model-00002-of-00002.safetensors"));
  WriteIndex(kIndex);
  auto ckpt = Checkpoint::Open(dir_);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ckpt.status().message(),
              HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("'lm_head'"));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("missing"));
}

TEST_F(CheckpointTest, TensorInIndexButNotInShard) {
  WriteShards();
  WriteIndex(R"({"weight_map": {
      "embed": "model-00001-of-00002.safetensors",
      "ghost": "model-00001-of-00002.safetensors",
      "lm_head": "model-00002-of-00002.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir_);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("'ghost'"));
  EXPECT_THAT(ckpt.status().message(),
              HasSubstr("model-00001-of-00002.safetensors"));
}

TEST_F(CheckpointTest, CorruptShardErrorNamesShardFile) {
  WriteShards();
  WriteIndex(kIndex);
  const std::string shard = Path("model-00002-of-00002.safetensors");
  const std::string full = ReadFile(shard);
  WriteFile(shard, full.substr(0, full.size() - 2));
  auto ckpt = Checkpoint::Open(dir_);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ckpt.status().message(), HasSubstr(shard));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("'lm_head'"));
}

TEST_F(CheckpointTest, MalformedIndexIsInvalidArgument) {
  WriteShards();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"not json", "not valid JSON"},
      {"[]", "must be a JSON object"},
      {R"({"metadata": {}})", "missing 'weight_map'"},
      {R"({"weight_map": []})", "'weight_map' must be an object"},
      {R"({"weight_map": {}})", "'weight_map' is empty"},
      {R"({"weight_map": {"embed": 1}})", "'embed'"},
      {R"({"weight_map": {"embed": "../model-00001-of-00002.safetensors"}})",
       "relative path"},
      {R"({"weight_map": {"embed": "/etc/passwd"}})", "relative path"},
      {R"({"weight_map": {"embed": ""}})", "relative path"},
  };
  for (const auto& [text, substring] : cases) {
    SCOPED_TRACE(text);
    WriteIndex(text);
    auto ckpt = Checkpoint::Open(dir_);
    EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ckpt.status().message(),
                HasSubstr("model.safetensors.index.json"));
    EXPECT_THAT(ckpt.status().message(), HasSubstr(substring));
  }
}

TEST_F(CheckpointTest, EmptyDirectoryIsNotFound) {
  auto ckpt = Checkpoint::Open(dir_);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ckpt.status().message(), HasSubstr(dir_));
  auto nodir = Checkpoint::Open(Path("does-not-exist"));
  EXPECT_EQ(nodir.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointTest, SingleFileTakesPrecedenceOverIndex) {
  WriteIndex(kIndex);  // shards absent: would fail if used
  ASSERT_TRUE(WriteSafetensors(
                  Path("model.safetensors"),
                  {{"only", DType::kF32, {1}, Bytes(std::vector<float>{5})}})
                  .ok());
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_THAT((*ckpt)->Names(), ElementsAre("only"));
}

// ---- Real fixtures (written by Python safetensors via transformers) ---------

// <repo>/tests/fixtures/hf/<model>, located from this source file (falls back
// to a path relative to the working directory, which ctest sets to the repo).
std::string FixtureDir(const std::string& model) {
  const std::filesystem::path root =
      std::filesystem::path(__FILE__).parent_path().parent_path();
  return (root / "tests" / "fixtures" / "hf" / model).string();
}

struct FixtureModel {
  std::string dir;
  DType dtype;
  int layers, vocab, hidden, inter, heads, kv_heads, head_dim;
  bool tied, qkv_bias;
  // Checked values of one tensor: first three elements, the last, and the sum.
  std::string probe;
  float first[3];
  float last;
  double sum;
};

class FixtureTest : public ::testing::TestWithParam<FixtureModel> {};

TEST_P(FixtureTest, OpensAndReadsEveryTensor) {
  const FixtureModel& m = GetParam();
  auto ckpt = Checkpoint::Open(FixtureDir(m.dir));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();

  // Every tensor a Llama-family model needs, with its exact shape.
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"model.embed_tokens.weight", {m.vocab, m.hidden}},
      {"model.norm.weight", {m.hidden}},
  };
  if (!m.tied) expected.push_back({"lm_head.weight", {m.vocab, m.hidden}});
  for (int l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const int64_t q = int64_t{m.heads} * m.head_dim;
    const int64_t kv = int64_t{m.kv_heads} * m.head_dim;
    expected.push_back({p + "input_layernorm.weight", {m.hidden}});
    expected.push_back({p + "post_attention_layernorm.weight", {m.hidden}});
    expected.push_back({p + "self_attn.q_proj.weight", {q, m.hidden}});
    expected.push_back({p + "self_attn.k_proj.weight", {kv, m.hidden}});
    expected.push_back({p + "self_attn.v_proj.weight", {kv, m.hidden}});
    expected.push_back({p + "self_attn.o_proj.weight", {m.hidden, q}});
    expected.push_back({p + "mlp.gate_proj.weight", {m.inter, m.hidden}});
    expected.push_back({p + "mlp.up_proj.weight", {m.inter, m.hidden}});
    expected.push_back({p + "mlp.down_proj.weight", {m.hidden, m.inter}});
    if (m.qkv_bias) {
      expected.push_back({p + "self_attn.q_proj.bias", {q}});
      expected.push_back({p + "self_attn.k_proj.bias", {kv}});
      expected.push_back({p + "self_attn.v_proj.bias", {kv}});
    }
  }
  EXPECT_EQ((*ckpt)->Names().size(), expected.size());
  for (const auto& [name, shape] : expected) {
    SCOPED_TRACE(name);
    auto view = (*ckpt)->Get(name);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ((*view)->dtype, m.dtype);
    auto values = (*ckpt)->ReadFloat32(name, shape);
    ASSERT_TRUE(values.ok()) << values.status();
    EXPECT_EQ(static_cast<int64_t>(values->size()), (*view)->num_elements());
    for (float v : *values) ASSERT_TRUE(std::isfinite(v));
  }

  auto probe = (*ckpt)->ReadFloat32(m.probe);
  ASSERT_TRUE(probe.ok()) << probe.status();
  ASSERT_GE(probe->size(), 3u);
  EXPECT_EQ((*probe)[0], m.first[0]);
  EXPECT_EQ((*probe)[1], m.first[1]);
  EXPECT_EQ((*probe)[2], m.first[2]);
  EXPECT_EQ(probe->back(), m.last);
  double sum = 0;
  for (float v : *probe) sum += v;
  EXPECT_NEAR(sum, m.sum, 1e-9 * probe->size());

  // The expected-logits file beside the model is a valid safetensors file too.
  auto expected_file =
      SafetensorsFile::Open(FixtureDir(m.dir) + "/expected.safetensors");
  ASSERT_TRUE(expected_file.ok()) << expected_file.status();
  EXPECT_FALSE((*expected_file)->tensors().empty());
  EXPECT_EQ((*expected_file)->metadata().at("format"), "pt");
}

INSTANTIATE_TEST_SUITE_P(
    Hf, FixtureTest,
    ::testing::Values(
        FixtureModel{"llama_gqa_f32",
                     DType::kF32,
                     2,
                     260,
                     64,
                     160,
                     4,
                     2,
                     16,
                     false,
                     false,
                     "model.embed_tokens.weight",
                     {0x1.d7f90ep-3f, 0x1.223beap-2f, -0x1.75f666p-3f},
                     0x1.d66bfap-5f,
                     -27.796009573138917},
        FixtureModel{"llama_tied_llama3_bf16",
                     DType::kBF16,
                     3,
                     260,
                     64,
                     160,
                     4,
                     1,
                     32,
                     true,
                     false,
                     "model.embed_tokens.weight",
                     {-0x1.1p-5f, 0x1.54p-4f, -0x1.56p-5f},
                     -0x1.b6p-2f,
                     7.708637595176697},
        FixtureModel{"mistral_f32",
                     DType::kF32,
                     2,
                     260,
                     64,
                     160,
                     4,
                     1,
                     16,
                     false,
                     false,
                     "model.norm.weight",
                     {0x1.d4fa4p-1f, 0x1.bc5d72p-1f, 0x1.fb6064p-1f},
                     0x1.c82f52p-1f,
                     65.29343646764755},
        FixtureModel{"qwen2_bias_f32",
                     DType::kF32,
                     2,
                     260,
                     64,
                     160,
                     4,
                     2,
                     16,
                     false,
                     true,
                     "lm_head.weight",
                     {0x1.1a0fd6p-2f, -0x1.f259ap-3f, -0x1.b2e85p-13f},
                     -0x1.499d9ap-4f,
                     -35.23316237612107}),
    [](const ::testing::TestParamInfo<FixtureModel>& info) {
      return info.param.dir;
    });

// Rewriting a reference file tensor by tensor reproduces it byte for byte
// (same header layout, key order and padding as the reference writer).
TEST_F(SafetensorsTest, RewriteOfReferenceFileIsByteIdentical) {
  for (const char* rel : {"llama_gqa_f32/model.safetensors",
                          "llama_tied_llama3_bf16/model.safetensors",
                          "qwen2_bias_f32/model-00003-of-00006.safetensors",
                          "mistral_f32/expected.safetensors"}) {
    SCOPED_TRACE(rel);
    const std::string original = FixtureDir(rel);
    auto file = SafetensorsFile::Open(original);
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<TensorToWrite> tensors;
    for (const TensorView& t : (*file)->tensors()) {
      tensors.push_back(
          {t.name, t.dtype, t.shape,
           std::string(reinterpret_cast<const char*>(t.data), t.nbytes)});
    }
    const std::string copy = Path("copy.safetensors");
    ASSERT_TRUE(WriteSafetensors(copy, tensors, (*file)->metadata()).ok());
    EXPECT_TRUE(ReadFile(copy) == ReadFile(original));
  }
}

// ---- WriteSafetensors errors ------------------------------------------------

TEST_F(SafetensorsTest, WriteRejectsBadInput) {
  const std::string path = Path("w.safetensors");
  auto size_mismatch = WriteSafetensors(
      path, {{"t", DType::kF32, {3}, Bytes(std::vector<float>(2))}});
  EXPECT_EQ(size_mismatch.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(size_mismatch.message(), HasSubstr("'t'"));

  auto negative = WriteSafetensors(path, {{"t", DType::kF32, {-1}, ""}});
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.message(), HasSubstr("negative"));

  auto duplicate = WriteSafetensors(
      path, {{"t", DType::kF32, {1}, Bytes(std::vector<float>(1))},
             {"t", DType::kF32, {1}, Bytes(std::vector<float>(1))}});
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(duplicate.message(), HasSubstr("duplicate"));

  auto reserved = WriteSafetensors(
      path, {{"__metadata__", DType::kF32, {}, Bytes(std::vector<float>(1))}});
  EXPECT_EQ(reserved.code(), absl::StatusCode::kInvalidArgument);

  auto bad_dir = WriteSafetensors(Path("no/such/dir/x.safetensors"), {});
  EXPECT_FALSE(bad_dir.ok());
  EXPECT_THAT(bad_dir.message(), HasSubstr("no/such/dir"));
}

}  // namespace
}  // namespace prehoc
