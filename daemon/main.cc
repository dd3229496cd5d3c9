// svmd: the svm daemon. See `svmd --help`.
#include <signal.h>
#include <grp.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/args.h"
#include "daemon/core/daemon.h"
#include "daemon/metrics/metrics_server.h"
#include "daemon/systemd/journal.h"
#include "daemon/systemd/watchdog.h"
#include "daemon/service/server.h"
#include "daemon/service/tls.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "common/log.h"

namespace {

constexpr char kUsage[] = R"(usage: svmd [options]
  --control unix:PATH          control socket for local clients (default unix:/run/svm/svmd.sock)
  --peer-listen HOST:PORT      peer API for other daemons (default 0.0.0.0:7470; port 0: any)
  --data-listen HOST:PORT      data connections (default: the peer host, any port)
  --node NAME                  this node's name (default: the host name)
  --source auto|shim|procfs    mirror source (default auto: shim when /dev/svm_shim exists)
  --transport auto|rdma|tcp    data transport (default auto: rdma when a device with an active
                               port is found, plus tcp; each peer link falls back to tcp
                               when its rdma setup fails)
  --rdma-device NAME           rdma device (default: the first with an active port)
  --rdma-registration auto|odp|pinned
                               data buffer registration (default auto: odp when the device
                               has rc read odp and passes the odp data check, else pinned;
                               odp: do not start without usable odp)
  --peer-token-file PATH       pre-shared token peers must present (default: none, unauthenticated)
  --tls-cert PATH              mutual TLS on the peer port (all three or none): this node's
  --tls-key PATH               certificate and key, and the CA peers' certificates must chain
  --tls-ca PATH                to (PEM). A peer's identity is its certificate's DNS/URI subject
                               alternative names (or CN); re-read on SIGHUP. Default: none,
                               peers unauthenticated and unencrypted
  --cache-mb N                 importer mirror cache size (default 256)
  --poll-interval-ms N         procfs source: pagemap poll interval (default 10)
  --scrub-interval-ms N        content scrub of remotely held pages (default 50)
  --sync-timeout-ms N          how long Sync waits for importers (default 5000)
  --fetch-timeout-ms N         how long a read waits for the exporter (default 1500)
  --peer-timeout-ms N          deadline of each call to a peer daemon (default 2000)
  --lease-ms N                 importer: serve cached pages only this long after the
                               exporter was last heard from (default 2000; keep it below
                               every exporter's --sync-timeout-ms)
  --heartbeat-ms N             exporter: heartbeat on every data connection (default 500;
                               keep it well below importers' --lease-ms)
  --socket-mode OCTAL          control socket mode (default 0660)
  --socket-group NAME          control socket group (default svm, if it exists; a group
                               named here must exist; "" leaves the socket's group alone)
  --metrics-listen HOST:PORT   serve Prometheus metrics at http://HOST:PORT/metrics (default:
                               off; port 0: any, the log names it)
  --log-level LEVEL            trace|debug|info|warn|error|critical|off (default info)
  --fault-fetch-delay-ms N     testing only: delay every fetch reply after the copy
  --fault-subscribe-inval-ms N testing only: on every subscription, push an invalidation of
                               the export's first page, then hold the answer N ms
  --flagfile PATH              read options from PATH, one "--flag value" a line (# comments);
                               options on the command line override it; SIGHUP re-reads it
  --version                    print the version and exit
SIGHUP reloads: the log level (from --flagfile) and the peer token file are re-read, and
the TLS certificate, key and CA files (new handshakes use them once they verify);
imports, exports and peer links stay up.
Exit status: 0 after a clean shutdown (SIGTERM, SIGINT), 1 when svmd cannot start or
serve, 2 for a usage error (the message names the flag).
)";

// --log-level, strictly: spdlog maps an unknown name to "off".
absl::StatusOr<spdlog::level::level_enum> LogLevelArg(const svm::Args& a) {
  const std::string v = a.Get("log-level", "info");
  static constexpr std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"warning", spdlog::level::warn}, {"error", spdlog::level::err},
      {"critical", spdlog::level::critical}, {"off", spdlog::level::off}};
  for (const auto& [name, level] : kLevels) {
    if (v == name) return level;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--log-level: unknown level '", v, "' (trace|debug|info|warn|error|critical|off)"));
}

// --socket-mode: octal permission bits, nothing else.
absl::StatusOr<mode_t> SocketModeArg(const std::string& v) {
  const bool octal = !v.empty() && v.size() <= 5 &&
                     v.find_first_not_of("01234567") == std::string::npos;
  const unsigned long mode = octal ? std::strtoul(v.c_str(), nullptr, 8) : 0;
  if (!octal || mode > 07777) {
    return absl::InvalidArgumentError(
        absl::StrCat("--socket-mode: '", v, "' is not an octal file mode (e.g. 0660)"));
  }
  return static_cast<mode_t>(mode);
}

// --socket-group: a group named on the command line must exist (a typo
// would leave the socket unreachable for the intended users); the default
// "svm" is used only when it exists.
absl::StatusOr<std::string> SocketGroupArg(const svm::Args& a) {
  if (!a.Has("socket-group")) return ::getgrnam("svm") != nullptr ? "svm" : "";
  const std::string g = a.Get("socket-group");
  if (!g.empty() && ::getgrnam(g.c_str()) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--socket-group: no group '", g, "'"));
  }
  return g;
}

absl::StatusOr<svm::HostPort> HostPortArg(const svm::Args& a, const std::string& key,
                                          const std::string& def) {
  auto hp = svm::ParseHostPort(a.Get(key, def));
  if (!hp.ok()) return absl::InvalidArgumentError(absl::StrCat("--", key, ": ", hp.status().message()));
  return hp;
}

absl::StatusOr<std::string> ReadPeerToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(ss.str()));
  if (token.empty()) return absl::InvalidArgumentError("the peer token file is empty");
  return token;
}

