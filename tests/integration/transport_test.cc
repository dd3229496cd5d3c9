// --transport auto: which transports a daemon runs, what `svmctl status`
// says about its RDMA device (or why there is none), per-peer negotiation,
// the fallback to tcp when an RDMA connection cannot be set up, and the
// RLIMIT_MEMLOCK error an importer sees when there is nothing to fall back
// to.
//
// Daemons are started by this file (not harness::Daemon) because each one
// needs its own --transport whatever $SVM_TEST_TRANSPORT says, and some run
// under a wrapper (prlimit + setpriv) that shrinks what they may pin.
//
// Without an active RDMA device (the host tier) only the first tests run;
// the rdma ones skip with the reason svmd gives, or fail when
// SVM_EXPECT_RDMA=1 (the VM tier). SVM_EXPECT_ODP=1 (the unstable kernel's
// entry) requires the ODP registration; otherwise the expected registration
// is derived from the RC READ ODP capability svmd reports.
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPages = 64;
constexpr int kFill = 0x3c;
// The exporter's pinned budget in the fallback tests: its per-connection
// message buffers (64 KiB) fit, its 2 MiB staging buffers do not.
constexpr uint64_t kSmallMemlock = 1ull << 20;

bool EnvSet(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One svmd with its own transport flags, optionally under a wrapper command.
class Node {
 public:
  struct Options {
    std::string dir;
    std::string name;
    std::string transport = "auto";
    std::vector<std::string> extra;    // more svmd flags
    std::vector<std::string> wrapper;  // argv prefix, e.g. prlimit ... --
  };

  static absl::StatusOr<std::unique_ptr<Node>> Start(const Options& o) {
    auto n = std::unique_ptr<Node>(new Node());
    n->control_ = absl::StrCat("unix:", o.dir, "/", o.name, ".sock");
    n->log_ = absl::StrCat(o.dir, "/", o.name, ".log");
    std::vector<std::string> argv = o.wrapper;
    for (const std::string& a :
         {SvmdPath(), std::string("--control"), n->control_, std::string("--peer-listen"),
          std::string("127.0.0.1:0"), std::string("--data-listen"), std::string("127.0.0.1:0"),
          std::string("--node"), o.name, std::string("--socket-mode"), std::string("0666"),
          std::string("--log-level"), std::string("debug"), std::string("--source"), TestSource(),
          std::string("--transport"), o.transport}) {
      argv.push_back(a);
    }
    argv.push_back("--peer-timeout-ms");
    argv.push_back(std::to_string(absl::ToInt64Milliseconds(Scaled(absl::Seconds(2)))));
    argv.push_back("--fetch-timeout-ms");
    argv.push_back(std::to_string(absl::ToInt64Milliseconds(Scaled(absl::Milliseconds(1500)))));
    for (const std::string& e : o.extra) argv.push_back(e);
    Subprocess::Options so;
    so.argv = argv;
    so.log_path = n->log_;
    auto p = Subprocess::Start(so);
    if (!p.ok()) return p.status();
    n->proc_ = std::move(*p);
    const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
    while (absl::Now() < deadline) {
      if (!n->proc_->running()) {
        return absl::InternalError(absl::StrCat("svmd exited during startup: ", Slurp(n->log_)));
      }
      if (access(n->control_.substr(5).c_str(), F_OK) == 0) {
        auto c = Client::Connect(n->control_);
        if (c.ok()) {
          auto s = (*c)->Status();
          if (s.ok()) {
            n->peer_ = s->peer_listen;
            n->client_ = std::move(*c);
            return n;
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return absl::DeadlineExceededError("svmd did not become ready");
  }

  const std::string& control() const { return control_; }
  const std::string& peer() const { return peer_; }
  const std::string& log() const { return log_; }
  pid_t pid() const { return proc_->pid(); }
  Client& client() { return *client_; }
  DaemonStatus Status() {
    auto s = client_->Status();
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : DaemonStatus();
  }
  uint64_t Counter(const std::string& name) {
    auto s = Status();
    auto it = s.counters.find(name);
    return it == s.counters.end() ? 0 : it->second;
  }
  RunResult Svmctl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {SvmctlPath(), "--daemon", control_};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, Scaled(absl::Seconds(20)));
  }

 private:
  Node() = default;
  std::string control_, peer_, log_;
  std::unique_ptr<Subprocess> proc_;
  std::unique_ptr<Client> client_;
};

// svm-exporter: kPages pages filled with kFill, exported through node.
class ExportingProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ExportingProcess>> Start(const Node& node,
                                                                 const std::string& name) {
    Subprocess::Options so;
    so.argv = {ExporterPath(), "--daemon", node.control(),          "--name",
               name,           "--pages",  std::to_string(kPages), "--fill",
               std::to_string(kFill)};
    auto p = Subprocess::Start(so);
    if (!p.ok()) return p.status();
    auto e = std::unique_ptr<ExportingProcess>(new ExportingProcess());
    e->proc_ = std::move(*p);
    auto line = e->proc_->ReadLine(Scaled(absl::Seconds(10)));
    if (!line.ok() || !absl::StartsWith(*line, "ready")) {
      return absl::InternalError(absl::StrCat("exporter did not start: ",
                                              line.ok() ? *line : line.status().ToString()));
    }
    return e;
  }
  absl::StatusOr<std::string> Command(const std::string& cmd) {
    if (auto st = proc_->WriteLine(cmd); !st.ok()) return st;
    return proc_->ReadLine(Scaled(absl::Seconds(20)));
  }

 private:
  std::unique_ptr<Subprocess> proc_;
};

// Imports `name` from exporter into importer and checks that reads return
// the exporter's live bytes (the initial fill, then a store made after the
// import, read fresh).
void ExpectLiveReads(Node& importer, ExportingProcess& exp, const std::string& name) {
  auto all = ReadBytes(importer.client(), name, 0, kPages * 4096);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, std::string(kPages * 4096, static_cast<char>(kFill)));
  auto r = exp.Command("fill 3 2 90");  // pages 3..4 := 'Z'
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(absl::StartsWith(*r, "ok")) << *r;
  auto fresh = ReadBytes(importer.client(), name, 2 * 4096, 4 * 4096, /*fresh=*/true);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(*fresh, std::string(4096, static_cast<char>(kFill)) + std::string(2 * 4096, 'Z') +
                        std::string(4096, static_cast<char>(kFill)));
}

ImportInfo ImportInfoOf(Node& importer, const std::string& name) {
  auto l = importer.client().ListImports();
  EXPECT_TRUE(l.ok()) << l.status();
  if (l.ok()) {
    for (auto& i : *l) {
      if (i.name == name) return i;
    }
  }
  ADD_FAILURE() << "no import named " << name;
  return ImportInfo();
}

std::string Join(const std::vector<std::string>& v) {
  return absl::StrJoin(v, ",");
}

// Skips (or fails under SVM_EXPECT_RDMA=1) when node runs no rdma transport.
#define REQUIRE_RDMA(node)                                                                   \
  do {                                                                                       \
    auto st_ = (node).Status();                                                              \
    if (!st_.rdma.has_value()) {                                                             \
      if (EnvSet("SVM_EXPECT_RDMA")) {                                                       \
        FAIL() << "SVM_EXPECT_RDMA=1 but svmd runs no rdma: " << st_.rdma_unavailable;       \
      }                                                                                      \
      GTEST_SKIP() << "no usable rdma device: " << st_.rdma_unavailable;                     \
    }                                                                                        \
  } while (0)

// The registration svmd must have chosen in auto mode on this device.
std::string ExpectedRegistration(const RdmaDeviceStatus& r) {
  if (EnvSet("SVM_EXPECT_ODP")) return "odp";
  return r.odp_rc_read ? "odp" : "pinned";
}

// A wrapper that runs svmd with RLIMIT_MEMLOCK = kSmallMemlock and without
// CAP_IPC_LOCK (which would exempt it from the limit).
std::vector<std::string> SmallMemlockWrapper() {
  return {"/usr/bin/prlimit",
          absl::StrCat("--memlock=", kSmallMemlock, ":", kSmallMemlock),
          "/usr/bin/setpriv",
          "--bounding-set=-ipc_lock",
          "--inh-caps=-ipc_lock",
          "--"};
}

// Proves the wrapper took effect on the running daemon.
void ExpectSmallMemlock(pid_t pid) {
  const std::string status = Slurp(absl::StrCat("/proc/", pid, "/status"));
  size_t at = status.find("CapEff:\t");
  ASSERT_NE(at, std::string::npos);
  const uint64_t eff = std::stoull(status.substr(at + 8, 16), nullptr, 16);
  EXPECT_EQ(eff & (1ull << 14), 0u) << "svmd still has CAP_IPC_LOCK (CapEff " << std::hex << eff << ")";
  // "Max locked memory         1048576              1048576              bytes"
  std::istringstream limits(Slurp(absl::StrCat("/proc/", pid, "/limits")));
  std::string line;
  bool seen = false;
  while (std::getline(limits, line)) {
    if (!absl::StartsWith(line, "Max locked memory")) continue;
    std::istringstream words(line.substr(17));
    std::string soft, hard;
    words >> soft >> hard;
    EXPECT_EQ(soft, std::to_string(kSmallMemlock)) << line;
    EXPECT_EQ(hard, std::to_string(kSmallMemlock)) << line;
    seen = true;
  }
  EXPECT_TRUE(seen) << "no memlock line in /proc/" << pid << "/limits";
}

class TransportTest : public ::testing::Test {
 protected:
  absl::StatusOr<std::unique_ptr<Node>> StartNode(const std::string& name,
                                                  const std::string& transport,
                                                  std::vector<std::string> extra = {},
                                                  std::vector<std::string> wrapper = {}) {
    Node::Options o;
    o.dir = dir_.path();
    o.name = name;
    o.transport = transport;
    o.extra = std::move(extra);
    o.wrapper = std::move(wrapper);
    return Node::Start(o);
  }

  TempDir dir_;
};

// --- every tier ---------------------------------------------------------------

// An auto daemon without a usable device runs tcp alone and says why; an
// importer on it reads over tcp, whatever the exporter runs. (In the VM the
// importer is kept off rxe0 with a device name that does not exist.)
TEST_F(TransportTest, AutoWithoutRdmaRunsTcpAndSaysWhy) {
  auto exporter = StartNode("exp", "auto");
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  auto importer = StartNode("imp", "auto", {"--rdma-device", "svm-no-such-device"});
  ASSERT_TRUE(importer.ok()) << importer.status();

  DaemonStatus s = (*importer)->Status();
  EXPECT_EQ(s.transport, "auto");
  EXPECT_EQ(Join(s.transports), "tcp");
  EXPECT_FALSE(s.rdma.has_value());
  EXPECT_TRUE(absl::StrContains(s.rdma_unavailable, "no rdma device")) << s.rdma_unavailable;
  RunResult cli = (*importer)->Svmctl({"status"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_TRUE(absl::StrContains(cli.out, "rdma:        unavailable: no rdma device")) << cli.out;
  EXPECT_TRUE(absl::StrContains(cli.out, "transport:   auto (running: tcp)")) << cli.out;

  // The exporter offers rdma too when it has a device (the VM), tcp always.
  DaemonStatus es = (*exporter)->Status();
  EXPECT_EQ(Join(es.transports), es.rdma.has_value() ? "rdma,tcp" : "tcp");

  auto exp = ExportingProcess::Start(**exporter, "x");
  ASSERT_TRUE(exp.ok()) << exp.status();
  auto exports = (*exporter)->client().ListExports();
  ASSERT_TRUE(exports.ok()) << exports.status();
  ASSERT_EQ(exports->size(), 1u);
  EXPECT_EQ((*exports)[0].path,
            es.rdma.has_value() ? absl::StrCat("staged/", es.rdma->registration, ",tcp") : "tcp");

  auto info = (*importer)->client().Import((*exporter)->peer(), "x");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->path, "tcp");
  EXPECT_EQ(info->fallback_reason, "");
  ExpectLiveReads(**importer, **exp, "x");
  EXPECT_EQ(ImportInfoOf(**importer, "x").path, "tcp");
  EXPECT_EQ((*importer)->Counter("rdma_fallbacks"), 0u);
}

TEST_F(TransportTest, BadTransportOptionsStopStartup) {
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--transport", "carrier-pigeon"},
        std::vector<std::string>{"--rdma-registration", "sometimes"}}) {
    std::vector<std::string> argv = {SvmdPath(), "--control",
                                     absl::StrCat("unix:", dir_.path(), "/bad.sock"),
                                     "--peer-listen", "127.0.0.1:0", "--source", TestSource()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    RunResult r = RunCommand(argv, Scaled(absl::Seconds(10)));
    EXPECT_NE(r.exit_code, 0) << flags[0];
    EXPECT_TRUE(absl::StrContains(r.err, flags[1])) << r.err;
  }
}

// --- with an rdma device (the VM tier) ---------------------------------------

TEST_F(TransportTest, BothAutoUseRdmaAndStatusDescribesTheDevice) {
  auto exporter = StartNode("exp", "auto");
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  REQUIRE_RDMA(**exporter);
  auto importer = StartNode("imp", "auto");
  ASSERT_TRUE(importer.ok()) << importer.status();

  DaemonStatus s = (*importer)->Status();
  EXPECT_EQ(s.transport, "auto");
  EXPECT_EQ(Join(s.transports), "rdma,tcp");
  EXPECT_EQ(s.rdma_unavailable, "");
  const RdmaDeviceStatus& r = *s.rdma;
  EXPECT_FALSE(r.device.empty());
  EXPECT_GE(r.port, 1u);
  // ibv_port_state_str(): "active" (rdma-core 44), "PORT_ACTIVE" (older).
  EXPECT_TRUE(r.port_state == "active" || r.port_state == "PORT_ACTIVE") << r.port_state;
  EXPECT_TRUE(absl::StrContains(r.gid, "gid[")) << r.gid;
  EXPECT_GE(r.active_mtu, 256u);
  const std::string reg = ExpectedRegistration(r);
  if (EnvSet("SVM_EXPECT_ODP")) {
    EXPECT_TRUE(r.odp_rc_read) << "SVM_EXPECT_ODP=1: no rc read odp";
  }
  EXPECT_EQ(r.registration, reg);
  EXPECT_EQ(r.odp_check, r.odp_rc_read ? "passed" : "not run");
  EXPECT_FALSE(r.liveness_listen.empty());
  RunResult cli = (*importer)->Svmctl({"status"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_TRUE(absl::StrContains(cli.out, absl::StrCat("rdma:        ", r.device, " port ")))
      << cli.out;
  EXPECT_TRUE(absl::StrContains(cli.out, absl::StrCat("registration ", reg))) << cli.out;

  auto exp = ExportingProcess::Start(**exporter, "x");
  ASSERT_TRUE(exp.ok()) << exp.status();
  auto info = (*importer)->client().Import((*exporter)->peer(), "x");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->path, absl::StrCat("staged/", reg));
  EXPECT_EQ(info->fallback_reason, "");
  ExpectLiveReads(**importer, **exp, "x");
  RunResult imports = (*importer)->Svmctl({"imports"});
  EXPECT_TRUE(absl::StrContains(imports.out, absl::StrCat("staged/", reg))) << imports.out;
  EXPECT_EQ((*importer)->Counter("rdma_fallbacks"), 0u);
}

// An exporter that runs tcp only: the importer negotiates tcp (no fallback).
TEST_F(TransportTest, TcpOnlyExporterNegotiatesTcp) {
  auto importer = StartNode("imp", "auto");
  ASSERT_TRUE(importer.ok()) << importer.status();
  REQUIRE_RDMA(**importer);
  auto exporter = StartNode("exp", "tcp");
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  DaemonStatus es = (*exporter)->Status();
  EXPECT_EQ(es.transport, "tcp");
  EXPECT_EQ(Join(es.transports), "tcp");
  EXPECT_FALSE(es.rdma.has_value());

  auto exp = ExportingProcess::Start(**exporter, "x");
  ASSERT_TRUE(exp.ok()) << exp.status();
  auto info = (*importer)->client().Import((*exporter)->peer(), "x");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->path, "tcp");
  EXPECT_EQ(info->fallback_reason, "");
  ExpectLiveReads(**importer, **exp, "x");
  EXPECT_EQ((*importer)->Counter("rdma_fallbacks"), 0u);
}

// A real rdma setup failure: the exporter may pin 1 MiB and no more, so its
// per-connection staging buffers (2 MiB, pinned by --rdma-registration
// pinned) cannot be registered. Start-up registers nothing pinned, so it
// starts; the importer falls back to tcp and says why.
TEST_F(TransportTest, RdmaSetupFailureFallsBackToTcpAndSaysWhy) {
  auto importer = StartNode("imp", "auto");
  ASSERT_TRUE(importer.ok()) << importer.status();
  REQUIRE_RDMA(**importer);
  auto exporter = StartNode("exp", "auto", {"--rdma-registration", "pinned"}, SmallMemlockWrapper());
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  ExpectSmallMemlock((*exporter)->pid());
  ASSERT_TRUE((*exporter)->Status().rdma.has_value()) << (*exporter)->Status().rdma_unavailable;
  EXPECT_EQ((*exporter)->Status().rdma->registration, "pinned");
  EXPECT_EQ((*exporter)->Status().rdma->odp_check, "not run");

  auto exp = ExportingProcess::Start(**exporter, "x");
  ASSERT_TRUE(exp.ok()) << exp.status();
  auto info = (*importer)->client().Import((*exporter)->peer(), "x");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->path, "tcp");
  EXPECT_TRUE(absl::StrContains(info->fallback_reason, "RLIMIT_MEMLOCK")) << info->fallback_reason;
  EXPECT_TRUE(absl::StrContains(info->fallback_reason, "LimitMEMLOCK=")) << info->fallback_reason;
  ExpectLiveReads(**importer, **exp, "x");
  EXPECT_EQ((*importer)->Counter("rdma_fallbacks"), 1u);
  RunResult imports = (*importer)->Svmctl({"imports"});
  EXPECT_TRUE(absl::StrContains(imports.out, "x: rdma fell back to tcp: ")) << imports.out;
  std::printf("svmctl imports after the fallback:\n%s", imports.out.c_str());
  RunResult status = (*importer)->Svmctl({"status"});
  EXPECT_TRUE(absl::StrContains(status.out, "rdma_fallbacks")) << status.out;
  EXPECT_TRUE(absl::StrContains(Slurp((*importer)->log()), "falling back to tcp")) << "no warning";
}

