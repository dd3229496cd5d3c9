// svmd's limits (docs/operations.md, "Limits"), on real daemons: a client
// (uid) that opens sessions or exports past its limit, and a peer that
// imports past its limit, get RESOURCE_EXHAUSTED naming the flag; a
// refusal is counted in svm_limit_refusals_total and logged once per
// (who, limit), not per request; freeing use admits again; SIGHUP raises
// or lowers a limit from the flagfile without dropping anything held; and
// a flood leaves svmd's resident memory within a bound. Per peer, over
// its data connections: how many it holds, and the fetches waiting on
// them all together.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/fd.h"
#include "daemon/transport/endpoint_codec.h"
#include "daemon/transport/frame.h"
#include "gtest/gtest.h"
#include "svm/v1/peer.grpc.pb.h"
#include "svm/v1/transport.pb.h"
#include "tests/integration/harness.h"
#include "tests/integration/raw_frames.h"

namespace svm::testing {
namespace {

bool WaitForLog(const std::string& path, const std::string& needle, int count = 1,
                absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + Scaled(timeout);
  while (LinesContaining(path, needle) < count) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return true;
}

// The value of `series` (exactly as exposed) in node's metrics; -1 when absent.
double Metric(const std::string& log_path, const std::string& series) {
  const std::string log = FileText(log_path);
  const std::string kSays = "metrics on http://";
  const size_t at = log.find(kSays);
  if (at == std::string::npos) return -1;
  const size_t begin = at + kSays.size();
  const std::string addr = log.substr(begin, log.find("/metrics", begin) - begin);
  RunResult r = RunCommand({CURL_PATH, "-sf", absl::StrCat("http://", addr, "/metrics")});
  for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " ")) continue;
    double v = 0;
    if (absl::SimpleAtod(line, &v)) return v;
  }
  return -1;
}

// Memory to export: private pages of this process, touched.
struct Region {
  explicit Region(size_t pages) : len(pages * 4096) {
    p = static_cast<uint8_t*>(::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    for (size_t i = 0; i < len; i += 4096) p[i] = static_cast<uint8_t>(i / 4096 + 1);
  }
  ~Region() { ::munmap(p, len); }
  uint8_t* p;
  size_t len;
};

class Limits : public ::testing::Test {
 protected:
  // A daemon whose limits come from a flagfile (SIGHUP re-reads it).
  std::unique_ptr<Daemon> Start(const std::string& node, const std::string& limits) {
    WriteConf(node, limits);
    auto d = Daemon::Start({.node = node,
                            .dir = dir_.path(),
                            .extra = {absl::StrCat("--flagfile=", Conf(node)), "--metrics-listen",
                                      "127.0.0.1:0"}});
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }
  std::string Conf(const std::string& node) { return absl::StrCat(dir_.path(), "/", node, ".conf"); }
  std::string Log(const std::string& node) { return absl::StrCat(dir_.path(), "/", node, ".log"); }
  void WriteConf(const std::string& node, const std::string& limits) {
    std::ofstream(Conf(node)) << limits;
  }
  // Rewrites the flagfile and reloads; waits for the reload to finish.
  void Reload(Daemon& d, const std::string& node, const std::string& limits) {
    const int before = LinesContaining(Log(node), "reload: done");
    WriteConf(node, limits);
    d.process().Signal(SIGHUP);
    ASSERT_TRUE(WaitForLog(Log(node), "reload: done", before + 1)) << FileText(Log(node));
  }

