// Peers prove who they are: svmd's peer port with mutual TLS
// (--tls-cert/--tls-key/--tls-ca) and per-export access lists (--allow),
// with real daemons and certificates made by scripts/make-test-ca.sh.
//
// Each refused peer must fail with a clear status, learn nothing of the
// export (no descriptor: no size, no id, no rkey), and be logged once by the
// exporter. Some peers are this test itself, calling the exporter's Peer
// service with real gRPC and the certificate under test (svmd refuses to
// start with an expired certificate or one its CA did not sign, so it
// cannot play those peers); the others are real importing daemons.
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/fd.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/frame.h"
#include "svm/v1/peer.grpc.pb.h"
#include "svm/v1/transport.pb.h"
#include "tests/integration/harness.h"
#include "tests/integration/raw_frames.h"

namespace svm::testing {
namespace {

bool WaitForLog(const std::string& path, const std::string& needle, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + Scaled(timeout);
  while (absl::Now() < deadline) {
    if (LinesContaining(path, needle) > 0) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

class Tls : public ::testing::Test {
 protected:
  void SetUp() override {
    ca_ = absl::StrCat(dir_.path(), "/pki");
    // node-a exports; node-b is on the secret export's list, node-c is not;
    // node-old expired; node-x comes from another CA.
    ASSERT_EQ(MakeCa({"node-a", "node-b", "node-c"}), 0);
    ASSERT_EQ(MakeCa({"--expired", "node-old"}), 0);
    ASSERT_EQ(MakeCa({"--ca", "evil-ca", "node-x"}), 0);
    auto a = Daemon::Start({.node = "node-a", .dir = dir_.path(), .extra = TlsFlags("node-a")});
    ASSERT_TRUE(a.ok()) << a.status();
    a_ = std::move(*a);
    auto e = Exporter::Start({.daemon = a_.get(), .name = "open", .pages = 4});
    ASSERT_TRUE(e.ok()) << e.status();
    exporter_ = std::move(*e);
    // The same memory again, for node-b only.
    RunResult r = RunCommand({SvmctlPath(), "--daemon", a_->control(), "export", "--pid",
                              std::to_string(exporter_->pid()), "--addr",
                              std::to_string(exporter_->addr()), "--len",
                              std::to_string(exporter_->len()), "--name", "secret", "--allow",
                              "node-b,spiffe://example/other"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  int MakeCa(const std::vector<std::string>& args) { return MakeTestCa(ca_, args); }
  std::vector<std::string> TlsFlags(const std::string& node, const std::string& ca = "ca") const {
    return TlsFlagsFor(ca_, node, ca);
  }

  std::string Log(const std::string& node) const {
    return absl::StrCat(dir_.path(), "/", node, ".log");
  }
  std::string ALog() const { return Log("node-a"); }

  // A Peer stub on the exporter presenting node's certificate ("" none),
  // trusting the test CA.
  std::unique_ptr<v1::Peer::Stub> PeerAs(const std::string& node) {
    std::vector<grpc::experimental::IdentityKeyCertPair> pairs;
    if (!node.empty()) {
      pairs.push_back({FileText(absl::StrCat(ca_, "/", node, ".key")),
                       FileText(absl::StrCat(ca_, "/", node, ".pem"))});
    }
    auto provider = std::make_shared<grpc::experimental::StaticDataCertificateProvider>(
        FileText(absl::StrCat(ca_, "/ca.pem")), pairs);
    grpc::experimental::TlsChannelCredentialsOptions o;
    o.set_certificate_provider(provider);
    o.watch_root_certs();
    if (!node.empty()) o.watch_identity_key_cert_pairs();
    return v1::Peer::NewStub(grpc::CreateChannel(a_->peer(), grpc::experimental::TlsCredentials(o)));
  }

  // DescribeExport as node; the descriptor is returned whatever the status,
  // so that a test can check it holds nothing.
  grpc::Status Describe(const std::string& node, const std::string& name, v1::ExportDescriptor* d) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
    v1::DescribeExportRequest req;
    req.set_name(name);
    return PeerAs(node)->DescribeExport(&ctx, req, d);
  }

  static void ExpectEmpty(const v1::ExportDescriptor& d) {
    EXPECT_EQ(d.ByteSizeLong(), 0u) << d.DebugString();
    EXPECT_EQ(d.len(), 0u);
    EXPECT_EQ(d.export_id(), 0u);
    EXPECT_FALSE(d.has_zero_copy());
  }

  // A refused handshake: UNAVAILABLE, nothing learned, and the exporter's
  // log says so exactly once (however often gRPC retried), and never
  // described or subscribed anything.
  void ExpectHandshakeRefused(const std::string& node, const std::string& reason) {
    v1::ExportDescriptor d;
    grpc::Status st = Describe(node, "secret", &d);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    ExpectEmpty(d);
    ASSERT_TRUE(WaitForLog(ALog(), reason, absl::Seconds(5))) << FileText(ALog());
    st = Describe(node, "open", &d);  // again, and to an export without a list
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    ExpectEmpty(d);
    absl::SleepFor(absl::Milliseconds(300));
    EXPECT_EQ(LinesContaining(ALog(), "tls handshake with a peer failed"), 1) << FileText(ALog());
    EXPECT_EQ(LinesContaining(ALog(), reason), 1) << FileText(ALog());
    EXPECT_EQ(LinesContaining(ALog(), "subscribed to"), 0);
    EXPECT_EQ(LinesContaining(ALog(), "data connection from"), 0);
  }

  TempDir dir_;
  std::string ca_;
  std::unique_ptr<Daemon> a_;
  std::unique_ptr<Exporter> exporter_;
};

TEST_F(Tls, TwoDaemonsImportAndReadAndKeepWorkingAcrossACertificateReload) {
  auto b = Daemon::Start({.node = "node-b", .dir = dir_.path(), .extra = TlsFlags("node-b")});
  ASSERT_TRUE(b.ok()) << b.status();
  auto cb = (*b)->Connect();
  auto ca = a_->Connect();
  ASSERT_TRUE(cb->Import(a_->peer(), "secret").ok());
  auto want = ReadBytes(*ca, "secret", 0, exporter_->len());
  ASSERT_TRUE(want.ok()) << want.status();
  auto got = ReadBytes(*cb, "secret", 0, exporter_->len(), /*fresh=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *want);
  EXPECT_TRUE(WaitForLog(ALog(), "node node-b subscribed to 'secret'", absl::Seconds(5)));

  // New keys and certificates for both nodes, from the same CA; SIGHUP.
  const std::string old_a = FileText(absl::StrCat(ca_, "/node-a.pem"));
  ASSERT_EQ(MakeCa({"node-a", "node-b"}), 0);
  const std::string new_a = FileText(absl::StrCat(ca_, "/node-a.pem"));
  ASSERT_NE(old_a, new_a);
  a_->process().Signal(SIGHUP);
  (*b)->process().Signal(SIGHUP);
  ASSERT_TRUE(WaitForLog(ALog(), "reload: peer tls certificate", absl::Seconds(10))) << FileText(ALog());
  ASSERT_TRUE(WaitForLog(Log("node-b"), "reload: peer tls certificate", absl::Seconds(10)));
  // The exporter's port serves the new certificate to new handshakes.
  bool served = false;
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  while (!served && absl::Now() < deadline) {
    RunResult r = RunCommand({"/bin/sh", "-c",
                              absl::StrCat("openssl s_client -connect ", a_->peer(), " -cert ", ca_,
                                           "/node-c.pem -key ", ca_, "/node-c.key </dev/null 2>/dev/null"
                                           " | openssl x509")});
    served = r.exit_code == 0 && r.out == new_a;
    if (!served) absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_TRUE(served) << "the exporter still serves its old certificate";
  // The established link keeps working, and a new daemon with node-b's new
  // certificate imports (new handshakes on both sides).
  got = ReadBytes(*cb, "secret", 0, exporter_->len(), /*fresh=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *want);
  auto b2 = Daemon::Start({.node = "node-b2", .dir = dir_.path(), .extra = TlsFlags("node-b")});
  ASSERT_TRUE(b2.ok()) << b2.status();
  auto cb2 = (*b2)->Connect();
  ASSERT_TRUE(cb2->Import(a_->peer(), "secret").ok());
  got = ReadBytes(*cb2, "secret", 0, exporter_->len(), /*fresh=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *want);
  EXPECT_EQ(LinesContaining(ALog(), "tls handshake with a peer failed"), 0) << FileText(ALog());
}

// --max-imports-per-peer counts what a peer proved (its certificate), not
// the node name its data connection declares: a second daemon presenting
// node-b's certificate under another name is the same peer.
TEST_F(Tls, ImportsPerPeerCountTheCertificateNotTheDeclaredName) {
  auto x = Daemon::Start({.node = "node-a2",
                          .dir = dir_.path(),
                          .extra = [&] {
                            auto f = TlsFlags("node-a");
                            f.insert(f.end(), {"--max-imports-per-peer", "1"});
                            return f;
                          }()});
  ASSERT_TRUE(x.ok()) << x.status();
  for (const char* name : {"one", "two"}) {
    RunResult r = RunCommand({SvmctlPath(), "--daemon", (*x)->control(), "export", "--pid",
                              std::to_string(exporter_->pid()), "--addr",
                              std::to_string(exporter_->addr()), "--len",
                              std::to_string(exporter_->len()), "--name", name});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  auto b = Daemon::Start({.node = "node-b", .dir = dir_.path(), .extra = TlsFlags("node-b")});
  ASSERT_TRUE(b.ok()) << b.status();
  auto cb = (*b)->Connect();
  ASSERT_TRUE(cb->Import((*x)->peer(), "one").ok());
  ASSERT_TRUE(ReadBytes(*cb, "one", 0, exporter_->len(), /*fresh=*/true).ok());
  // Another name, the same certificate.
  auto b2 = Daemon::Start({.node = "node-b2", .dir = dir_.path(), .extra = TlsFlags("node-b")});
  ASSERT_TRUE(b2.ok()) << b2.status();
  auto cb2 = (*b2)->Connect();
  auto second = cb2->Import((*x)->peer(), "two");
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), "peer node-b")) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), "--max-imports-per-peer=1")) << second.status();
  // Another certificate is another peer.
  auto c = Daemon::Start({.node = "node-c", .dir = dir_.path(), .extra = TlsFlags("node-c")});
  ASSERT_TRUE(c.ok()) << c.status();
  auto cc = (*c)->Connect();
  EXPECT_TRUE(cc->Import((*x)->peer(), "two").ok());
  EXPECT_TRUE(ReadBytes(*cb, "one", 0, exporter_->len(), /*fresh=*/true).ok());
}

