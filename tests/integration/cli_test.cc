// The command-line contracts of svmd and svmctl, with the real binaries:
// bad values are refused naming the flag (exit 2), svmctl reports usage
// errors before contacting any daemon (exit 2; an operation that fails is
// exit 1), help per command, --version, watch's exit codes, and `status`
// counting only the peer links that are up.
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

TEST(SvmdCommandLine, RefusesBadValuesNamingTheFlag) {
  TempDir dir;
  const std::string sock = absl::StrCat(dir.path(), "/x.sock");
  struct Case {
    std::vector<std::string> args;
    std::string says;
  } cases[] = {
      // abseil: "Illegal value 'V' specified for flag 'NAME'; why".
      {{"--log-level", "loud"}, "flag 'log-level'; unknown level 'loud'"},
      {{"--socket-mode", "abc"}, "flag 'socket-mode'; 'abc' is not an octal file mode"},
      {{"--socket-mode", "0999"}, "'0999' specified for flag 'socket-mode'"},
      {{"--socket-mode", "177777"}, "'177777' specified for flag 'socket-mode'"},
      {{"--socket-group", "nosuchgroup"}, "--socket-group: no group 'nosuchgroup'"},
      {{"--cache-mb", "-1"}, "'-1' specified for flag 'cache-mb'"},
      {{"--cache-mb", "lots"}, "'lots' specified for flag 'cache-mb'"},
      {{"--cache-mb", "4294967296"}, "--cache-mb: 4294967296 MiB is more than 1 PiB"},
      {{"--fetch-timeout-ms", "-5"}, "'-5' specified for flag 'fetch-timeout-ms'"},
      {{"--heartbeat-ms", "0"}, "--heartbeat-ms: must be > 0"},
      {{"--poll-interval-ms", "0"}, "--poll-interval-ms: must be > 0"},
      {{"--rdma-ack-timeout-ms", "0"}, "--rdma-ack-timeout-ms: must be > 0"},
      {{"--lease-ms", "9000"}, "--lease-ms 9000 must be shorter than --sync-timeout-ms 5000"},
      {{"--source", "magic"}, "flag 'source'; 'magic' is not one of auto|shim|procfs"},
      {{"--transport", "udp"}, "flag 'transport'; 'udp' is not one of auto|rdma|tcp"},
      {{"--rdma-registration", "lazy"}, "flag 'rdma-registration'; 'lazy' is not one of auto|odp|pinned"},
      {{"--peer-listen", "nohost"}, "specified for flag 'peer-listen'"},
      {{"--metrics-listen", "127.0.0.1:99999"}, "specified for flag 'metrics-listen'"},
      {{"--control", "/tmp/x.sock"}, "flag 'control'; must be unix:PATH"},
      {{"--peer-token-file", "/nonexistent/token"}, "--peer-token-file: cannot read /nonexistent/token"},
      {{"--tls-cert", "/nonexistent/cert"}, "--tls-cert, --tls-key and --tls-ca go together"},
      {{"--no-such-flag", "1"}, "Unknown command line flag 'no-such-flag'"},
      {{"--max-imports-per-peer", "0"}, "--max-imports-per-peer: must be > 0"},
      {{"--max-sessions-per-client", "-1"}, "flag 'max-sessions-per-client'"},
      {{"--cache-mb"}, "Missing the value for the flag 'cache-mb'"},
      {{"stray"}, "unexpected argument 'stray'"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {SvmdPath(), "--control", "unix:" + sock, "--peer-listen",
                                     "127.0.0.1:0", "--source", TestSource()};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto r = RunCommand(argv, Scaled(absl::Seconds(5)));
    EXPECT_EQ(r.exit_code, 2) << absl::StrJoin(c.args, " ") << ": " << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, c.says)) << absl::StrJoin(c.args, " ") << ": " << r.err;
    EXPECT_NE(access(sock.c_str(), F_OK), 0) << "svmd created its socket despite " << c.args[0];
  }
}

TEST(SvmdCommandLine, VersionAndHelp) {
  auto v = RunCommand({SvmdPath(), "--version"});
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_TRUE(absl::StartsWith(v.out, "svmd ")) << v.out;
  auto h = RunCommand({SvmdPath(), "--help"});
  EXPECT_EQ(h.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(h.out, "--log-level")) << h.out;
  EXPECT_TRUE(absl::StrContains(h.out, "--peer-token-file")) << h.out;
  EXPECT_TRUE(absl::StrContains(h.out, "SIGHUP reloads")) << h.out;
}

