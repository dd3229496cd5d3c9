// svmd under the systemd service protocol, without systemd: the test owns
// the NOTIFY_SOCKET datagram socket (as systemd would) and the stream
// JOURNAL_STREAM names, runs real daemons and reads what they send.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/fd.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;

// The receiving end of sd_notify(3): a unix datagram socket.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = UniqueFd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
    EXPECT_EQ(::bind(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << path;
  }
  // The next message, or "" after timeout.
  std::string Next(absl::Duration timeout) {
    timeval tv = absl::ToTimeval(std::max(timeout, absl::Milliseconds(1)));
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char buf[4096];
    const ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
    return n > 0 ? std::string(buf, n) : "";
  }
  // Waits for a message containing what; returns it ("" after timeout).
  std::string WaitFor(absl::string_view what, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + Scaled(timeout);
    while (absl::Now() < deadline) {
      std::string m = Next(deadline - absl::Now());
      if (absl::StrContains(m, what)) return m;
    }
    return "";
  }
  std::string env() const { return absl::StrCat("NOTIFY_SOCKET=", path_); }

 private:
  std::string path_;
  UniqueFd fd_;
};

TEST(Systemd, ReadyStatusWatchdogReloadAndStopping) {
  TempDir dir;
  NotifySocket notify(absl::StrCat(dir.path(), "/notify"));
  auto a = Daemon::Start({.node = "A", .dir = dir.path()});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Daemon::Start({.node = "B", .dir = dir.path(),
                          .env = {notify.env(), "WATCHDOG_USEC=300000"}});
  ASSERT_TRUE(b.ok()) << b.status();
  const std::string ready = notify.Next(Scaled(absl::Seconds(5)));
  EXPECT_TRUE(absl::StartsWith(ready, "READY=1\nSTATUS=serving: 0 exports, 0 imports"))
      << "the first message must be READY=1: '" << ready << "'";

  // Pings at WatchdogSec/2 = 150 ms, each after a probe ran.
  const absl::Time t0 = absl::Now();
  int pings = 0;
  while (absl::Now() - t0 < absl::Seconds(1)) {
    pings += absl::StartsWith(notify.Next(absl::Seconds(1) - (absl::Now() - t0)), "WATCHDOG=1\n");
  }
  EXPECT_GE(pings, 3);  // about 6
  EXPECT_LE(pings, 9);

  // STATUS= follows the daemon's state.
  auto e = Exporter::Start({.daemon = a->get(), .name = "s", .pages = 2, .fill = 'S',
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto cb = (*b)->Connect();
  ASSERT_TRUE(cb->Import((*a)->peer(), "s").ok());
  EXPECT_NE(notify.WaitFor("STATUS=serving: 0 exports, 1 imports, 1 peer links up", absl::Seconds(3)), "");

  // Reload: RELOADING=1, READY=1, and the import survives it.
  (*b)->process().Signal(SIGHUP);
  EXPECT_NE(notify.WaitFor("RELOADING=1", absl::Seconds(3)), "");
  EXPECT_EQ(notify.WaitFor("READY=1", absl::Seconds(3)), "READY=1");
  EXPECT_EQ(*ReadBytes(*cb, "s", 0, 2 * kPage), std::string(2 * kPage, 'S'));
  auto imports = cb->ListImports();
  ASSERT_TRUE(imports.ok());
  ASSERT_EQ(imports->size(), 1u);
  EXPECT_EQ((*imports)[0].state, "connected");
  EXPECT_NE(notify.WaitFor("WATCHDOG=1", absl::Seconds(1)), "") << "pings must go on after a reload";

  (*b)->process().Signal(SIGTERM);
  EXPECT_NE(notify.WaitFor("STOPPING=1", absl::Seconds(3)), "");
  EXPECT_TRUE((*b)->process().Wait(Scaled(absl::Seconds(5))).ok());
}

// SIGHUP re-reads --flagfile: a new log level applies at once; an option
// that needs a restart is named, not silently ignored.
TEST(Systemd, SighupReReadsTheFlagfile) {
  TempDir dir;
  const std::string flags = absl::StrCat(dir.path(), "/svmd.flags");
  std::ofstream(flags) << "# svmd options\n--log-level=warn\n--cache-mb=64\n";
  const std::string log = absl::StrCat(dir.path(), "/svmd.log");
  const std::string sock = absl::StrCat(dir.path(), "/svmd.sock");
  auto p = Subprocess::Start({.argv = {SvmdPath(), "--flagfile", flags, "--control",
                                       absl::StrCat("unix:", sock), "--peer-listen", "127.0.0.1:0",
                                       "--source", TestSource(), "--socket-group", ""},
                              .log_path = log});
  ASSERT_TRUE(p.ok()) << p.status();
  for (int i = 0; i < 200 && access(sock.c_str(), F_OK) != 0; ++i) usleep(20000);
  ASSERT_EQ(access(sock.c_str(), F_OK), 0) << FileText(log);
  EXPECT_FALSE(absl::StrContains(FileText(log), " info ")) << "--log-level warn from the flagfile";

  std::ofstream(flags) << "--log-level=info\n--cache-mb=128\n";
  (*p)->Signal(SIGHUP);
  std::string text;
  for (int i = 0; i < 200 && !absl::StrContains(text, "reload: done"); ++i) {
    usleep(20000);
    text = FileText(log);
  }
  EXPECT_TRUE(absl::StrContains(text, "reload: done")) << text;  // logged at info: the level changed
  EXPECT_TRUE(absl::StrContains(text, "--cache-mb changed; it takes effect when svmd restarts")) << text;

  std::ofstream(flags) << "--log-level=loud\n";
  (*p)->Signal(SIGHUP);
  for (int i = 0; i < 200 && !absl::StrContains(text, "nothing changed"); ++i) {
    usleep(20000);
    text = FileText(log);
  }
  EXPECT_TRUE(absl::StrContains(text, "--log-level: unknown level 'loud'")) << text;
  EXPECT_TRUE((*p)->running()) << "a bad flagfile on reload must not stop svmd";
  (*p)->Signal(SIGTERM);
  auto st = (*p)->Wait(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(st.ok());
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0);

  // At start-up a bad flagfile is a usage error.
  auto bad = RunCommand({SvmdPath(), "--flagfile", flags, "--control", absl::StrCat("unix:", sock)});
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_TRUE(absl::StrContains(bad.err, "flag 'log-level'")) << bad.err;
  std::ofstream(flags) << "--cache-mb 64\n";  // abseil's flagfiles: --flag=value
  auto spaced = RunCommand({SvmdPath(), "--flagfile", flags});
  EXPECT_EQ(spaced.exit_code, 2) << spaced.err;
  EXPECT_TRUE(absl::StrContains(spaced.err, "cache-mb 64")) << spaced.err;
  auto missing = RunCommand({SvmdPath(), "--flagfile", absl::StrCat(dir.path(), "/none")});
  EXPECT_EQ(missing.exit_code, 2) << missing.err;
  EXPECT_TRUE(absl::StrContains(missing.err, "Can't open flagfile")) << missing.err;
}

// SIGHUP re-reads --peer-token-file: on the exporter, peers presenting the
// old token are refused from then on and the new one is accepted, while an
// import made before keeps reading over its data connection; on the
// importer, its new peer calls present the new token.
TEST(Systemd, SighupRotatesThePeerToken) {
  TempDir dir;
  auto token = [&](const std::string& node, const std::string& value) {
    const std::string path = absl::StrCat(dir.path(), "/", node, ".token");
    std::ofstream(path) << value << "\n";
    return path;
  };
  auto x = Daemon::Start({.node = "X", .dir = dir.path(), .extra = {"--peer-token-file", token("X", "old")}});
  ASSERT_TRUE(x.ok()) << x.status();
  auto y = Daemon::Start({.node = "Y", .dir = dir.path(), .extra = {"--peer-token-file", token("Y", "old")}});
  ASSERT_TRUE(y.ok()) << y.status();
  auto z = Daemon::Start({.node = "Z", .dir = dir.path(), .extra = {"--peer-token-file", token("Z", "new")}});
  ASSERT_TRUE(z.ok()) << z.status();
  auto e = Exporter::Start({.daemon = x->get(), .name = "r", .pages = 2, .fill = 'R'});
  ASSERT_TRUE(e.ok()) << e.status();
  auto cy = (*y)->Connect();
  auto cz = (*z)->Connect();
  ASSERT_TRUE(cy->Import((*x)->peer(), "r").ok());
  EXPECT_TRUE(absl::IsUnauthenticated(cz->Import((*x)->peer(), "r").status()));

  token("X", "new");
  (*x)->process().Signal(SIGHUP);
  const std::string xlog = absl::StrCat(dir.path(), "/X.log");
  for (int i = 0; i < 250 && !absl::StrContains(FileText(xlog), "reload: done"); ++i) usleep(20000);
  ASSERT_TRUE(absl::StrContains(FileText(xlog), "reload: new peer token")) << FileText(xlog);
  // The import made before the reload still reads (fresh: from X, not the cache).
  auto r = ReadBytes(*cy, "r", 0, 2 * kPage, /*fresh=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(2 * kPage, 'R'));
  // A new peer call with the old token is refused, with the new one accepted.
  EXPECT_TRUE(absl::IsUnauthenticated(cy->Import((*x)->peer(), "r", "r2").status()));
  // (A link refused before waits out its backoff, under a second, first.)
  auto import_soon = [&](Client& c, const std::string& as) {
    absl::StatusOr<ImportInfo> r;
    for (int i = 0; i < 50; ++i) {
      r = c.Import((*x)->peer(), "r", as);
      if (r.ok() || !absl::StrContains(r.status().message(), "next attempt")) break;
      usleep(100000);
    }
    return r;
  };
  auto zi = import_soon(*cz, "r");
  ASSERT_TRUE(zi.ok()) << zi.status();
  EXPECT_EQ(*ReadBytes(*cz, "r", 0, kPage), std::string(kPage, 'R'));

  // Y takes the new token too: its next call to X presents it.
  token("Y", "new");
  (*y)->process().Signal(SIGHUP);
  const std::string ylog = absl::StrCat(dir.path(), "/Y.log");
  for (int i = 0; i < 250 && !absl::StrContains(FileText(ylog), "reload: done"); ++i) usleep(20000);
  auto yi = import_soon(*cy, "r3");
  ASSERT_TRUE(yi.ok()) << yi.status();
  EXPECT_EQ(*ReadBytes(*cy, "r3", 0, kPage), std::string(kPage, 'R'));
  EXPECT_TRUE((*x)->process().running());
}

// With stderr connected to the stream JOURNAL_STREAM names, every line
// carries its syslog priority; elsewhere lines keep the timestamped format.
TEST(Systemd, JournalStreamLinesCarrySyslogPriorities) {
  TempDir dir;
  auto run = [&](const std::string& journal_stream, const std::string& name) {
    const std::string log = absl::StrCat(dir.path(), "/", name, ".log");
    const std::string cmd = absl::StrCat(
        "exec 2>", log, "; export ", journal_stream, "; exec ", SvmdPath(), " --control unix:",
        dir.path(), "/", name, ".sock --peer-listen 127.0.0.1:0 --source ", TestSource(),
        " --socket-group ''");
    auto p = Subprocess::Start({.argv = {"/bin/sh", "-c", cmd}, .log_path = log + ".sh"});
    EXPECT_TRUE(p.ok());
    std::string text;
    for (int i = 0; i < 250 && !absl::StrContains(text, "peer authentication is OFF"); ++i) {
      usleep(20000);
      text = FileText(log);
    }
    (*p)->Signal(SIGTERM);
    EXPECT_TRUE((*p)->Wait(Scaled(absl::Seconds(5))).ok());
    return FileText(log);
  };
  // As systemd sets it: "device:inode" of the stream on fd 2 (the shell's,
  // which svmd inherits).
  const std::string journal = run("JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/2)", "journal");
  // Starts with the lines of a successful start-up and shutdown.
  EXPECT_TRUE(absl::StrContains(journal, "\n<4>peer authentication is OFF")) << journal;
  EXPECT_TRUE(absl::StrContains(journal, "\n<6>stopped")) << journal;
  for (absl::string_view line : absl::StrSplit(journal, '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(line.size() > 3 && line[0] == '<' && line[2] == '>') << line;
  }
  // Another stream (stderr redirected elsewhere): svmd's own format.
  const std::string other = run("JOURNAL_STREAM=1:1", "other");
  EXPECT_TRUE(absl::StrContains(other, " warning [svmd] peer authentication is OFF")) << other;
  EXPECT_FALSE(absl::StrContains(other, "<4>")) << other;
}

}  // namespace
}  // namespace svm::testing
