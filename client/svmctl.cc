// svmctl: the operator CLI for svmd. See `svmctl --help`.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/args.h"
#include "common/fd.h"
#include "google/protobuf/util/json_util.h"
#include "svm/client.h"

namespace {

constexpr char kUsage[] = R"(usage: svmctl [--daemon unix:PATH] COMMAND [options]
  export   --pid PID --addr ADDR --len LEN --name NAME
  unexport --name NAME
  import   --peer HOST:PORT --name NAME [--as LOCAL]
  read     --name NAME --offset OFF --len LEN [--out FILE] [--fresh]   raw bytes to stdout by default
  watch    --name NAME [--count N] [--timeout SECONDS] [--verbose]     one line per invalidation:
                                                 NAME FIRST_PAGE NPAGES SEQ (--verbose adds the KIND)
  sync     --name NAME
  exports | imports | status [--json]
Numbers accept decimal and 0x-hex. The daemon defaults to unix:/run/svm/svmd.sock
(or $SVM_DAEMON). Errors go to stderr with the gRPC status name and a non-zero exit.
)";

int Fail(const absl::Status& st) {
  std::fprintf(stderr, "svmctl: %s: %s\n", absl::StatusCodeToString(st.code()).c_str(),
               std::string(st.message()).c_str());
  return 1;
}

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

std::string KindName(svm::v1::InvalidationKind k) {
  std::string n = svm::v1::InvalidationKind_Name(k);
  constexpr std::string_view kPrefix = "INVALIDATION_KIND_";
  if (n.rfind(kPrefix, 0) == 0) n = n.substr(kPrefix.size());
  for (char& c : n) c = static_cast<char>(std::tolower(c));
  return n;
}