absl::StatusOr<svm::core::DaemonOptions> ParseOptions(const svm::Args& a) {
  svm::core::DaemonOptions o;
  const std::string control = a.Get("control", "unix:/run/svm/svmd.sock");
  if (!absl::StartsWith(control, "unix:") || control.size() <= 5) {
    return absl::InvalidArgumentError("--control must be unix:PATH");
  }
  o.control = control.substr(5);
  auto peer = HostPortArg(a, "peer-listen", "0.0.0.0:7470");
  if (!peer.ok()) return peer.status();
  o.peer_listen = *peer;
  auto data = HostPortArg(a, "data-listen", absl::StrCat(o.peer_listen.host, ":0"));
  if (!data.ok()) return data.status();
  o.data_listen = *data;
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  o.node = a.Get("node", host);
  o.source = a.Get("source", "auto");
  o.transport = a.Get("transport", "auto");
  o.rdma_device = a.Get("rdma-device", "");
  o.rdma_registration = a.Get("rdma-registration", "auto");
  if (a.Has("peer-token-file")) {
    auto token = ReadPeerToken(a.Get("peer-token-file"));
    if (!token.ok()) return token.status();
    o.peer_token = *token;
  }
  auto num = [&](const char* key, uint64_t def) { return a.GetU64(key, def); };
  auto cache = num("cache-mb", 256);
  auto poll = num("poll-interval-ms", 10);
  auto scrub = num("scrub-interval-ms", 50);
  auto sync = num("sync-timeout-ms", 5000);
  auto fetch = num("fetch-timeout-ms", 1500);
  auto fault = num("fault-fetch-delay-ms", 0);
  auto fault_sub = num("fault-subscribe-inval-ms", 0);
  auto peer_timeout = num("peer-timeout-ms", 2000);
  auto lease = num("lease-ms", 2000);
  auto heartbeat = num("heartbeat-ms", 500);
  for (auto* s : {&cache, &poll, &scrub, &sync, &fetch, &fault, &fault_sub, &peer_timeout, &lease,
                  &heartbeat}) {
    if (!s->ok()) return s->status();
  }
  if (*poll == 0 || *scrub == 0) return absl::InvalidArgumentError("intervals must be > 0");
  if (*heartbeat == 0) return absl::InvalidArgumentError("--heartbeat-ms must be > 0");
  if (*lease <= *heartbeat) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--lease-ms %u must be longer than --heartbeat-ms %u", *lease, *heartbeat));
  }
  if (*lease >= *sync) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--lease-ms %u must be shorter than --sync-timeout-ms %u (an importer dropped by an "
        "exporter could otherwise serve stale pages)", *lease, *sync));
  }
  o.import.lease = absl::Milliseconds(*lease);
  o.heartbeat_interval = absl::Milliseconds(*heartbeat);
  o.cache_bytes = *cache << 20;
  o.poll_interval = absl::Milliseconds(*poll);
  o.scrub_interval = absl::Milliseconds(*scrub);
  o.limits.sync_timeout = absl::Milliseconds(*sync);
  o.import.fetch_timeout = absl::Milliseconds(*fetch);
  o.limits.fault_fetch_delay = absl::Milliseconds(*fault);
  o.limits.fault_subscribe_inval = absl::Milliseconds(*fault_sub);
  o.import.rpc_timeout = absl::Milliseconds(*peer_timeout);
  return o;
}

}  // namespace

