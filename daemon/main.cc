// svmd: the svm daemon. See `svmd --help`.
#include <signal.h>
#include <grp.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include <iostream>
#include <map>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/internal/parse.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/marshalling.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/numbers.h"
#include "daemon/core/daemon.h"
#include "daemon/flags.h"
#include "daemon/metrics/metrics_server.h"
#include "daemon/systemd/journal.h"
#include "daemon/systemd/watchdog.h"
#include "daemon/service/server.h"
#include "daemon/service/tls.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "common/log.h"

// Flags keep the names svmd always had ("--peer-listen", with dashes):
// SVMD_FLAG(Type, identifier, "name", default, help) is ABSL_FLAG with the
// name given separately from the C++ identifier (FLAGS_identifier).
// ABSL_FLAG itself names a flag after its identifier, and identifiers have
// no dashes. It uses ABSL_FLAG's own building blocks from
// absl/flags/flag.h (Debian 12's abseil, 20220623).
#define SVMD_FLAG(Type, ident, name, default_value, help)                      \
  extern ::absl::Flag<Type> FLAGS_##ident;                                     \
  ABSL_FLAG_IMPL_DECLARE_DEF_VAL_WRAPPER(ident, Type, default_value)           \
  ABSL_FLAG_IMPL_DECLARE_HELP_WRAPPER(ident, help)                             \
  ABSL_CONST_INIT absl::Flag<Type> FLAGS_##ident{                              \
      name, ABSL_FLAG_IMPL_FILENAME(), ABSL_FLAG_IMPL_HELP_ARG(ident),         \
      ABSL_FLAG_IMPL_DEFAULT_ARG(Type, ident)};                                \
  extern absl::flags_internal::FlagRegistrarEmpty FLAGS_no##ident;             \
  absl::flags_internal::FlagRegistrarEmpty FLAGS_no##ident =                   \
      ABSL_FLAG_IMPL_REGISTRAR(Type, FLAGS_##ident)

using svm::flags::Choice;
using svm::flags::RdmaRegistrationName;
using svm::flags::SourceName;
using svm::flags::TransportName;
using svm::flags::ControlSocket;
using svm::flags::LogLevel;
using svm::flags::OptionalHostPort;
using svm::flags::SocketMode;

// Endpoints.
SVMD_FLAG(ControlSocket, control, "control", ControlSocket{"/run/svm/svmd.sock"},
          "control socket for local clients, unix:PATH");
SVMD_FLAG(OptionalHostPort, peer_listen, "peer-listen", OptionalHostPort::Of("0.0.0.0", 7470),
          "peer API for other daemons, HOST:PORT (port 0: any)");
SVMD_FLAG(OptionalHostPort, data_listen, "data-listen", OptionalHostPort{},
          "data connections, HOST:PORT (empty: the peer host, any port)");
SVMD_FLAG(std::string, node, "node", "", "this node's name (empty: the host name)");
SVMD_FLAG(OptionalHostPort, metrics_listen, "metrics-listen", OptionalHostPort{},
          "serve Prometheus metrics at http://HOST:PORT/metrics (empty: off; port 0: any, the log "
          "names it)");
// Data path.
SVMD_FLAG(Choice<SourceName>, source, "source", Choice<SourceName>{"auto"},
          "mirror source: auto|shim|procfs (auto: shim when /dev/svm_shim exists)");
SVMD_FLAG(Choice<TransportName>, transport, "transport", Choice<TransportName>{"auto"},
          "data transport: auto|rdma|tcp (auto: rdma when a device with an active port is found, "
          "plus tcp; each peer link falls back to tcp when its rdma setup fails)");
SVMD_FLAG(std::string, rdma_device, "rdma-device", "", "rdma device (empty: the first with an active port)");
SVMD_FLAG(Choice<RdmaRegistrationName>, rdma_registration, "rdma-registration",
          Choice<RdmaRegistrationName>{"auto"},
          "data buffer registration: auto|odp|pinned (auto: odp when the device has rc read odp and "
          "passes the odp data check, else pinned; odp: do not start without usable odp)");
SVMD_FLAG(uint64_t, rdma_ack_timeout_ms, "rdma-ack-timeout-ms", 67,
          "how long an rdma request waits for its acknowledgement before it is retransmitted (7 "
          "times without progress, then the connection fails); rounded up to 4.096 us * 2^n; > 0");
// Peers.
SVMD_FLAG(std::string, peer_token_file, "peer-token-file", "",
          "pre-shared token peers must present (empty: none, unauthenticated); re-read on SIGHUP");
SVMD_FLAG(std::string, tls_cert, "tls-cert", "",
          "mutual TLS on the peer port (with --tls-key and --tls-ca, all three or none): this node's "
          "certificate (PEM); re-read on SIGHUP");
SVMD_FLAG(std::string, tls_key, "tls-key", "", "this node's private key (PEM); re-read on SIGHUP");
SVMD_FLAG(std::string, tls_ca, "tls-ca", "",
          "the CA peers' certificates must chain to (PEM); a peer's identity is its certificate's "
          "DNS/URI subject alternative names (or CN); re-read on SIGHUP");
// Sizes and times.
SVMD_FLAG(uint64_t, cache_mb, "cache-mb", 256, "importer mirror cache size in MiB");
SVMD_FLAG(uint64_t, poll_interval_ms, "poll-interval-ms", 10, "procfs source: pagemap poll interval (> 0)");
SVMD_FLAG(uint64_t, scrub_interval_ms, "scrub-interval-ms", 50,
          "content scrub of remotely held pages, interval (> 0)");
SVMD_FLAG(uint64_t, sync_timeout_ms, "sync-timeout-ms", 5000, "how long Sync waits for importers");
SVMD_FLAG(uint64_t, fetch_timeout_ms, "fetch-timeout-ms", 1500, "how long a read waits for the exporter");
SVMD_FLAG(uint64_t, peer_timeout_ms, "peer-timeout-ms", 2000, "deadline of each call to a peer daemon");
SVMD_FLAG(uint64_t, lease_ms, "lease-ms", 2000,
          "importer: serve cached pages only this long after the exporter was last heard from "
          "(keep it below every exporter's --sync-timeout-ms)");
SVMD_FLAG(uint64_t, heartbeat_ms, "heartbeat-ms", 500,
          "exporter: heartbeat on every data connection (> 0; keep it well below importers' "
          "--lease-ms)");
// The control socket.
SVMD_FLAG(SocketMode, socket_mode, "socket-mode", SocketMode{0660}, "control socket mode, octal");
SVMD_FLAG(std::string, socket_group, "socket-group", "svm",
          "control socket group; must exist when given; the default svm is used when it exists; "
          "\"\" leaves the socket's group alone");
// Limits (docs/operations.md, "Limits"); reloadable (SIGHUP): a lowered
// limit refuses new work only, nothing held is dropped.
SVMD_FLAG(uint64_t, max_sessions_per_client, "max-sessions-per-client", 256,
          "open sessions (session socket) per client uid (> 0); reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_exports_per_client, "max-exports-per-client", 256,
          "exports per client uid (> 0); reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_export_bytes_per_client, "max-export-bytes-per-client", uint64_t{1} << 40,
          "bytes the exports of one client uid may span (> 0); reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_imports_per_peer, "max-imports-per-peer", 1024,
          "exporter: imports (subscriptions) one peer node may hold over all exports (> 0); "
          "reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_pending_fetches_per_peer, "max-pending-fetches-per-peer", 4096,
          "exporter: fetches waiting on one peer's data connections, all of them together (tcp: "
          "responses queued unsent; rdma: FETCHes waiting for a staging buffer), before further "
          "fetches are answered RESOURCE_EXHAUSTED (> 0); reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_data_connections_per_peer, "max-data-connections-per-peer", 16,
          "exporter: data connections one peer may hold, offered (SetupData) or open, before "
          "SetupData is answered RESOURCE_EXHAUSTED (> 0; each costs a thread pair on tcp, a "
          "queue pair with about 2.1 MiB registered on rdma); reloadable (SIGHUP)");
SVMD_FLAG(uint64_t, max_sessions, "max-sessions", 1024,
          "open sessions (session socket) of all clients together (> 0); reloadable (SIGHUP)");
// Logs.
SVMD_FLAG(LogLevel, log_level, "log-level", LogLevel{spdlog::level::info},
          "trace|debug|info|warn|error|critical|off; reloadable (SIGHUP)");
// Fault injection.
SVMD_FLAG(uint64_t, fault_fetch_delay_ms, "fault-fetch-delay-ms", 0,
          "testing only: delay every fetch reply after the copy");
SVMD_FLAG(uint64_t, fault_subscribe_inval_ms, "fault-subscribe-inval-ms", 0,
          "testing only: on every subscription, push an invalidation of the export's first page, "
          "then hold the answer N ms");

namespace {

constexpr char kUsage[] = R"(the svm daemon (shared virtual memory over RDMA/TCP).
usage: svmd [--flagfile=/etc/svm/svmd.conf] [--flag=value ...]

A flagfile has one --flag=value a line (# comments); flags after --flagfile
on the command line override it. Every flag is listed below.

SIGHUP reloads, without dropping imports, exports, sessions or peer links:
  --log-level (from the flagfile), the peer token file (--peer-token-file:
  the new token applies to peer calls from then on), the TLS certificate,
  key and CA files (new handshakes use them once they verify), the limits
  (--max-*: a lowered limit refuses new work only). Other changed flags
  are logged as needing a restart.
Exit status: 0 after a clean shutdown (SIGTERM, SIGINT) and for --help and
--version, 1 when svmd cannot start or serve, 2 for a usage error (the
message names the flag).)";

// The flags that SIGHUP applies (the rest need a restart).
// The flags that SIGHUP applies; the rest need a restart. (The TLS files
// are re-read too, from the paths svmd started with.) To make a flag
// reloadable: list it here and apply it in Reload() (docs/operations.md).
const std::set<std::string> kReloadable = {
    "log-level",           "peer-token-file",       "max-sessions-per-client",
    "max-exports-per-client", "max-export-bytes-per-client", "max-imports-per-peer",
    "max-pending-fetches-per-peer"};

absl::Status FlagError(const char* flag, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", what));
}

// The limit flags, by core::Limit.
struct LimitFlag {
  svm::core::Limit limit;
  absl::Flag<uint64_t>* flag;
};
const LimitFlag kLimitFlags[] = {
    {svm::core::Limit::kSessionsPerClient, &FLAGS_max_sessions_per_client},
    {svm::core::Limit::kExportsPerClient, &FLAGS_max_exports_per_client},
    {svm::core::Limit::kExportBytesPerClient, &FLAGS_max_export_bytes_per_client},
    {svm::core::Limit::kImportsPerPeer, &FLAGS_max_imports_per_peer},
    {svm::core::Limit::kPendingFetchesPerPeer, &FLAGS_max_pending_fetches_per_peer},
    {svm::core::Limit::kSessions, &FLAGS_max_sessions},
    {svm::core::Limit::kDataConnectionsPerPeer, &FLAGS_max_data_connections_per_peer},
};

absl::Status CheckLimit(svm::core::Limit l, uint64_t v) {
  if (v > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", svm::core::Limits::Flag(l), ": must be > 0"));
}

absl::StatusOr<std::string> ReadPeerToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return FlagError("peer-token-file", absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(ss.str()));
  if (token.empty()) return FlagError("peer-token-file", absl::StrCat(path, " is empty"));
  return token;
}

// Whether the flag was set on the command line or in a flagfile.
bool Given(absl::string_view name) { return absl::flags_internal::WasPresentOnCommandLine(name); }

absl::StatusOr<svm::core::DaemonOptions> ParseOptions() {
  svm::core::DaemonOptions o;
  o.control = absl::GetFlag(FLAGS_control).path;
  auto peer = absl::GetFlag(FLAGS_peer_listen);
  if (!peer.value) return FlagError("peer-listen", "must be HOST:PORT");
  o.peer_listen = *peer.value;
  auto data = absl::GetFlag(FLAGS_data_listen);
  o.data_listen = data.value ? *data.value : svm::HostPort{o.peer_listen.host, 0};
  o.node = absl::GetFlag(FLAGS_node);
  if (o.node.empty()) {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    o.node = host;
  }
  o.source = absl::GetFlag(FLAGS_source).value;
  o.transport = absl::GetFlag(FLAGS_transport).value;
  o.rdma_device = absl::GetFlag(FLAGS_rdma_device);
  o.rdma_registration = absl::GetFlag(FLAGS_rdma_registration).value;
  if (const uint64_t ack = absl::GetFlag(FLAGS_rdma_ack_timeout_ms); ack == 0) {
    return FlagError("rdma-ack-timeout-ms", "must be > 0");
  } else {
    o.rdma_ack_timeout = absl::Milliseconds(ack);
  }
  if (const std::string path = absl::GetFlag(FLAGS_peer_token_file); !path.empty()) {
    auto token = ReadPeerToken(path);
    if (!token.ok()) return token.status();
    o.peer_token = *token;
  }
  const uint64_t cache = absl::GetFlag(FLAGS_cache_mb);
  const uint64_t poll = absl::GetFlag(FLAGS_poll_interval_ms);
  const uint64_t scrub = absl::GetFlag(FLAGS_scrub_interval_ms);
  const uint64_t sync = absl::GetFlag(FLAGS_sync_timeout_ms);
  const uint64_t lease = absl::GetFlag(FLAGS_lease_ms);
  const uint64_t heartbeat = absl::GetFlag(FLAGS_heartbeat_ms);
  if (cache > (uint64_t{1} << 30)) return FlagError("cache-mb", absl::StrCat(cache, " MiB is more than 1 PiB"));
  if (poll == 0) return FlagError("poll-interval-ms", "must be > 0");
  if (scrub == 0) return FlagError("scrub-interval-ms", "must be > 0");
  if (heartbeat == 0) return FlagError("heartbeat-ms", "must be > 0");
  if (lease <= heartbeat) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--lease-ms %u must be longer than --heartbeat-ms %u", lease, heartbeat));
  }
  if (lease >= sync) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--lease-ms %u must be shorter than --sync-timeout-ms %u (an importer dropped by an "
        "exporter could otherwise serve stale pages)", lease, sync));
  }
  o.import.lease = absl::Milliseconds(lease);
  o.heartbeat_interval = absl::Milliseconds(heartbeat);
  o.cache_bytes = cache << 20;
  o.poll_interval = absl::Milliseconds(poll);
  o.scrub_interval = absl::Milliseconds(scrub);
  o.limits.sync_timeout = absl::Milliseconds(sync);
  o.import.fetch_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_fetch_timeout_ms));
  o.limits.fault_fetch_delay = absl::Milliseconds(absl::GetFlag(FLAGS_fault_fetch_delay_ms));
  o.limits.fault_subscribe_inval = absl::Milliseconds(absl::GetFlag(FLAGS_fault_subscribe_inval_ms));
  o.import.rpc_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_peer_timeout_ms));
  for (const LimitFlag& f : kLimitFlags) {
    const uint64_t v = absl::GetFlag(*f.flag);
    if (auto st = CheckLimit(f.limit, v); !st.ok()) return st;
    o.limit_values.Of(f.limit) = v;
  }
  return o;
}

