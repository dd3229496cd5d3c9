#include "tests/integration/harness.h"

#include "client/proto_convert.h"

#include <fcntl.h>
#include <grp.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <sched.h>
#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"

namespace svm::testing {

// $SVM_TEST_SVMD, $SVM_TEST_SVMCTL, $SVM_TEST_EXPORTER name other binaries
// (installed ones, or copies that a rebuild does not replace mid-run).
static std::string BinaryPath(const char* env, const char* built) {
  const char* p = std::getenv(env);
  return p != nullptr && *p != '\0' ? p : built;
}
std::string SvmdPath() { return BinaryPath("SVM_TEST_SVMD", SVMD_PATH); }
std::string SvmctlPath() { return BinaryPath("SVM_TEST_SVMCTL", SVMCTL_PATH); }
std::string ExporterPath() { return BinaryPath("SVM_TEST_EXPORTER", EXPORTER_PATH); }

static std::string TmpBase() {
  const char* t = std::getenv("TMPDIR");
  return t != nullptr && *t != '\0' ? t : "/tmp";
}

absl::Duration Scaled(absl::Duration d) {
  const char* s = std::getenv("SVM_TEST_SLOW");
  return s != nullptr && *s != '\0' && *s != '0' ? d * 5 : d;
}

absl::Duration TestLease() {
  return Scaled(absl::Seconds(1)) > absl::Seconds(1) ? absl::Seconds(4) : absl::Seconds(2);
}

// ThreadSanitizer's runtime: defined only in a TSan build.
extern "C" void __tsan_init() __attribute__((weak));
bool UnderThreadSanitizer() { return &__tsan_init != nullptr; }

std::string TestSource() {
  const char* s = std::getenv("SVM_TEST_SOURCE");
  return s != nullptr && *s != '\0' ? s : "procfs";
}

std::string TestTransport() {
  const char* s = std::getenv("SVM_TEST_TRANSPORT");
  return s != nullptr ? s : "";
}

absl::StatusOr<std::string> ActiveRdmaDevice() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    return absl::UnavailableError(absl::StrCat("no RDMA devices (ibv_get_device_list: ",
                                               std::strerror(errno), ")"));
  }
  std::vector<std::string> seen;
  std::string found;
  for (int i = 0; i < n && found.empty(); ++i) {
    const std::string name = ibv_get_device_name(list[i]);
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr) {
      seen.push_back(absl::StrCat(name, " (open: ", std::strerror(errno), ")"));
      continue;
    }
    ibv_device_attr attr{};
    if (ibv_query_device(ctx, &attr) == 0) {
      for (uint8_t port = 1; port <= attr.phys_port_cnt && found.empty(); ++port) {
        ibv_port_attr pa{};
        if (ibv_query_port(ctx, port, &pa) != 0) continue;
        if (pa.state == IBV_PORT_ACTIVE) found = name;
        else seen.push_back(absl::StrCat(name, " port ", port, " ", ibv_port_state_str(pa.state)));
      }
    }
    ibv_close_device(ctx);
  }
  ibv_free_device_list(list);
  if (!found.empty()) return found;
  if (seen.empty()) return absl::UnavailableError("no RDMA device present");
  return absl::UnavailableError(absl::StrCat("no RDMA device with an active port (",
                                             absl::StrJoin(seen, ", "), ")"));
}

