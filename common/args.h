// A small command-line parser shared by svmd, svmctl and the examples:
// "--key value", "--key=value" and boolean "--flag"; everything else is a
// positional word. Unknown keys are reported, never ignored.
#ifndef SVM_COMMON_ARGS_H_
#define SVM_COMMON_ARGS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace svm {

class Args {
 public:
  // value_keys take a value; bool_keys do not. Both without the leading "--".
  static absl::StatusOr<Args> Parse(int argc, char** argv, const std::set<std::string>& value_keys,
                                    const std::set<std::string>& bool_keys);

  bool Has(const std::string& key) const { return values_.count(key) > 0; }
  std::string Get(const std::string& key, const std::string& def = "") const;
  absl::StatusOr<std::string> Require(const std::string& key) const;
  // Decimal or 0x-hex.
  absl::StatusOr<uint64_t> GetU64(const std::string& key, std::optional<uint64_t> def) const;
  const std::vector<std::string>& positional() const { return positional_; }
  // The options given, without "--".
  std::vector<std::string> keys() const;

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

}  // namespace svm

#endif  // SVM_COMMON_ARGS_H_