// The options svmd takes (value options and booleans).
const std::set<std::string> kValueFlags = {
    "control", "peer-listen", "data-listen", "node", "source", "transport", "rdma-device",
    "rdma-registration", "peer-token-file", "cache-mb", "poll-interval-ms", "scrub-interval-ms",
    "sync-timeout-ms", "fetch-timeout-ms", "socket-mode", "socket-group", "log-level",
    "metrics-listen", "fault-fetch-delay-ms", "fault-subscribe-inval-ms", "peer-timeout-ms",
    "lease-ms", "heartbeat-ms", "flagfile", "tls-cert", "tls-key", "tls-ca"};
const std::set<std::string> kBoolFlags = {"help", "version"};

// The words of a flagfile: each line "--flag value" or "--flag=value"
// (the value is the rest of the line, literally: no quoting), "#" comments
// and blank lines skipped.
absl::StatusOr<std::vector<std::string>> ReadFlagfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--flagfile: cannot read ", path));
  std::vector<std::string> words;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    if (!absl::StartsWith(l, "--")) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--flagfile %s:%d: expected --flag [value], got '%s'", path, n, l));
    }
    if (absl::StartsWith(l, "--flagfile")) {
      return absl::InvalidArgumentError(absl::StrFormat("--flagfile %s:%d: flagfiles do not nest", path, n));
    }
    const size_t sp = l.find_first_of(" \t");
    words.emplace_back(l.substr(0, sp));
    if (sp != absl::string_view::npos) words.emplace_back(absl::StripAsciiWhitespace(l.substr(sp)));
  }
  return words;
}

// The command line with the flagfile it names (if any) read in front of
// it, so that the command line wins.
absl::StatusOr<svm::Args> ParseArgs(int argc, char** argv) {
  auto cli = svm::Args::Parse(argc, argv, kValueFlags, kBoolFlags);
  if (!cli.ok() || !cli->Has("flagfile")) return cli;
  auto words = ReadFlagfile(cli->Get("flagfile"));
  if (!words.ok()) return words.status();
  std::vector<char*> merged = {argv[0]};
  for (auto& w : *words) merged.push_back(w.data());
  for (int i = 1; i < argc; ++i) merged.push_back(argv[i]);
  auto a = svm::Args::Parse(static_cast<int>(merged.size()), merged.data(), kValueFlags, kBoolFlags);
  if (!a.ok()) {
    return absl::Status(a.status().code(),
                        absl::StrCat(a.status().message(), " (command line or --flagfile)"));
  }
  return a;
}