TEST_F(Tls, PeerWithoutCertificateIsRefused) {
  ExpectHandshakeRefused("", "peer did not return a certificate");
}

TEST_F(Tls, DaemonWithoutTlsIsRefusedAndWarned) {
  auto n = Daemon::Start({.node = "plain", .dir = dir_.path()});
  ASSERT_TRUE(n.ok()) << n.status();
  // Without TLS flags svmd says so, once.
  EXPECT_EQ(LinesContaining(Log("plain"),
                       "warning [svmd] peer authentication is OFF and peer traffic is unencrypted"),
            1);
  EXPECT_EQ(LinesContaining(ALog(), "unencrypted"), 0);
  RunResult r = RunCommand({SvmctlPath(), "--daemon", (*n)->control(), "import", "--peer",
                            a_->peer(), "--name", "secret"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "UNAVAILABLE")) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "without TLS")) << r.err;
  r = RunCommand({SvmctlPath(), "--daemon", (*n)->control(), "imports", "--json"});
  EXPECT_FALSE(absl::StrContains(r.out, "secret")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, std::to_string(exporter_->len()))) << r.out;
  ASSERT_TRUE(WaitForLog(ALog(), "tls handshake with a peer failed", absl::Seconds(5)));
  absl::SleepFor(Scaled(absl::Seconds(2)));  // gRPC retries the connection meanwhile
  EXPECT_EQ(LinesContaining(ALog(), "tls handshake with a peer failed"), 1) << FileText(ALog());
  EXPECT_EQ(LinesContaining(ALog(), "subscribed to"), 0);
}

