#include "daemon/service/tls.h"

#include <grpc/grpc_security_constants.h>
#include <grpc/support/log.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/strings/str_join.h"
#include "common/log.h"

namespace svm::service {
namespace {

using X509Ptr = std::unique_ptr<X509, decltype(&X509_free)>;
using KeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using BioPtr = std::unique_ptr<BIO, decltype(&BIO_free)>;

std::string OpensslError() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no PEM data";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

absl::StatusOr<std::string> ReadFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every certificate in pem, in order.
absl::StatusOr<std::vector<X509Ptr>> ParseCerts(const std::string& flag, const std::string& path,
                                                const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  std::vector<X509Ptr> out;
  for (;;) {
    X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (x == nullptr) break;
    out.emplace_back(x, &X509_free);
  }
  ERR_clear_error();  // the end of the data reads as an error
  if (out.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": no PEM certificate in ", path));
  }
  return out;
}

std::string TimeString(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()), &BIO_free);
  ASN1_TIME_print(bio.get(), t);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// The names PeerNames() would give a peer presenting x.
std::vector<std::string> CertNames(X509* x) {
  std::vector<std::string> names;
  auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(x, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; sans != nullptr && i < sk_GENERAL_NAME_num(sans); ++i) {
    const GENERAL_NAME* g = sk_GENERAL_NAME_value(sans, i);
    if (g->type == GEN_DNS || g->type == GEN_URI) {
      const ASN1_IA5STRING* s = g->type == GEN_DNS ? g->d.dNSName : g->d.uniformResourceIdentifier;
      names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                         static_cast<size_t>(ASN1_STRING_length(s)));
    }
  }
  GENERAL_NAMES_free(sans);
  if (names.empty()) {
    char cn[256] = {};
    if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) > 0) {
      names.emplace_back(cn);
    }
  }
  return names;
}

absl::StatusOr<UniqueFd> MemfdWith(const char* name, const std::string& data) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("memfd_create ", name));
  if (auto st = WriteFull(fd.get(), data.data(), data.size()); !st.ok()) return st;
  return fd;
}

std::string FdPath(const UniqueFd& fd) { return absl::StrCat("/proc/self/fd/", fd.get()); }

}  // namespace

absl::StatusOr<PeerTls::Loaded> PeerTls::Load(const TlsFiles& files) {
  Loaded l;
  auto cert = ReadFile("tls-cert", files.cert);
  if (!cert.ok()) return cert.status();
  auto key = ReadFile("tls-key", files.key);
  if (!key.ok()) return key.status();
  auto ca = ReadFile("tls-ca", files.ca);
  if (!ca.ok()) return ca.status();
  auto chain = ParseCerts("tls-cert", files.cert, *cert);
  if (!chain.ok()) return chain.status();
  auto roots = ParseCerts("tls-ca", files.ca, *ca);
  if (!roots.ok()) return roots.status();
  BioPtr kbio(BIO_new_mem_buf(key->data(), static_cast<int>(key->size())), &BIO_free);
  KeyPtr pkey(PEM_read_bio_PrivateKey(kbio.get(), nullptr, nullptr, nullptr), &EVP_PKEY_free);
  if (!pkey) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-key: no PEM private key in ", files.key, ": ", OpensslError()));
  }
  X509* leaf = (*chain)[0].get();
  if (X509_check_private_key(leaf, pkey.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls-key: ", files.key,
                                                   " is not the key of the certificate in ", files.cert));
  }
  // The certificate must verify against the CA now: a node serving a
  // certificate its peers refuse (expired, another CA) could import nothing
  // and would be refused by every peer.
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(), &X509_STORE_free);
  for (auto& r : *roots) X509_STORE_add_cert(store.get(), r.get());
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> untrusted(
      sk_X509_new_null(), [](STACK_OF(X509)* s) { sk_X509_free(s); });
  for (size_t i = 1; i < chain->size(); ++i) sk_X509_push(untrusted.get(), (*chain)[i].get());
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> vctx(X509_STORE_CTX_new(),
                                                                      &X509_STORE_CTX_free);
  X509_STORE_CTX_init(vctx.get(), store.get(), leaf, untrusted.get());
  if (X509_verify_cert(vctx.get()) != 1) {
    const int err = X509_STORE_CTX_get_error(vctx.get());
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls-cert: ", files.cert,
                                                   " does not verify against ", files.ca, ": ",
                                                   X509_verify_cert_error_string(err)));
  }
  const std::vector<std::string> names = CertNames(leaf);
  if (names.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls-cert: ", files.cert, " names no identity (no DNS or URI subject alternative name, no CN)"));
  }
  char subject[512] = {};
  X509_NAME_oneline(X509_get_subject_name(leaf), subject, sizeof(subject));
  l.description = absl::StrCat("subject ", subject, ", identity ", absl::StrJoin(names, ","),
                               ", expires ", TimeString(X509_get0_notAfter(leaf)));
  l.cert = *std::move(cert);
  l.key = *std::move(key);
  l.ca = *std::move(ca);
  return l;
}