  TempDir dir_;
};

// Connects, retrying while a closed session is still being torn down by
// svmd (its close is seen asynchronously).
absl::StatusOr<std::unique_ptr<Client>> ConnectEventually(const Daemon& d) {
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(5));
  for (;;) {
    auto c = Client::Connect(d.control());
    if (c.ok() || c.status().code() != absl::StatusCode::kResourceExhausted || absl::Now() > deadline) {
      return c;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

TEST_F(Limits, SessionsPerClient) {
  auto a = Start("a", "--max-sessions-per-client=3\n");
  ASSERT_NE(a, nullptr);
  std::vector<std::unique_ptr<Client>> held;
  for (int i = 0; i < 3; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_TRUE(c.ok()) << i << ": " << c.status();
    held.push_back(std::move(*c));
  }
  // A flood of sessions from the same uid: every one refused, one log line.
  for (int i = 0; i < 50; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << i << ": " << c.status();
    ASSERT_TRUE(absl::StrContains(c.status().message(), "--max-sessions-per-client=3")) << c.status();
    ASSERT_TRUE(absl::StrContains(c.status().message(), absl::StrCat("uid ", ::getuid())))
        << c.status();
  }
  EXPECT_EQ(LinesContaining(Log("a"), "refused: uid"), 1) << FileText(Log("a"));
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"sessions_per_client\"}"), 50);
  // The held sessions work.
  for (auto& c : held) EXPECT_TRUE(c->Status().ok());
  // Use drops: a session closes, another may open.
  held.pop_back();
  auto again = ConnectEventually(*a);
  ASSERT_TRUE(again.ok()) << again.status();
  held.push_back(std::move(*again));

  // SIGHUP raises it: two more.
  Reload(*a, "a", "--max-sessions-per-client=5\n");
  EXPECT_EQ(Metric(Log("a"), "svm_limit{limit=\"sessions_per_client\"}"), 5);
  for (int i = 0; i < 2; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_TRUE(c.ok()) << i << ": " << c.status();
    held.push_back(std::move(*c));
  }
  EXPECT_EQ(Client::Connect(a->control()).status().code(), absl::StatusCode::kResourceExhausted);
  // SIGHUP lowers it below use: the five held sessions stay and work; new ones are refused.
  Reload(*a, "a", "--max-sessions-per-client=2\n");
  EXPECT_TRUE(WaitForLog(Log("a"), "reload: --max-sessions-per-client 2 (was 5)"));
  for (auto& c : held) EXPECT_TRUE(c->Status().ok());
  auto lowered = Client::Connect(a->control());
  EXPECT_EQ(lowered.status().code(), absl::StatusCode::kResourceExhausted) << lowered.status();
  EXPECT_TRUE(absl::StrContains(lowered.status().message(), "--max-sessions-per-client=2"));
  // Below the lowered limit again (3 closed: 2 left), one more is refused;
  // at 1 left, one is admitted.
  held.resize(1);
  auto after = ConnectEventually(*a);
  EXPECT_TRUE(after.ok()) << after.status();
  // A bad value changes nothing.
  Reload(*a, "a", "--max-sessions-per-client=0\n");
  EXPECT_TRUE(WaitForLog(Log("a"), "svmd keeps its current limits"));
  EXPECT_EQ(Metric(Log("a"), "svm_limit{limit=\"sessions_per_client\"}"), 2);
}

// --max-sessions counts the sessions of all clients together. One uid here,
// with --max-sessions-per-client above it, so only the global cap refuses.
TEST_F(Limits, SessionsOfAllClientsTogether) {
  auto a = Start("a", "--max-sessions=3\n--max-sessions-per-client=8\n");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(Metric(Log("a"), "svm_limit{limit=\"sessions\"}"), 3);
  std::vector<std::unique_ptr<Client>> held;
  for (int i = 0; i < 3; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_TRUE(c.ok()) << i << ": " << c.status();
    held.push_back(std::move(*c));
  }
  for (int i = 0; i < 20; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << i << ": " << c.status();
    ASSERT_TRUE(absl::StrContains(c.status().message(), "svmd already has 3 sessions open")) << c.status();
    ASSERT_TRUE(absl::StrContains(c.status().message(), "--max-sessions=3")) << c.status();
  }
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"sessions\"}"), 20);
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"sessions_per_client\"}"), 0);
  EXPECT_EQ(LinesContaining(Log("a"), "refused: svmd"), 1) << FileText(Log("a"));
  for (auto& c : held) EXPECT_TRUE(c->Status().ok());
  // SIGHUP raises it: one more, then refused at the new value.
  Reload(*a, "a", "--max-sessions=4\n--max-sessions-per-client=8\n");
  EXPECT_EQ(Metric(Log("a"), "svm_limit{limit=\"sessions\"}"), 4);
  auto fourth = Client::Connect(a->control());
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  auto fifth = Client::Connect(a->control());
  EXPECT_EQ(fifth.status().code(), absl::StatusCode::kResourceExhausted) << fifth.status();
  EXPECT_TRUE(absl::StrContains(fifth.status().message(), "--max-sessions=4")) << fifth.status();
}

