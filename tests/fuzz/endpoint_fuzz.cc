// libFuzzer target: endpoint and address decoding. HOST:PORT as an import's
// peer names it (ParseHostPort, common/numbers.h: what a client's Import
// and the daemon's flags pass through), and the opaque transport endpoint
// a peer sends in SetupData (importer) or its answer (exporter): a
// google.protobuf.Any that must hold the reader's endpoint type
// (daemon/transport/endpoint_codec.h), then, for rdma, the queue pair it
// describes checked before a QP is connected to it (rdma::Endpoint::Validate).
//
// Input: one byte picking the decoder, the rest its bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/numbers.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/rdma/verbs.h"
#include "google/protobuf/stubs/logging.h"
#include "svm/v1/transport.pb.h"

namespace {

// Whatever ParseHostPort accepts has a host gRPC and getaddrinfo can take
// and a port that fits, and reads back the same when written as a user
// would ("[HOST]:PORT" for a host with colons).
void HostPort(absl::string_view text) {
  auto hp = svm::ParseHostPort(text);
  if (!hp.ok()) {
    if (!absl::IsInvalidArgument(hp.status())) std::abort();
    return;
  }
  if (hp->host.empty() || hp->host.find_first_of("[] \t") != std::string::npos) std::abort();
  const bool v6 = hp->host.find(':') != std::string::npos;
  auto again = svm::ParseHostPort(
      v6 ? absl::StrCat("[", hp->host, "]:", hp->port) : absl::StrCat(hp->host, ":", hp->port));
  if (!again.ok() || again->host != hp->host || again->port != hp->port) std::abort();
}

// The tcp transport connects only to ports 1..65535 of the peer's host.
void TcpEndpoint(std::string_view bytes) {
  svm::v1::TcpEndpoint e;
  if (!svm::transport::UnpackEndpoint(bytes, &e)) return;
  svm::v1::RdmaEndpoint other;
  if (svm::transport::UnpackEndpoint(bytes, &other)) std::abort();  // one type per Any
}

// The rdma transport's checks before Qp::Connect: 16-byte GID, then Validate.
void RdmaEndpoint(std::string_view bytes) {
  svm::v1::RdmaEndpoint m;
  if (!svm::transport::UnpackEndpoint(bytes, &m)) return;
  svm::v1::TcpEndpoint other;
  if (svm::transport::UnpackEndpoint(bytes, &other)) std::abort();
  svm::transport::rdma::Endpoint e;
  if (m.gid().size() != e.gid.size()) return;
  e.qpn = m.qpn();
  e.psn = m.psn();
  std::memcpy(e.gid.data(), m.gid().data(), e.gid.size());
  e.gid_index = m.gid_index();
  e.mtu = m.mtu();
  const absl::Status st = e.Validate();
  const bool mtu_ok = e.mtu == 256 || e.mtu == 512 || e.mtu == 1024 || e.mtu == 2048 || e.mtu == 4096;
  const bool ok = e.qpn != 0 && e.qpn <= 0xffffff && e.psn <= 0xffffff && mtu_ok;
  if (st.ok() != ok) std::abort();
  if (!st.ok() && !absl::IsInvalidArgument(st)) std::abort();
  (void)e.ToString();
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
  const std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0: HostPort(absl::string_view(bytes.data(), bytes.size())); break;
    case 1: TcpEndpoint(bytes); break;
    default: RdmaEndpoint(bytes); break;
  }
  return 0;
}
