#include "worker/tokenizer.h"

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::string WriteDir(const std::string& name, const std::string& json) {
  fs::path dir = fs::path(::testing::TempDir()) / name;
  fs::create_directories(dir);
  std::ofstream(dir / "prehoc_tokenizer.json") << json;
  return dir.string();
}

TEST(TokenizerTest, RoundTripsBytesAndDropsSpecials) {
  Tokenizer t(256, 257, 258, 259);
  const std::string text = "def f(x):\n    return x * 2  # \xc3\xa9";
  auto ids = t.Encode(text, true);
  ASSERT_EQ(ids.size(), text.size() + 1);
  EXPECT_EQ(ids[0], 256);
  EXPECT_EQ(ids[1], 'd');
  EXPECT_EQ(ids.back(), 0xa9);
  ids.push_back(257);
  EXPECT_EQ(t.Decode(ids), text);
}

TEST(TokenizerTest, LoadsFromModelDir) {
  auto dir = WriteDir("tok_ok", R"({"type": "byte", "bos_token_id": 256, "eos_token_id": 257,
                                    "pad_token_id": 258, "mask_token_id": 259})");
  auto t = Tokenizer::LoadFromModelDir(dir, 260);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_NE(*t, nullptr);
  EXPECT_EQ((*t)->mask_id(), 259);
  EXPECT_EQ((*t)->eos_id(), 257);
}

TEST(TokenizerTest, MissingFileIsNotAnError) {
  fs::path dir = fs::path(::testing::TempDir()) / "tok_none";
  fs::create_directories(dir);
  auto t = Tokenizer::LoadFromModelDir(dir.string(), 260);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, nullptr);
}

TEST(TokenizerTest, MalformedFilesNameTheProblem) {
  EXPECT_THAT(Tokenizer::LoadFromModelDir(WriteDir("tok_bad1", "{not json"), 260).status().message(),
              HasSubstr("not a JSON object"));
  EXPECT_THAT(Tokenizer::LoadFromModelDir(WriteDir("tok_bad2", R"({"type": "bpe"})"), 260)
                  .status()
                  .message(),
              HasSubstr("\"type\" must be \"byte\""));
  EXPECT_THAT(Tokenizer::LoadFromModelDir(
                  WriteDir("tok_bad3", R"({"type": "byte", "eos_token_id": 300})"), 260)
                  .status()
                  .message(),
              HasSubstr("eos_token_id"));
  EXPECT_THAT(Tokenizer::LoadFromModelDir(
                  WriteDir("tok_bad4", R"({"type": "byte", "bos_token_id": "x"})"), 260)
                  .status()
                  .message(),
              HasSubstr("bos_token_id\" must be an integer"));
}

}  // namespace
}  // namespace prehoc