absl::Status PeerTls::Install(const Loaded& l) {
  auto cert = MemfdWith("svm-tls-cert", l.cert);
  if (!cert.ok()) return cert.status();
  auto key = MemfdWith("svm-tls-key", l.key);
  if (!key.ok()) return key.status();
  auto ca = MemfdWith("svm-tls-ca", l.ca);
  if (!ca.ok()) return ca.status();
  absl::MutexLock lock(&mu_);
  if (!cert_fd_.valid()) {
    cert_fd_ = *std::move(cert);
    key_fd_ = *std::move(key);
    ca_fd_ = *std::move(ca);
  } else {
    // Each path now opens the new content; gRPC rereads the key and the
    // certificate until neither changed while it read them.
    for (auto [from, to] : {std::pair{&*key, &key_fd_}, {&*cert, &cert_fd_}, {&*ca, &ca_fd_}}) {
      if (::dup3(from->get(), to->get(), O_CLOEXEC) < 0) return ErrnoStatus(errno, "dup3 (tls reload)");
    }
  }
  description_ = l.description;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PeerTls>> PeerTls::Create(const TlsFiles& files) {
  auto l = Load(files);
  if (!l.ok()) return l.status();
  std::unique_ptr<PeerTls> t(new PeerTls());
  t->files_ = files;
  if (auto st = t->Install(*l); !st.ok()) return st;
  t->provider_ = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      FdPath(t->key_fd_), FdPath(t->cert_fd_), FdPath(t->ca_fd_), kRefreshSeconds);
  return t;
}

absl::StatusOr<std::string> PeerTls::Reload() {
  auto l = Load(files_);
  if (!l.ok()) return l.status();
  if (auto st = Install(*l); !st.ok()) return st;
  return l->description;
}

std::string PeerTls::Describe() const {
  absl::MutexLock lock(&mu_);
  return description_;
}

std::shared_ptr<grpc::ServerCredentials> PeerTls::ServerCredentials() const {
  grpc::experimental::TlsServerCredentialsOptions o(provider_);
  o.watch_root_certs();
  o.watch_identity_key_cert_pairs();
  o.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  return grpc::experimental::TlsServerCredentials(o);
}

std::shared_ptr<grpc::ChannelCredentials> PeerTls::ChannelCredentials() const {
  grpc::experimental::TlsChannelCredentialsOptions o;
  o.set_certificate_provider(provider_);
  o.watch_root_certs();
  o.watch_identity_key_cert_pairs();
  o.set_verify_server_certs(true);  // chain and host name
  return grpc::experimental::TlsCredentials(o);
}

namespace {

constexpr absl::Duration kHandshakeLogWindow = absl::Minutes(1);

void HandshakeFailed(const std::string& reason) {
  static absl::Mutex mu(absl::kConstInit);  // guards last
  struct Seen {
    absl::Time logged;
    uint64_t suppressed = 0;
  };
  static auto* last = new std::map<std::string, Seen>();  // by reason; never freed (gRPC threads)
  uint64_t suppressed;
  {
    absl::MutexLock l(&mu);
    Seen& s = (*last)[reason];
    const absl::Time now = absl::Now();
    if (now - s.logged < kHandshakeLogWindow) {
      ++s.suppressed;
      return;
    }
    suppressed = std::exchange(s.suppressed, 0);
    s.logged = now;
  }
  if (suppressed == 0) {
    spdlog::warn("tls handshake with a peer failed: {}", reason);
  } else {
    spdlog::warn("tls handshake with a peer failed: {} (and {} times more in the last minute)",
                 reason, suppressed);
  }
}

void GrpcLog(gpr_log_func_args* args) {
  std::string_view msg(args->message);
  constexpr std::string_view kHandshake = "Handshake failed with fatal error ";
  if (msg.substr(0, kHandshake.size()) == kHandshake) {
    HandshakeFailed(std::string(msg.substr(kHandshake.size())));
    return;
  }
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) level = spdlog::level::err;
  if (args->severity == GPR_LOG_SEVERITY_INFO) level = spdlog::level::info;
  std::string_view file(args->file);
  if (size_t slash = file.rfind('/'); slash != std::string_view::npos) file.remove_prefix(slash + 1);
  spdlog::log(level, "grpc: {} ({}:{})", msg, file, args->line);
}

}  // namespace

void RouteGrpcLogs() { gpr_set_log_function(&GrpcLog); }

std::vector<std::string> PeerNames(const grpc::AuthContext& ctx) {
  std::vector<std::string> names;
  if (!ctx.IsPeerAuthenticated()) return names;
  for (const char* prop : {GRPC_PEER_DNS_PROPERTY_NAME, GRPC_PEER_URI_PROPERTY_NAME}) {
    for (const grpc::string_ref& v : ctx.FindPropertyValues(prop)) names.emplace_back(v.data(), v.size());
  }
  if (names.empty()) {
    for (const grpc::string_ref& v : ctx.FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME)) {
      names.emplace_back(v.data(), v.size());
    }
  }
  return names;
}

}  // namespace svm::service
