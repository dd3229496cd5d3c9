// spdlog, plus formatting of absl::string_view (Debian's abseil does not
// alias it to std::string_view), so Status messages can be logged directly.
#ifndef SVM_COMMON_LOG_H_
#define SVM_COMMON_LOG_H_

#include <string_view>

#include "absl/strings/string_view.h"
#include <fmt/format.h>

#include "spdlog/spdlog.h"

template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<std::string_view> {
  template <typename Ctx>
  auto format(absl::string_view s, Ctx& ctx) const {
    return fmt::formatter<std::string_view>::format(std::string_view(s.data(), s.size()), ctx);
  }
};

#endif  // SVM_COMMON_LOG_H_
