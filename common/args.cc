#include "common/args.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/numbers.h"

namespace svm {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, const std::set<std::string>& value_keys,
                                 const std::set<std::string>& bool_keys) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string word = argv[i];
    if (!absl::StartsWith(word, "--") || word == "--") {
      a.positional_.push_back(word);
      continue;
    }
    std::string key = word.substr(2);
    std::optional<std::string> value;
    if (size_t eq = key.find('='); eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
    }
    if (bool_keys.count(key)) {
      if (value && *value != "true" && *value != "false") {
        return absl::InvalidArgumentError(absl::StrCat("--", key, " takes no value"));
      }
      a.values_[key] = value.value_or("true");
      continue;
    }
    if (!value_keys.count(key)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown option --", key));
    }
    if (!value) {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", key, " needs a value"));
      value = argv[++i];
    }
    a.values_[key] = *value;
  }
  return a;
}

std::vector<std::string> Args::keys() const {
  std::vector<std::string> k;
  for (const auto& [key, value] : values_) k.push_back(key);
  return k;
}

std::string Args::Get(const std::string& key, const std::string& def) const {
  auto it = values_.find(key);
  return it == values_.end() ? def : it->second;
}

absl::StatusOr<std::string> Args::Require(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) return absl::InvalidArgumentError(absl::StrCat("--", key, " is required"));
  return it->second;
}

absl::StatusOr<uint64_t> Args::GetU64(const std::string& key, std::optional<uint64_t> def) const {
  auto it = values_.find(key);
  if (it == values_.end()) {
    if (def) return *def;
    return absl::InvalidArgumentError(absl::StrCat("--", key, " is required"));
  }
  auto v = ParseU64(it->second);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat("--", key, ": ", v.status().message()));
  return v;
}

}  // namespace svm
