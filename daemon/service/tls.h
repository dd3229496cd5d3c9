// Mutual TLS on the peer port (svmd --tls-cert/--tls-key/--tls-ca).
//
// The peer server requires a client certificate and verifies it against the
// CA; importers' channels present this node's certificate and verify the
// exporter's (chain and host name: the exporter's certificate must name the
// address importers dial, as a DNS or IP subject alternative name). A
// peer's identity is its certificate's DNS and URI subject alternative
// names, or its common name when it has neither (PeerNames).
//
// Lifetimes: gRPC reads the PEM through a FileWatcherCertificateProvider
// from private memfds (/proc/self/fd/N), never from the configured files
// directly. Create() and Reload() read and check the files (key matches
// certificate, certificate verifies against the CA now) and only then swap
// the memfds' contents in with dup2(2): edits of the files take effect on
// SIGHUP, never half-written, and a bad reload leaves the running
// certificates in place. gRPC picks a swap up within kRefreshSeconds; TLS
// sessions already established keep the certificates they were made with.
// The provider outlives every credential made from it (shared_ptr).
#ifndef SVM_DAEMON_SERVICE_TLS_H_
#define SVM_DAEMON_SERVICE_TLS_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/fd.h"

namespace svm::service {

struct TlsFiles {
  std::string cert;  // PEM: this node's certificate (then its chain, if any)
  std::string key;   // PEM: its private key
  std::string ca;    // PEM: the CA certificate(s) peers' certificates must chain to
};

class PeerTls {
 public:
  static constexpr unsigned kRefreshSeconds = 1;  // gRPC's minimum

  // Reads and checks the files. INVALID_ARGUMENT naming the file when one
  // is unreadable, not PEM, or the certificate does not verify.
  static absl::StatusOr<std::unique_ptr<PeerTls>> Create(const TlsFiles& files);

  // Reads and checks the same paths again; installs them only if they pass.
  // Returns a description of the certificate now served (Describe()).
  absl::StatusOr<std::string> Reload();

  // "subject CN=..., names node-a, expires 2027-01-01 00:00:00 UTC".
  std::string Describe() const;

  std::shared_ptr<grpc::ServerCredentials> ServerCredentials() const;
  std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() const;

 private:
  struct Loaded {
    std::string cert, key, ca;
    std::string description;
  };
  static absl::StatusOr<Loaded> Load(const TlsFiles& files);
  PeerTls() = default;
  absl::Status Install(const Loaded& l);

  TlsFiles files_;
  mutable absl::Mutex mu_;  // guards description_ and serialises Install
  std::string description_ ABSL_GUARDED_BY(mu_);
  // The fds gRPC reads (/proc/self/fd/N); their numbers never change.
  UniqueFd cert_fd_, key_fd_, ca_fd_;
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider_;
};

// The identities a peer's call authenticated as: the DNS and URI subject
// alternative names of its certificate, or its common name when it has
// none of those. Empty when the call is not over TLS.
std::vector<std::string> PeerNames(const grpc::AuthContext& ctx);

// Sends gRPC core's log to spdlog. A refused TLS handshake (no
// certificate, another CA, expired, wrong host name: gRPC decides it, svmd
// never sees the call) is logged once as a warning "tls handshake with a
// peer failed: REASON"; repeats of the same reason within a minute are
// counted and reported with the next line for it, so a peer retrying
// every second cannot flood the log.
void RouteGrpcLogs();

}  // namespace svm::service

#endif  // SVM_DAEMON_SERVICE_TLS_H_
