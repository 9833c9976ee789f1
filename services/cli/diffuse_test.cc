#include "services/cli/diffuse.h"

#include <filesystem>
#include <sstream>

#include "gtest/gtest.h"
#include "services/cli/cli.h"

namespace prehoc {
namespace {

std::string Model() {
  return (std::filesystem::path(PREHOC_SOURCE_DIR) / "models" / "prehoc-code-dlm").string();
}

int Cli(std::vector<std::string> args, std::string* out, std::string* err) {
  args.insert(args.begin(), {"prehoc", "diffuse"});
  std::ostringstream o, e;
  const int rc = RunCli(args, o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(DiffuseCliTest, HelpAndUsageErrors) {
  std::string out, err;
  EXPECT_EQ(Cli({"--help"}, &out, &err), 0);
  EXPECT_NE(out.find("--cache"), std::string::npos);
  EXPECT_NE(out.find("--parallel-threshold"), std::string::npos);
  EXPECT_EQ(Cli({"--eval", "--help"}, &out, &err), 0);
  EXPECT_NE(out.find("--retrieval-rows"), std::string::npos);
  EXPECT_EQ(Cli({"--bogus"}, &out, &err), 2);
  EXPECT_NE(err.find("unknown flag"), std::string::npos);
  // Request errors are reported before the model is loaded, naming the field.
  EXPECT_EQ(Cli({"--gen-length", "0"}, &out, &err), 2);
  EXPECT_NE(err.find("gen_length"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--gen-length", "64", "--block-length", "24"}, &out, &err), 2);
  EXPECT_NE(err.find("block_length"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--cache", "fast"}, &out, &err), 2);
  EXPECT_NE(err.find("cache"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--cache", "spa", "--cache-overrides", "r_full"}, &out, &err), 2);
  EXPECT_EQ(Cli({"--model", "/nonexistent/dir"}, &out, &err), 1);
  EXPECT_EQ(Cli({"--device", "gpu"}, &out, &err), 2);
  EXPECT_NE(err.find("--device must be auto, cpu or cuda, got 'gpu'"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--prompt", "a", "--prompt-ids", "1"}, &out, &err), 2);
  EXPECT_NE(err.find("--prompt and --prompt-ids are mutually exclusive"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--suffix", "a", "--suffix-ids", "1"}, &out, &err), 2);
  EXPECT_NE(err.find("--suffix and --suffix-ids are mutually exclusive"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--threads", "-1"}, &out, &err), 2);
  EXPECT_NE(err.find("invalid value '-1' for --threads"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--seed", "x"}, &out, &err), 2);
  EXPECT_NE(err.find("invalid value 'x' for --seed"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--eval", "--bogus", "1"}, &out, &err), 2);
  EXPECT_NE(err.find("unknown flag '--bogus'"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--eval", "--threads", "-2"}, &out, &err), 2);
  EXPECT_NE(err.find("invalid value '-2' for --threads"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--eval", "--steps"}, &out, &err), 2);
  EXPECT_NE(err.find("--steps needs a value"), std::string::npos) << err;
  EXPECT_EQ(Cli({"--eval", "--device", "gpu"}, &out, &err), 2);
  EXPECT_NE(err.find("--device must be auto, cpu or cuda, got 'gpu'"), std::string::npos) << err;
}

// The harness decodes on the backend --device names (the header says which) and reports every
// policy; --device cuda without a usable device fails naming it.
TEST(DiffuseCliTest, EvalRunsOnTheNamedDevice) {
  const std::vector<std::string> small = {
      "--eval", "--model", Model(), "--ar-model", "", "--retrieval-rows", "0", "--gen-rows", "1",
      "--gen-prompt-bytes", "64", "--gen-length", "8", "--block-length", "8", "--steps", "8",
      "--policies", "none,spa", "--threads", "2"};
  std::string out, err;
  std::vector<std::string> args = small;
  args.insert(args.end(), {"--device", "cpu"});
  ASSERT_EQ(Cli(args, &out, &err), 0) << err;
  EXPECT_NE(out.find("backend cpu"), std::string::npos) << out;
  EXPECT_NE(out.find("| none |"), std::string::npos) << out;
  EXPECT_NE(out.find("| spa |"), std::string::npos) << out;

  args = small;
  args.insert(args.end(), {"--device", "cuda"});
  const int rc = Cli(args, &out, &err);
  if (rc == 0) {
    EXPECT_NE(out.find("backend cuda"), std::string::npos) << out;
  } else {
    EXPECT_EQ(rc, 1);
    EXPECT_NE(err.find("--device cuda"), std::string::npos) << err;
  }
}

TEST(DiffuseCliTest, DecodesWithSpa) {
  std::string out, err;
  ASSERT_EQ(Cli({"--model", Model(), "--prompt", "def f(x):\n    return ", "--gen-length", "8",
                 "--block-length", "4", "--steps", "8", "--cache", "spa", "--threads", "2",
                 "--print-ids", "--device", "cpu"},
                &out, &err),
            0)
      << err;
  EXPECT_NE(out.find("--- 8 tokens (length) in 8 steps (1 full"), std::string::npos) << out;
  EXPECT_NE(out.find("tokens/s | cache=spa"), std::string::npos) << out;
  EXPECT_NE(out.find("rows recomputed per step by layer"), std::string::npos) << out;
  EXPECT_NE(out.find("--- schedule: rho 1.000"), std::string::npos) << out;
  EXPECT_NE(out.find("ids:"), std::string::npos) << out;
  EXPECT_NE(out.find("| 2 threads | cpu\n"), std::string::npos) << out;
}

}  // namespace
}  // namespace prehoc
