#include "tests/services/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace prehoc::testing {

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(
    const std::vector<std::string>& argv) {
  int fds[2];
  if (pipe(fds) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    // Child: unblock signals the test runner may have blocked, wire the pipe, exec.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  auto p = std::unique_ptr<ChildProcess>(new ChildProcess());
  p->pid_ = pid;
  p->fd_ = fds[0];
  return p;
}

ChildProcess::~ChildProcess() {
  if (!reaped_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    Wait();
  }
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::string> ChildProcess::WaitForLine(const std::string& needle,
                                                      absl::Duration timeout, int occurrence) {
  const absl::Time deadline = absl::Now() + timeout;
  size_t scanned = 0;
  int seen = 0;
  while (true) {
    for (; scanned < lines_.size(); ++scanned) {
      if (lines_[scanned].find(needle) != std::string::npos && ++seen == occurrence) {
        return lines_[scanned];
      }
    }
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0 || fd_ < 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("no line with '", needle, "' from pid ", pid_, "; output:\n", output_));
    }
    pollfd pfd{fd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(ms)) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(fd_, buf, sizeof(buf));
    if (n <= 0) {
      close(fd_);
      fd_ = -1;
      return absl::NotFoundError(absl::StrCat("pid ", pid_, " closed its output before '",
                                              needle, "'; output:\n", output_));
    }
    buffer_.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buffer_.find('\n')) != std::string::npos) {
      lines_.push_back(buffer_.substr(0, nl));
      output_ += buffer_.substr(0, nl + 1);
      buffer_.erase(0, nl + 1);
    }
  }
}

const std::string& ChildProcess::DrainOutput(absl::Duration timeout) {
  WaitForLine("\x01never-printed\x01", timeout).IgnoreError();
  if (!buffer_.empty()) {
    output_ += buffer_;
    buffer_.clear();
  }
  return output_;
}

int ChildProcess::CountLines(const std::string& needle) const {
  int n = 0;
  for (const std::string& l : lines_) n += l.find(needle) != std::string::npos ? 1 : 0;
  return n;
}

void ChildProcess::Signal(int sig) {
  if (!reaped_) kill(pid_, sig);
}

int ChildProcess::Wait() {
  if (reaped_) return -1;
  int status = 0;
  if (waitpid(pid_, &status, 0) != pid_) return -1;
  reaped_ = true;
  return status;
}

std::string Field(const std::string& line, const std::string& key) {
  const std::string k = key + "=";
  size_t p = line.find(k);
  if (p == std::string::npos) return "";
  p += k.size();
  const size_t e = line.find(' ', p);
  return line.substr(p, e == std::string::npos ? std::string::npos : e - p);
}

}  // namespace prehoc::testing