TEST_F(Limits, ExportsAndExportBytesPerClient) {
  auto a = Start("a", "--max-exports-per-client=3\n--max-export-bytes-per-client=262144\n");
  ASSERT_NE(a, nullptr);
  auto c = a->Connect();
  ASSERT_NE(c, nullptr);
  Region mem(128);  // 512 KiB
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c->Export(absl::StrCat("e", i), mem.p + i * 4096 * 8, 4096 * 8).ok()) << i;
  }
  for (int i = 0; i < 20; ++i) {
    auto r = c->Export("e3", mem.p + 3 * 4096 * 8, 4096 * 8);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
    ASSERT_TRUE(absl::StrContains(r.status().message(), "--max-exports-per-client=3")) << r.status();
  }
  EXPECT_EQ(LinesContaining(Log("a"), "refused: uid"), 1) << FileText(Log("a"));
  ASSERT_TRUE(c->Unexport("e0").ok());
  EXPECT_TRUE(c->Export("e3", mem.p + 3 * 4096 * 8, 4096 * 8).ok()) << "an unexport frees a slot";
  // Bytes: 3 x 32 KiB held, 256 KiB allowed.
  Reload(*a, "a", "--max-exports-per-client=10\n--max-export-bytes-per-client=262144\n");
  auto big = c->Export("big", mem.p + 32 * 4096, 41 * 4096);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  EXPECT_TRUE(absl::StrContains(big.status().message(), "--max-export-bytes-per-client=262144"))
      << big.status();
  EXPECT_TRUE(c->Export("big", mem.p + 32 * 4096, 40 * 4096).ok()) << "exactly at the limit";
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"exports_per_client\"}"), 20);
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"export_bytes_per_client\"}"), 1);
  // Lowered below use: every export stays.
  Reload(*a, "a", "--max-exports-per-client=1\n");
  auto list = c->ListExports();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 4u);
  EXPECT_EQ(c->Export("more", mem.p + 100 * 4096, 4096).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(Limits, ImportsPerPeer) {
  auto a = Start("a", "--max-imports-per-peer=2\n");
  ASSERT_NE(a, nullptr);
  auto bd = Daemon::Start({.node = "b", .dir = dir_.path()});
  ASSERT_TRUE(bd.ok()) << bd.status();
  auto& b = *bd;
  auto ca = a->Connect();
  auto cb = b->Connect();
  ASSERT_TRUE(ca && cb);
  Region mem(16);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(ca->Export(absl::StrCat("x", i), mem.p + i * 4096, 4096).ok());
  ASSERT_TRUE(cb->Import(a->peer(), "x0").ok());
  ASSERT_TRUE(cb->Import(a->peer(), "x1").ok());
  auto third = cb->Import(a->peer(), "x2");
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_TRUE(absl::StrContains(third.status().message(), "node b")) << third.status();
  EXPECT_TRUE(absl::StrContains(third.status().message(), "--max-imports-per-peer=2")) << third.status();
  EXPECT_TRUE(WaitForLog(Log("a"), "refused: node b"));
  EXPECT_GE(Metric(Log("a"), "svm_limit_refusals_total{limit=\"imports_per_peer\"}"), 1);
  // The held imports read.
  EXPECT_TRUE(ReadBytes(*cb, "x0", 0, 4096, /*fresh=*/true).ok());
  // SIGHUP raises it: the import is admitted (the importer asks again).
  Reload(*a, "a", "--max-imports-per-peer=3\n");
  auto admitted = cb->Import(a->peer(), "x2");
  if (!admitted.ok()) {
    // The failed attempt may still be answered from the importer's last
    // try until its retry time: read instead, which subscribes anew.
    const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
    while (!ReadBytes(*cb, "x2", 0, 4096, true).ok() && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(100));
    }
  }
  EXPECT_TRUE(ReadBytes(*cb, "x2", 0, 4096, /*fresh=*/true).ok());
  // Lowered below use: the three imports stay and read; a fourth is refused.
  Reload(*a, "a", "--max-imports-per-peer=1\n");
  for (const char* n : {"x0", "x1", "x2"}) {
    auto r = ReadBytes(*cb, n, 0, 4096, /*fresh=*/true);
    EXPECT_TRUE(r.ok()) << n << ": " << r.status();
  }
  EXPECT_EQ(cb->Import(a->peer(), "x3").status().code(), absl::StatusCode::kResourceExhausted);
  // Use drops: the exporter withdraws two; the importer may import again
  // (x3's refused import may retry and take one of the three slots).
  Reload(*a, "a", "--max-imports-per-peer=3\n");
  ASSERT_TRUE(ca->Unexport("x0").ok());
  ASSERT_TRUE(ca->Unexport("x1").ok());
  ASSERT_TRUE(ca->Export("x5", mem.p + 5 * 4096, 4096).ok());
  auto later = cb->Import(a->peer(), "x5");
  EXPECT_TRUE(later.ok()) << later.status();
}

