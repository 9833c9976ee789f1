// `prehoc serve`: embedded mode (worker and cache-manager cores in one process) behind the same
// gRPC API as prehoc-cachemgr (prehoc.v1.Inference, health, reflection, /metrics).
// `prehoc loadgen`: a closed-loop load generator against a server (--target) or an in-process
// embedded backend (--model), reporting tokens/s, TTFT and inter-token latency percentiles.
#ifndef PREHOC_SERVICES_CLI_SERVE_H_
#define PREHOC_SERVICES_CLI_SERVE_H_

#include <ostream>
#include <string>
#include <vector>

namespace prehoc {

// args[0] = program, args[1] = "serve". Blocks until SIGTERM/SIGINT. Returns the exit code.
int RunServe(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
// args[0] = program, args[1] = "loadgen". Returns the exit code.
int RunLoadgen(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CLI_SERVE_H_