TEST_F(Tls, CertificateFromAnotherCaIsRefused) {
  ExpectHandshakeRefused("node-x", "certificate verify failed");
}

TEST_F(Tls, ExpiredCertificateIsRefused) {
  ExpectHandshakeRefused("node-old", "certificate verify failed");
}

TEST_F(Tls, PeerNotOnTheAccessListLearnsNothing) {
  v1::ExportDescriptor d;
  grpc::Status st = Describe("node-c", "secret", &d);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << st.error_message();
  ExpectEmpty(d);
  EXPECT_FALSE(absl::StrContains(st.error_message(), std::to_string(exporter_->len())));
  EXPECT_EQ(LinesContaining(ALog(), "(node-c) refused export 'secret'"), 1) << FileText(ALog());
  // The same peer sees an export without a list (its channel is fine), and
  // cannot Sync the listed one.
  st = Describe("node-c", "open", &d);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(d.len(), exporter_->len());
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
    v1::PeerSyncRequest req;
    req.set_name("secret");
    v1::PeerSyncResponse resp;
    EXPECT_EQ(PeerAs("node-c")->Sync(&ctx, req, &resp).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  // A real importing daemon with node-c's certificate.
  auto c = Daemon::Start({.node = "node-c", .dir = dir_.path(), .extra = TlsFlags("node-c")});
  ASSERT_TRUE(c.ok()) << c.status();
  RunResult r = RunCommand({SvmctlPath(), "--daemon", (*c)->control(), "import", "--peer",
                            a_->peer(), "--name", "secret"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r.err, "PERMISSION_DENIED")) << r.err;
  r = RunCommand({SvmctlPath(), "--daemon", (*c)->control(), "imports", "--json"});
  EXPECT_FALSE(absl::StrContains(r.out, "secret")) << r.out;
  EXPECT_EQ(LinesContaining(ALog(), "(node-c) refused export 'secret'"), 3) << FileText(ALog());
  EXPECT_EQ(LinesContaining(ALog(), "subscribed to"), 0);
  // node-b, on the list, imports.
  auto b = Daemon::Start({.node = "node-b", .dir = dir_.path(), .extra = TlsFlags("node-b")});
  ASSERT_TRUE(b.ok()) << b.status();
  auto cb = (*b)->Connect();
  auto info = cb->Import(a_->peer(), "secret");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->len, exporter_->len());
}

