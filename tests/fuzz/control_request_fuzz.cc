// libFuzzer target: the control service's request validation
// (daemon/service/requests.h) on requests as a local client can send them.
// The first byte picks the call, the rest is the request message in
// protobuf's wire format, parsed as gRPC parses it. Every request ends in OK
// or INVALID_ARGUMENT (OUT_OF_RANGE for a read whose range wraps), and one
// that passes satisfies what the service relies on afterwards, checked here
// against an independent statement of each rule.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/numbers.h"
#include "daemon/service/requests.h"
#include "google/protobuf/stubs/logging.h"
#include "svm/v1/control.pb.h"

namespace {

using svm::service::kMaxReadBytes;
constexpr uint64_t kPage = 4096;

bool NameOk(const std::string& n) {
  if (n.empty() || n.size() > 128) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const unsigned char c = n[i];
    const bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-'))) return false;
  }
  return true;
}

bool IdentityOk(const std::string& id) {
  if (id.empty() || id.size() > 255) return false;
  for (unsigned char c : id) {
    if (c <= ' ' || c >= 0x7f || c == ',') return false;
  }
  return true;
}

// OK, or the status codes a bad request may get.
void CheckCode(const absl::Status& st, bool out_of_range_allowed = false) {
  if (st.ok() || absl::IsInvalidArgument(st)) return;
  if (out_of_range_allowed && absl::IsOutOfRange(st)) return;
  std::abort();
}

void Export(const std::string& bytes) {
  svm::v1::ExportRequest r;
  if (!r.ParseFromString(bytes)) return;
  const absl::Status st = svm::service::ValidateExportRequest(r);
  CheckCode(st);
  if (!st.ok()) return;
  if (!NameOk(r.name()) || r.len() == 0 || r.addr() % kPage != 0 || r.len() % kPage != 0 ||
      r.addr() > UINT64_MAX - r.len() || r.pid() < 0 || r.allow_size() > 64) {
    std::abort();
  }
  for (const std::string& id : r.allow()) {
    if (!IdentityOk(id)) std::abort();
  }
}

void Import(const std::string& bytes) {
  svm::v1::ImportRequest r;
  if (!r.ParseFromString(bytes)) return;
  const absl::Status st = svm::service::ValidateImportRequest(r);
  CheckCode(st);
  if (!st.ok()) return;
  if (!NameOk(r.name()) || (!r.as().empty() && !NameOk(r.as()))) std::abort();
  auto hp = svm::ParseHostPort(r.peer());
  if (!hp.ok() || hp->port == 0 || hp->host.empty()) std::abort();
}

void Read(const std::string& bytes) {
  svm::v1::ReadRequest r;
  if (!r.ParseFromString(bytes)) return;
  const absl::Status st = svm::service::ValidateReadRequest(r);
  CheckCode(st, /*out_of_range_allowed=*/true);
  if (!st.ok()) return;
  if (!NameOk(r.name()) || r.len() == 0 || r.len() > kMaxReadBytes || r.offset() > UINT64_MAX - r.len()) {
    std::abort();
  }
}

// Unexport, Watch and Sync: a name only (the three messages share field 1).
void NameOnly(const std::string& bytes) {
  svm::v1::UnexportRequest r;
  if (!r.ParseFromString(bytes)) return;
  const absl::Status st = svm::service::ValidateName(r.name());
  CheckCode(st);
  if (st.ok() != NameOk(r.name())) std::abort();
}

}  // namespace

// Protobuf logs every string field that is not UTF-8 (and refuses the
// message, as gRPC does): millions of lines in a run, none of them news.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 4) {
    case 0: Export(bytes); break;
    case 1: Import(bytes); break;
    case 2: Read(bytes); break;
    default: NameOnly(bytes); break;
  }
  return 0;
}
