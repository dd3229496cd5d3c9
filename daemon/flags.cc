#include "daemon/flags.h"

#include <fstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace svm::flags {
namespace {

constexpr std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
    {"trace", spdlog::level::trace},      {"debug", spdlog::level::debug},
    {"info", spdlog::level::info},        {"warn", spdlog::level::warn},
    {"warning", spdlog::level::warn},     {"error", spdlog::level::err},
    {"critical", spdlog::level::critical}, {"off", spdlog::level::off}};

absl::Status ReadOne(const std::string& path, int depth, FlagfileValues& out) {
  if (depth > 8) return absl::InvalidArgumentError(absl::StrCat("--flagfile ", path, ": nested too deep"));
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--flagfile: cannot read ", path));
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    if (!absl::ConsumePrefix(&l, "--")) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--flagfile %s:%d: expected --flag=value, got '%s'", path, n, l));
    }
    const size_t eq = l.find('=');
    std::string name(l.substr(0, eq));
    std::string value = eq == absl::string_view::npos ? "true" : std::string(l.substr(eq + 1));
    if (name == "flagfile") {
      for (absl::string_view p : absl::StrSplit(value, ',', absl::SkipEmpty())) {
        if (auto st = ReadOne(std::string(p), depth + 1, out); !st.ok()) return st;
      }
      continue;
    }
    out[std::move(name)] = std::move(value);
  }
  return absl::OkStatus();
}

}  // namespace

bool AbslParseFlag(absl::string_view text, LogLevel* out, std::string* error) {
  for (const auto& [name, level] : kLevels) {
    if (text == name) {
      out->value = level;
      return true;
    }
  }
  *error = absl::StrCat("unknown level '", text, "' (trace|debug|info|warn|error|critical|off)");
  return false;
}

std::string AbslUnparseFlag(const LogLevel& v) {
  return std::string(spdlog::level::to_string_view(v.value).data(),
                     spdlog::level::to_string_view(v.value).size());
}

bool AbslParseFlag(absl::string_view text, SocketMode* out, std::string* error) {
  const bool octal = !text.empty() && text.size() <= 5 &&
                     text.find_first_not_of("01234567") == absl::string_view::npos;
  const unsigned long mode = octal ? std::strtoul(std::string(text).c_str(), nullptr, 8) : 0;
  if (!octal || mode > 07777) {
    *error = absl::StrCat("'", text, "' is not an octal file mode (e.g. 0660)");
    return false;
  }
  out->mode = static_cast<mode_t>(mode);
  return true;
}

std::string AbslUnparseFlag(const SocketMode& v) { return absl::StrFormat("%04o", v.mode); }

bool AbslParseFlag(absl::string_view text, ControlSocket* out, std::string* error) {
  if (!absl::ConsumePrefix(&text, "unix:") || text.empty()) {
    *error = "must be unix:PATH";
    return false;
  }
  out->path = std::string(text);
  return true;
}

std::string AbslUnparseFlag(const ControlSocket& v) { return absl::StrCat("unix:", v.path); }

bool AbslParseFlag(absl::string_view text, OptionalHostPort* out, std::string* error) {
  if (text.empty()) {
    out->value.reset();
    return true;
  }
  auto hp = ParseHostPort(text);
  if (!hp.ok()) {
    *error = std::string(hp.status().message());
    return false;
  }
  out->value = *hp;
  return true;
}

std::string AbslUnparseFlag(const OptionalHostPort& v) {
  return v.value ? absl::StrCat(v.value->host, ":", v.value->port) : "";
}

absl::StatusOr<FlagfileValues> ReadFlagfiles(const std::vector<std::string>& paths) {
  FlagfileValues out;
  for (const std::string& p : paths) {
    if (auto st = ReadOne(p, 0, out); !st.ok()) return st;
  }
  return out;
}

}  // namespace svm::flags