// SIGHUP: applies what can change while svmd runs (the log level), checks
// the peer token file, and names every other option that changed as
// needing a restart. Nothing is torn down: imports and links stay up.
void Reload(int argc, char** argv, const svm::Args& running, const std::string& running_token,
            svm::service::PeerTls* tls) {
  svm::systemd::Notify("RELOADING=1");
  absl::Cleanup ready = [] { svm::systemd::Notify("READY=1"); };
  auto now = ParseArgs(argc, argv);
  if (!now.ok()) {
    spdlog::error("reload: {}; nothing changed", now.status().message());
    return;
  }
  auto level = LogLevelArg(*now);
  if (!level.ok()) {
    spdlog::error("reload: {}; nothing changed", level.status().message());
    return;
  }
  if (*level != spdlog::get_level()) {
    spdlog::set_level(*level);
    spdlog::warn("reload: log level {}", spdlog::level::to_string_view(*level));
  }
  if (now->Has("peer-token-file")) {
    auto token = ReadPeerToken(now->Get("peer-token-file"));
    if (!token.ok()) {
      spdlog::error("reload: {}; svmd keeps the token it started with", token.status().message());
    } else if (*token != running_token) {
      spdlog::warn("reload: the peer token changed; it takes effect when svmd restarts "
                   "(imports and peer links keep the current one)");
    }
  }
  if (tls != nullptr) {
    auto served = tls->Reload();
    if (!served.ok()) {
      spdlog::error("reload: {}; svmd keeps its current certificates ({})", served.status().message(),
                    tls->Describe());
    } else {
      spdlog::warn("reload: peer tls certificate {}", *served);
    }
  }
  for (const std::string& key : kValueFlags) {
    if (key == "log-level" || key == "flagfile") continue;
    if (now->Get(key, "\x01") != running.Get(key, "\x01")) {
      spdlog::warn("reload: --{} changed; it takes effect when svmd restarts", key);
    }
  }
  spdlog::info("reload: done");
}