// A data connection of the test's own, driven by hand as a hostile peer
// would: SetupData over mutual TLS, then the tcp frames of
// daemon/transport/frame.h (HELLO with the session token, FETCH).
class RawDataConnection : RawFrames {
 public:
  // Answer to one FETCH: the status code, its message, and the page bytes.
  struct Reply {
    uint32_t code = ~0u;
    std::string msg;
    size_t page_bytes = 0;
    uint32_t first_word = 0;
  };

  static std::unique_ptr<RawDataConnection> Open(v1::Peer::Stub& peer, const std::string& host,
                                                 const std::string& node, std::string* token) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
    v1::SetupDataRequest req;
    req.set_node(node);
    req.set_transport("tcp");
    v1::SetupDataResponse resp;
    grpc::Status st = peer.SetupData(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    v1::TcpEndpoint ep;
    if (!st.ok() || !transport::UnpackEndpoint(resp.endpoint(), &ep)) return nullptr;
    *token = resp.session_token();
    auto c = std::unique_ptr<RawDataConnection>(new RawDataConnection());
    c->fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(static_cast<uint16_t>(ep.port()));
    if (::inet_pton(AF_INET, host.c_str(), &sin.sin_addr) != 1 ||
        ::connect(c->fd_.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) != 0) {
      ADD_FAILURE() << "connect to " << host << ":" << ep.port() << ": " << std::strerror(errno);
      return nullptr;
    }
    timeval tv{static_cast<time_t>(absl::ToInt64Seconds(Scaled(absl::Seconds(10)))), 0};
    ::setsockopt(c->fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (!c->Hello(*token)) {
      ADD_FAILURE() << "the exporter did not answer the HELLO";
      return nullptr;
    }
    return c;
  }

  Reply Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages) {
    transport::FetchPayload f{export_id, first_page, npages, 0};
    Reply r;
    if (!Send(transport::FrameType::kFetch, ++next_id_, &f, sizeof(f))) return r;
    transport::FrameHeader h;
    transport::FetchRespPayload p{};
    std::string payload;
    if (!NextFetchResp(&h, &p, &payload) || h.id != next_id_) {
      ADD_FAILURE() << "no answer to FETCH " << next_id_ << " (last frame type " << int{h.type} << ")";
      return r;
    }
    r.code = p.code;
    if (p.code != 0) {
      r.msg = payload.substr(sizeof(p));
    } else {
      r.page_bytes = payload.size() - sizeof(p);
      if (r.page_bytes >= sizeof(r.first_word)) std::memcpy(&r.first_word, payload.data() + sizeof(p), 4);
    }
    return r;
  }

 private:
  RawDataConnection() = default;