// A flood that would grow an unlimited svmd: one client opening sessions
// and exports, one peer importing, far past their limits. Each is refused,
// and svmd's resident memory stays within the bound (docs/operations.md).
TEST_F(Limits, AFloodIsRefusedAndMemoryStaysBounded) {
  auto a = Start("a", "--max-sessions-per-client=8\n--max-exports-per-client=32\n"
                      "--max-imports-per-peer=16\n");
  ASSERT_NE(a, nullptr);
  auto bd = Daemon::Start({.node = "b", .dir = dir_.path()});
  ASSERT_TRUE(bd.ok()) << bd.status();
  auto cb = (*bd)->Connect();
  ASSERT_NE(cb, nullptr);
  const pid_t pid = a->process().pid();
  std::vector<std::unique_ptr<Client>> held;
  for (int i = 0; i < 7; ++i) {
    auto c = Client::Connect(a->control());
    ASSERT_TRUE(c.ok()) << c.status();
    held.push_back(std::move(*c));
  }
  auto ca = a->Connect();
  ASSERT_NE(ca, nullptr);
  Region mem(64);
  for (int i = 0; i < 32; ++i) ASSERT_TRUE(ca->Export(absl::StrCat("f", i), mem.p + i * 4096, 4096).ok());
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(cb->Import(a->peer(), absl::StrCat("f", i)).ok()) << i;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(ReadBytes(*cb, absl::StrCat("f", i), 0, 4096).ok());
  const Footprint base = FootprintOf(pid);

  int refused = 0;
  for (int i = 0; i < 300; ++i) {
    refused += Client::Connect(a->control()).status().code() == absl::StatusCode::kResourceExhausted;
    refused += ca->Export(absl::StrCat("g", i), mem.p + 40 * 4096, 4096).status().code() ==
               absl::StatusCode::kResourceExhausted;
  }
  for (int i = 16; i < 32; ++i) {
    auto imp = cb->Import(a->peer(), absl::StrCat("f", i));
    refused += imp.status().code() == absl::StatusCode::kResourceExhausted;
  }
  EXPECT_EQ(refused, 616);
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"sessions_per_client\"}"), 300);
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"exports_per_client\"}"), 300);
  EXPECT_GE(Metric(Log("a"), "svm_limit_refusals_total{limit=\"imports_per_peer\"}"), 16);
  EXPECT_EQ(LinesContaining(Log("a"), "refused: uid"), 2) << "one line per (uid, limit)";
  EXPECT_EQ(LinesContaining(Log("a"), "refused: node b"), 1) << "one line per (node, limit)";
  for (auto& c : held) EXPECT_TRUE(c->Status().ok());
  for (int i = 0; i < 16; ++i) EXPECT_TRUE(ReadBytes(*cb, absl::StrCat("f", i), 0, 4096, true).ok());
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "ASan's quarantine holds freed memory: resident memory is not checked";
#else
  if (UnderThreadSanitizer()) {
    // Seen: 92672 -> 160424 KiB over the flood under TSan, whose shadow
    // memory and sync metadata grow with every thread and lock it sees.
    GTEST_SKIP() << "TSan's shadow memory and metadata grow with use: resident memory is not checked";
  }
  const Footprint after = FootprintOf(pid);
  // The flood added no session, export or import: svmd holds what it held
  // before, plus allocator slack (16 MiB).
  EXPECT_LT(after.rss_kib, base.rss_kib + 16 * 1024) << base.ToString() << " -> " << after.ToString();
