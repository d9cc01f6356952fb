#include "app/cli.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>

#include "base/error.h"

namespace remat {

Options& Options::add(const std::string& name, const std::string& def, const std::string& help) {
  order_.push_back(name);
  opts_[name] = {def, help, false};
  return *this;
}

Options& Options::flag(const std::string& name, const std::string& help) {
  order_.push_back(name);
  opts_[name] = {"", help, true};
  return *this;
}

bool Options::parse(int argc, const char* const* argv, int first) {
  for (int i = first; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") return false;
    if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
      positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto it = opts_.find(name);
    if (it == opts_.end())
      throw Error("unknown option --" + name + " (see remat " + command_ + " --help)");
    if (it->second.is_flag) {
      if (has_value) throw Error("--" + name + " takes no value");
      values_[name] = "1";
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) throw Error("--" + name + " needs a value");
      value = argv[++i];
    }
    values_[name] = value;
  }
  return true;
}

std::string Options::help() const {
  std::string s = "usage: remat " + command_ + " [options]\n" + summary_ + "\n\noptions:\n";
  for (const std::string& n : order_) {
    const Opt& o = opts_.at(n);
    std::string left = "  --" + n + (o.is_flag ? "" : " VALUE");
    if (left.size() < 28)
      left.resize(28, ' ');
    else
      left += "  ";
    s += left + o.help;
    if (!o.is_flag && !o.def.empty()) s += " (default: " + o.def + ")";
    s += "\n";
  }
  s += "  --help                    this text\n";
  return s;
}

std::string Options::get(const std::string& name) const {
  auto v = values_.find(name);
  if (v != values_.end()) return v->second;
  auto o = opts_.find(name);
  if (o == opts_.end()) throw Error("internal: option --" + name + " was never declared");
  return o->second.def;
}

bool Options::given(const std::string& name) const {
  return values_.count(name) != 0;
}
bool Options::get_bool(const std::string& name) const {
  return !get(name).empty();
}

long long Options::get_int(const std::string& name) const {
  std::string v = get(name);
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE)
    throw Error("--" + name + " expects an integer, got '" + v + "'");
  return x;
}

int Options::get_positive(const std::string& name) const {
  const long long x = get_int(name);
  if (x < 1 || x > INT_MAX)
    throw Error("--" + name + " must be a positive integer (at most " + std::to_string(INT_MAX) +
                "), got " + std::to_string(x));
  return static_cast<int>(x);
}

uint64_t Options::get_seed(const std::string& name) const {
  const long long x = get_int(name);
  if (x < 0)
    throw Error("--" + name + " must be between 0 and " + std::to_string(LLONG_MAX) + ", got " +
                std::to_string(x));
  return static_cast<uint64_t>(x);
}

int Options::get_count(const std::string& name) const {
  const long long x = get_int(name);
  if (x < 0 || x > INT_MAX)
    throw Error("--" + name + " must be between 0 and " + std::to_string(INT_MAX) + ", got " +
                std::to_string(x));
  return static_cast<int>(x);
}

double Options::get_double(const std::string& name) const {
  std::string v = get(name);
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x))
    throw Error("--" + name + " expects a number, got '" + v + "'");
  return x;
}

}  // namespace remat
