// libFuzzer target: what svmd does with a peer's request before anything
// is looked up or revealed (daemon/service/requests.h, the token compare of
// daemon/transport/session_registry.h), on requests as another node can
// send them: the access-list decision between an export's list and the
// identities the peer's certificate proves, the warning a refusal logs, and
// the session token a Subscribe presents.
//
// Input: one byte picking the call (Hello, DescribeExport, Subscribe,
// SetupData, Sync), two bytes of length L, L bytes of that request in
// protobuf's wire format. The rest: one byte of length M, M bytes of an
// ExportRequest whose allow list (if the control service would accept it)
// is the export's access list, and then the identities the peer's
// certificate proves, split at '\n' (certificate names can hold any byte).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "daemon/service/requests.h"
#include "daemon/transport/session_registry.h"
#include "google/protobuf/stubs/logging.h"
#include "svm/v1/control.pb.h"
#include "svm/v1/peer.pb.h"

namespace {

// One line of printable ASCII: nothing a peer sends may break a log line.
void CheckPrintable(absl::string_view line) {
  for (unsigned char c : line) {
    if (c < 0x20 || c >= 0x7f) std::abort();
  }
}

void CheckAccess(const std::vector<std::string>& allow, const std::vector<std::string>& ids,
                 const std::string& what) {
  const absl::Status st = svm::service::CheckAllowed(allow, ids);
  bool shared = allow.empty();
  for (const std::string& id : ids) shared = shared || absl::c_linear_search(allow, id);
  if (st.ok() != shared) std::abort();
  if (!st.ok() && !absl::IsPermissionDenied(st)) std::abort();
  if (!st.ok()) {
    const std::string line = svm::service::RefusalLogLine("ipv4:10.0.0.2:50000", ids, what, st.message());
    CheckPrintable(line);
  }
}

void CheckToken(const std::string& presented, const std::string& issued) {
  const bool eq = svm::transport::TokensEqual(presented, issued);
  if (eq != (!issued.empty() && presented == issued)) std::abort();
}

}  // namespace

// Protobuf logs every string field that is not UTF-8 (and refuses the
// message, as gRPC does): millions of lines in a run, none of them news.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const uint8_t call = data[0] % 5;
  const size_t len = std::min<size_t>(size - 3, data[1] | (data[2] << 8));
  const std::string req(reinterpret_cast<const char*>(data) + 3, len);
  const absl::string_view rest(reinterpret_cast<const char*>(data) + 3 + len, size - 3 - len);

  // The export's access list: only lists the control service accepts exist.
  std::vector<std::string> allow;
  std::vector<std::string> ids;
  if (!rest.empty()) {
    const size_t m = std::min<size_t>(static_cast<uint8_t>(rest[0]), rest.size() - 1);
    svm::v1::ExportRequest e;
    if (e.ParseFromArray(rest.data() + 1, static_cast<int>(m)) && svm::service::ValidateAllow(e.allow()).ok()) {
      allow.assign(e.allow().begin(), e.allow().end());
    }
    if (rest.size() > 1 + m) ids = absl::StrSplit(rest.substr(1 + m), '\n');
  }

  std::string what;
  switch (call) {
    case 0: {
      svm::v1::HelloRequest r;
      if (!r.ParseFromString(req)) return 0;
      CheckPrintable(svm::service::LogSafe(r.node()));
      return 0;
    }
    case 1: {
      svm::v1::DescribeExportRequest r;
      if (!r.ParseFromString(req)) return 0;
      what = r.name();
      break;
    }
    case 2: {
      svm::v1::SubscribeRequest r;
      if (!r.ParseFromString(req)) return 0;
      // The registry compares the presented token with every one it issued.
      for (const std::string& issued : ids) CheckToken(r.session_token(), issued);
      CheckToken(r.session_token(), r.session_token());
      what = absl::StrCat("id ", r.export_id());
      break;
    }
    case 3: {
      svm::v1::SetupDataRequest r;
      if (!r.ParseFromString(req)) return 0;
      CheckPrintable(svm::service::LogSafe(r.node()));
      CheckPrintable(svm::service::LogSafe(r.transport()));
      return 0;  // the endpoint bytes: endpoint_fuzz
    }
    default: {
      svm::v1::PeerSyncRequest r;
      if (!r.ParseFromString(req)) return 0;
      what = r.name();
      break;
    }
  }
  CheckAccess(allow, ids, what);
  return 0;
}