#endif
}

// The peer API of daemon d, as any peer may call it (no TLS, no token).
std::unique_ptr<v1::Peer::Stub> PeerOf(const Daemon& d) {
  return v1::Peer::NewStub(grpc::CreateChannel(d.peer(), grpc::InsecureChannelCredentials()));
}

grpc::Status SetupData(v1::Peer::Stub& peer, const std::string& node, v1::SetupDataResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
  v1::SetupDataRequest req;
  req.set_node(node);
  req.set_transport("tcp");
  return peer.SetupData(&ctx, req, resp);
}

// A tcp data connection of the test's own, driven by hand as a flooding
// peer would (the frames of daemon/transport/frame.h): SetupData, HELLO
// with the token, Subscribe, FETCHes sent without reading the answers.
class RawData : RawFrames {
 public:
  struct Reply {
    uint32_t code = ~0u;
    std::string msg;
    size_t page_bytes = 0;
  };

  static std::unique_ptr<RawData> Open(v1::Peer::Stub& peer, const std::string& node) {
    v1::SetupDataResponse resp;
    grpc::Status st = SetupData(peer, node, &resp);
    v1::TcpEndpoint ep;
    if (!st.ok() || !transport::UnpackEndpoint(resp.endpoint(), &ep)) {
      ADD_FAILURE() << "SetupData as " << node << ": " << st.error_message();
      return nullptr;
    }
    auto c = std::unique_ptr<RawData>(new RawData());
    c->peer_ = &peer;
    c->token_ = resp.session_token();
    c->fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(static_cast<uint16_t>(ep.port()));
    ::inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    if (::connect(c->fd_.get(), reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) != 0) {
      ADD_FAILURE() << "connect: " << std::strerror(errno);
      return nullptr;
    }
    timeval tv{static_cast<time_t>(absl::ToInt64Seconds(Scaled(absl::Seconds(10)))), 0};
    ::setsockopt(c->fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (!c->Hello(c->token_)) {
      ADD_FAILURE() << "the exporter did not answer the HELLO";
      return nullptr;
    }
    return c;
  }

  grpc::Status Subscribe(uint64_t export_id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + Scaled(absl::Seconds(5))));
    v1::SubscribeRequest req;
    req.set_session_token(token_);
    req.set_export_id(export_id);
    v1::SubscribeResponse resp;
    return peer_->Subscribe(&ctx, req, &resp);
  }
  bool SendFetch(uint64_t export_id, uint64_t first_page, uint32_t npages) {
    transport::FetchPayload f{export_id, first_page, npages, 0};
    return Send(transport::FrameType::kFetch, ++next_id_, &f, sizeof(f));
  }
  // The next fetch answer (INVALs skipped).
  Reply NextReply() {
    Reply r;
    transport::FrameHeader h;
    transport::FetchRespPayload p{};
    std::string payload;
    if (!NextFetchResp(&h, &p, &payload)) return r;
    r.code = p.code;
    if (p.code != 0) {
      r.msg = payload.substr(sizeof(p));
    } else {
      r.page_bytes = payload.size() - sizeof(p);
    }
    return r;
  }
  Reply Fetch(uint64_t export_id, uint64_t first_page, uint32_t npages) {
    if (!SendFetch(export_id, first_page, npages)) return {};
    return NextReply();
  }

 private:
  RawData() = default;

  v1::Peer::Stub* peer_ = nullptr;
  std::string token_;
  uint64_t next_id_ = 0;
};

// SetupData as node until it is admitted (a closed connection is seen by
// the exporter asynchronously) or the deadline passes.
grpc::Status SetupDataEventually(v1::Peer::Stub& peer, const std::string& node) {
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  for (;;) {
    v1::SetupDataResponse resp;
    grpc::Status st = SetupData(peer, node, &resp);
    if (st.ok() || absl::Now() > deadline) return st;
    absl::SleepFor(absl::Milliseconds(50));
  }
}

