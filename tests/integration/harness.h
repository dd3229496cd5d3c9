// Integration-test harness: real svmd daemons on 127.0.0.1 (ports chosen
// by the kernel), real exporter processes, real svmctl invocations.
#ifndef SVM_TESTS_INTEGRATION_HARNESS_H_
#define SVM_TESTS_INTEGRATION_HARNESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "svm/client.h"

namespace svm::testing {

// A child process with a pipe to its stdin and from its stdout; stderr goes
// to a log file.
class Subprocess {
 public:
  struct Options {
    std::vector<std::string> argv;
    std::string log_path;
    uid_t uid = static_cast<uid_t>(-1);  // drop to this uid/gid when set
    gid_t gid = static_cast<gid_t>(-1);
    std::string netns;  // run in this network namespace (ip netns name) when set
  };
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(const Options& opts);
  ~Subprocess();

  pid_t pid() const { return pid_; }
  absl::Status WriteLine(const std::string& line);
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout);
  void Signal(int sig);
  // SIGSTOP, then waits until the kernel reports the process stopped
  // (kill() returns before the target actually stops).
  absl::Status Stop(absl::Duration timeout);
  // Waits for exit; returns the wait status, or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  bool running();

 private:
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1;
  std::string buf_;
  bool reaped_ = false;
  int status_ = 0;
};

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};
// Runs a command to completion (bounded by timeout), capturing output.
RunResult RunCommand(const std::vector<std::string>& argv, absl::Duration timeout = absl::Seconds(20),
              uid_t uid = static_cast<uid_t>(-1), gid_t gid = static_cast<gid_t>(-1));

// A directory for one test's sockets and logs, removed on destruction
// unless the test failed.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class Daemon {
 public:
  struct Options {
    std::string node;
    std::string dir;
    std::vector<std::string> extra;  // more svmd flags
    std::vector<std::string> env;    // NAME=VALUE added to svmd's environment
    uint16_t peer_port = 0;          // 0: the kernel chooses
    uint16_t data_port = 0;
    // --transport for svmd; Start fails when `svmctl status` names another.
    // Empty: $SVM_TEST_TRANSPORT (TestTransport()), else svmd's default.
    std::string transport;
    // A network namespace (Fabric::Node::netns) to run svmd in, and the
    // address its peer and data ports listen on there.
    std::string netns;
    std::string host = "127.0.0.1";
  };
  // Two nodes (the VM tier's two guests, tests/vm/nodes): with
  // $SVM_TEST_REMOTE=HOST:PORT naming the node agent of the other machine
  // (tests/vm/nodes/node-agent.sh), every daemon whose node name does not
  // start with "A" runs there, listening on HOST. Daemons of nodes "A..."
  // run here and listen on $SVM_TEST_HOST when it is set (instead of
  // 127.0.0.1). Kill() and Restart() work on remote daemons; process() is
  // the agent connection (signals reach the agent's socat, not svmd).
  // A Client talks to its own machine's daemon only (the session is shared
  // memory), so Connect() on a remote daemon returns a Client whose calls
  // run in svm-remote-client on that machine (Export is not offered), and
  // RunCommand runs `svmctl --daemon CONTROL ...` of a remote daemon there.
  // $SVM_TEST_REMOTE_NODES=NAME[,NAME...] names the remote daemons instead
  // (svm-read-bench across two guests: its exporter's daemon "bench-a" on
  // the other machine, the reading one here). An Exporter of a remote
  // daemon runs on the daemon's machine too (through the agent; its pid()
  // is the local agent connection's, uid/gid and log_path are not applied).
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const Options& opts);

  const std::string& control() const { return control_; }  // "unix:PATH"
  const std::string& peer() const { return peer_; }        // "HOST:PORT"
  const std::string& agent() const { return agent_; }      // HOST:PORT; empty: local
  const std::string& remote_control() const { return remote_control_; }
  uint16_t peer_port() const;
  uint16_t data_port() const;
  std::unique_ptr<Client> Connect();
  Subprocess& process() { return *proc_; }
  // SIGKILL and reap.
  void Kill();
  // Starts again with the same ports, node name and socket. Call it (and
  // Start) from a thread that outlives the daemon: the child's
  // PR_SET_PDEATHSIG fires when the forking thread exits.
  absl::Status Restart();

 private:
  Options opts_;
  std::string control_, peer_, data_;
  std::string agent_;                // HOST:PORT of the node agent; empty: local
  std::string remote_control_;       // the control socket on the agent's machine
  std::unique_ptr<Subprocess> proc_;
};

// The svm-exporter example, driven through its stdin commands.
class Exporter {
 public:
  struct Options {
    const Daemon* daemon = nullptr;
    std::string name;
    uint64_t pages = 16;
    int fill = -1;  // -1: page p is stamped with version p + 1
    std::string backing = "anon";
    uid_t uid = static_cast<uid_t>(-1);
    gid_t gid = static_cast<gid_t>(-1);
    std::string log_path;
  };
  static absl::StatusOr<std::unique_ptr<Exporter>> Start(const Options& opts);
  // Sends a command; returns the reply line ("ok ..." / "err ...").
  absl::StatusOr<std::string> Command(const std::string& cmd,
                                      absl::Duration timeout = absl::Seconds(20));
  pid_t pid() const { return proc_->pid(); }
  uint64_t addr() const { return addr_; }
  uint64_t len() const { return len_; }
  Subprocess& process() { return *proc_; }

