#include "services/cli/cli.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

struct CliRun {
  int code;
  std::string out, err;
};

CliRun Cli(std::vector<std::string> args) {
  args.insert(args.begin(), "prehoc");
  std::ostringstream out, err;
  int code = RunCli(args, out, err);
  return {code, out.str(), err.str()};
}

std::string Fixture(const std::string& name) {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests" / "fixtures" / "hf" / name).string();
}

TEST(CliTest, HelpAndUsageErrors) {
  CliRun r = Cli({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("generate"));
  r = Cli({"generate", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("--max-tokens"));
  r = Cli({});
  EXPECT_EQ(r.code, 2);
  r = Cli({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown command 'frobnicate'"));
  r = Cli({"generate", "--bogus"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown flag '--bogus'"));
  r = Cli({"generate", "--max-tokens", "abc"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("invalid value 'abc' for --max-tokens"));
  r = Cli({"generate", "--max-tokens"});
  EXPECT_THAT(r.err, HasSubstr("--max-tokens needs a value"));
  r = Cli({"generate", "--top-p", "1.5", "--model", Fixture("llama_gqa_f32")});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("top_p must be in (0, 1]"));
}

TEST(CliTest, MissingOrCorruptModelIsAClearError) {
  CliRun r = Cli({"generate", "--model", "/no/such/dir"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("model directory '/no/such/dir' does not exist"));
  fs::path dir = fs::path(::testing::TempDir()) / "cli_corrupt";
  fs::create_directories(dir);
  fs::copy_file(fs::path(Fixture("llama_gqa_f32")) / "config.json", dir / "config.json",
                fs::copy_options::overwrite_existing);
  {
    std::ofstream f(dir / "model.safetensors", std::ios::binary);
    f << "garbage";
  }
  r = Cli({"generate", "--model", dir.string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot load model"));
  EXPECT_THAT(r.err, HasSubstr("model.safetensors"));
}

TEST(CliTest, GeneratesFromTextAndIdsDeterministically) {
  CliRun a = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt", "hello", "--max-tokens",
               "6", "--no-stop-at-eos", "--print-ids", "--threads", "1"});
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_THAT(a.out, HasSubstr("--- 6 tokens (length) from a 6-token prompt"));
  EXPECT_THAT(a.out, HasSubstr("decode"));
  EXPECT_THAT(a.out, HasSubstr("tokens/s"));
  EXPECT_THAT(a.out, HasSubstr("--- sparsity: policy=dense kept_fraction=1.000"));
  // The same prompt as ids (BOS + "hello") gives the same ids.
  CliRun b = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt-ids",
               "256,104,101,108,108,111", "--max-tokens", "6", "--no-stop-at-eos", "--print-ids"});
  ASSERT_EQ(b.code, 0) << b.err;
  auto ids_line = [](const std::string& s) {
    auto p = s.find("ids:");
    return s.substr(p, s.find('\n', p) - p);
  };
  EXPECT_EQ(ids_line(a.out), ids_line(b.out));
  CliRun c = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt-ids", "1,x"});
  EXPECT_EQ(c.code, 2);
  EXPECT_THAT(c.err, HasSubstr("'x' is not an integer"));
  CliRun d = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt-ids", "1,999"});
  EXPECT_EQ(d.code, 1);
  EXPECT_THAT(d.err, HasSubstr("prompt token 1 = 999"));
}

TEST(CliTest, GenerateFlagChecksAndConfigFile) {
  CliRun a = Cli({"generate", "--prompt", "x", "--prompt-ids", "1"});
  EXPECT_EQ(a.code, 2);
  EXPECT_THAT(a.err, HasSubstr("--prompt and --prompt-ids are mutually exclusive"));
  a = Cli({"generate", "--prompt", "x", "--prompt-file", "/no/such/file"});
  EXPECT_THAT(a.err, HasSubstr("--prompt and --prompt-file are mutually exclusive"));
  a = Cli({"generate", "--prompt-file", "/no/such/file"});
  EXPECT_THAT(a.err, HasSubstr("--prompt-file: cannot read '/no/such/file'"));
  a = Cli({"generate", "--threads", "-1"});
  EXPECT_THAT(a.err, HasSubstr("invalid value '-1' for --threads"));
  a = Cli({"generate", "--kv-cache-mb", "0"});
  EXPECT_THAT(a.err, HasSubstr("invalid value '0' for --kv-cache-mb"));
  a = Cli({"generate", "--max-tokens", "0"});
  EXPECT_THAT(a.err, HasSubstr("--max-tokens must be >= 1, got 0"));
  a = Cli({"generate", "stray"});
  EXPECT_EQ(a.code, 2);
  EXPECT_THAT(a.err, HasSubstr("unexpected argument 'stray'"));
  // --config applies a JSON file of flag values; the command line wins.
  const std::string cfg = (fs::temp_directory_path() /
                           ("cli_generate_" + std::to_string(getpid()) + ".json")).string();
  {
    std::ofstream out(cfg);
    out << R"({"prompt-ids": "256,104,105", "max-tokens": 9, "stop-at-eos": false,
               "print-ids": true, "threads": 1})";
  }
  CliRun b = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--config", cfg,
                  "--max-tokens", "3"});
  std::remove(cfg.c_str());
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_THAT(b.out, HasSubstr("--- 3 tokens (length) from a 3-token prompt"));
  EXPECT_THAT(b.out, HasSubstr("ids:"));
}

TEST(CliTest, DeviceFlag) {
  CliRun a = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt", "hi", "--max-tokens",
                  "2", "--device", "cpu", "--threads", "1"});
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_THAT(a.out, HasSubstr("tokens/s | cpu: CPU, 1 threads"));
  CliRun b = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--device", "gpu"});
  EXPECT_EQ(b.code, 2);
  EXPECT_THAT(b.err, HasSubstr("--device must be auto, cpu or cuda, got 'gpu'"));
}

