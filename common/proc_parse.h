// Parsers of the kernel's /proc text files that svmd reads about other
// processes (/proc/PID/maps, /proc/PID/status). One parser per format,
// shared by every reader; none throws; malformed input is an error, never
// a default. Their input is not trusted (a process controls its own
// mapping names), so they are fuzzed (tests/fuzz/).
#ifndef SVM_COMMON_PROC_PARSE_H_
#define SVM_COMMON_PROC_PARSE_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace svm::proc {

// One line of /proc/PID/maps: "start-end perms offset major:minor inode [path]".
struct MapsLine {
  uint64_t start = 0, end = 0;  // [start, end), start < end
  std::string perms;            // 4 characters, e.g. "rw-s"
  uint64_t offset = 0;          // in the mapped object, bytes
  uint32_t dev_major = 0, dev_minor = 0;
  uint64_t inode = 0;
  std::string path;             // may be empty, may contain spaces ("... (deleted)")

  bool shared() const { return perms.size() == 4 && perms[3] == 's'; }
  bool readable() const { return !perms.empty() && perms[0] == 'r'; }
};

// INVALID_ARGUMENT naming what is wrong when the line is not one.
absl::StatusOr<MapsLine> ParseMapsLine(absl::string_view line);

// The fields of /proc/PID/status svmd uses.
struct ProcStatus {
  uid_t uid[4] = {};  // real, effective, saved, filesystem
  gid_t gid[4] = {};
  uint64_t cap_eff = 0;
  uint64_t vm_pin_bytes = 0;  // VmPin (0 when absent)
  bool has_ids = false;       // both Uid: and Gid: were present and well-formed
  bool has_cap_eff = false;
};

// INVALID_ARGUMENT when a field svmd uses is present but malformed.
absl::StatusOr<ProcStatus> ParseStatus(absl::string_view text);

// The whole content of a (/proc) file; NOT_FOUND when it cannot be opened.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path);

}  // namespace svm::proc

#endif  // SVM_COMMON_PROC_PARSE_H_
