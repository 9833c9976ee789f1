// A child process for multi-process tests: started with fork/exec, stdout and stderr merged
// into a pipe that the test reads line by line with a timeout (poll), so tests synchronise on
// what the servers print instead of sleeping. The destructor SIGKILLs and reaps the child.
#ifndef PREHOC_TESTS_SERVICES_CHILD_PROCESS_H_
#define PREHOC_TESTS_SERVICES_CHILD_PROCESS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace prehoc::testing {

class ChildProcess {
 public:
  // Starts `argv[0]` with `argv`. INTERNAL when fork/pipe fail.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv);
  ~ChildProcess();

  // Returns the `occurrence`-th output line (stdout or stderr, counting from 1 since the start)
  // containing `needle`, reading until `timeout`; DEADLINE_EXCEEDED (with the output seen so
  // far) or NOT_FOUND when the child closed its output first. Lines read are kept in output().
  absl::StatusOr<std::string> WaitForLine(const std::string& needle, absl::Duration timeout,
                                          int occurrence = 1);
  // Reads whatever output is available now (waiting at most `timeout`) and returns all output
  // read so far (for failure messages).
  const std::string& DrainOutput(absl::Duration timeout = absl::Milliseconds(200));
  // Counts lines containing `needle` seen so far.
  int CountLines(const std::string& needle) const;

  void Signal(int sig);
  // Waits for the child to exit; returns its exit status (waitpid's) or -1.
  int Wait();
  pid_t pid() const { return pid_; }
  const std::string& output() const { return output_; }

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int fd_ = -1;
  bool reaped_ = false;
  std::string buffer_;  // partial line
  std::string output_;  // every complete line read
  std::vector<std::string> lines_;
};

// "key=value" from a line like "prehoc-worker ready grpc=127.0.0.1:5 metrics_port=0 id=x".
std::string Field(const std::string& line, const std::string& key);

}  // namespace prehoc::testing

#endif  // PREHOC_TESTS_SERVICES_CHILD_PROCESS_H_
