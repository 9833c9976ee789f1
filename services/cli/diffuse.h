// `prehoc diffuse`: diffusion-LM decoding with the embedded DLM decoder (worker/dlm/), one prompt
// at a time, or `--eval`: every cache policy side by side on the held-out sets (the harness
// behind docs/dlm.md).
#ifndef PREHOC_SERVICES_CLI_DIFFUSE_H_
#define PREHOC_SERVICES_CLI_DIFFUSE_H_

#include <ostream>
#include <string>
#include <vector>

namespace prehoc {

// Runs `prehoc diffuse` with args (args[0] = program, args[1] = "diffuse"). Text and the summary
// go to `out`, usage errors and failures to `err`. Returns 0 on success, 2 on a usage error (bad
// flag or an INVALID_ARGUMENT request), 1 on any other failure.
int RunDiffuse(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// The `--eval` harness; args as for RunDiffuse (the --eval flag itself is accepted and ignored).
int RunDiffuseEval(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CLI_DIFFUSE_H_