// The same failure with nothing to fall back to: the import fails with the
// error that says what to change.
TEST_F(TransportTest, RdmaOnlyImportNamesRlimitMemlock) {
  {
    auto probe = StartNode("probe", "auto");
    ASSERT_TRUE(probe.ok()) << probe.status();
    REQUIRE_RDMA(**probe);
  }
  auto exporter = StartNode("exp", "rdma", {"--rdma-registration", "pinned"}, SmallMemlockWrapper());
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  ExpectSmallMemlock((*exporter)->pid());
  auto importer = StartNode("imp", "rdma");
  ASSERT_TRUE(importer.ok()) << importer.status();
  EXPECT_EQ((*importer)->Status().transport, "rdma");
  EXPECT_EQ(Join((*importer)->Status().transports), "rdma");

  auto exp = ExportingProcess::Start(**exporter, "x");
  ASSERT_TRUE(exp.ok()) << exp.status();
  auto info = (*importer)->client().Import((*exporter)->peer(), "x");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kResourceExhausted) << info.status();
  EXPECT_TRUE(absl::StrContains(info.status().message(), "RLIMIT_MEMLOCK")) << info.status();
  EXPECT_TRUE(absl::StrContains(info.status().message(), "LimitMEMLOCK=")) << info.status();
  // What an operator sees.
  RunResult cli = (*importer)->Svmctl({"import", "--peer", (*exporter)->peer(), "--name", "x"});
  EXPECT_NE(cli.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(cli.err, "RESOURCE_EXHAUSTED")) << cli.err;
  EXPECT_TRUE(absl::StrContains(cli.err, "LimitMEMLOCK=")) << cli.err;
  EXPECT_EQ((*importer)->Counter("rdma_fallbacks"), 0u);
}

// --rdma-registration odp is honoured or svmd does not start.
TEST_F(TransportTest, OdpRegistrationIsHonouredOrStartupFails) {
  auto probe = StartNode("probe", "auto");
  ASSERT_TRUE(probe.ok()) << probe.status();
  REQUIRE_RDMA(**probe);
  const bool odp = (*probe)->Status().rdma->odp_rc_read;
  if (EnvSet("SVM_EXPECT_ODP")) {
    EXPECT_TRUE(odp) << "SVM_EXPECT_ODP=1: no rc read odp";
  }
  auto node = StartNode("odp", "auto", {"--rdma-registration", "odp"});
  if (odp) {
    ASSERT_TRUE(node.ok()) << node.status();
    EXPECT_EQ((*node)->Status().rdma->registration, "odp");
    EXPECT_EQ((*node)->Status().rdma->odp_check, "passed");
  } else {
    ASSERT_FALSE(node.ok());
    EXPECT_TRUE(absl::StrContains(node.status().message(), "--rdma-registration odp"))
        << node.status();
  }
}

}  // namespace
}  // namespace svm::testing