 private:
  std::unique_ptr<Subprocess> proc_;
  uint64_t addr_ = 0, len_ = 0;
};

std::string SvmdPath();
std::string SvmctlPath();
std::string ExporterPath();
// Waits stretched for slow machines: x5 when $SVM_TEST_SLOW is set (the VM
// tier under TCG emulation), otherwise unchanged.
absl::Duration Scaled(absl::Duration d);
// The lease a harness Daemon runs with unless its options name one: svmd's
// default (2 s) natively; under SVM_TEST_SLOW 4 s, with heartbeats every
// 250 ms (a heartbeat can be seconds late under emulation).
absl::Duration TestLease();
// Whether this binary runs under ThreadSanitizer (its runtime is linked; the
// TSan build's flags undefine __SANITIZE_THREAD__: tests/sanitize/run-sanitized.sh).
bool UnderThreadSanitizer();

// The mirror source the daemons under test use: $SVM_TEST_SOURCE (the VM
// tier sets "shim"), procfs by default.
std::string TestSource();

// The data transport the daemons under test are started with:
// $SVM_TEST_TRANSPORT (the VM tier sets "rdma"); empty: svmd's default.
// Daemon::Start fails when `svmctl status` reports another one.
std::string TestTransport();

// Whether the tests of one transport ("tcp", "rdma") run on this machine.
// Suites parameterized over the transport call it from SetUp (see
// SVM_GATE_TRANSPORT): with $SVM_TEST_TRANSPORT set, only that transport
// runs (the VM tier's entries each cover one); rdma needs an active port on
// some RDMA device, and its absence is a failure instead of a skip when
// $SVM_EXPECT_RDMA=1.
struct TransportGate {
  enum Verdict { kRun, kSkip, kFail };
  Verdict verdict = kRun;
  std::string reason;  // why not kRun
};
TransportGate GateTransport(const std::string& transport);

// The name of the first RDMA device with an ACTIVE port (libibverbs), or
// why there is none.
absl::StatusOr<std::string> ActiveRdmaDevice();

// Reads len bytes at offset of name through client c.
absl::StatusOr<std::string> ReadBytes(Client& c, const std::string& name, uint64_t offset,
                                      uint64_t len, bool fresh = false);

// Waits for the next invalidation covering page (npages 0 counts as the whole range).
absl::StatusOr<Invalidation> WaitForPage(WatchStream& w, uint64_t page, absl::Duration timeout);

// What a process holds, from /proc/PID: open fds (-1 when unreadable), all
// threads, svm's own threads (named "svmd"; gRPC names its threads), the
// threads by name (for failure messages) and resident memory.
struct Footprint {
  int fds = -1;
  int threads = -1;
  int own_threads = 0;
  int64_t rss_kib = -1;
  std::string thread_names;
  std::string ToString() const;
};
Footprint FootprintOf(pid_t pid);

// The whole text of a file ("" when it cannot be read: a log not written
// yet), and how many of its lines contain needle.
std::string FileText(const std::string& path);
int LinesContaining(const std::string& path, const std::string& needle);

// A test CA and node certificates under dir, made by the script users run
// (scripts/make-test-ca.sh): args are its options and node names
// ("--ca NAME", "--expired", "node-a", ...). Returns its exit code.
int MakeTestCa(const std::string& dir, const std::vector<std::string>& args);
// svmd's TLS flags for node's certificate from MakeTestCa(dir), trusting
// the CA named ca.
std::vector<std::string> TlsFlagsFor(const std::string& dir, const std::string& node,
                                     const std::string& ca = "ca");

// The listing of export / import `name` on c's daemon; NOT_FOUND without one.
absl::StatusOr<ExportInfo> ExportOf(Client& c, const std::string& name);
absl::StatusOr<ImportInfo> ImportOf(Client& c, const std::string& name);

}  // namespace svm::testing

// In SetUp (or a test body) of a suite parameterized over the transport:
// skips or fails as GateTransport() decides.
#define SVM_GATE_TRANSPORT(transport)                                            \
  do {                                                                           \
    const auto svm_gate_ = ::svm::testing::GateTransport(transport);             \
    if (svm_gate_.verdict == ::svm::testing::TransportGate::kFail) {             \
      GTEST_FAIL() << svm_gate_.reason;                                          \
    }                                                                            \
    if (svm_gate_.verdict == ::svm::testing::TransportGate::kSkip) {             \
      GTEST_SKIP() << svm_gate_.reason;                                          \
    }                                                                            \
  } while (0)

#endif  // SVM_TESTS_INTEGRATION_HARNESS_H_
