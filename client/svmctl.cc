// svmctl: the operator CLI for svmd. See `svmctl --help`.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/args.h"
#include "client/proto_convert.h"
#include "common/fd.h"
#include "google/protobuf/util/json_util.h"
#include "svm/client.h"

namespace {

constexpr char kUsage[] = R"(usage: svmctl [--daemon unix:PATH] COMMAND [options]
       svmctl help [COMMAND] | COMMAND --help | --version
  export   --pid PID --addr ADDR --len LEN --name NAME [--json]
  unexport --name NAME
  import   --peer HOST:PORT --name NAME [--as LOCAL] [--json]
  read     --name NAME --len LEN [--offset OFF] [--out FILE] [--fresh]   raw bytes to stdout by default
  map      --name NAME --len LEN [--offset OFF] [--out FILE]   bytes read through a mapping (Client::Map)
  watch    --name NAME [--count N] [--timeout SECONDS] [--verbose]     one line per invalidation:
                                                 NAME FIRST_PAGE NPAGES SEQ (--verbose adds the KIND)
  sync     --name NAME [--json]
  exports | imports | status [--json]
Numbers accept decimal and 0x-hex. The daemon defaults to unix:/run/svm/svmd.sock
(or $SVM_DAEMON). Exit status: 0 success, 1 the operation failed (the message on
stderr is `svmctl: STATUS_NAME: text`), 2 usage error (reported before contacting
the daemon).
)";

// What each command accepts. Arguments are checked against this before
// svmctl connects, so a usage error never depends on the daemon.
struct Command {
  const char* name;
  std::vector<std::string> value_keys;  // options taking a value
  std::vector<std::string> bool_keys;
  std::vector<std::string> required;
  std::vector<std::string> numbers;     // decimal or 0x-hex
  const char* synopsis;
  const char* help;
};

const std::vector<Command>& Commands() {
  static const std::vector<Command> kCommands = {
      {"export", {"pid", "addr", "len", "name", "allow"}, {"json"}, {"pid", "addr", "len", "name"},
       {"pid", "addr", "len"},
       "export --pid PID --addr ADDR --len LEN --name NAME [--allow ID[,ID...]] [--json]",
       "Export LEN bytes at ADDR of process PID as NAME. You must be allowed to\n"
       "ptrace PID (same uid and gids and PID dumpable, or CAP_SYS_PTRACE).\n"
       "--allow: only peers whose TLS certificate names one of these identities (a DNS\n"
       "or URI subject alternative name, or the common name) may import it; others get\n"
       "PERMISSION_DENIED. Without it, every peer the daemon authenticates may.\n"},
      {"unexport", {"name"}, {}, {"name"}, {}, "unexport --name NAME",
       "Withdraw the export NAME; importers are told it is gone.\n"},
      {"import", {"peer", "name", "as"}, {"json"}, {"peer", "name"}, {},
       "import --peer HOST:PORT --name NAME [--as LOCAL] [--json]",
       "Import the export NAME of the svmd at HOST:PORT (its --peer-listen), under the\n"
       "local name LOCAL (default NAME).\n"},
      {"read", {"name", "offset", "len", "out"}, {"fresh"}, {"name", "len"}, {"offset", "len"},
       "read --name NAME --len LEN [--offset OFF] [--out FILE] [--fresh]",
       "Read LEN bytes (at most 4 GiB) at OFF (default 0) of the import or export NAME:\n"
       "raw bytes to stdout, or to FILE with a summary on stderr. --fresh bypasses the\n"
       "importer's cache.\n"},
      {"map", {"name", "offset", "len", "out"}, {}, {"name", "len"}, {"offset", "len"},
       "map --name NAME --len LEN [--offset OFF] [--out FILE]",
       "Map the import NAME (Client::Map) and copy LEN bytes at OFF (default 0) out of\n"
       "the mapping: raw bytes to stdout, or to FILE with a summary (faults, pages\n"
       "fetched) on stderr. A page that cannot be had ends it with SIGBUS: exit 1.\n"},
      {"watch", {"name", "count", "timeout"}, {"verbose"}, {"name"}, {"count", "timeout"},
       "watch --name NAME [--count N] [--timeout SECONDS] [--verbose]",
       "Print one line per invalidation of NAME received after the watch is registered\n"
       "(\"watching NAME\" on stderr): NAME FIRST_PAGE NPAGES SEQ, and the KIND with\n"
       "--verbose. Exits 0 after N events (--count), or when SECONDS elapse without\n"
       "--count; exits 1 when SECONDS elapse before N events or the stream fails.\n"},
      {"sync", {"name"}, {"json"}, {"name"}, {}, "sync --name NAME [--json]",
       "Publish the exporting process's stores: returns after every importer acknowledged\n"
       "the invalidation of each page written since the last sync.\n"},
      {"exports", {}, {"json"}, {}, {}, "exports [--json]", "List this node's exports.\n"},
      {"imports", {}, {"json"}, {}, {}, "imports [--json]", "List this node's imports.\n"},
      {"status", {}, {"json"}, {}, {}, "status [--json]",
       "The daemon's configuration, transports, counters, and the number of peers whose\n"
       "links are up.\n"},
  };
  return kCommands;
}