// A flagfile's values are checked like the command line's (abseil reads
// it where --flagfile stands).
TEST(SvmdCommandLine, FlagfileValuesAreChecked) {
  TempDir dir;
  const std::string sock = absl::StrCat(dir.path(), "/x.sock");
  const std::string conf = absl::StrCat(dir.path(), "/svmd.conf");
  std::ofstream(conf) << "# comment\n\n--socket-mode=0abc\n";
  auto bad = RunCommand({SvmdPath(), "--flagfile=" + conf, "--control", "unix:" + sock},
                        Scaled(absl::Seconds(5)));
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_TRUE(absl::StrContains(bad.err, "'0abc' specified for flag 'socket-mode'")) << bad.err;
  std::ofstream(conf) << "--log-level=loud\n";
  auto level = RunCommand({SvmdPath(), "--flagfile=" + conf, "--control", "unix:" + sock},
                          Scaled(absl::Seconds(5)));
  EXPECT_EQ(level.exit_code, 2) << level.err;
  EXPECT_TRUE(absl::StrContains(level.err, "flag 'log-level'; unknown level 'loud'")) << level.err;
  EXPECT_NE(access(sock.c_str(), F_OK), 0);
}

TEST(SvmdCommandLine, WarnsThatPeersAreNotAuthenticatedWithoutAToken) {
  TempDir dir;
  auto d = Daemon::Start({.node = "open", .dir = dir.path()});
  ASSERT_TRUE(d.ok()) << d.status();
  (*d)->process().Signal(SIGTERM);
  ASSERT_TRUE((*d)->process().Wait(Scaled(absl::Seconds(10))).ok());
  auto log = RunCommand({"/bin/sh", "-c", absl::StrCat("cat ", dir.path(), "/*.log")});
  EXPECT_TRUE(absl::StrContains(log.out, "peer authentication is OFF")) << log.out;
}

// No daemon listens on this socket: anything that reaches it fails with
// UNAVAILABLE (exit 1); usage errors must be reported first (exit 2).
class SvmctlCommandLine : public ::testing::Test {
 protected:
  RunResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), {SvmctlPath(), "--daemon", absl::StrCat("unix:", dir_.path(), "/none.sock")});
    return RunCommand(args, Scaled(absl::Seconds(10)));
  }
  TempDir dir_;
};

TEST_F(SvmctlCommandLine, UsageErrorsAreReportedBeforeConnecting) {
  struct Case {
    std::vector<std::string> args;
    std::string says;
  } cases[] = {
      {{"frobnicate"}, "unknown command 'frobnicate'"},
      {{"stauts", "--json"}, "unknown command 'stauts'"},
      {{"read", "--name", "x"}, "--len is required"},
      {{"read", "--name", "x", "--len", "lots"}, "--len"},
      {{"read", "--name", "x", "--len", "0"}, "--len must be > 0"},
      {{"export", "--pid", "0", "--addr", "0x1000", "--len", "1", "--name", "x"}, "--pid"},
      {{"export", "--pid", "1", "--addr", "0x1000", "--name", "x"}, "--len is required"},
      {{"import", "--name", "x"}, "--peer is required"},
      {{"sync"}, "--name is required"},
      {{"unexport"}, "--name is required"},
      {{"watch", "--name", "x", "--count", "many"}, "--count"},
      {{"status", "--pid", "1"}, "status does not take --pid"},
      {{"status", "extra"}, "unexpected argument 'extra'"},
      {{"status", "--frobnicate"}, "unknown option --frobnicate"},
      {{"help", "frobnicate"}, "no command 'frobnicate'"},
  };
  for (const auto& c : cases) {
    auto r = Ctl(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args[0] << ": " << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, c.says)) << c.args[0] << ": " << r.err;
    EXPECT_FALSE(absl::StrContains(r.err, "UNAVAILABLE")) << c.args[0] << ": " << r.err;
  }
  auto none = Ctl({});
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(none.err, "usage: svmctl")) << none.err;
}

