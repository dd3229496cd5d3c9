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

absl::Status WriteToClient(pid_t pid, uint64_t dest, const uint8_t* data, size_t len) {
  size_t done = 0;
  while (done < len) {
    iovec local{const_cast<uint8_t*>(data) + done, len - done};
    iovec remote{reinterpret_cast<void*>(dest + done), len - done};
    ssize_t n = ::process_vm_writev(pid, &local, 1, &remote, 1, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EFAULT) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "destination buffer 0x%x+%u is not writable in the caller", dest, len));
      }
      return ErrnoStatus(errno, "write into the caller's buffer");
    }
    if (n == 0) return absl::InvalidArgumentError("destination buffer is not writable");
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace svm::service