const Command* FindCommand(const std::string& name) {
  for (const Command& c : Commands()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

void PrintCommandHelp(const Command& c, FILE* f) {
  std::fprintf(f, "usage: svmctl [--daemon unix:PATH] %s\n%s", c.synopsis, c.help);
}

int UsageError(const std::string& msg, const Command* c) {
  std::fprintf(stderr, "svmctl: INVALID_ARGUMENT: %s\n", msg.c_str());
  if (c != nullptr) {
    std::fprintf(stderr, "usage: svmctl [--daemon unix:PATH] %s\n", c->synopsis);
  } else {
    std::fputs("run `svmctl help` for the commands\n", stderr);
  }
  return 2;
}

// Every check that needs no daemon. Returns the error to report as a usage
// error, or OK.
absl::Status CheckArguments(const Command& c, const svm::Args& a) {
  auto takes = [&](const std::string& k) {
    return k == "daemon" || k == "help" || absl::c_linear_search(c.value_keys, k) ||
           absl::c_linear_search(c.bool_keys, k);
  };
  for (const std::string& k : a.keys()) {
    if (!takes(k)) return absl::InvalidArgumentError(absl::StrCat(c.name, " does not take --", k));
  }
  for (const std::string& k : c.required) {
    if (!a.Has(k)) return absl::InvalidArgumentError(absl::StrCat("--", k, " is required"));
  }
  for (const std::string& k : c.numbers) {
    if (auto v = a.GetU64(k, 0); !v.ok()) return v.status();
  }
  const std::string cmd = c.name;
  if (cmd == "export") {
    uint64_t pid = *a.GetU64("pid", 0);
    if (pid == 0 || pid > INT32_MAX) return absl::InvalidArgumentError("--pid must be a process id");
    if (a.Has("allow")) {
      for (absl::string_view id : absl::StrSplit(a.Get("allow"), ',')) {
        if (id.empty()) return absl::InvalidArgumentError("--allow: an empty identity");
      }
    }
  }
  if (cmd == "read" || cmd == "map") {
    uint64_t len = *a.GetU64("len", 0);
    if (len == 0) return absl::InvalidArgumentError("--len must be > 0");
    if (len > (1ull << 32)) return absl::InvalidArgumentError("--len above 4 GiB");
  }
  if (a.Has("daemon") && !absl::StartsWith(a.Get("daemon"), "unix:")) {
    return absl::InvalidArgumentError("--daemon must be unix:PATH");
  }
  return absl::OkStatus();
}

int Fail(const absl::Status& st) {
  std::fprintf(stderr, "svmctl: %s: %s\n", absl::StatusCodeToString(st.code()).c_str(),
               std::string(st.message()).c_str());
  return 1;
}

// A byte count in the largest binary unit that divides it: 4K, 2M, 1G, 12K.
std::string Size(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"", "K", "M", "G", "T"};
  int u = 0;
  while (u < 4 && bytes != 0 && bytes % 1024 == 0) {
    bytes /= 1024;
    ++u;
  }
  return absl::StrCat(bytes, kUnits[u]);
}

// The --json output is the control API's messages in protobuf's JSON
// mapping (converted back from libsvm's result types).
template <typename M>
std::string Json(const M& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

// The bytes of read and map: to --out FILE, else to stdout.
absl::Status WriteOut(const svm::Args& a, const std::vector<uint8_t>& buf) {
  int fd = STDOUT_FILENO;
  svm::UniqueFd out;
  if (a.Has("out")) {
    out.Reset(::open(a.Get("out").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!out.valid()) return svm::ErrnoStatus(errno, absl::StrCat("open ", a.Get("out")));
    fd = out.get();
  }
  return svm::WriteFull(fd, buf.data(), buf.size());
}

int Run(const svm::Args& a) {
  if (a.Has("version")) {
    std::printf("svmctl %s\n", SVM_VERSION);
    return 0;
  }
  const auto& pos = a.positional();
  if (pos.empty()) {
    if (a.Has("help")) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    std::fputs(kUsage, stderr);
    return 2;
  }
  if (pos[0] == "help") {
    if (pos.size() == 1) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    const Command* c = FindCommand(pos[1]);
    if (c == nullptr || pos.size() > 2) return UsageError(absl::StrCat("no command '", pos[1], "'"), nullptr);
    PrintCommandHelp(*c, stdout);
    return 0;
  }
  const Command* command = FindCommand(pos[0]);
  if (command == nullptr) return UsageError(absl::StrCat("unknown command '", pos[0], "'"), nullptr);
  if (a.Has("help")) {
    PrintCommandHelp(*command, stdout);
    return 0;
  }
  if (pos.size() > 1) return UsageError(absl::StrCat("unexpected argument '", pos[1], "'"), command);
  if (auto st = CheckArguments(*command, a); !st.ok()) return UsageError(std::string(st.message()), command);

  const std::string cmd = pos[0];
  const char* env = std::getenv("SVM_DAEMON");
  auto client = svm::Client::Connect(a.Get("daemon", env ? env : "unix:/run/svm/svmd.sock"));
  if (!client.ok()) return Fail(client.status());
  svm::Client& c = **client;
  const bool json = a.Has("json");

  if (cmd == "export") {
    auto name = a.Require("name");
    auto pid = a.GetU64("pid", std::nullopt);
    auto addr = a.GetU64("addr", std::nullopt);
    auto len = a.GetU64("len", std::nullopt);
    for (const absl::Status& s : {name.status(), pid.status(), addr.status(), len.status()}) {
      if (!s.ok()) return Fail(s);
    }
    if (*pid == 0 || *pid > INT32_MAX) return Fail(absl::InvalidArgumentError("--pid must be a process id"));
    svm::ExportOptions eo;
    if (a.Has("allow")) eo.allow = absl::StrSplit(a.Get("allow"), ',');
    auto info = c.ExportPid(*name, static_cast<pid_t>(*pid), *addr, *len, eo);
    if (!info.ok()) return Fail(info.status());
    if (json) {
      std::printf("%s", Json(svm::internal::ToProto(*info)).c_str());
    } else {
      std::printf("exported %s: pid %d 0x%llx+0x%llx (%llu pages, source %s, path %s)\n",
                  info->name.c_str(), info->pid, (unsigned long long)info->addr,
                  (unsigned long long)info->len, (unsigned long long)(info->len / info->page_size),
                  info->source.c_str(), info->path.c_str());
    }
    return 0;
  }
  if (cmd == "unexport") {
    auto name = a.Require("name");
    if (!name.ok()) return Fail(name.status());
    if (auto st = c.Unexport(*name); !st.ok()) return Fail(st);
    std::printf("unexported %s\n", name->c_str());
    return 0;
  }
  if (cmd == "import") {
    auto name = a.Require("name");
    auto peer = a.Require("peer");
    if (!name.ok()) return Fail(name.status());
    if (!peer.ok()) return Fail(peer.status());
    auto info = c.Import(*peer, *name, a.Get("as"));
    if (!info.ok()) return Fail(info.status());
    if (json) {
      std::printf("%s", Json(svm::internal::ToProto(*info)).c_str());
    } else {
      std::printf("imported %s from %s as %s: %llu bytes, path %s\n", info->remote_name.c_str(),
                  info->peer.c_str(), info->name.c_str(), (unsigned long long)info->len,
                  info->path.c_str());
    }
    return 0;
  }
  if (cmd == "read") {
    auto name = a.Require("name");
    auto off = a.GetU64("offset", 0);
    auto len = a.GetU64("len", std::nullopt);
    for (const absl::Status& s : {name.status(), off.status(), len.status()}) {
      if (!s.ok()) return Fail(s);
    }
    if (*len == 0) return Fail(absl::InvalidArgumentError("--len must be > 0"));
    if (*len > (1ull << 32)) return Fail(absl::InvalidArgumentError("--len above 4 GiB"));
    std::vector<uint8_t> buf(*len);
    svm::ReadOptions ro;
    ro.fresh = a.Has("fresh");
    auto r = c.Read(*name, *off, absl::MakeSpan(buf), ro);
    if (!r.ok()) return Fail(r.status());
    if (auto st = WriteOut(a, buf); !st.ok()) return Fail(st);
    if (a.Has("out")) {
      std::fprintf(stderr, "read %llu bytes (seq %llu, %llu pages cached, %llu fetched)\n",
                   (unsigned long long)r->len, (unsigned long long)r->seq,
                   (unsigned long long)r->pages_from_cache, (unsigned long long)r->pages_fetched);
    }
    return 0;
  }
  if (cmd == "map") {
    auto name = a.Require("name");
    auto off = a.GetU64("offset", 0);
    auto len = a.GetU64("len", std::nullopt);
    for (const absl::Status& s : {name.status(), off.status(), len.status()}) {
      if (!s.ok()) return Fail(s);
    }
    auto m = c.Map(*name);
    if (!m.ok()) return Fail(m.status());
    if (*off > (*m)->size() || *len > (*m)->size() - *off) {
      return Fail(absl::OutOfRangeError(absl::StrFormat("%u bytes at %u are past the end of '%s' (%u bytes)",
                                                        *len, *off, *name, (*m)->size())));
    }
    struct sigaction sa {};
    sa.sa_handler = [](int) {
      static const char kMsg[] = "svmctl: SIGBUS: a page of the mapping cannot be had (export gone?)\n";
      (void)!::write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
      ::_exit(1);
    };
    ::sigaction(SIGBUS, &sa, nullptr);
    std::vector<uint8_t> buf(*len);
    std::memcpy(buf.data(), (*m)->data() + *off, *len);
    if (auto st = WriteOut(a, buf); !st.ok()) return Fail(st);
    if (a.Has("out")) {
      std::fprintf(stderr, "mapped %llu bytes (%llu faults, %llu pages fetched)\n", (unsigned long long)*len,
                   (unsigned long long)(*m)->faults(), (unsigned long long)(*m)->pages_fetched());
    }
    return 0;
  }
  if (cmd == "watch") {
    auto name = a.Require("name");
    auto count = a.GetU64("count", 0);
    auto timeout = a.GetU64("timeout", 0);
    for (const absl::Status& s : {name.status(), count.status(), timeout.status()}) {
      if (!s.ok()) return Fail(s);
    }
    auto w = c.Watch(*name);
    if (!w.ok()) return Fail(w.status());
    std::fprintf(stderr, "watching %s\n", name->c_str());
    const absl::Time deadline =
        *timeout ? absl::Now() + absl::Seconds(static_cast<int64_t>(*timeout)) : absl::InfiniteFuture();
    uint64_t seen = 0;
    while (*count == 0 || seen < *count) {
      auto ev = (*w)->Next(deadline - absl::Now());
      if (!ev.ok()) {
        if (absl::IsDeadlineExceeded(ev.status()) && *count == 0) return 0;
        return Fail(ev.status());
      }
      const std::string kind = a.Has("verbose") ? " " + std::string(svm::InvalidationKindName(ev->kind)) : "";
      std::printf("%s %llu %llu %llu%s\n", ev->name.c_str(), (unsigned long long)ev->first_page,
                  (unsigned long long)ev->npages, (unsigned long long)ev->seq, kind.c_str());
      std::fflush(stdout);
      ++seen;
    }
    return 0;
  }
  if (cmd == "sync") {
    auto name = a.Require("name");
    if (!name.ok()) return Fail(name.status());
    auto r = c.Sync(*name);
    if (!r.ok()) return Fail(r.status());
    if (json) {
      std::printf("%s", Json(svm::internal::ToProto(*r)).c_str());
    } else {
      std::printf("synced %s: %llu pages invalidated, seq %llu, %u importers acknowledged\n",
                  name->c_str(), (unsigned long long)r->pages_invalidated,
                  (unsigned long long)r->seq, r->subscribers_acked);
    }
    return 0;
  }
  if (cmd == "exports") {
    auto l = c.ListExports();
    if (!l.ok()) return Fail(l.status());
    if (json) {
      svm::v1::ListExportsResponse r;
      for (auto& e : *l) *r.add_exports() = svm::internal::ToProto(e);
      std::printf("%s", Json(r).c_str());
      return 0;
    }
    std::printf("%-20s %8s %18s %12s %-7s %-18s %8s %5s %-5s %-16s %s\n", "NAME", "PID", "ADDR",
                "LEN", "SOURCE", "PATHS", "SEQ", "SUBS", "STATE", "MAPPED", "ALLOW");
    for (auto& e : *l) {
      const std::string allow = e.allow.empty() ? "*" : absl::StrJoin(e.allow, ",");
      // Bytes mapped by page size, e.g. "4K:8K,2M:4M"; "-" when the source
      // cannot tell (procfs).
      std::vector<std::string> mapped;
      for (const auto& m : e.mapped) mapped.push_back(absl::StrCat(Size(m.page_size), ":", Size(m.bytes)));
      std::printf("%-20s %8d %#18llx %12llu %-7s %-18s %8llu %5u %-5s %-16s %s\n", e.name.c_str(),
                  e.pid, (unsigned long long)e.addr, (unsigned long long)e.len, e.source.c_str(),
                  e.path.c_str(), (unsigned long long)e.seq, e.subscribers,
                  e.gone ? "gone" : "live", mapped.empty() ? "-" : absl::StrJoin(mapped, ",").c_str(),
                  allow.c_str());
    }
    return 0;
  }
  if (cmd == "imports") {
    auto l = c.ListImports();
    if (!l.ok()) return Fail(l.status());
    if (json) {
      svm::v1::ListImportsResponse r;
      for (auto& i : *l) *r.add_imports() = svm::internal::ToProto(i);
      std::printf("%s", Json(r).c_str());
      return 0;
    }
    std::printf("%-20s %-22s %-20s %12s %-13s %-12s %8s %8s %8s\n", "NAME", "PEER", "REMOTE", "LEN",
                "PATH", "STATE", "SEQ", "CACHED", "INVALS");
    for (auto& i : *l) {
      std::printf("%-20s %-22s %-20s %12llu %-13s %-12s %8llu %8llu %8llu\n", i.name.c_str(),
                  i.peer.c_str(), i.remote_name.c_str(), (unsigned long long)i.len,
                  i.path.c_str(), i.state.c_str(), (unsigned long long)i.seq,
                  (unsigned long long)i.cached_pages, (unsigned long long)i.invalidations);
      if (!i.fallback_reason.empty()) {
        std::printf("  %s: rdma fell back to tcp: %s\n", i.name.c_str(), i.fallback_reason.c_str());
      }
    }
    return 0;
  }
  if (cmd == "status") {
    auto s = c.Status();
    if (!s.ok()) return Fail(s.status());
    if (json) {
      std::printf("%s", Json(svm::internal::ToProto(*s)).c_str());
      return 0;
    }
    std::printf("node:        %s (svmd %s, pid %d, up %llds)\n", s->node.c_str(), s->version.c_str(),
                s->pid, (long long)absl::ToInt64Seconds(s->uptime));
    std::printf("control:     unix:%s\n", s->control.c_str());
    std::printf("peers:       %s\n", s->peer_listen.c_str());
    std::string running;
    for (const auto& t : s->transports) absl::StrAppend(&running, running.empty() ? "" : ", ", t);
    std::printf("data:        %s\n", s->data_listen.c_str());
    std::printf("transport:   %s (running: %s)\n", s->transport.c_str(), running.c_str());
    if (s->rdma.has_value()) {
      const auto& r = *s->rdma;
      std::printf("rdma:        %s port %u %s, %s, mtu %u, liveness %s\n", r.device.c_str(), r.port,
                  r.port_state.c_str(), r.gid.c_str(), r.active_mtu, r.liveness_listen.c_str());
      std::printf("             odp rc read: %s (data check %s), registration %s\n",
                  r.odp_rc_read ? "yes" : "no", r.odp_check.c_str(), r.registration.c_str());
    } else {
      std::printf("rdma:        unavailable: %s\n", s->rdma_unavailable.c_str());
    }
    std::printf("source:      %s (sync detection: %s)\n", s->source.c_str(), s->sync_detection.c_str());
    std::printf("exports:     %u\nimports:     %u (from %u peers up)\n", s->exports, s->imports, s->peers);
    for (auto& [k, v] : s->counters) std::printf("  %-28s %llu\n", k.c_str(), (unsigned long long)v);
    return 0;
  }
  return UsageError(absl::StrCat("unknown command '", cmd, "'"), nullptr);  // not reached: checked above
}

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv,
                            {"daemon", "allow", "pid", "addr", "len", "name", "peer", "as", "offset", "out",
                             "count", "timeout"},
                            {"fresh", "json", "help", "verbose", "version"});
  if (!a.ok()) return UsageError(std::string(a.status().message()), nullptr);
  return Run(*a);
}
