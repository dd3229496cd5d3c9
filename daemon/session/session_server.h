// The daemon's end of the client data plane: the session socket, and one
// thread that serves every session's submission ring (layout in abi.h).
//
// The thread takes entries from the rings, checks each (validate.h: an
// entry is untrusted input; a bad one gets an error completion), and hands
// reads to the Backend, which runs them on the daemon's executors; their
// completions are posted from whichever thread finishes them. After work it
// polls the rings briefly, then sets need_wakeup on every ring and sleeps in
// epoll until a doorbell or a socket wakes it.
//
// What one client can cost svmd is bounded by its own session: at most
// cq_entries requests in flight (the thread stops taking entries from a
// session whose completions the client does not drain), a fixed amount of
// shared memory, and a bounded number of handles. svmd never reads the
// submission doorbell (it waits for it edge-triggered), never blocks on the
// socket, and keeps its own copies of the ring indices it owns.
//
// LOCKING: Session::cq_mu guards a session's completion ring and the
// completions waiting for room; everything else of a session belongs to the
// server's thread, but for Session::ctr_mu, which guards what svmd last saw
// of the client counters (the harvest runs on any thread). Server::mu_
// guards the session count and the sessions to harvest; neither lock is
// held while the other is taken.
#ifndef SVM_DAEMON_SESSION_SESSION_SERVER_H_
#define SVM_DAEMON_SESSION_SESSION_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/fd.h"
#include "common/net.h"
#include "daemon/session/abi.h"

namespace svm::transport {
class LandingAreas;
}  // namespace svm::transport

namespace svm::session {

struct ReadDone {
  uint64_t seq = 0;
  uint64_t pages_from_cache = 0;
  uint64_t pages_fetched = 0;
  // The bytes were left in the import's shared cache (asked with in_cache):
  // dst holds nothing; the completion says kDoneInCache.
  bool in_cache = false;
};

struct Opened {
  abi::HandleKind kind = abi::kImport;
  uint64_t len = 0;
  UniqueFd data;   // imports: the shared cache, read-only
  UniqueFd words;
};

// What sessions need of the daemon.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual absl::StatusOr<Opened> Open(const std::string& name, const PeerCred& who) = 0;
  // Reads [offset, offset + dst.size()) of name into dst; calls done exactly
  // once, from any thread: the caller's own before Read returns when the
  // read is quick (a small read of a local export), otherwise later. It
  // must not block the caller for long (the caller serves every session).
  // fill: the pages must end up in the import's shared cache (no zero-copy).
  // in_cache: the client copies from the shared cache itself, so a read of
  // an import that installs its pages there may leave dst untouched
  // (ReadDone::in_cache). dst_areas: dst's memory (the session's data
  // area) for the transport to register, so that zero-copy READs land in
  // dst itself (transport::LandingAreas).
  virtual void Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool fresh,
                    bool fill, bool in_cache, transport::LandingAreas* dst_areas,
                    std::function<void(absl::StatusOr<ReadDone>)> done) = 0;
  // Calls cb (which must not block) with every invalidation of name from
  // now until Unwatch(returned id) returns.
  virtual absl::StatusOr<uint64_t> Watch(const std::string& name,
                                         std::function<void(const abi::Event&)> cb) = 0;
  virtual void Unwatch(uint64_t id) = 0;
  // Keeps fd (a client's svm_shim range fd, not yet checked) for the
  // ExportRequest that names the returned token; INVALID_ARGUMENT when fd
  // is not a range fd. object (may be invalid): the object the client says
  // the range maps, for the zero-copy path; INVALID_ARGUMENT when the
  // kernel says it does not. Deposits of a session go when it ends.
  virtual absl::StatusOr<uint64_t> Deposit(const PeerCred& /*who*/, uint64_t /*session*/,
                                           UniqueFd /*fd*/, UniqueFd /*object*/) {
    return absl::UnimplementedError("this svmd takes no deposits");
  }
  // A client's hello: an error (RESOURCE_EXHAUSTED past a limit) is sent
  // to it instead of the session memory, and the session ends
  // (SessionClosed follows, as for every session).
  virtual absl::Status SessionOpening(const PeerCred& /*who*/, uint64_t /*session*/) {
    return absl::OkStatus();
  }
  virtual void SessionClosed(uint64_t /*session*/) {}
  // The sessions open at once over all clients (svmd: --max-sessions, read
  // at every accept). The backend refuses the hello beyond it, with an
  // error; the server itself closes a new socket unanswered only past it
  // plus ServerOptions::hello_slack (sockets that have not said hello yet).
  virtual uint64_t MaxSessions() { return 1024; }
  // Reads of the import name that a client served from its shared cache
  // (what its ClientCounters grew by): reads and pages to add to the
  // import's figures.
  virtual void CountClientHits(const std::string& /*name*/, uint64_t /*reads*/, uint64_t /*pages*/) {}
};

struct ServerOptions {
  std::string path;  // the session socket
  mode_t mode = 0660;
  uint32_t sq_entries = 128;
  uint32_t cq_entries = 256;
  uint32_t ev_entries = 1024;
  uint32_t max_watches = 256;  // per session
  uint64_t data_size = 16ull << 20;
  // Sockets beyond Backend::MaxSessions() the server still accepts so that
  // their hello can be refused with an error instead of a silent close.
  uint32_t hello_slack = 64;
  uint32_t max_handles = 4096;  // per session
  // How long the thread polls the rings after work before it sleeps.
  absl::Duration spin = absl::Microseconds(50);
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(Backend* backend, ServerOptions opts);
  // Closes every session (reads in flight finish into memory only svmd
  // still maps) and removes the socket.
  ~Server();
  size_t sessions() const;
  // Adds what every session's ClientCounters grew by since the last look to
  // the backend (CountClientHits). Any thread; the metrics endpoint calls it
  // before a scrape reads the import figures. A session that ends is
  // harvested once more, so its counts stay.
  void HarvestClientCounters();

  struct Session;

 private:
  Server(Backend* backend, ServerOptions opts) : backend_(backend), opts_(std::move(opts)) {}
  void Loop();
  void Accept();
  // Handles what arrived on a session's socket; false: close the session.
  bool OnSocket(Session& s);
  bool OnHello(Session& s);
  bool OnOpen(Session& s, const std::string& name);
  bool OnWatch(Session& s, const std::string& name);
  bool OnDeposit(Session& s, std::vector<UniqueFd> fds);
  void OnUnwatch(Session& s, uint32_t watch);
  bool SendError(Session& s, const absl::Status& st);
  // Takes entries from the session's ring; true when it took any. false in
  // *ok: the client broke the ring (close the session).
  bool Drain(Session& s, bool* ok);
  void Close(uint64_t id);
  void Harvest(Session& s);

  Backend* const backend_;
  const ServerOptions opts_;
  UniqueFd listen_;
  UniqueFd epoll_;
  UniqueFd stop_;  // eventfd
  std::thread thread_;
  // The server's thread only.
  std::map<uint64_t, std::shared_ptr<Session>> live_;
  uint64_t next_id_ = 1;
  mutable absl::Mutex mu_;
  size_t count_ ABSL_GUARDED_BY(mu_) = 0;
  // The sessions that said hello, for HarvestClientCounters.
  std::map<uint64_t, std::shared_ptr<Session>> harvest_ ABSL_GUARDED_BY(mu_);
};

}  // namespace svm::session

#endif  // SVM_DAEMON_SESSION_SESSION_SERVER_H_
