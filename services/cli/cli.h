// The `prehoc` command line: subcommands over the embedded engine.
//   prehoc generate --model DIR --prompt TEXT --max-tokens N [sampling flags]
// Flags are parsed here (not with global flag libraries) so the CLI is testable in-process.
#ifndef PREHOC_SERVICES_CLI_CLI_H_
#define PREHOC_SERVICES_CLI_CLI_H_

#include <ostream>
#include <string>
#include <vector>

namespace prehoc {

// Runs the CLI with `args` (args[0] is the program name). Generated text and the summary go to
// `out`; usage errors and failures go to `err`. Returns the process exit code: 0 on success,
// 2 on a usage error, 1 on any other failure.
int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CLI_CLI_H_
