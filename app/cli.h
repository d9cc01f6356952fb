// Command-line options of the remat subcommands: declared once with defaults and help, parsed
// strictly (an unknown option or a malformed value is an error naming it).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace remat {

class Options {
 public:
  explicit Options(std::string command, std::string summary)
      : command_(std::move(command)), summary_(std::move(summary)) {}
  // A valued option (--name VALUE or --name=VALUE) with its default and help line.
  Options& add(const std::string& name, const std::string& def, const std::string& help);
  // A flag (--name, no value); get_bool() is true when given.
  Options& flag(const std::string& name, const std::string& help);
  // Parses argv[first..argc). Throws remat::Error for unknown options, missing values.
  // Returns false when --help was asked for (help() says what to print).
  bool parse(int argc, const char* const* argv, int first);
  std::string help() const;

  std::string get(const std::string& name) const;
  bool given(const std::string& name) const;
  bool get_bool(const std::string& name) const;
  // An integer >= 1 (sizes: --batch, --seq), or an error naming the option and the value.
  int get_positive(const std::string& name) const;
  long long get_int(const std::string& name) const;  // Error naming the option if not an integer
  // A random seed: an integer in [0, LLONG_MAX] (so the value printed back can be given
  // again), or an error naming the option and the value.
  uint64_t get_seed(const std::string& name) const;
  double get_double(const std::string& name) const;
  // A non-negative int (a size or a count): Error naming the option when it is not an
  // integer in [0, INT_MAX], so a huge value is never silently cut down.
  int get_count(const std::string& name) const;  // Error naming the option if not a number
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  struct Opt {
    std::string def, help;
    bool is_flag;
  };
  std::string command_, summary_;
  std::vector<std::string> order_;
  std::map<std::string, Opt> opts_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

}  // namespace remat
