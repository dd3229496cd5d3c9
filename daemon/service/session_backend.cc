// The sessions' view of the daemon: opening an import's shared cache or a
// local export, and reads (an import's asynchronously, on its peer link, so
// a stuck peer holds up only its own imports; a local export's on the
// daemon's executor).
#include "daemon/service/session_backend.h"

#include <set>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"

namespace svm::service {

std::string SessionSocketPath(const std::string& control) {
  if (absl::EndsWith(control, ".sock")) {
    return absl::StrCat(control.substr(0, control.size() - 5), "-session.sock");
  }
  return absl::StrCat(control, ".session");
}

namespace {

class DaemonBackend final : public session::Backend {
 public:
  DaemonBackend(core::Daemon* d, RangeDeposits* deposits) : d_(d), deposits_(deposits) {}

  // --max-sessions-per-client: open sessions per uid.
  absl::Status SessionOpening(const PeerCred& who, uint64_t session) override {
    core::Limits& lim = d_->limits();
    const uint64_t max = lim.Get(core::Limit::kSessionsPerClient);
    const uint64_t max_all = lim.Get(core::Limit::kSessions);
    absl::MutexLock l(&mu_);
    if (const uint64_t all = uid_of_.size(); all >= max_all) {
      return lim.Refuse(core::Limit::kSessions, "svmd", absl::StrCat("already has ", all, " sessions open"),
                        max_all);
    }
    uint64_t& open = per_uid_[who.uid];
    if (open >= max) {
      const uint64_t held = open;
      if (held == 0) per_uid_.erase(who.uid);
      return lim.Refuse(core::Limit::kSessionsPerClient, absl::StrCat("uid ", who.uid),
                        absl::StrCat("already has ", held, " sessions open"), max);
    }
    ++open;
    uid_of_[session] = who.uid;
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> Deposit(const PeerCred& who, uint64_t session, UniqueFd fd,
                                   UniqueFd object) override {
    return deposits_->Add(who, session, std::move(fd), std::move(object));
  }
  uint64_t MaxSessions() override { return d_->limits().Get(core::Limit::kSessions); }
  void SessionClosed(uint64_t session) override {
    deposits_->DropSession(session);
    absl::MutexLock l(&mu_);
    auto it = uid_of_.find(session);
    if (it == uid_of_.end()) return;  // refused, or closed before its hello
    if (--per_uid_[it->second] == 0) per_uid_.erase(it->second);
    uid_of_.erase(it);
  }
  void CountClientHits(const std::string& name, uint64_t reads, uint64_t pages) override {
    d_->imports().CountClientHits(name, reads, pages);
  }

  absl::StatusOr<session::Opened> Open(const std::string& name, const PeerCred&) override {
    if (d_->imports().Has(name)) {
      auto files = d_->imports().OpenCache(name);
      if (!files.ok()) return files.status();
      session::Opened o;
      o.kind = session::abi::kImport;
      o.len = files->len;
      o.data = std::move(files->data);
      o.words = std::move(files->words);
      return o;
    }
    for (const auto& e : d_->exports().List()) {
      if (e.name() != name) continue;
      session::Opened o;
      o.kind = session::abi::kExport;
      o.len = e.len();
      return o;
    }
    return absl::NotFoundError(absl::StrCat("no export or import named '", name, "'"));
  }

  void Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh, bool fill,
            bool in_cache, transport::LandingAreas* dst_areas,
            std::function<void(absl::StatusOr<session::ReadDone>)> done) override {
    if (d_->imports().Has(name)) {
      // Asynchronous: the import's peer link runs it.
      d_->imports().ReadInCache(
          name, offset, dst, fresh, fill, in_cache,
          [done = std::move(done)](absl::StatusOr<v1::ReadResponse> r, bool left_in_cache) {
            if (!r.ok()) return done(r.status());
            done(session::ReadDone{r->seq(), r->pages_from_cache(), r->pages_fetched(), left_in_cache});
          },
          dst_areas);
      return;
    }
    // A local export has no cache: its bytes are always copied into dst
    // (in_cache is not honoured).
    // A local export's pages, read from its process. A small read runs on
    // the session thread itself: handing it to the executor costs a thread
    // wakeup (the better part of the round trip on an idle machine, where
    // it is an IPI to a sleeping CPU) for a copy of a few microseconds. A
    // read that took long on that thread (the exporting process's pages
    // were swapped out, or its memory faults slowly) sends every later read
    // of that export to the executor, so one slow exporter holds up the
    // other sessions at most once.
    if (dst.size() <= kInlineMax && slow_.count(name) == 0) {
      const absl::Time t0 = absl::Now();
      auto seq = d_->exports().ReadLocal(name, offset, dst);
      if (absl::Now() - t0 > kInlineSlow) {
        spdlog::info("session reads of export '{}' run on the executor from now on: one took {}", name,
                     absl::FormatDuration(absl::Now() - t0));
        slow_.insert(name);
      }
      if (!seq.ok()) return done(seq.status());
      return done(session::ReadDone{*seq, 0, 0});
    }
    d_->executor().Submit([d = d_, name, offset, dst, done = std::move(done)] {
      auto seq = d->exports().ReadLocal(name, offset, dst);
      if (!seq.ok()) return done(seq.status());
      done(session::ReadDone{*seq, 0, 0});
    });
  }

  absl::StatusOr<uint64_t> Watch(const std::string& name,
                                 std::function<void(const session::abi::Event&)> cb) override {
    if (!d_->imports().Has(name) && !d_->exports().Has(name)) {
      return absl::NotFoundError(absl::StrCat("no export or import named '", name, "'"));
    }
    return d_->hub().Add(name, [cb = std::move(cb)](const v1::Invalidation& ev) {
      session::abi::Event e{};
      e.kind = static_cast<uint32_t>(ev.kind());
      e.first_page = ev.first_page();
      e.npages = ev.npages();
      e.seq = ev.seq();
      e.detected_ns = ev.detected_ns();
      e.received_ns = ev.received_ns();
      cb(e);
    });
  }

  void Unwatch(uint64_t id) override { d_->hub().Remove(id); }

 private:
  // Local-export reads up to this size run on the session thread.
  static constexpr uint64_t kInlineMax = 64 << 10;
  static constexpr absl::Duration kInlineSlow = absl::Milliseconds(1);

  core::Daemon* const d_;
  RangeDeposits* const deposits_;
  // Exports whose reads go to the executor (the session thread only).
  std::set<std::string> slow_;
  absl::Mutex mu_;  // guards the session counts
  std::map<uid_t, uint64_t> per_uid_ ABSL_GUARDED_BY(mu_);     // sessions past their hello
  std::map<uint64_t, uid_t> uid_of_ ABSL_GUARDED_BY(mu_);      // session id -> its uid
};

}  // namespace

std::unique_ptr<session::Backend> CreateSessionBackend(core::Daemon* d, RangeDeposits* deposits) {
  return std::make_unique<DaemonBackend>(d, deposits);
}

}  // namespace svm::service
