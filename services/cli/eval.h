// `prehoc eval`: the quality harness for sparse-attention policies on a real model and the
// held-out sets in tests/data (format: tests/data/README.md).
//
// For every (policy, budget) configuration, on the same inputs:
//   * perplexity: each ppl row's prefix is prefilled densely once, then the last `ppl_tokens`
//     tokens are teacher-forced one decode step at a time with the policy's selection; the
//     cross-entropy of each step's next-token prediction gives bits per byte, and its argmax is
//     compared with dense attention's (top-1 agreement);
//   * retrieval: the prompt up to its final query line (`KEY_xxxx = "`) is prefilled densely,
//     the query line is fed token by token with selection, then the answer is greedy-decoded
//     with selection; a hit is an exact match;
//   * δ: the exact dropped mass of every (step, layer, kv head) selection (one dense pass
//     each, eval only), and the refresh δ the worker would report;
//   * output error: for every measured selection also ‖o_S − o‖ / ‖o‖, the relative error of the
//     attention output over the chosen list against dense attention (mean over the kv head's
//     query heads), reported per (layer, kv head) unit with that unit's refresh rate;
//   * refresh rate = refreshes / selections (per-step selection = 1), real kept fraction and
//     real kept count including dilation;
//   * equivalent refresh rate = keys selection scored beyond the kept set / (keys × selections)
//     (PrHS and oracle count it: t per refresh, the scanned keys of an incremental scan, t per
//     step of the diagnostic exact-δ gate), the cost of selection in units of per-step selection.
// All configurations run as one batch of forked sequences per example, so they see identical
// prefixes and the prefill is paid once.
#ifndef PREHOC_SERVICES_CLI_EVAL_H_
#define PREHOC_SERVICES_CLI_EVAL_H_

#include <ostream>
#include <string>
#include <vector>

namespace prehoc {

// Runs `prehoc eval` with args (args[0] = program, args[1] = "eval"). Returns the exit code.
int RunEval(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CLI_EVAL_H_
