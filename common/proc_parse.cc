#include "common/proc_parse.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/fd.h"

namespace svm::proc {
namespace {

// The next space-delimited token of *rest (leading spaces skipped).
absl::string_view Token(absl::string_view* rest) {
  size_t i = 0;
  while (i < rest->size() && (*rest)[i] == ' ') ++i;
  size_t j = i;
  while (j < rest->size() && (*rest)[j] != ' ') ++j;
  absl::string_view t = rest->substr(i, j - i);
  rest->remove_prefix(j);
  return t;
}

bool Hex64(absl::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 16) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleHexAtoi(s, out);
}

bool Hex32(absl::string_view s, uint32_t* out) {
  uint64_t v = 0;
  if (s.size() > 8 || !Hex64(s, &v)) return false;
  *out = static_cast<uint32_t>(v);
  return true;
}

absl::Status Bad(absl::string_view what, absl::string_view line) {
  return absl::InvalidArgumentError(
      absl::StrCat("malformed /proc maps line (", what, "): '", line.substr(0, 200), "'"));
}

}  // namespace

absl::StatusOr<MapsLine> ParseMapsLine(absl::string_view line) {
  MapsLine m;
  absl::string_view rest = line;
  absl::string_view range = Token(&rest);
  const size_t dash = range.find('-');
  if (dash == absl::string_view::npos || !Hex64(range.substr(0, dash), &m.start) ||
      !Hex64(range.substr(dash + 1), &m.end) || m.start >= m.end) {
    return Bad("range", line);
  }
  absl::string_view perms = Token(&rest);
  if (perms.size() != 4) return Bad("permissions", line);
  m.perms = std::string(perms);
  if (!Hex64(Token(&rest), &m.offset)) return Bad("offset", line);
  absl::string_view dev = Token(&rest);
  const size_t colon = dev.find(':');
  if (colon == absl::string_view::npos || !Hex32(dev.substr(0, colon), &m.dev_major) ||
      !Hex32(dev.substr(colon + 1), &m.dev_minor)) {
    return Bad("device", line);
  }
  absl::string_view inode = Token(&rest);
  if (inode.empty() || !absl::SimpleAtoi(inode, &m.inode) || inode[0] == '-' || inode[0] == '+') {
    return Bad("inode", line);
  }
  // The path is the rest after the padding; it may contain spaces.
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  m.path = std::string(rest);
  return m;
}

absl::StatusOr<ProcStatus> ParseStatus(absl::string_view text) {
  ProcStatus st;
  bool uid = false, gid = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) continue;
    const absl::string_view key = line.substr(0, colon);
    const absl::string_view value = absl::StripAsciiWhitespace(line.substr(colon + 1));
    if (key == "Uid" || key == "Gid") {
      std::vector<absl::string_view> f = absl::StrSplit(value, absl::ByAnyChar(" \t"), absl::SkipEmpty());
      if (f.size() != 4) return absl::InvalidArgumentError(absl::StrCat("malformed status field ", key));
      for (int i = 0; i < 4; ++i) {
        uint32_t v = 0;
        if (!absl::SimpleAtoi(f[i], &v) || f[i][0] == '-' || f[i][0] == '+') {
          return absl::InvalidArgumentError(absl::StrCat("malformed status field ", key));
        }
        if (key == "Uid") {
          st.uid[i] = static_cast<uid_t>(v);
        } else {
          st.gid[i] = static_cast<gid_t>(v);
        }
      }
      (key == "Uid" ? uid : gid) = true;
    } else if (key == "CapEff") {
      if (!Hex64(value, &st.cap_eff)) return absl::InvalidArgumentError("malformed status field CapEff");
      st.has_cap_eff = true;
    } else if (key == "VmPin") {
      absl::string_view v = value;
      if (!absl::ConsumeSuffix(&v, " kB")) return absl::InvalidArgumentError("malformed status field VmPin");
      uint64_t kb = 0;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(v), &kb) || kb > (UINT64_MAX >> 10)) {
        return absl::InvalidArgumentError("malformed status field VmPin");
      }
      st.vm_pin_bytes = kb << 10;
    }
  }
  st.has_ids = uid && gid;
  return st;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
  std::string out;
  char buf[16384];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("read ", path));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

}  // namespace svm::proc
