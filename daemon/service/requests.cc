#include "daemon/service/requests.h"

#include "absl/algorithm/container.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/numbers.h"
#include "daemon/source/mirror_source.h"

namespace svm::service {

using source::kPageSize;

absl::Status ValidateName(const std::string& name) {
  auto alnum = [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
  };
  bool ok = !name.empty() && name.size() <= 128 && alnum(name[0]);
  for (size_t i = 1; ok && i < name.size(); ++i) {
    ok = alnum(name[i]) || name[i] == '.' || name[i] == '_' || name[i] == '-';
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad name '", name, "': 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAllow(const google::protobuf::RepeatedPtrField<std::string>& allow) {
  constexpr int kMaxEntries = 64;
  constexpr size_t kMaxLen = 255;
  if (allow.size() > kMaxEntries) {
    return absl::InvalidArgumentError(absl::StrFormat("allow: at most %d identities", kMaxEntries));
  }
  for (const std::string& id : allow) {
    const bool printable = absl::c_all_of(id, [](char ch) { return ch > ' ' && ch < 0x7f && ch != ','; });
    if (id.empty() || id.size() > kMaxLen || !printable) {
      return absl::InvalidArgumentError(absl::StrCat(
          "allow: '", absl::CHexEscape(id.substr(0, kMaxLen)),
          "' is not an identity (1-255 printable characters, no spaces or commas)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateExportRequest(const v1::ExportRequest& req) {
  if (auto st = ValidateName(req.name()); !st.ok()) return st;
  if (req.len() == 0) return absl::InvalidArgumentError("len must be > 0");
  if (req.addr() % kPageSize || req.len() % kPageSize) {
    return absl::InvalidArgumentError(
        absl::StrFormat("addr 0x%x and len 0x%x must be multiples of the page size (%u)", req.addr(),
                        req.len(), kPageSize));
  }
  if (req.addr() + req.len() < req.addr()) return absl::InvalidArgumentError("addr + len overflows");
  if (req.pid() < 0) return absl::InvalidArgumentError("pid must be >= 0");
  return ValidateAllow(req.allow());
}

absl::Status ValidateImportRequest(const v1::ImportRequest& req) {
  if (auto st = ValidateName(req.name()); !st.ok()) return st;
  if (!req.as().empty()) {
    if (auto st = ValidateName(req.as()); !st.ok()) return st;
  }
  if (auto hp = ParseHostPort(req.peer()); !hp.ok() || hp->port == 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad peer '", req.peer(), "': expected HOST:PORT"));
  }
  return absl::OkStatus();
}

absl::Status ValidateReadRequest(const v1::ReadRequest& req) {
  if (auto st = ValidateName(req.name()); !st.ok()) return st;
  if (req.len() == 0) return absl::InvalidArgumentError("len must be > 0");
  if (req.len() > kMaxReadBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("len %u is above the %u-byte limit of one read", req.len(), kMaxReadBytes));
  }
  if (req.offset() + req.len() < req.offset()) return absl::OutOfRangeError("offset + len overflows");
  return absl::OkStatus();
}

absl::Status CheckAllowed(absl::Span<const std::string> allow, absl::Span<const std::string> peer) {
  if (allow.empty()) return absl::OkStatus();
  for (const std::string& id : peer) {
    if (absl::c_linear_search(allow, id)) return absl::OkStatus();
  }
  return absl::PermissionDeniedError(
      peer.empty() ? "the export has an access list and this peer proved no identity (no TLS)"
                   : "the export is not shared with this peer");
}

std::string LogSafe(absl::string_view text, size_t max_len) {
  const bool cut = text.size() > max_len;
  std::string out = absl::CHexEscape(text.substr(0, max_len));
  if (cut) absl::StrAppend(&out, "...");
  return out;
}

std::string RefusalLogLine(absl::string_view peer, absl::Span<const std::string> names,
                           absl::string_view what, absl::string_view why) {
  std::string ids;
  for (const std::string& n : names) absl::StrAppend(&ids, ids.empty() ? "" : ",", LogSafe(n));
  return absl::StrCat("peer ", LogSafe(peer), " (", names.empty() ? "unauthenticated" : ids,
                      ") refused export '", LogSafe(what), "': ", LogSafe(why));
}

}  // namespace svm::service