int main(int argc, char** argv) {
  auto args = ParseArgs(argc, argv);
  if (!args.ok()) {
    std::fprintf(stderr, "svmd: %s\n%s", std::string(args.status().message()).c_str(), kUsage);
    return 2;
  }
  if (args->Has("help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (args->Has("version")) {
    std::printf("svmd %s\n", SVM_VERSION);
    return 0;
  }
  if (!args->positional().empty()) {
    std::fprintf(stderr, "svmd: unexpected argument '%s'\n", args->positional()[0].c_str());
    return 2;
  }
  auto usage_error = [](const absl::Status& st) {
    std::fprintf(stderr, "svmd: %s\n", std::string(st.message()).c_str());
    return 2;
  };
  auto level = LogLevelArg(*args);
  if (!level.ok()) return usage_error(level.status());
  svm::service::ServerOptions so;
  if (args->Has("socket-mode")) {
    auto mode = SocketModeArg(args->Get("socket-mode"));
    if (!mode.ok()) return usage_error(mode.status());
    so.socket_mode = *mode;
  }
  auto group = SocketGroupArg(*args);
  if (!group.ok()) return usage_error(group.status());
  so.socket_group = *group;

  auto logger = spdlog::stderr_color_mt("svmd");
  spdlog::set_default_logger(logger);
  svm::systemd::SetLogPattern();  // "<N>" priorities when stderr is the journal
  spdlog::set_level(*level);
  svm::service::RouteGrpcLogs();

  auto opts = ParseOptions(*args);
  if (!opts.ok()) return usage_error(opts.status());
  // Mutual TLS on the peer port: all three files or none.
  std::unique_ptr<svm::service::PeerTls> tls;
  {
    const int given = args->Has("tls-cert") + args->Has("tls-key") + args->Has("tls-ca");
    if (given != 0 && given != 3) {
      return usage_error(absl::InvalidArgumentError("--tls-cert, --tls-key and --tls-ca go together"));
    }
    if (given == 3) {
      auto t = svm::service::PeerTls::Create(
          {.cert = args->Get("tls-cert"), .key = args->Get("tls-key"), .ca = args->Get("tls-ca")});
      if (!t.ok()) return usage_error(t.status());
      tls = std::move(*t);
      so.peer_credentials = tls->ServerCredentials();
      opts->import.peer_credentials = tls->ChannelCredentials();
    }
  }
  std::optional<svm::HostPort> metrics_listen;
  if (args->Has("metrics-listen")) {
    auto hp = HostPortArg(*args, "metrics-listen", "");
    if (!hp.ok()) return usage_error(hp.status());
    metrics_listen = *hp;
  }

  // Signals are taken synchronously by this thread; every other thread
  // inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto daemon = svm::core::Daemon::Create(*opts);
  if (!daemon.ok()) {
    spdlog::error("cannot start: {}", daemon.status().message());
    return 1;
  }
  auto server = svm::service::Server::Start(daemon->get(), so);
  if (!server.ok()) {
    spdlog::error("cannot start: {}", server.status().message());
    return 1;
  }
  std::unique_ptr<svm::metrics::MetricsServer> metrics;
  if (metrics_listen) {
    auto m = svm::metrics::MetricsServer::Start(daemon->get(), *metrics_listen);
    if (!m.ok()) {
      spdlog::error("cannot start: {}", m.status().message());
      return 1;
    }
    metrics = std::move(*m);
    spdlog::info("metrics on http://{}/metrics", metrics->address());
  }
  std::string data;
  for (svm::transport::Transport* t : (*daemon)->transports()) {
    absl::StrAppend(&data, data.empty() ? "" : ", ", t->name(), " ", t->listen_address());
  }
  spdlog::info("svmd {} node {} ready: control unix:{}, peers {}, data {} (transport {}), source {}",
               SVM_VERSION, opts->node, opts->control, (*server)->peer_address(), data,
               opts->transport, (*daemon)->source_name());
  if (tls) {
    spdlog::info("peers: mutual tls, {}", tls->Describe());
  } else if (opts->peer_token.empty()) {
    // The packaged default: the service must start on a fresh install,
    // where no certificates or token exist yet (docs/operations.md,
    // "Configure" and "Securing peers").
    spdlog::warn("peer authentication is OFF and peer traffic is unencrypted (no --tls-cert/--tls-key/"
                 "--tls-ca, no --peer-token-file): any host that reaches {} can read every export "
                 "of this node that has no access list; use --tls-* on every node unless peers are "
                 "confined to a trusted network",
                 (*server)->peer_address());
  } else {
    spdlog::warn("peer tls is OFF (no --tls-cert/--tls-key/--tls-ca): peer traffic, the token and "
                 "rkeys travel unencrypted, peers prove no identity (exports with an access list "
                 "are refused to every peer); use --tls-* on every node unless peers are confined "
                 "to a trusted network");
  }
  svm::core::Daemon* d = daemon->get();
  auto summary = [d] {
    return absl::StrFormat("serving: %d exports, %d imports, %u peer links up",
                           d->exports().List().size(), d->imports().List().size(),
                           d->imports().peers());
  };
  svm::systemd::Notify(absl::StrCat("READY=1\nSTATUS=", summary()));
  // Under systemd: STATUS= refreshed, and WATCHDOG=1 when WatchdogSec= is
  // set, each only after a probe ran on the executor and read the tables.
  std::unique_ptr<svm::systemd::Watchdog> watchdog;
  if (std::getenv("NOTIFY_SOCKET") != nullptr) {
    const absl::Duration interval = svm::systemd::WatchdogInterval();
    if (interval > absl::ZeroDuration()) {
      spdlog::info("watchdog: pinging systemd every {} ms while the daemon makes progress",
                   absl::ToInt64Milliseconds(interval / 2));
    }
    watchdog = svm::systemd::Watchdog::Start(
        {.interval = interval},
        [d](std::function<void()> done) {
          d->executor().Submit([d, done = std::move(done)] {
            d->exports().List();  // takes (and so checks) the table locks
            d->imports().List();
            done();
          });
        },
        summary, &svm::systemd::Notify);
  }

  int sig = 0;
  while (sigwait(&sigs, &sig) == 0 && sig == SIGHUP) {
    spdlog::info("SIGHUP: reloading");
    Reload(argc, argv, *args, opts->peer_token, tls.get());
  }
  spdlog::info("signal {}: shutting down", sig);
  svm::systemd::Notify("STOPPING=1");
  watchdog.reset();  // its probes use the executor and the tables
  metrics.reset();  // no scrape may read the tables while they go
  (*server)->Shutdown();
  server->reset();
  daemon->reset();
  spdlog::info("stopped");
  return 0;
}