// The flagfiles svmd started with, and the flags named outside them (on
// the command line proper): those keep their command-line value on reload.
struct Startup {
  std::vector<std::string> flagfiles;
  std::set<std::string> on_command_line;
  svm::flags::FlagfileValues values;  // what the flagfiles said at start
};

Startup ScanCommandLine(int argc, char** argv) {
  Startup s;
  s.flagfiles = absl::GetFlag(FLAGS_flagfile);
  for (int i = 1; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "--") break;
    if (!absl::ConsumePrefix(&a, "--")) continue;
    const std::string name(a.substr(0, a.find('=')));
    if (name != "flagfile") s.on_command_line.insert(name);
  }
  auto v = svm::flags::ReadFlagfiles(s.flagfiles);
  if (v.ok()) s.values = *std::move(v);
  return s;
}

// SIGHUP: re-reads the flagfiles, applies the reloadable flags they set
// (unless the command line set them), re-reads the peer token file and the
// TLS files, and names every other flag that changed as needing a restart.
// Nothing is torn down: imports, sessions and peer links stay up. An error
// changes nothing of what it concerns.
void Reload(Startup& startup, svm::core::Daemon* d, svm::service::PeerTls* tls) {
  svm::systemd::Notify("RELOADING=1");
  absl::Cleanup ready = [] { svm::systemd::Notify("READY=1"); };
  auto now = svm::flags::ReadFlagfiles(startup.flagfiles);
  if (!now.ok()) {
    spdlog::error("reload: {}; nothing changed", now.status().message());
    return;
  }
  for (const auto& [name, value] : *now) {
    if (absl::FindCommandLineFlag(name) == nullptr) {
      spdlog::error("reload: --flagfile: unknown flag --{}; nothing changed", name);
      return;
    }
  }
  auto from_file = [&](const std::string& name) -> std::optional<std::string> {
    if (startup.on_command_line.count(name)) return std::nullopt;  // the command line wins
    auto it = now->find(name);
    if (it != now->end()) return it->second;
    return absl::FindCommandLineFlag(name)->DefaultValue();  // removed from the file
  };
  LogLevel level = absl::GetFlag(FLAGS_log_level);
  if (auto v = from_file("log-level")) {
    std::string err;
    if (!absl::ParseFlag(*v, &level, &err)) {
      spdlog::error("reload: --log-level: {}; nothing changed", err);
      return;
    }
  }
  if (level.value != spdlog::get_level()) {
    absl::SetFlag(&FLAGS_log_level, level);
    spdlog::set_level(level.value);
    spdlog::warn("reload: log level {}", spdlog::level::to_string_view(level.value));
  }
  // The limits: all of them or none (a bad value changes no limit). Held
  // exports, imports, sessions and queued fetches stay above a lowered one.
  {
    svm::core::LimitValues limits = d->limits().Values();
    absl::Status bad;
    for (const LimitFlag& f : kLimitFlags) {
      const std::string name(svm::core::Limits::Flag(f.limit));
      auto v = from_file(name);
      if (!v) continue;
      uint64_t n = 0;
      std::string err;
      if (!absl::ParseFlag(*v, &n, &err)) {
        bad = FlagError(name.c_str(), err.empty() ? absl::StrCat("'", *v, "' is not a number") : err);
      } else if (auto st = CheckLimit(f.limit, n); !st.ok()) {
        bad = st;
      }
      if (!bad.ok()) break;
      limits.Of(f.limit) = n;
    }
    if (!bad.ok()) {
      spdlog::error("reload: {}; svmd keeps its current limits", bad.message());
    } else {
      const svm::core::LimitValues was = d->limits().Values();
      d->limits().Set(limits);
      for (const LimitFlag& f : kLimitFlags) {
        absl::SetFlag(f.flag, limits.Of(f.limit));
        if (was.Of(f.limit) != limits.Of(f.limit)) {
          spdlog::warn("reload: --{} {} (was {}); what is held stays", svm::core::Limits::Flag(f.limit),
                       limits.Of(f.limit), was.Of(f.limit));
        }
      }
    }
  }
  // The token: the file named now (the path may change too), re-read.
  std::string token_path = absl::GetFlag(FLAGS_peer_token_file);
  if (auto v = from_file("peer-token-file")) token_path = *v;
  const std::string running = d->peer_token().Get();
  if (token_path.empty() != running.empty()) {
    spdlog::error("reload: --peer-token-file: token authentication cannot be turned {} by a reload; "
                  "svmd keeps the current setting until it restarts",
                  running.empty() ? "on" : "off");
  } else if (!token_path.empty()) {
    auto token = ReadPeerToken(token_path);
    if (!token.ok()) {
      spdlog::error("reload: {}; svmd keeps its current token", token.status().message());
    } else if (*token != running) {
      d->peer_token().Set(*token);
      absl::SetFlag(&FLAGS_peer_token_file, token_path);
      spdlog::warn("reload: new peer token from {}: peer calls from now on use it (imports, "
                   "sessions and data connections stay up)", token_path);
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
  std::set<std::string> names;
  for (const auto& [k, v] : *now) names.insert(k);
  for (const auto& [k, v] : startup.values) names.insert(k);
  for (const std::string& name : names) {
    if (kReloadable.count(name) || startup.on_command_line.count(name)) continue;
    auto was = startup.values.find(name);
    auto is = now->find(name);
    const bool same = (was == startup.values.end()) == (is == now->end()) &&
                      (is == now->end() || is->second == was->second);
    if (!same) spdlog::warn("reload: --{} changed; it takes effect when svmd restarts", name);
  }
  spdlog::info("reload: done");
}

}  // namespace

// abseil reports a usage error (a bad value, an unknown flag, an unreadable
// flagfile), having printed it, through this hook before it exits with 1:
// svmd's usage errors exit with 2 (the unit does not restart on 2).
extern "C" void ABSL_INTERNAL_C_SYMBOL(AbslInternalReportFatalUsageError)(absl::string_view) {
  std::fflush(stderr);
  std::exit(2);
}

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  absl::FlagsUsageConfig usage;
  usage.version_string = [] { return absl::StrCat("svmd ", SVM_VERSION, "\n"); };
  usage.normalize_filename = [](absl::string_view f) {
    return std::string(absl::StrContains(f, "daemon/main.cc") ? "svmd" : f);
  };
  usage.contains_help_flags = [](absl::string_view f) { return f == "svmd" || absl::StrContains(f, "daemon/main.cc"); };
  absl::SetFlagsUsageConfig(usage);
  // Usage errors end the process here, with exit status 2 (the hook above).
  const std::vector<char*> positional = absl::flags_internal::ParseCommandLineImpl(
      argc, argv, absl::flags_internal::ArgvListAction::kRemoveParsedArgs,
      absl::flags_internal::UsageFlagsAction::kIgnoreUsage,
      absl::flags_internal::OnUndefinedFlag::kAbortIfUndefined);
  // --help, --helpfull, --version: printed, exit 0.
  if (absl::flags_internal::HandleUsageFlags(std::cout, absl::ProgramUsageMessage()) != -1) return 0;
  if (positional.size() > 1) {
    std::fprintf(stderr, "svmd: unexpected argument '%s' (svmd takes only flags; see --help)\n",
                 positional[1]);
    return 2;
  }
  auto usage_error = [](const absl::Status& st) {
    std::fprintf(stderr, "svmd: %s\n", std::string(st.message()).c_str());
    return 2;
  };
  Startup startup = ScanCommandLine(argc, argv);
  svm::service::ServerOptions so;
  so.socket_mode = absl::GetFlag(FLAGS_socket_mode).mode;
  // --socket-group: a group named must exist (a typo would leave the socket
  // unreachable for the intended users); the default "svm" is used only when
  // it exists.
  so.socket_group = absl::GetFlag(FLAGS_socket_group);
  if (!Given("socket-group")) {
    if (::getgrnam(so.socket_group.c_str()) == nullptr) so.socket_group.clear();
  } else if (!so.socket_group.empty() && ::getgrnam(so.socket_group.c_str()) == nullptr) {
    return usage_error(FlagError("socket-group", absl::StrCat("no group '", so.socket_group, "'")));
  }

  auto logger = spdlog::stderr_color_mt("svmd");
  spdlog::set_default_logger(logger);
  svm::systemd::SetLogPattern();  // "<N>" priorities when stderr is the journal
  spdlog::set_level(absl::GetFlag(FLAGS_log_level).value);
  svm::service::RouteGrpcLogs();

  auto opts = ParseOptions();
  if (!opts.ok()) return usage_error(opts.status());
  // Mutual TLS on the peer port: all three files or none.
  std::unique_ptr<svm::service::PeerTls> tls;
  {
    const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key),
                      ca = absl::GetFlag(FLAGS_tls_ca);
    const int given = !cert.empty() + !key.empty() + !ca.empty();
    if (given != 0 && given != 3) {
      return usage_error(absl::InvalidArgumentError("--tls-cert, --tls-key and --tls-ca go together"));
    }
    if (given == 3) {
      auto t = svm::service::PeerTls::Create(
          {.cert = cert, .key = key, .ca = ca});
      if (!t.ok()) return usage_error(t.status());
      tls = std::move(*t);
      so.peer_credentials = tls->ServerCredentials();
      opts->import.peer_credentials = tls->ChannelCredentials();
    }
  }
  const std::optional<svm::HostPort> metrics_listen = absl::GetFlag(FLAGS_metrics_listen).value;

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
    Reload(startup, d, tls.get());
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
