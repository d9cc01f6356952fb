// What the tests that run the remat program share, so test_cli and test_crash do not each
// carry a copy: the tiny run's arguments and starting REMAT_BINARY with fork/exec (its stdout
// and stderr to files, limits, a timeout, the result described). Temporary directories
// (TempDir, make_temp_dir) and shards (write_random_shard) come from tests/tiny_model.h.
#pragma once
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/shards.h"
#include "tests/tiny_model.h"

namespace remat::test {

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

inline bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// `remat train` of the tiny preset (V=300) on `shard` at B=2, T=16 for `steps` steps, no
// evaluation or samples; later options win, so callers append what they change.
inline std::vector<std::string> tiny_train_args(const std::string& shard, int steps) {
  return {"train",
          "--model",
          "tiny",
          "--vocab",
          "300",
          "--data",
          shard,
          "--batch",
          "2",
          "--seq",
          "16",
          "--steps",
          std::to_string(steps),
          "--eval-every",
          "0",
          "--sample-tokens",
          "0"};
}

struct Limits {
  std::vector<std::string> env;  // extra NAME=VALUE
  rlim_t fsize = RLIM_INFINITY;  // RLIMIT_FSIZE: a smaller one simulates a full disk
  rlim_t as = RLIM_INFINITY;     // RLIMIT_AS: address-space cap
};

struct Child {
  pid_t pid = -1;
  std::string out, err;  // files holding its stdout and stderr
};

// Starts REMAT_BINARY with `args`, stdout and stderr going to `<base>.out` and `<base>.err`.
inline Child spawn(const std::vector<std::string>& args, const std::string& base,
                   const Limits& lim = {}) {
  Child c;
  c.out = base + ".out";
  c.err = base + ".err";
  std::vector<std::string> full = {REMAT_BINARY};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : full) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = lim.env;
  c.pid = ::fork();
  if (c.pid == 0) {
    const int fo = ::open(c.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int fe = ::open(c.err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fo < 0 || fe < 0) ::_exit(126);
    ::dup2(fo, 1);
    ::dup2(fe, 2);
    for (std::string& e : env) ::putenv(e.data());
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    // A write past RLIMIT_FSIZE fails with EFBIG instead of killing with SIGXFSZ.
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit r;
    if (lim.fsize != RLIM_INFINITY) {
      r.rlim_cur = r.rlim_max = lim.fsize;
      ::setrlimit(RLIMIT_FSIZE, &r);
    }
    if (lim.as != RLIM_INFINITY) {
      r.rlim_cur = r.rlim_max = lim.as;
      ::setrlimit(RLIMIT_AS, &r);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return c;
}

// Waits for the child; SIGKILLs it and fails the test after `timeout_s`. Returns the status.
inline int wait_child(const Child& c, double timeout_s = 300) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int status = 0;
  while (true) {
    const pid_t r = ::waitpid(c.pid, &status, WNOHANG);
    if (r == c.pid) return status;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(c.pid, SIGKILL);
      ::waitpid(c.pid, &status, 0);
      ADD_FAILURE() << "remat did not finish within " << timeout_s << " s";
      return status;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// How a finished child ended and what it wrote.
struct Result {
  int status = 0;
  std::string out, err;
  bool exited() const { return WIFEXITED(status); }
  int code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : -1; }
  std::string describe() const {
    std::string s = WIFEXITED(status)     ? "exit " + std::to_string(WEXITSTATUS(status))
                    : WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                          : "status " + std::to_string(status);
    return s + "\n--- stdout:\n" + out + "\n--- stderr:\n" + err;
  }
};

// The Result of a child that ended with `status` (from wait_child).
inline Result result_of(const Child& c, int status) {
  return {status, slurp(c.out), slurp(c.err)};
}

// For a failed assertion: how the child ended, its stdout and its stderr.
inline std::string describe(int status, const Child& c) {
  return result_of(c, status).describe();
}

// Runs REMAT_BINARY with `args` to completion (killing it after 300 s).
inline Result run_remat(const std::vector<std::string>& args, const std::string& base,
                        const Limits& lim = {}) {
  const Child c = spawn(args, base, lim);
  return result_of(c, wait_child(c));
}

// A shell command's exit status (-1 when it did not exit normally) and its stdout and stderr
// together.
struct ShellResult {
  int status = -1;
  std::string output;
};
inline ShellResult run_shell(const std::string& cmd) {
  ShellResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  if (st != -1 && WIFEXITED(st)) r.status = WEXITSTATUS(st);
  return r;
}

// s in single quotes for the shell.
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'')
      q += "'\\''";
    else
      q += c;
  }
  return q + "'";
}

}  // namespace remat::test