  uint64_t next_id_ = 0;
};

// A peer that is authenticated but not on an export's list, and learnt the
// export's id (here from a listed peer's descriptor: a leak), fetches it
// over a data connection of its own: refused with the answer an unknown id
// gets (no page, no size), and the exporter logs it once. The connection
// itself works: an export the peer subscribed to is served on it.
TEST_F(Tls, PeerNotOnTheListCannotFetchAnExportByItsIdOverItsOwnConnection) {
  v1::ExportDescriptor leaked, open;
  ASSERT_TRUE(Describe("node-b", "secret", &leaked).ok());
  ASSERT_NE(leaked.export_id(), 0u);
  ASSERT_TRUE(Describe("node-c", "open", &open).ok());
  auto peer = PeerAs("node-c");
  std::string token;
  auto conn = RawDataConnection::Open(*peer, a_->peer().substr(0, a_->peer().rfind(':')), "node-c",
                                      &token);
  ASSERT_NE(conn, nullptr);

  const auto forged = conn->Fetch(leaked.export_id(), 0, 1);
  EXPECT_EQ(forged.code, static_cast<uint32_t>(absl::StatusCode::kPermissionDenied)) << forged.msg;
  EXPECT_EQ(forged.page_bytes, 0u);
  // Word for word what a made-up id gets, and pages past the end too.
  for (const auto& other : {conn->Fetch(leaked.export_id() ^ 1, 0, 1),
                            conn->Fetch(leaked.export_id(), 1u << 20, 1)}) {
    EXPECT_EQ(other.code, forged.code);
    EXPECT_EQ(other.msg, forged.msg);
  }
  // Subscribing with the leaked id over the peer API: refused as an unknown id is.
  auto subscribe = [&](uint64_t id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
    v1::SubscribeRequest req;
    req.set_session_token(token);
    req.set_export_id(id);
    v1::SubscribeResponse resp;
    return peer->Subscribe(&ctx, req, &resp);
  };
  const grpc::Status sub = subscribe(leaked.export_id());
  EXPECT_EQ(sub.error_code(), grpc::StatusCode::PERMISSION_DENIED) << sub.error_message();
  EXPECT_EQ(sub.error_message(), subscribe(leaked.export_id() ^ 1).error_message());
  EXPECT_EQ(LinesContaining(ALog(), "subscribed to"), 0);

  // The connection is fine: subscribed to "open", it is served that.
  ASSERT_TRUE(subscribe(open.export_id()).ok());
  const auto served = conn->Fetch(open.export_id(), 2, 1);
  EXPECT_EQ(served.code, 0u) << served.msg;
  EXPECT_EQ(served.page_bytes, 4096u);
  EXPECT_EQ(served.first_word, 3u);  // page p is stamped p + 1
  // ...and still not the secret one.
  EXPECT_EQ(conn->Fetch(leaked.export_id(), 0, 1).code, forged.code);
  EXPECT_EQ(LinesContaining(ALog(), "which it did not subscribe to; refused"), 1) << FileText(ALog());
  EXPECT_EQ(LinesContaining(ALog(), "from node node-c fetched export id"), 1) << FileText(ALog());
}

// svmd does not start with TLS files that cannot work: an expired
// certificate, a key of another certificate, a certificate its CA did not
// sign, or only some of the three flags (exit 2, the message names the flag).
TEST_F(Tls, UnusableTlsFilesStopTheDaemonAtStart) {
  const std::string p = ca_ + "/";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {TlsFlags("node-old"), "--tls-cert"},
      {{"--tls-cert", p + "node-b.pem", "--tls-key", p + "node-c.key", "--tls-ca", p + "ca.pem"},
       "--tls-key"},
      {TlsFlags("node-x"), "--tls-cert"},
      {{"--tls-cert", p + "node-b.pem", "--tls-key", p + "node-b.key"}, "--tls-ca"},
  };
  for (const auto& [flags, named] : cases) {
    std::vector<std::string> argv = {SvmdPath(), "--control", "unix:" + dir_.path() + "/bad.sock",
                                     "--peer-listen", "127.0.0.1:0", "--source", TestSource()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    RunResult r = RunCommand(argv, absl::Seconds(20));
    EXPECT_EQ(r.exit_code, 2) << absl::StrJoin(flags, " ") << ": " << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, named)) << r.err;
  }
}

}  // namespace
}  // namespace svm::testing