TEST(CliTest, SparsePolicyFlagsReachTheReport) {
  CliRun a = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt", std::string(100, 'x'),
                  "--max-tokens", "4", "--no-stop-at-eos", "--policy", "streaming", "--budget", "40"});
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_THAT(a.out, HasSubstr("policy=streaming"));
  EXPECT_THAT(a.out, ::testing::Not(HasSubstr("kept_fraction=1.000")));
  CliRun b = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--policy", "magic"});
  EXPECT_EQ(b.code, 1);
  EXPECT_THAT(b.err, HasSubstr("sparsity.policy 'magic' is unknown"));
  CliRun c = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--budget", "-1"});
  EXPECT_EQ(c.code, 2);
}

TEST(CliTest, EvalRejectsBadFlags) {
  CliRun a = Cli({"eval", "--budgets", "2"});
  EXPECT_EQ(a.code, 2);
  EXPECT_THAT(a.err, HasSubstr("not a fraction"));
  CliRun b = Cli({"eval", "--bogus", "1"});
  EXPECT_EQ(b.code, 2);
  CliRun c = Cli({"eval", "--help"});
  EXPECT_EQ(c.code, 0);
  EXPECT_THAT(c.out, HasSubstr("--policies"));
}

TEST(CliTest, PromptFileIsReadAndLongPromptsAreSummarised) {
  fs::path file = fs::path(::testing::TempDir()) / "prompt.txt";
  {
    std::ofstream f(file);
    f << std::string(150, 'a') << "TAIL";
  }
  CliRun a = Cli({"generate", "--model", Fixture("llama_gqa_f32"), "--prompt-file", file.string(),
                  "--max-tokens", "2", "--no-stop-at-eos"});
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_THAT(a.out, HasSubstr("from a 155-token prompt"));
  EXPECT_THAT(a.out, HasSubstr("aTAIL"));
  CliRun b = Cli({"generate", "--prompt-file", "/no/such/file"});
  EXPECT_EQ(b.code, 2);
  EXPECT_THAT(b.err, HasSubstr("cannot read '/no/such/file'"));
}

}  // namespace
}  // namespace prehoc