TEST_F(SvmctlCommandLine, AnOperationThatFailsExitsOne) {
  // (Each takes the client's 5 s connect deadline.)
  for (std::vector<std::string> args : {std::vector<std::string>{"read", "--name", "x", "--len", "1"},
                                        {"watch", "--name", "x", "--timeout", "1"}}) {
    auto r = Ctl(args);
    EXPECT_EQ(r.exit_code, 1) << args[0] << ": " << r.err;
    EXPECT_TRUE(absl::StartsWith(r.err, "svmctl: UNAVAILABLE:")) << args[0] << ": " << r.err;
  }
}

TEST_F(SvmctlCommandLine, HelpPerCommandAndVersion) {
  auto all = Ctl({"help"});
  EXPECT_EQ(all.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(all.out, "usage: svmctl")) << all.out;
  EXPECT_TRUE(absl::StrContains(all.out, "Exit status")) << all.out;
  auto read = Ctl({"help", "read"});
  EXPECT_EQ(read.exit_code, 0) << read.err;
  EXPECT_TRUE(absl::StrContains(read.out, "read --name NAME --len LEN")) << read.out;
  EXPECT_FALSE(absl::StrContains(read.out, "export --pid")) << read.out;
  auto dash = Ctl({"watch", "--help"});
  EXPECT_EQ(dash.exit_code, 0) << dash.err;
  EXPECT_TRUE(absl::StrContains(dash.out, "watch --name NAME")) << dash.out;
  auto v = RunCommand({SvmctlPath(), "--version"});
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_TRUE(absl::StartsWith(v.out, "svmctl ")) << v.out;
}

// watch: 0 when --count events arrived or --timeout elapsed without
// --count; 1 when --timeout elapsed before --count events, or the name is
// not there.
TEST(SvmctlWatch, ExitCodes) {
  TempDir dir;
  auto d = Daemon::Start({.node = "w", .dir = dir.path()});
  ASSERT_TRUE(d.ok()) << d.status();
  auto e = Exporter::Start({.daemon = d->get(), .name = "w", .pages = 2, .fill = 'W',
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {SvmctlPath(), "--daemon", (*d)->control()});
    return RunCommand(args, Scaled(absl::Seconds(20)));
  };
  EXPECT_EQ(ctl({"watch", "--name", "w", "--timeout", "1"}).exit_code, 0);
  auto short_of_count = ctl({"watch", "--name", "w", "--count", "1", "--timeout", "1"});
  EXPECT_EQ(short_of_count.exit_code, 1) << short_of_count.err;
  EXPECT_TRUE(absl::StrContains(short_of_count.err, "DEADLINE_EXCEEDED")) << short_of_count.err;
  auto missing = ctl({"watch", "--name", "nothere", "--timeout", "1"});
  EXPECT_EQ(missing.exit_code, 1) << missing.err;
  EXPECT_TRUE(absl::StrContains(missing.err, "NOT_FOUND")) << missing.err;
}

// `status` counts the peers whose link is up, not every link ever made.
TEST(SvmctlStatus, CountsOnlyPeerLinksThatAreUp) {
  TempDir dir;
  auto a = Daemon::Start({.node = "A", .dir = dir.path()});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Daemon::Start({.node = "B", .dir = dir.path()});
  ASSERT_TRUE(b.ok()) << b.status();
  auto e = Exporter::Start({.daemon = a->get(), .name = "p", .pages = 1, .fill = 'P',
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto cb = (*b)->Connect();
  ASSERT_TRUE(cb->Import((*a)->peer(), "p").ok());
  auto status = [&] { return RunCommand({SvmctlPath(), "--daemon", (*b)->control(), "status"}); };
  EXPECT_TRUE(absl::StrContains(status().out, "imports:     1 (from 1 peers up)")) << status().out;

  (*a)->Kill();
  bool down = false;
  for (int i = 0; i < 200 && !down; ++i) {
    auto l = cb->ListImports();
    down = l.ok() && l->size() == 1 && (*l)[0].state != "connected";
    if (!down) usleep(50000);
  }
  ASSERT_TRUE(down) << "the import never left state connected";
  auto st = cb->Status();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->imports, 1u);
  EXPECT_EQ(st->peers, 0u);
  EXPECT_TRUE(absl::StrContains(status().out, "imports:     1 (from 0 peers up)")) << status().out;
}

}  // namespace
}  // namespace svm::testing
