#include "daemon/service/access.h"

#include "common/proc_parse.h"

#include <sys/stat.h>
#include <sys/uio.h>

#include <cerrno>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/fd.h"
#include "daemon/source/procfs_source.h"

namespace svm::service {
namespace {

constexpr int kCapSysPtrace = 19;

bool HasCapSysPtrace(pid_t pid) {
  auto text = proc::ReadSmallFile(absl::StrCat("/proc/", pid, "/status"));
  if (!text.ok()) return false;
  auto st = proc::ParseStatus(*text);
  return st.ok() && st->has_cap_eff && ((st->cap_eff >> kCapSysPtrace) & 1);
}

}  // namespace

absl::Status CheckMayExport(const PeerCred& caller, pid_t target) {
  auto ids = source::ReadProcIds(target);
  if (!ids.ok()) return ids.status();
  if (caller.pid == target) return absl::OkStatus();
  if (HasCapSysPtrace(caller.pid)) return absl::OkStatus();
  // The kernel's rule for a caller without CAP_SYS_PTRACE: its ids match the
  // target's real, effective and saved ids, and the target is dumpable (a
  // non-dumpable process has its /proc directory owned by root).
  bool match = true;
  for (int i = 0; i < 3; ++i) {
    match = match && ids->uid[i] == caller.uid && ids->gid[i] == caller.gid;
  }
  struct stat st{};
  bool dumpable = ::stat(absl::StrCat("/proc/", target).c_str(), &st) == 0 && st.st_uid == ids->uid[1];
  if (match && dumpable) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrFormat(
      "uid %u may not export memory of process %d (it could not ptrace it)", caller.uid, target));
}

}  // namespace svm::service