TransportGate GateTransport(const std::string& transport) {
  if (const std::string only = TestTransport(); !only.empty() && only != transport) {
    return {TransportGate::kSkip, absl::StrCat("SVM_TEST_TRANSPORT=", only)};
  }
  if (transport != "rdma") return {};
  auto dev = ActiveRdmaDevice();
  if (dev.ok()) return {};
  const char* expect = std::getenv("SVM_EXPECT_RDMA");
  if (expect != nullptr && std::string(expect) == "1") {
    return {TransportGate::kFail,
            absl::StrCat("SVM_EXPECT_RDMA=1 but ", dev.status().message())};
  }
  return {TransportGate::kSkip, absl::StrCat("rdma: ", dev.status().message())};
}

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(const Options& opts) {
  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  std::vector<char*> argv;
  for (auto& a : opts.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const std::string ns_path = "/run/netns/" + opts.netns;  // no allocation after fork
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    int log = open(opts.log_path.empty() ? "/dev/null" : opts.log_path.c_str(),
                   O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(log, 2);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a crashed test
    if (!opts.netns.empty()) {
      int fd = open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) _exit(125);
      close(fd);
    }
    if (opts.gid != static_cast<gid_t>(-1)) {
      if (setgroups(0, nullptr) != 0 || setgid(opts.gid) != 0) _exit(126);
    }
    if (opts.uid != static_cast<uid_t>(-1) && setuid(opts.uid) != 0) _exit(126);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  auto p = std::unique_ptr<Subprocess>(new Subprocess());
  p->pid_ = pid;
  p->in_ = in[1];
  p->out_ = out[0];
  return p;
}

Subprocess::~Subprocess() {
  if (!reaped_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (in_ >= 0) close(in_);
  if (out_ >= 0) close(out_);
}

absl::Status Subprocess::WriteLine(const std::string& line) {
  std::string l = line + "\n";
  if (write(in_, l.data(), l.size()) != static_cast<ssize_t>(l.size())) {
    return absl::UnavailableError(absl::StrCat("write to child: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Subprocess::ReadLine(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  size_t scanned = 0;  // long lines (a remote client's reads) arrive in many chunks
  for (;;) {
    if (size_t nl = buf_.find('\n', scanned); nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      return line;
    }
    scanned = buf_.size();
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::DeadlineExceededError("no line from child");
    pollfd p{out_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(ms)) <= 0) continue;
    char chunk[65536];
    ssize_t n = read(out_, chunk, sizeof(chunk));
    if (n <= 0) return absl::UnavailableError("child closed its output");
    buf_.append(chunk, static_cast<size_t>(n));
  }
}

void Subprocess::Signal(int sig) {
  if (!reaped_) kill(pid_, sig);
}

absl::Status Subprocess::Stop(absl::Duration timeout) {
  Signal(SIGSTOP);
  // Every thread, not only the first: a thread still running could serve
  // a request after the main one stopped.
  const std::string task_dir = absl::StrCat("/proc/", pid_, "/task");
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    bool all = true;
    if (DIR* d = ::opendir(task_dir.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream in(absl::StrCat(task_dir, "/", e->d_name, "/stat"));
        std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        size_t paren = stat.rfind(')');  // "TID (COMM) STATE ..."
        if (paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'T') {
          all = false;
        }
      }
      ::closedir(d);
    } else {
      all = false;
    }
    if (all) return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return absl::DeadlineExceededError("child did not stop");
}

bool Subprocess::running() {
  if (reaped_) return false;
  int st = 0;
  if (waitpid(pid_, &st, WNOHANG) == pid_) {
    reaped_ = true;
    status_ = st;
    return false;
  }
  return true;
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (running()) {
    if (absl::Now() > deadline) return absl::DeadlineExceededError("child still running");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status_;
}

// Remote daemons (SVM_TEST_REMOTE): local control path -> {agent, control there}.
static absl::Mutex remote_mu;
static std::map<std::string, std::pair<std::string, std::string>>& RemoteControls() {
  static auto* m = new std::map<std::string, std::pair<std::string, std::string>>();
  return *m;
}

// `svmctl --daemon CONTROL ...` of a remote daemon, run on its machine by
// the node agent ("run": it answers "rc STATUS B64(OUT) B64(ERR)").
static std::optional<RunResult> RunRemoteSvmctl(const std::vector<std::string>& argv,
                                                absl::Duration timeout) {
  if (argv.size() < 3 || argv[0] != SvmctlPath() || argv[1] != "--daemon") return std::nullopt;
  std::pair<std::string, std::string> remote;
  {
    absl::MutexLock l(&remote_mu);
    auto it = RemoteControls().find(argv[2]);
    if (it == RemoteControls().end()) return std::nullopt;
    remote = it->second;
  }
  std::vector<std::string> args = argv;
  args[2] = remote.second;
  args.insert(args.begin(), "run");
  RunResult r;
  auto p = Subprocess::Start({.argv = {"/usr/bin/socat", "-", absl::StrCat("TCP:", remote.first)}});
  if (!p.ok() || !(*p)->WriteLine(absl::StrJoin(args, "\t")).ok()) {
    r.err = "node agent unreachable\n";
    return r;
  }
  auto line = (*p)->ReadLine(timeout);
  std::vector<std::string> f = absl::StrSplit(line.ok() ? *line : "", ' ');
  if (f.size() != 4 || f[0] != "rc" || !absl::SimpleAtoi(f[1], &r.exit_code) ||
      !absl::Base64Unescape(f[2], &r.out) || !absl::Base64Unescape(f[3], &r.err)) {
    r.exit_code = -1;
    r.err = absl::StrCat("node agent: ", line.ok() ? *line : line.status().ToString(), "\n");
  }
  return r;
}

RunResult RunCommand(const std::vector<std::string>& argv, absl::Duration timeout, uid_t uid, gid_t gid) {
  if (auto remote = RunRemoteSvmctl(argv, timeout)) return *remote;
  RunResult r;
  std::string out_tmpl = TmpBase() + "/svm-run-outXXXXXX";
  std::string err_tmpl = TmpBase() + "/svm-run-errXXXXXX";
  int out = mkstemp(out_tmpl.data()), err = mkstemp(err_tmpl.data());
  // The child of a multi-threaded process may only make async-signal-safe
  // calls until exec: another thread can hold the allocator's lock at the
  // fork, and a child that allocates then waits forever. Under ASan, with
  // four threads allocating, 1 in 2000 children that built their argv after
  // the fork hung; a convergence test's `svmctl import` timed out so, with
  // nothing in its daemon's log.
  std::vector<char*> av;
  for (auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
  av.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out, 1);
    dup2(err, 2);
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    if (gid != static_cast<gid_t>(-1)) {
      if (setgroups(0, nullptr) != 0 || setgid(gid) != 0) _exit(126);
    }
    if (uid != static_cast<uid_t>(-1) && setuid(uid) != 0) _exit(126);
    execv(av[0], av.data());
    _exit(127);
  }
  const absl::Time deadline = absl::Now() + timeout;
  int st = 0;
  for (;;) {
    if (waitpid(pid, &st, WNOHANG) == pid) break;
    if (absl::Now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      r.err = "timed out\n";
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  auto slurp = [](int fd) {
    std::string s;
    lseek(fd, 0, SEEK_SET);
    char b[65536];
    ssize_t n;
    while ((n = read(fd, b, sizeof(b))) > 0) s.append(b, static_cast<size_t>(n));
    close(fd);
    return s;
  };
  r.out = slurp(out);
  r.err += slurp(err);
  unlink(out_tmpl.c_str());
  unlink(err_tmpl.c_str());
  return r;
}

TempDir::TempDir() {
  std::string tmpl = TmpBase() + "/svm-itest-XXXXXX";
  path_ = mkdtemp(tmpl.data());
  chmod(path_.c_str(), 0755);  // tests run clients as other users
}

TempDir::~TempDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (info != nullptr && info->result()->Failed()) {
    std::fprintf(stderr, "keeping %s for inspection (daemon logs)\n", path_.c_str());
    for (auto& e : std::filesystem::directory_iterator(path_)) {
      if (absl::EndsWith(e.path().string(), ".log")) {
        std::fprintf(stderr, "---- %s (last lines)\n", e.path().c_str());
        auto r = RunCommand({"/usr/bin/tail", "-n", "25", e.path().string()});
        std::fprintf(stderr, "%s", r.out.c_str());
      }
    }
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

namespace {

absl::Status StatusOf(const std::vector<std::string>& f) {  // "err CODE B64(MESSAGE)"
  int code = static_cast<int>(absl::StatusCode::kUnknown);
  std::string msg = "bad answer from svm-remote-client";
  if (f.size() == 3 && f[0] == "err") {
    (void)absl::SimpleAtoi(f[1], &code);
    (void)absl::Base64Unescape(f[2], &msg);
  }
  return absl::Status(static_cast<absl::StatusCode>(code), msg);
}

// One connection to svm-remote-client on the remote daemon's machine.
class RemoteConn {
 public:
  static absl::StatusOr<std::unique_ptr<RemoteConn>> Open(const std::string& agent,
                                                          const std::string& control) {
    auto p = Subprocess::Start({.argv = {"/usr/bin/socat", "-", absl::StrCat("TCP:", agent)}});
    if (!p.ok()) return p.status();
    auto c = std::unique_ptr<RemoteConn>(new RemoteConn());
    c->p_ = std::move(*p);
    auto hello = c->Call(absl::StrCat("exec\t", REMOTE_CLIENT_PATH, "\t", control), Scaled(absl::Seconds(10)));
    if (!hello.ok()) return hello.status();
    return c;
  }
  // The answer's fields after "ok", or its error.
  absl::StatusOr<std::vector<std::string>> Call(const std::string& req,
                                                absl::Duration timeout = absl::Seconds(60)) {
    absl::MutexLock l(&mu_);
    if (auto st = p_->WriteLine(req); !st.ok()) return st;
    auto line = p_->ReadLine(timeout);
    if (!line.ok()) return absl::UnavailableError(absl::StrCat("svm-remote-client: ", line.status().message()));
    std::vector<std::string> f = absl::StrSplit(*line, ' ');
    if (f[0] != "ok") return StatusOf(f);
    f.erase(f.begin());
    return f;
  }

 private:
  absl::Mutex mu_;
  std::unique_ptr<Subprocess> p_;
};

// svm-remote-client sends the control messages (libsvm's results converted
// back, client/proto_convert.h); M is the message, the result libsvm's type.
template <typename M>
using ResultOf = decltype(internal::FromProto(std::declval<const M&>()));

template <typename M>
absl::StatusOr<ResultOf<M>> Decode(const absl::StatusOr<std::vector<std::string>>& f, size_t i = 0) {
  if (!f.ok()) return f.status();
  std::string bytes;
  M m;
  if (f->size() <= i || !absl::Base64Unescape((*f)[i], &bytes) || !m.ParseFromString(bytes)) {
    return absl::InternalError("bad answer from svm-remote-client");
  }
  return internal::FromProto(m);
}

template <typename M>
absl::StatusOr<std::vector<ResultOf<M>>> DecodeList(const absl::StatusOr<std::vector<std::string>>& f) {
  if (!f.ok()) return f.status();
  std::vector<ResultOf<M>> out;
  for (size_t i = 0; i < f->size(); ++i) {
    auto m = Decode<M>(f, i);
    if (!m.ok()) return m.status();
    out.push_back(std::move(*m));
  }
  return out;
}

class RemoteWatch : public WatchStream {
 public:
  explicit RemoteWatch(std::unique_ptr<RemoteConn> c) : c_(std::move(c)) {}
  absl::StatusOr<Invalidation> Next(absl::Duration timeout) override {
    return Decode<v1::Invalidation>(
        c_->Call(absl::StrCat("next\t", absl::ToInt64Milliseconds(timeout)), timeout + absl::Seconds(30)));
  }

 private:
  std::unique_ptr<RemoteConn> c_;
};

// A Mapping of an import on another machine: data() reads all of it
// through a mapping there (svm-remote-client keeps one per connection) at
// the moment of the call; the bytes stay valid until the next call.
class RemoteMapping : public Mapping {
 public:
  RemoteMapping(RemoteConn* c, std::string name, std::string first, uint64_t fetched)
      : c_(c), name_(std::move(name)), data_(std::move(first)), fetched_(fetched) {}
  const uint8_t* data() const override {
    {  // Map() fetched once for the size; never hand out bytes older than this call
      auto f = c_->Call("map\t" + name_);
      std::string bytes;
      if (f.ok() && f->size() == 2 && absl::Base64Unescape((*f)[1], &bytes) && bytes.size() == data_.size()) {
        (void)absl::SimpleAtoi((*f)[0], &fetched_);
        data_ = std::move(bytes);
      } else {
        ADD_FAILURE() << "remote mapping of " << name_ << ": " << (f.ok() ? "bad answer" : f.status().ToString());
      }
    }
    return reinterpret_cast<const uint8_t*>(data_.data());
  }
  size_t size() const override { return data_.size(); }
  absl::Status Prefetch(uint64_t, uint64_t) override { return absl::OkStatus(); }
  uint64_t faults() const override { return 0; }
  uint64_t pages_fetched() const override { return fetched_; }

 private:
  RemoteConn* c_;
  std::string name_;
  mutable std::string data_;
  mutable uint64_t fetched_;
};

// A Client whose calls run on the remote daemon's machine (Map: see
// RemoteMapping).
class RemoteClient : public Client {
 public:
  RemoteClient(std::string agent, std::string control, std::unique_ptr<RemoteConn> c)
      : agent_(std::move(agent)), control_(std::move(control)), c_(std::move(c)) {}
  absl::StatusOr<ExportInfo> Export(const std::string&, const void*, size_t,
                                        const ExportOptions&) override {
    return absl::UnimplementedError("exporting on a remote node");
  }
  absl::StatusOr<ExportInfo> ExportPid(const std::string&, pid_t, uint64_t, uint64_t,
                                           const ExportOptions&) override {
    return absl::UnimplementedError("exporting on a remote node");
  }
  absl::Status Unexport(const std::string& name) override { return c_->Call("unexport\t" + name).status(); }
  absl::StatusOr<std::vector<ExportInfo>> ListExports() override {
    return DecodeList<v1::ExportInfo>(c_->Call("exports"));
  }
  absl::StatusOr<ImportInfo> Import(const std::string& peer, const std::string& name,
                                        const std::string& as) override {
    return Decode<v1::ImportInfo>(c_->Call(absl::StrCat("import\t", peer, "\t", name, "\t", as)));
  }
  absl::StatusOr<std::vector<ImportInfo>> ListImports() override {
    return DecodeList<v1::ImportInfo>(c_->Call("imports"));
  }
  absl::StatusOr<ReadResult> Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst,
                                  ReadOptions opts) override {
    auto f = c_->Call(absl::StrCat("read\t", name, "\t", offset, "\t", dst.size(), "\t", opts.fresh ? 1 : 0));
    if (!f.ok()) return f.status();
    ReadResult r;
    std::string bytes;
    if (f->size() != 5 || !absl::SimpleAtoi((*f)[0], &r.len) || !absl::SimpleAtoi((*f)[1], &r.seq) ||
        !absl::SimpleAtoi((*f)[2], &r.pages_from_cache) || !absl::SimpleAtoi((*f)[3], &r.pages_fetched) ||
        !absl::Base64Unescape((*f)[4], &bytes) || bytes.size() != dst.size()) {
      return absl::InternalError("bad answer from svm-remote-client");
    }
    std::memcpy(dst.data(), bytes.data(), bytes.size());
    return r;
  }
  std::vector<absl::StatusOr<ReadResult>> ReadV(absl::Span<const ReadOp> ops) override {
    std::vector<absl::StatusOr<ReadResult>> out;
    for (const ReadOp& op : ops) out.push_back(Read(op.name, op.offset, op.dst, op.opts));
    return out;
  }
  absl::StatusOr<std::unique_ptr<Mapping>> Map(const std::string& name, MapOptions) override {
    auto f = c_->Call("map\t" + name);
    if (!f.ok()) return f.status();
    uint64_t fetched = 0;
    std::string bytes;
    if (f->size() != 2 || !absl::SimpleAtoi((*f)[0], &fetched) || !absl::Base64Unescape((*f)[1], &bytes)) {
      return absl::InternalError("bad answer from svm-remote-client");
    }
    return std::unique_ptr<Mapping>(std::make_unique<RemoteMapping>(c_.get(), name, std::move(bytes), fetched));
  }
  absl::StatusOr<std::unique_ptr<WatchStream>> Watch(const std::string& name) override {
    auto c = RemoteConn::Open(agent_, control_);  // Next() blocks: a connection of its own
    if (!c.ok()) return c.status();
    if (auto st = (*c)->Call("watch\t" + name); !st.ok()) return st.status();
    return std::unique_ptr<WatchStream>(std::make_unique<RemoteWatch>(std::move(*c)));
  }
  absl::StatusOr<SyncResult> Sync(const std::string& name) override {
    return Decode<v1::SyncResponse>(c_->Call("sync\t" + name));
  }
  absl::StatusOr<DaemonStatus> Status() override {
    return Decode<v1::StatusResponse>(c_->Call("status"));
  }

 private:
  std::string agent_, control_;
  std::unique_ptr<RemoteConn> c_;
};

}  // namespace

static std::string Env(const char* name) {
  const char* s = std::getenv(name);
  return s != nullptr ? s : "";
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const Options& opts) {
  auto d = std::unique_ptr<Daemon>(new Daemon());
  d->opts_ = opts;
  const std::string remote_nodes = Env("SVM_TEST_REMOTE_NODES");
  const bool remote = remote_nodes.empty()
                          ? !absl::StartsWith(opts.node, "A")
                          : absl::c_linear_search(absl::StrSplit(remote_nodes, ','), opts.node);
  if (const std::string agent = Env("SVM_TEST_REMOTE"); !agent.empty() && remote && opts.netns.empty()) {
    d->agent_ = agent;
    d->opts_.host = agent.substr(0, agent.rfind(':'));
  } else if (const std::string host = Env("SVM_TEST_HOST");
             !host.empty() && opts.host == "127.0.0.1" && opts.netns.empty()) {
    d->opts_.host = host;
  }
  d->control_ = absl::StrCat("unix:", opts.dir, "/", opts.node, ".sock");
  if (auto st = d->Restart(); !st.ok()) return st;
  return d;
}

absl::Status Daemon::Restart() {
  std::vector<std::string> argv;
  if (!opts_.env.empty()) {  // env(1) execs svmd: the pid stays svmd's
    argv.push_back("/usr/bin/env");
    argv.insert(argv.end(), opts_.env.begin(), opts_.env.end());
  }
  const std::vector<std::string> svmd = {SvmdPath(),
                                         "--control", control_,
                                         "--peer-listen", absl::StrCat(opts_.host, ":", opts_.peer_port),
                                         "--data-listen", absl::StrCat(opts_.host, ":", opts_.data_port),
                                         "--node", opts_.node,
                                         "--socket-mode", "0666",
                                         "--log-level", "debug"};
  argv.insert(argv.end(), svmd.begin(), svmd.end());
  argv.push_back("--source");
  argv.push_back(TestSource());
  const std::string transport = opts_.transport.empty() ? TestTransport() : opts_.transport;
  if (!transport.empty()) {
    argv.push_back("--transport");
    argv.push_back(transport);
  }
  argv.push_back("--peer-timeout-ms");
  argv.push_back(std::to_string(absl::ToInt64Milliseconds(Scaled(absl::Seconds(2)))));
  argv.push_back("--fetch-timeout-ms");
  argv.push_back(std::to_string(absl::ToInt64Milliseconds(Scaled(absl::Milliseconds(1500)))));
  // Under emulation (SVM_TEST_SLOW) a heartbeat can be seconds late: a
  // longer lease (still below the default 5 s sync timeout) and more
  // frequent heartbeats keep caches usable, unless the test chose.
  if (Scaled(absl::Seconds(1)) > absl::Seconds(1) &&
      std::find(opts_.extra.begin(), opts_.extra.end(), "--lease-ms") == opts_.extra.end()) {
    for (const std::string& f : {std::string("--lease-ms"), std::to_string(absl::ToInt64Milliseconds(TestLease())),
                                 std::string("--heartbeat-ms"), std::string("250")}) {
      argv.push_back(f);
    }
  }
  for (auto& e : opts_.extra) argv.push_back(e);
  Subprocess::Options so;
  so.argv = argv;
  so.log_path = absl::StrCat(opts_.dir, "/", opts_.node, ".log");
  so.netns = opts_.netns;
  if (!agent_.empty()) {
    // The agent runs svmd (with a control socket of its own, which it
    // names) for as long as this connection stays open.
    auto ctl = std::find(argv.begin(), argv.end(), "--control");
    argv.erase(ctl, ctl + 2);
    so.argv = {"/usr/bin/socat", "-", absl::StrCat("TCP:", agent_)};
    auto p = Subprocess::Start(so);
    if (!p.ok()) return p.status();
    proc_ = std::move(*p);
    if (auto st = proc_->WriteLine(absl::StrJoin(argv, "\t")); !st.ok()) return st;
    auto line = proc_->ReadLine(Scaled(absl::Seconds(10)));
    if (!line.ok()) return absl::UnavailableError(absl::StrCat("node agent ", agent_, ": ", line.status().message()));
    std::vector<std::string> ready = absl::StrSplit(*line, ' ');  // ready CONTROL
    if (ready.size() != 2 || ready[0] != "ready") {
      return absl::InternalError(absl::StrCat("node agent ", agent_, " said: ", *line));
    }
    remote_control_ = ready[1];
    absl::MutexLock l(&remote_mu);
    RemoteControls()[control_] = {agent_, remote_control_};
  } else {
    auto p = Subprocess::Start(so);
    if (!p.ok()) return p.status();
    proc_ = std::move(*p);
  }
  // Ready when the control socket answers Status.
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  while (absl::Now() < deadline) {
    if (!proc_->running()) return absl::InternalError("svmd exited during startup (see its log)");
    if (agent_.empty() && access(control_.substr(5).c_str(), F_OK) != 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    absl::StatusOr<std::unique_ptr<Client>> c = absl::UnavailableError("");
    if (agent_.empty()) {
      c = Client::Connect(control_);
    } else if (auto rc = RemoteConn::Open(agent_, remote_control_); rc.ok()) {
      c = std::unique_ptr<Client>(std::make_unique<RemoteClient>(agent_, remote_control_, std::move(*rc)));
    }
    if (c.ok()) {
      auto s = (*c)->Status();
      if (s.ok()) {
        // A daemon that silently runs another transport than the suite asked
        // for must not pass it.
        if (!transport.empty() && s->transport != transport) {
          return absl::FailedPreconditionError(absl::StrCat(
              "svmd runs transport '", s->transport, "', the test wants '", transport, "'"));
        }
        peer_ = s->peer_listen;
        data_ = s->data_listen;
        // Keep the ports across restarts, as a restarted node would.
        opts_.peer_port = peer_port();
        opts_.data_port = data_port();
        return absl::OkStatus();
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("svmd did not become ready");
}

static uint16_t PortOf(const std::string& hp) {
  uint32_t port = 0;
  (void)absl::SimpleAtoi(hp.substr(hp.rfind(':') + 1), &port);
  return static_cast<uint16_t>(port);
}

uint16_t Daemon::peer_port() const { return PortOf(peer_); }
uint16_t Daemon::data_port() const { return PortOf(data_); }

std::unique_ptr<Client> Daemon::Connect() {
  if (!agent_.empty()) {
    auto c = RemoteConn::Open(agent_, remote_control_);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return nullptr;
    return std::make_unique<RemoteClient>(agent_, remote_control_, std::move(*c));
  }
  auto c = Client::Connect(control_);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

void Daemon::Kill() {
  if (!agent_.empty() && proc_->WriteLine("kill 9").ok()) {
    (void)proc_->ReadLine(Scaled(absl::Seconds(5)));  // "exited STATUS": the ports are free
  }
  proc_->Signal(SIGKILL);
  (void)proc_->Wait(absl::Seconds(5));
}

absl::StatusOr<std::unique_ptr<Exporter>> Exporter::Start(const Options& opts) {
  std::vector<std::string> argv = {ExporterPath(), "--daemon", opts.daemon->control(), "--name",
                                   opts.name, "--pages", std::to_string(opts.pages), "--backing",
                                   opts.backing};
  if (opts.fill >= 0) {
    argv.push_back("--fill");
    argv.push_back(std::to_string(opts.fill));
  }
  Subprocess::Options so;
  so.argv = argv;
  so.log_path = opts.log_path;
  so.uid = opts.uid;
  so.gid = opts.gid;
  const std::string& agent = opts.daemon->agent();
  if (!agent.empty()) {  // on the daemon's machine, through its node agent
    argv[2] = opts.daemon->remote_control();
    so = {};
    so.argv = {"/usr/bin/socat", "-", absl::StrCat("TCP:", agent)};
  }
  auto p = Subprocess::Start(so);
  if (!p.ok()) return p.status();
  auto e = std::unique_ptr<Exporter>(new Exporter());
  e->proc_ = std::move(*p);
  if (!agent.empty()) {
    if (auto st = e->proc_->WriteLine(absl::StrCat("exec\t", absl::StrJoin(argv, "\t"))); !st.ok()) return st;
  }
  auto line = e->proc_->ReadLine(Scaled(absl::Seconds(10)));
  if (!line.ok()) return absl::InternalError(absl::StrCat("exporter did not start: ", line.status().message()));
  // ready pid=P addr=0xA len=L
  for (absl::string_view kv : absl::StrSplit(*line, ' ')) {
    if (absl::ConsumePrefix(&kv, "addr=0x")) (void)absl::SimpleHexAtoi(kv, &e->addr_);
    if (absl::ConsumePrefix(&kv, "len=")) (void)absl::SimpleAtoi(kv, &e->len_);
  }
  if (!absl::StartsWith(*line, "ready")) return absl::InternalError(absl::StrCat("exporter said: ", *line));
  return e;
}

absl::StatusOr<std::string> Exporter::Command(const std::string& cmd, absl::Duration timeout) {
  if (auto st = proc_->WriteLine(cmd); !st.ok()) return st;
  return proc_->ReadLine(Scaled(timeout));
}

std::string Footprint::ToString() const {
  return absl::StrCat(fds, " fds, ", threads, " threads (", thread_names, "), ", rss_kib,
                      " KiB resident");
}

Footprint FootprintOf(pid_t pid) {
  Footprint f;
  if (DIR* d = ::opendir(absl::StrCat("/proc/", pid, "/fd").c_str())) {
    f.fds = 0;
    while (const dirent* e = ::readdir(d)) f.fds += e->d_name[0] != '.';
    ::closedir(d);
  }
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(status, line);) {
    auto value = [&](const char* key) -> int64_t {
      int64_t v = -1;
      (void)absl::SimpleAtoi(
          absl::StripAsciiWhitespace(absl::StripSuffix(line.substr(std::strlen(key)), "kB")), &v);
      return v;
    };
    if (absl::StartsWith(line, "Threads:")) f.threads = static_cast<int>(value("Threads:"));
    if (absl::StartsWith(line, "VmRSS:")) f.rss_kib = value("VmRSS:");
  }
  std::map<std::string, int> names;
  const std::string task_dir = absl::StrCat("/proc/", pid, "/task");
  if (DIR* d = ::opendir(task_dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      std::ifstream comm(absl::StrCat(task_dir, "/", e->d_name, "/comm"));
      std::string name;
      std::getline(comm, name);
      ++names[name];
    }
    ::closedir(d);
  }
  for (const auto& [name, n] : names) {
    absl::StrAppend(&f.thread_names, f.thread_names.empty() ? "" : " ", name, "x", n);
    if (name == "svmd") f.own_threads = n;
  }
  return f;
}

absl::StatusOr<std::string> ReadBytes(Client& c, const std::string& name, uint64_t offset,
                                      uint64_t len, bool fresh) {
  std::string out(len, '\0');
  ReadOptions o;
  o.fresh = fresh;
  auto r = c.Read(name, offset, absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), len), o);
  if (!r.ok()) return r.status();
  return out;
}

absl::StatusOr<Invalidation> WaitForPage(WatchStream& w, uint64_t page, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + Scaled(timeout);
  for (;;) {
    auto ev = w.Next(deadline - absl::Now());
    if (!ev.ok()) return ev.status();
    if (ev->npages == 0 || (page >= ev->first_page && page < ev->first_page + ev->npages)) {
      return ev;
    }
  }
}

absl::StatusOr<ExportInfo> ExportOf(Client& c, const std::string& name) {
  auto l = c.ListExports();
  if (!l.ok()) return l.status();
  for (auto& e : *l) {
    if (e.name == name) return e;
  }
  return absl::NotFoundError(name);
}

absl::StatusOr<ImportInfo> ImportOf(Client& c, const std::string& name) {
  auto l = c.ListImports();
  if (!l.ok()) return l.status();
  for (auto& i : *l) {
    if (i.name == name) return i;
  }
  return absl::NotFoundError(name);
}

std::string FileText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int MakeTestCa(const std::string& dir, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {MAKE_TEST_CA_PATH};
  std::vector<std::string> nodes;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--ca" && i + 1 < args.size()) {
      argv.push_back(args[i]);
      argv.push_back(args[++i]);
    } else if (args[i] == "--expired") {
      argv.push_back(args[i]);
    } else {
      nodes.push_back(args[i]);
    }
  }
  argv.push_back(dir);
  argv.insert(argv.end(), nodes.begin(), nodes.end());
  RunResult r = RunCommand(argv, absl::Seconds(60));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.exit_code;
}

std::vector<std::string> TlsFlagsFor(const std::string& dir, const std::string& node, const std::string& ca) {
  return {"--tls-cert", absl::StrCat(dir, "/", node, ".pem"), "--tls-key", absl::StrCat(dir, "/", node, ".key"),
          "--tls-ca", absl::StrCat(dir, "/", ca, ".pem")};
}

int LinesContaining(const std::string& path, const std::string& needle) {
  int n = 0;
  for (absl::string_view line : absl::StrSplit(FileText(path), '\n')) {
    n += absl::StrContains(line, needle);
  }
  return n;
}

}  // namespace svm::testing