int Run(const svm::Args& a) {
  if (a.positional().size() != 1) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = a.positional()[0];
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
    auto info = c.ExportPid(*name, static_cast<pid_t>(*pid), *addr, *len);
    if (!info.ok()) return Fail(info.status());
    if (json) {
      std::printf("%s", Json(*info).c_str());
    } else {
      std::printf("exported %s: pid %d 0x%llx+0x%llx (%llu pages, source %s, path %s)\n",
                  info->name().c_str(), info->pid(), (unsigned long long)info->addr(),
                  (unsigned long long)info->len(), (unsigned long long)(info->len() / info->page_size()),
                  info->source().c_str(), info->path().c_str());
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
      std::printf("%s", Json(*info).c_str());
    } else {
      std::printf("imported %s from %s as %s: %llu bytes, path %s\n", info->remote_name().c_str(),
                  info->peer().c_str(), info->name().c_str(), (unsigned long long)info->len(),
                  info->path().c_str());
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
    int fd = STDOUT_FILENO;
    svm::UniqueFd out;
    if (a.Has("out")) {
      out.Reset(::open(a.Get("out").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (!out.valid()) return Fail(svm::ErrnoStatus(errno, absl::StrCat("open ", a.Get("out"))));
      fd = out.get();
    }
    if (auto st = svm::WriteFull(fd, buf.data(), buf.size()); !st.ok()) return Fail(st);
    if (a.Has("out")) {
      std::fprintf(stderr, "read %llu bytes (seq %llu, %llu pages cached, %llu fetched)\n",
                   (unsigned long long)r->len, (unsigned long long)r->seq,
                   (unsigned long long)r->pages_from_cache, (unsigned long long)r->pages_fetched);
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
      std::printf("%s %llu %llu %llu%s%s\n", ev->name().c_str(), (unsigned long long)ev->first_page(),
                  (unsigned long long)ev->npages(), (unsigned long long)ev->seq(),
                  a.Has("verbose") ? " " : "", a.Has("verbose") ? KindName(ev->kind()).c_str() : "");
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
      std::printf("%s", Json(*r).c_str());
    } else {
      std::printf("synced %s: %llu pages invalidated, seq %llu, %u importers acknowledged\n",
                  name->c_str(), (unsigned long long)r->pages_invalidated(),
                  (unsigned long long)r->seq(), r->subscribers_acked());
    }
    return 0;
  }
  if (cmd == "exports") {
    auto l = c.ListExports();
    if (!l.ok()) return Fail(l.status());
    if (json) {
      svm::v1::ListExportsResponse r;
      for (auto& e : *l) *r.add_exports() = e;
      std::printf("%s", Json(r).c_str());
      return 0;
    }
    std::printf("%-20s %8s %18s %12s %-7s %-18s %8s %5s %s\n", "NAME", "PID", "ADDR", "LEN",
                "SOURCE", "PATHS", "SEQ", "SUBS", "STATE");
    for (auto& e : *l) {
      std::printf("%-20s %8d %#18llx %12llu %-7s %-18s %8llu %5u %s\n", e.name().c_str(), e.pid(),
                  (unsigned long long)e.addr(), (unsigned long long)e.len(), e.source().c_str(),
                  e.path().c_str(), (unsigned long long)e.seq(), e.subscribers(),
                  e.gone() ? "gone" : "live");
    }
    return 0;
  }
  if (cmd == "imports") {
    auto l = c.ListImports();
    if (!l.ok()) return Fail(l.status());
    if (json) {
      svm::v1::ListImportsResponse r;
      for (auto& i : *l) *r.add_imports() = i;
      std::printf("%s", Json(r).c_str());
      return 0;
    }
    std::printf("%-20s %-22s %-20s %12s %-13s %-12s %8s %8s %8s\n", "NAME", "PEER", "REMOTE", "LEN",
                "PATH", "STATE", "SEQ", "CACHED", "INVALS");
    for (auto& i : *l) {
      std::printf("%-20s %-22s %-20s %12llu %-13s %-12s %8llu %8llu %8llu\n", i.name().c_str(),
                  i.peer().c_str(), i.remote_name().c_str(), (unsigned long long)i.len(),
                  i.path().c_str(), i.state().c_str(), (unsigned long long)i.seq(),
                  (unsigned long long)i.cached_pages(), (unsigned long long)i.invalidations());
      if (!i.fallback_reason().empty()) {
        std::printf("  %s: rdma fell back to tcp: %s\n", i.name().c_str(), i.fallback_reason().c_str());
      }
    }
    return 0;
  }
  if (cmd == "status") {
    auto s = c.Status();
    if (!s.ok()) return Fail(s.status());
    if (json) {
      std::printf("%s", Json(*s).c_str());
      return 0;
    }
    std::printf("node:        %s (svmd %s, pid %d, up %llds)\n", s->node().c_str(), s->version().c_str(),
                s->pid(), (long long)(s->uptime_ms() / 1000));
    std::printf("control:     unix:%s\n", s->control().c_str());
    std::printf("peers:       %s\n", s->peer_listen().c_str());
    std::string running;
    for (const auto& t : s->transports()) absl::StrAppend(&running, running.empty() ? "" : ", ", t);
    std::printf("data:        %s\n", s->data_listen().c_str());
    std::printf("transport:   %s (running: %s)\n", s->transport().c_str(), running.c_str());
    if (s->has_rdma()) {
      const auto& r = s->rdma();
      std::printf("rdma:        %s port %u %s, %s, mtu %u, liveness %s\n", r.device().c_str(), r.port(),
                  r.port_state().c_str(), r.gid().c_str(), r.active_mtu(), r.liveness_listen().c_str());
      std::printf("             odp rc read: %s (data check %s), registration %s\n",
                  r.odp_rc_read() ? "yes" : "no", r.odp_check().c_str(), r.registration().c_str());
    } else {
      std::printf("rdma:        unavailable: %s\n", s->rdma_unavailable().c_str());
    }
    std::printf("source:      %s (sync detection: %s)\n", s->source().c_str(), s->sync_detection().c_str());
    std::printf("exports:     %u\nimports:     %u (from %u peers)\n", s->exports(), s->imports(), s->peers());
    for (auto& [k, v] : s->counters()) std::printf("  %-28s %llu\n", k.c_str(), (unsigned long long)v);
    return 0;
  }
  std::fprintf(stderr, "svmctl: unknown command '%s'\n%s", cmd.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv,
                            {"daemon", "pid", "addr", "len", "name", "peer", "as", "offset", "out",
                             "count", "timeout"},
                            {"fresh", "json", "help", "verbose"});
  if (!a.ok()) {
    std::fprintf(stderr, "svmctl: INVALID_ARGUMENT: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  if (a->Has("help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  return Run(*a);
}
