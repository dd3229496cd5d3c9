#include "tests/bench/reference.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace svm::bench {
namespace {

// A fresh TCP port per run: a server's port can linger in TIME_WAIT.
uint16_t NextPort(uint16_t base) {
  static int n = 0;
  return static_cast<uint16_t>(base + (n++ % 200));
}

bool Listening(uint16_t port) {
  const std::string needle = absl::StrFormat(":%04X ", port);
  for (const char* f : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(f);
    std::string line;
    while (std::getline(in, line)) {
      std::vector<std::string> cols = absl::StrSplit(line, ' ', absl::SkipWhitespace());
      // sl local_address rem_address st ...: LISTEN is 0A.
      if (cols.size() > 3 && absl::EndsWith(cols[1] + " ", needle) && cols[3] == "0A") return true;
    }
  }
  return false;
}

// fork + exec with extra environment, stdout and stderr into `out_path`.
// Everything the child needs is built before the fork: the child of a
// multi-threaded process must not allocate (harness.cc, RunCommand).
pid_t Spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env,
            const std::string& out_path) {
  std::vector<char*> av;
  for (const std::string& a : argv) av.push_back(const_cast<char*>(a.c_str()));
  av.push_back(nullptr);
  std::vector<char*> envp;
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  for (char** e = environ; *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    const size_t key = eq == nullptr ? std::strlen(*e) : static_cast<size_t>(eq - *e) + 1;
    bool overridden = false;
    for (const std::string& x : env) overridden |= x.compare(0, key, *e, key) == 0;
    if (!overridden) envp.push_back(*e);
  }
  envp.push_back(nullptr);
  pid_t pid = fork();
  if (pid != 0) return pid;
  int fd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    dup2(fd, 1);
    dup2(fd, 2);
  }
  int null = open("/dev/null", O_RDONLY);
  if (null >= 0) dup2(null, 0);
  setpgid(0, 0);
  execvpe(av[0], av.data(), envp.data());
  _exit(127);
}