// --max-data-connections-per-peer: SetupData past it is refused naming the
// flag (counted, logged once); another peer and the held connections are
// unaffected; a connection that closes gives its slot back, and so does a
// SIGKILLed importer daemon (its restart imports again); SIGHUP raises it.
TEST_F(Limits, DataConnectionsPerPeer) {
  auto a = Start("a", "--max-data-connections-per-peer=2\n");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(Metric(Log("a"), "svm_limit{limit=\"data_connections_per_peer\"}"), 2);
  auto bd = Daemon::Start({.node = "b", .dir = dir_.path(), .transport = "tcp"});
  ASSERT_TRUE(bd.ok()) << bd.status();
  auto& b = *bd;
  auto ca = a->Connect();
  auto cb = b->Connect();
  ASSERT_TRUE(ca && cb);
  Region mem(4);
  ASSERT_TRUE(ca->Export("x", mem.p, mem.len).ok());
  ASSERT_TRUE(cb->Import(a->peer(), "x").ok());  // svmd b: one data connection
  ASSERT_TRUE(ReadBytes(*cb, "x", 0, 4096, /*fresh=*/true).ok());

  auto peer = PeerOf(*a);
  auto raw = RawData::Open(*peer, "b");  // b's second: connected
  ASSERT_NE(raw, nullptr);
  for (int i = 0; i < 20; ++i) {
    v1::SetupDataResponse resp;
    grpc::Status st = SetupData(*peer, "b", &resp);
    ASSERT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << i << ": " << st.error_message();
    ASSERT_TRUE(absl::StrContains(st.error_message(), "node b already holds 2 data connections"))
        << st.error_message();
    ASSERT_TRUE(absl::StrContains(st.error_message(), "--max-data-connections-per-peer=2"))
        << st.error_message();
  }
  EXPECT_EQ(LinesContaining(Log("a"), "refused: node b already holds"), 1) << FileText(Log("a"));
  EXPECT_EQ(Metric(Log("a"), "svm_limit_refusals_total{limit=\"data_connections_per_peer\"}"), 20);
  v1::SetupDataResponse other;
  EXPECT_TRUE(SetupData(*peer, "c", &other).ok()) << "another peer has its own slots";
  // The held connections work: svmd b's import reads, the raw one is served.
  EXPECT_TRUE(ReadBytes(*cb, "x", 0, 4096, /*fresh=*/true).ok());

  // A closed connection gives its slot back; the offer that takes it is
  // not taken up, but holds it meanwhile.
  raw.reset();
  ASSERT_TRUE(SetupDataEventually(*peer, "b").ok()) << "the closed connection's slot";
  v1::SetupDataResponse resp;
  EXPECT_EQ(SetupData(*peer, "b", &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);

  // svmd b killed: its connection's slot comes back, and b restarted
  // under the same name imports again.
  b->Kill();
  ASSERT_TRUE(b->Restart().ok());
  cb = b->Connect();
  ASSERT_NE(cb, nullptr);
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(15));
  absl::Status read = absl::UnknownError("not read");
  while (!read.ok() && absl::Now() < deadline) {
    if (cb->Import(a->peer(), "x").ok()) read = ReadBytes(*cb, "x", 0, 4096, /*fresh=*/true).status();
    if (!read.ok()) absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_TRUE(read.ok()) << read << "\n" << FileText(Log("a"));
  EXPECT_EQ(SetupData(*peer, "b", &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << "restarted b's connection and the open offer hold both slots";

  // SIGHUP raises it: one more.
  Reload(*a, "a", "--max-data-connections-per-peer=3\n");
  EXPECT_TRUE(SetupData(*peer, "b", &resp).ok());
  EXPECT_EQ(SetupData(*peer, "b", &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

// A killed importer daemon gives its data connection's slot back, on the
// transport under test (tcp, or rdma in the VM tier: there the slot goes
// with the queue pair and its registered buffers): with a bound of one,
// every restart of the importer under the same name connects and reads.
TEST_F(Limits, AKilledImportersDataConnectionSlotComesBack) {
  auto a = Start("a", "--max-data-connections-per-peer=1\n");
  ASSERT_NE(a, nullptr);
  auto bd = Daemon::Start({.node = "b", .dir = dir_.path()});
  ASSERT_TRUE(bd.ok()) << bd.status();
  auto& b = *bd;
  auto ca = a->Connect();
  ASSERT_NE(ca, nullptr);
  Region mem(4);
  ASSERT_TRUE(ca->Export("x", mem.p, mem.len).ok());
  for (int round = 0; round < 3; ++round) {
    if (round > 0) {
      b->Kill();
      ASSERT_TRUE(b->Restart().ok());
    }
    auto cb = b->Connect();
    ASSERT_NE(cb, nullptr);
    const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(15));
    absl::Status read = absl::UnknownError("not read");
    while (!read.ok() && absl::Now() < deadline) {
      if (cb->Import(a->peer(), "x").ok()) read = ReadBytes(*cb, "x", 0, 4096, /*fresh=*/true).status();
      if (!read.ok()) absl::SleepFor(absl::Milliseconds(200));
    }
    ASSERT_TRUE(read.ok()) << "round " << round << ": " << read << "\n" << FileText(Log("a"));
  }
}

// --max-pending-fetches-per-peer counts the fetches waiting on all of a
// peer's data connections together: one connection that does not read its
// answers fills the peer's share, and the peer's other connection is
// refused though nothing waits on it; another peer is served; when the
// flooding connection closes, its waiting fetches stop counting.
TEST_F(Limits, PendingFetchesPerPeerAcrossItsDataConnections) {
  auto a = Start("a", "--max-pending-fetches-per-peer=8\n");
  ASSERT_NE(a, nullptr);
  auto ca = a->Connect();
  ASSERT_NE(ca, nullptr);
  Region mem(256);  // 1 MiB: one fetch's largest answer
  ASSERT_TRUE(ca->Export("p", mem.p, mem.len).ok());
  auto peer = PeerOf(*a);
  v1::ExportDescriptor desc;
  {
    grpc::ClientContext ctx;
    v1::DescribeExportRequest req;
    req.set_name("p");
    ASSERT_TRUE(peer->DescribeExport(&ctx, req, &desc).ok());
  }
  auto flood = RawData::Open(*peer, "b");
  auto second = RawData::Open(*peer, "b");
  auto c = RawData::Open(*peer, "c");
  ASSERT_TRUE(flood && second && c);
  for (RawData* r : {flood.get(), second.get(), c.get()}) ASSERT_TRUE(r->Subscribe(desc.export_id()).ok());
  EXPECT_EQ(second->Fetch(desc.export_id(), 0, 1).code, 0u);

  // 1 MiB answers that nobody reads: a few fill the socket, the rest wait.
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(flood->SendFetch(desc.export_id(), 0, 256));
  const std::string refusals = "svm_limit_refusals_total{limit=\"pending_fetches_per_peer\"}";
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  while (Metric(Log("a"), refusals) < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  ASSERT_GE(Metric(Log("a"), refusals), 1) << FileText(Log("a"));

  const auto refused = second->Fetch(desc.export_id(), 0, 1);
  EXPECT_EQ(refused.code, static_cast<uint32_t>(absl::StatusCode::kResourceExhausted)) << refused.msg;
  EXPECT_TRUE(absl::StrContains(refused.msg, "node b has")) << refused.msg;
  EXPECT_TRUE(absl::StrContains(refused.msg, "waiting on its 2 data connections")) << refused.msg;
  EXPECT_TRUE(absl::StrContains(refused.msg, "--max-pending-fetches-per-peer=8")) << refused.msg;
  const auto served = c->Fetch(desc.export_id(), 1, 1);
  EXPECT_EQ(served.code, 0u) << "another peer: " << served.msg;
  EXPECT_EQ(served.page_bytes, 4096u);
  EXPECT_EQ(LinesContaining(Log("a"), "refused: node b has"), 1) << FileText(Log("a"));

  flood.reset();  // closed: its waiting answers go with it
  const absl::Time after = absl::Now() + Scaled(absl::Seconds(10));
  RawData::Reply r = second->Fetch(desc.export_id(), 0, 1);
  while (r.code != 0 && absl::Now() < after) {
    absl::SleepFor(absl::Milliseconds(50));
    r = second->Fetch(desc.export_id(), 0, 1);
  }
  EXPECT_EQ(r.code, 0u) << r.msg;
}

}  // namespace
}  // namespace svm::testing
