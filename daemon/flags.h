// The value types of svmd's flags (absl::flags): each parses strictly, so a
// bad value is a usage error naming the flag, never a silent default. And
// the reader SIGHUP uses to see what the flagfiles say now.
#ifndef SVM_DAEMON_FLAGS_H_
#define SVM_DAEMON_FLAGS_H_

#include <sys/types.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/numbers.h"
#include "spdlog/common.h"

namespace svm::flags {

// --log-level: spdlog maps an unknown name to "off"; this refuses it.
struct LogLevel {
  spdlog::level::level_enum value = spdlog::level::info;
};
bool AbslParseFlag(absl::string_view text, LogLevel* out, std::string* error);
std::string AbslUnparseFlag(const LogLevel& v);

// --socket-mode: octal permission bits, nothing else.
struct SocketMode {
  mode_t mode = 0660;
};
bool AbslParseFlag(absl::string_view text, SocketMode* out, std::string* error);
std::string AbslUnparseFlag(const SocketMode& v);

// --control: unix:PATH.
struct ControlSocket {
  std::string path;
};
bool AbslParseFlag(absl::string_view text, ControlSocket* out, std::string* error);
std::string AbslUnparseFlag(const ControlSocket& v);

// HOST:PORT, or "" for none.
struct OptionalHostPort {
  std::optional<HostPort> value;
  static OptionalHostPort Of(std::string host, uint16_t port) {
    return OptionalHostPort{HostPort{std::move(host), port}};
  }
};
bool AbslParseFlag(absl::string_view text, OptionalHostPort* out, std::string* error);
std::string AbslUnparseFlag(const OptionalHostPort& v);

// One of a fixed set of words (Names::kWords).
template <typename Names>
struct Choice {
  std::string value;
};
template <typename Names>
bool AbslParseFlag(absl::string_view text, Choice<Names>* out, std::string* error) {
  for (const char* w : Names::kWords) {
    if (text == w) {
      out->value = w;
      return true;
    }
  }
  *error = absl::StrCat("'", text, "' is not one of ", absl::StrJoin(Names::kWords, "|"));
  return false;
}
template <typename Names>
std::string AbslUnparseFlag(const Choice<Names>& v) {
  return v.value;
}
struct SourceName {
  static constexpr const char* kWords[] = {"auto", "shim", "procfs"};
};
struct TransportName {
  static constexpr const char* kWords[] = {"auto", "rdma", "tcp"};
};
struct RdmaRegistrationName {
  static constexpr const char* kWords[] = {"auto", "odp", "pinned"};
};

// Flag name (without "--") -> value, as abseil reads flagfiles: one
// "--name=value" (or a boolean "--name") a line, "#" comments and blank
// lines skipped, nested --flagfile lines followed, the last setting wins.
using FlagfileValues = std::map<std::string, std::string>;
absl::StatusOr<FlagfileValues> ReadFlagfiles(const std::vector<std::string>& paths);

}  // namespace svm::flags

#endif  // SVM_DAEMON_FLAGS_H_