// Waits for pid until the deadline, then kills its process group.
int WaitOrKill(pid_t pid, std::chrono::steady_clock::time_point deadline) {
  int st = 0;
  for (;;) {
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (r < 0) return -1;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(-pid, SIGKILL);
      waitpid(pid, &st, 0);
      return 124;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string TmpPath(const std::string& what) {
  const char* t = std::getenv("TMPDIR");
  return absl::StrCat(t != nullptr && *t != '\0' ? t : "/tmp", "/svm-bench-", getpid(), "-", what,
                      ".out");
}

// Server in the background (until it listens on port), then the client;
// returns the client's output.
absl::StatusOr<std::string> ServerClient(const std::vector<std::string>& server,
                                         const std::vector<std::string>& client,
                                         const std::vector<std::string>& env, uint16_t port) {
  const std::string sout = TmpPath("server"), cout = TmpPath("client");
  const pid_t s = Spawn(server, env, sout);
  if (s < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  const auto start = std::chrono::steady_clock::now();
  bool up = false;
  while (!up && std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    up = Listening(port);
    int st;
    if (!up && waitpid(s, &st, WNOHANG) == s) break;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  absl::StatusOr<std::string> result;
  if (!up) {
    result = absl::UnavailableError(absl::StrCat("`", absl::StrJoin(server, " "),
                                                 "` did not listen on port ", port, ": ",
                                                 Slurp(sout)));
  } else {
    const pid_t c = Spawn(client, env, cout);
    const int rc = WaitOrKill(c, std::chrono::steady_clock::now() + std::chrono::seconds(300));
    std::string out = Slurp(cout);
    if (rc != 0) {
      result = absl::UnavailableError(absl::StrCat("`", absl::StrJoin(client, " "), "` exited ",
                                                   rc, ": ", out, "\nserver: ", Slurp(sout)));
    } else {
      result = out;
    }
  }
  // The server exits after its client; do not wait long for a stuck one.
  WaitOrKill(s, std::chrono::steady_clock::now() + std::chrono::seconds(10));
  unlink(sout.c_str());
  unlink(cout.c_str());
  return result;
}

std::vector<std::string> Cols(absl::string_view line) {
  return absl::StrSplit(line, ' ', absl::SkipWhitespace());
}

}  // namespace

double NowUs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

uint64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

Stats Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Stats s;
  s.min = v.front();
  s.max = v.back();
  s.typical = v[v.size() / 2];
  s.avg = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  s.p99 = v[std::min(v.size() - 1, static_cast<size_t>(static_cast<double>(v.size()) * 0.99))];
  return s;
}

static absl::StatusOr<RefResult> RunPerftestOnce(const RdmaTarget& t, const std::string& tool, uint64_t size,
                                                 uint64_t iters, const std::vector<std::string>& extra) {
  const uint16_t port = NextPort(18515);
  std::vector<std::string> argv = {tool,
                                   "-d", t.device,
                                   "-i", std::to_string(t.port),
                                   "-x", std::to_string(t.gid_index),
                                   "-s", std::to_string(size),
                                   "-n", std::to_string(iters),
                                   "-p", std::to_string(port),
                                   "-F"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  std::vector<std::string> client = argv;
  client.push_back(t.addr);
  auto out = ServerClient(argv, client, {}, port);
  if (!out.ok()) return out.status();
  RefResult r;
  r.command = absl::StrJoin(client, " ");
  const bool bw = absl::EndsWith(tool, "_bw");
  for (absl::string_view line : absl::StrSplit(*out, '\n')) {
    std::vector<std::string> c = Cols(line);
    if (c.empty() || c[0] != std::to_string(size)) continue;
    // lat: #bytes #iterations t_min t_max t_typical t_avg ...
    // bw:  #bytes #iterations BW_peak BW_average MsgRate
    if (bw && c.size() >= 4 && absl::SimpleAtod(c[3], &r.bw_mib_s)) return r;
    if (!bw && c.size() >= 6 && absl::SimpleAtod(c[4], &r.typical_usec) &&
        absl::SimpleAtod(c[5], &r.avg_usec)) {
      return r;
    }
  }
  return absl::InternalError(absl::StrCat("no result row in the output of `", r.command, "`:\n", *out));
}

absl::StatusOr<RefResult> RunPerftest(const RdmaTarget& t, const std::string& tool, uint64_t size,
                                      uint64_t iters, const std::vector<std::string>& extra) {
  // Under TCG perftest now and then reports "inf" (its cycle clock): retry.
  absl::StatusOr<RefResult> r;
  for (int attempt = 0; attempt < 3; ++attempt) {
    r = RunPerftestOnce(t, tool, size, iters, extra);
    if (!r.ok()) return r;
    const double v = absl::EndsWith(tool, "_bw") ? r->bw_mib_s : r->typical_usec;
    if (std::isfinite(v) && v > 0) return r;
  }
  return absl::InternalError(absl::StrCat("`", r->command, "` reported no finite result in 3 runs"));
}

absl::StatusOr<RefResult> RunUcxGet(const RdmaTarget& t, const std::string& api,
                                    const std::string& tls, uint64_t size, uint64_t iters) {
  const uint16_t port = NextPort(13337);
  const std::string dev = absl::StrCat(t.device, ":", t.port);
  std::vector<std::string> server = {"ucx_perftest",
                                     "-s", std::to_string(size),
                                     "-n", std::to_string(iters),
                                     "-w", std::to_string(std::max<uint64_t>(iters / 10, 10)),
                                     "-p", std::to_string(port)};
  std::vector<std::string> env;
  if (api == "uct") {
    server.insert(server.end(), {"-t", "get", "-x", tls, "-d", dev, "-D", "zcopy"});
  } else {
    server.insert(server.end(), {"-t", "ucp_get"});
    env = {absl::StrCat("UCX_NET_DEVICES=", dev), absl::StrCat("UCX_TLS=", tls)};
  }
  std::vector<std::string> client = server;
  client.insert(client.begin() + 1, t.addr);
  auto out = ServerClient(server, client, env, port);
  if (!out.ok()) return out.status();
  RefResult r;
  r.command = absl::StrCat(absl::StrJoin(env, " "), env.empty() ? "" : " ", absl::StrJoin(client, " "));
  for (absl::string_view line : absl::StrSplit(*out, '\n')) {
    // Final: ITERS lat_50% lat_avg lat_overall bw_avg bw_overall rate_avg rate_overall
    std::vector<std::string> c = Cols(line);
    if (c.size() >= 7 && c[0] == "Final:" && absl::SimpleAtod(c[2], &r.typical_usec) &&
        absl::SimpleAtod(c[3], &r.avg_usec) && absl::SimpleAtod(c[5], &r.bw_mib_s)) {
      return r;
    }
  }
  return absl::InternalError(absl::StrCat("no Final: row in the output of `", r.command, "`:\n", *out));
}

absl::StatusOr<RefResult> Mean(const absl::StatusOr<RefResult>& a,
                               const absl::StatusOr<RefResult>& b) {
  if (!a.ok()) return a.status();
  if (!b.ok()) return b.status();
  RefResult r = *a;
  r.typical_usec = (a->typical_usec + b->typical_usec) / 2;
  r.avg_usec = (a->avg_usec + b->avg_usec) / 2;
  r.bw_mib_s = (a->bw_mib_s + b->bw_mib_s) / 2;
  return r;
}

}  // namespace svm::bench
