// The session server (daemon/session/session_server.h) against libsvm's own
// end of the session (client/session.h), with a fake backend: watches that
// end, the event ring when the client does not drain it, a forked child.
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/session.h"
#include "daemon/session/session_server.h"
#include "daemon/source/mirror_source.h"
#include "daemon/transport/transport.h"
#include "gtest/gtest.h"

namespace svm::session {
namespace {

using internal::Session;

// What became of the registration a session's data area got on a channel
// (transport::LandingAreas): when it was destroyed, whether the read that
// used it had completed, and whether the memory it registered was still
// mapped (mincore).
struct AreaFate {
  absl::Mutex mu;
  bool registered ABSL_GUARDED_BY(mu) = false;
  bool destroyed ABSL_GUARDED_BY(mu) = false;
  bool read_done_before ABSL_GUARDED_BY(mu) = false;
  bool mapped_at_destruction ABSL_GUARDED_BY(mu) = false;
  bool read_done ABSL_GUARDED_BY(mu) = false;
};

class ProbeArea : public transport::LandingArea {
 public:
  ProbeArea(void* addr, size_t len, std::shared_ptr<AreaFate> fate)
      : addr_(addr), len_(len), fate_(std::move(fate)) {}
  ~ProbeArea() override {
    std::vector<unsigned char> vec((len_ + abi::kPageSize - 1) / abi::kPageSize);
    const bool mapped = ::mincore(addr_, len_, vec.data()) == 0;
    absl::MutexLock l(&fate_->mu);
    fate_->destroyed = true;
    fate_->read_done_before = fate_->read_done;
    fate_->mapped_at_destruction = mapped;
  }

 private:
  void* const addr_;
  const size_t len_;
  const std::shared_ptr<AreaFate> fate_;
};

// A channel whose only use here is RegisterLanding (kReads): a ProbeArea.
class ProbeChannel : public transport::PeerChannel {
 public:
  explicit ProbeChannel(std::shared_ptr<AreaFate> fate) : PeerChannel(transport::Capabilities{}), fate_(fate) {}
  void FetchVAsync(absl::Span<transport::FetchOp>, absl::Duration, transport::FetchDone done) override { std::move(done)(); }
  absl::StatusOr<std::unique_ptr<transport::LandingArea>> RegisterLanding(void* addr, size_t len,
                                                                          transport::LandingUse use) override {
    if (use != transport::LandingUse::kReads) return absl::InvalidArgumentError("a data area lands READs");
    absl::MutexLock l(&fate_->mu);
    fate_->registered = true;
    return std::make_unique<ProbeArea>(addr, len, fate_);
  }
  bool alive() const override { return true; }
  void Close() override {}
  const char* path() const override { return "probe"; }

 private:
  const std::shared_ptr<AreaFate> fate_;
};

// An export "exp" of 64 KiB whose bytes are (offset % 251); watches of any
// name; every watch's callback is kept so the test can send events.
class FakeBackend : public Backend {
 public:
  absl::StatusOr<Opened> Open(const std::string& name, const PeerCred&) override {
    if (name == "held") {
      Opened o;
      o.kind = abi::kExport;
      o.len = 64 << 10;
      return o;
    }
    if (name == "imp") {
      // An import of 4 pages with an empty cache.
      Opened o;
      o.kind = abi::kImport;
      o.len = 4 * abi::kPageSize;
      o.data = UniqueFd(::memfd_create("imp-data", MFD_CLOEXEC));
      o.words = UniqueFd(::memfd_create("imp-words", MFD_CLOEXEC));
      if (::ftruncate(o.data.get(), 4 * abi::kPageSize) != 0 ||
          ::ftruncate(o.words.get(), static_cast<off_t>(abi::WordsFileSize(4))) != 0) {
        return absl::InternalError("memfd");
      }
      absl::MutexLock l(&mu_);
      imp_data_ = UniqueFd(::dup(o.data.get()));
      imp_words_ = UniqueFd(::dup(o.words.get()));
      return o;
    }
    if (name != "exp") return absl::NotFoundError(name);
    Opened o;
    o.kind = abi::kExport;
    o.len = 64 << 10;
    return o;
  }
  // "imp" asked with in_cache: completes in the cache (leaving dst as it
  // is) when the test said so (AnswerInCache), installing the pages with
  // their bytes or not at all (a fetch that raced an invalidation).
  void Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst, bool, bool,
            bool in_cache, transport::LandingAreas* areas,
            std::function<void(absl::StatusOr<ReadDone>)> done) override {
    if (name == "held") {
      // Registers dst's area on the probe channel (as a zero-copy READ
      // does) and keeps the read in flight until Release().
      if (areas == nullptr || areas->For(probe_) == nullptr) return done(absl::InternalError("no landing area"));
      absl::MutexLock l(&mu_);
      held_.push_back(std::move(done));
      return;
    }
    bool in_cache_answer = false, install = false;
    int data = -1, words = -1;
    {
      absl::MutexLock l(&mu_);
      if (name == "imp") reads_.push_back(in_cache);
      in_cache_answer = name == "imp" && in_cache && in_cache_answer_;
      install = install_;
      data = imp_data_.get();
      words = imp_words_.get();
    }
    if (in_cache_answer) {
      if (install) {
        for (uint64_t p = offset / abi::kPageSize; p * abi::kPageSize < offset + dst.size(); ++p) {
          uint8_t page[abi::kPageSize];
          for (size_t i = 0; i < sizeof(page); ++i) page[i] = static_cast<uint8_t>((p * abi::kPageSize + i) % 251);
          const uint64_t version = 7;
          if (::pwrite(data, page, sizeof(page), static_cast<off_t>(p * abi::kPageSize)) != sizeof(page) ||
              ::pwrite(words, &version, 8, static_cast<off_t>(abi::kWordsOffset + p * 8)) != 8) {
            return done(absl::InternalError("pwrite"));
          }
        }
      }
      return done(ReadDone{1, 0, dst.size() / 4096, /*in_cache=*/true});
    }
    for (size_t i = 0; i < dst.size(); ++i) dst[i] = static_cast<uint8_t>((offset + i) % 251);
    done(ReadDone{1, 0, dst.size() / 4096});
  }
  // Reads of "imp" complete in the cache from now on when they ask to;
  // install: their pages are put in the cache first. The cache's lease is
  // set to last.
  void AnswerInCache(bool install) {
    absl::MutexLock l(&mu_);
    in_cache_answer_ = true;
    install_ = install;
    const int64_t forever = INT64_MAX;
    (void)!::pwrite(imp_words_.get(), &forever, sizeof(forever), offsetof(abi::CacheHeader, lease_until_ns));
  }
  // Whether each read of "imp" asked to complete in the cache, in order.
  std::vector<bool> imp_reads() {
    absl::MutexLock l(&mu_);
    return reads_;
  }
  absl::StatusOr<uint64_t> Watch(const std::string&, std::function<void(const abi::Event&)> cb) override {
    absl::MutexLock l(&mu_);
    const uint64_t id = next_++;
    cbs_[id] = std::move(cb);
    return id;
  }
  void Unwatch(uint64_t id) override {
    absl::MutexLock l(&mu_);
    cbs_.erase(id);
    ++unwatched_;
  }
  // Sends an event with seq to every live watch; how many got it.
  int Send(uint64_t seq) {
    absl::MutexLock l(&mu_);
    abi::Event e{};
    e.seq = seq;
    e.first_page = seq;
    e.npages = 1;
    e.kind = static_cast<uint32_t>(source::ChangeKind::kUnmap);
    for (auto& [id, cb] : cbs_) cb(e);
    return static_cast<int>(cbs_.size());
  }
  void CountClientHits(const std::string& name, uint64_t reads, uint64_t pages) override {
    absl::MutexLock l(&mu_);
    hits_[name].first += reads;
    hits_[name].second += pages;
  }
  std::pair<uint64_t, uint64_t> hits(const std::string& name) {
    absl::MutexLock l(&mu_);
    return hits_[name];
  }
  // Reads of "held" in flight.
  size_t held() {
    absl::MutexLock l(&mu_);
    return held_.size();
  }
  // Completes the reads of "held" (after telling the probe so).
  void Release() {
    std::vector<std::function<void(absl::StatusOr<ReadDone>)>> done;
    {
      absl::MutexLock l(&mu_);
      done.swap(held_);
    }
    {
      absl::MutexLock l(&fate_->mu);
      fate_->read_done = true;
    }
    for (auto& d : done) d(ReadDone{1, 0, 1});
  }
  AreaFate& fate() { return *fate_; }
  int live() {
    absl::MutexLock l(&mu_);
    return static_cast<int>(cbs_.size());
  }
  int unwatched() {
    absl::MutexLock l(&mu_);
    return unwatched_;
  }

 private:
  absl::Mutex mu_;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 100;
  std::map<uint64_t, std::function<void(const abi::Event&)>> cbs_ ABSL_GUARDED_BY(mu_);
  int unwatched_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::pair<uint64_t, uint64_t>> hits_ ABSL_GUARDED_BY(mu_);
  UniqueFd imp_data_ ABSL_GUARDED_BY(mu_), imp_words_ ABSL_GUARDED_BY(mu_);
  bool in_cache_answer_ ABSL_GUARDED_BY(mu_) = false;
  bool install_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<bool> reads_ ABSL_GUARDED_BY(mu_);
  const std::shared_ptr<AreaFate> fate_ = std::make_shared<AreaFate>();
  const std::shared_ptr<transport::PeerChannel> probe_ = std::make_shared<ProbeChannel>(fate_);
  std::vector<std::function<void(absl::StatusOr<ReadDone>)>> held_ ABSL_GUARDED_BY(mu_);
};

class SessionServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions o) {
    o.path = absl::StrCat(::testing::TempDir(), "/svm-session-", ::getpid(), ".sock");
    auto s = Server::Start(&backend_, o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    auto c = Session::Connect(o.path);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = std::move(*c);
  }
  // Waits until the server's thread has taken what the client sent.
  bool Eventually(const std::function<bool()>& pred) {
    for (int i = 0; i < 2000; ++i) {
      if (pred()) return true;
      ::usleep(1000);
    }
    return pred();
  }
  // Opens import "imp", has the backend answer reads in the cache (with
  // the pages installed, or not), reads len bytes at offset through the
  // session into a buffer pre-filled with 0xee and checks that byte i is
  // (offset + i) % 251, the fake backend's pattern.
  void ReadInCacheAndCheck(bool install, uint64_t offset, size_t len) {
    auto imp = client_->Open("imp");
    ASSERT_TRUE(imp.ok()) << imp.status();
    backend_.AnswerInCache(install);
    std::vector<uint8_t> buf(len, 0xee);
    Session::Op op;
    op.handle = (*imp)->handle;
    op.offset = offset;
    op.len = buf.size();
    op.dst = buf.data();
    op.view = imp->get();
    auto r = client_->Run(absl::MakeConstSpan(&op, 1));
    ASSERT_EQ(r.size(), 1u);
    ASSERT_TRUE(r[0].status.ok()) << r[0].status;
    for (size_t i = 0; i < buf.size(); ++i) {
      ASSERT_EQ(buf[i], static_cast<uint8_t>((offset + i) % 251)) << "byte " << i;
    }
  }

  FakeBackend backend_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<Session> client_;
};

TEST_F(SessionServerTest, EndedWatchesGiveTheirPlaceBackAndStopTheirEvents) {
  ServerOptions o;
  o.max_watches = 4;
  StartServer(o);
  // Five times the limit, one at a time: each ended watch frees its place.
  for (int i = 0; i < 20; ++i) {
    auto w = client_->Watch("exp");
    ASSERT_TRUE(w.ok()) << "watch " << i << ": " << w.status();
    client_->ForgetWatch(*w);
  }
  ASSERT_TRUE(Eventually([&] { return backend_.unwatched() == 20; })) << backend_.unwatched();
  EXPECT_EQ(backend_.live(), 0);

  auto w = client_->Watch("exp");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(backend_.Send(7), 1);
  auto e = client_->NextEvent(*w, absl::Seconds(5));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->seq, 7u);
  EXPECT_EQ(e->watch, *w);
  // An ended watch answers no more.
  client_->ForgetWatch(*w);
  EXPECT_EQ(client_->NextEvent(*w, absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(SessionServerTest, AFullEventRingBecomesOneOverflowEventPerWatchWithTheNewestLostSequence) {
  ServerOptions o;
  o.ev_entries = 16;
  StartServer(o);
  auto a = client_->Watch("exp");
  ASSERT_TRUE(a.ok()) << a.status();
  // 20 events for a alone (16 fit), then b starts and loses its first.
  for (uint64_t s = 1; s <= 20; ++s) ASSERT_EQ(backend_.Send(s), 1);
  auto b = client_->Watch("exp");
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(backend_.Send(21), 2);

  // Nothing was drained yet: a's first 16 are there, then room comes back as
  // the client drains, and each watch gets one overflow event on the next
  // push.
  std::vector<uint64_t> seen_a;
  for (int i = 0; i < 16; ++i) {
    auto e = client_->NextEvent(*a, absl::Seconds(5));
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_NE(e->kind, static_cast<uint32_t>(source::ChangeKind::kOverflow));
    seen_a.push_back(e->seq);
  }
  EXPECT_EQ(seen_a.front(), 1u);
  EXPECT_EQ(seen_a.back(), 16u);
  ASSERT_EQ(backend_.Send(22), 2);  // the ring has room again: the overflows go first

  auto oa = client_->NextEvent(*a, absl::Seconds(5));
  ASSERT_TRUE(oa.ok()) << oa.status();
  EXPECT_EQ(oa->kind, static_cast<uint32_t>(source::ChangeKind::kOverflow));
  EXPECT_EQ(oa->seq, 21u);  // the newest a lost (17..21)
  auto na = client_->NextEvent(*a, absl::Seconds(5));
  ASSERT_TRUE(na.ok()) << na.status();
  EXPECT_EQ(na->seq, 22u);

  auto ob = client_->NextEvent(*b, absl::Seconds(5));
  ASSERT_TRUE(ob.ok()) << ob.status();
  EXPECT_EQ(ob->kind, static_cast<uint32_t>(source::ChangeKind::kOverflow));
  EXPECT_EQ(ob->seq, 21u);
  auto nb = client_->NextEvent(*b, absl::Seconds(5));
  ASSERT_TRUE(nb.ok()) << nb.status();
  EXPECT_EQ(nb->seq, 22u);
  EXPECT_EQ(client_->NextEvent(*a, absl::Milliseconds(20)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST_F(SessionServerTest, AForkedChildCannotUseItsParentsSessionAndTheParentKeepsIt) {
  StartServer(ServerOptions{});
  auto v = client_->Open("exp");
  ASSERT_TRUE(v.ok()) << v.status();
  std::vector<uint8_t> buf(4096);
  Session::Op op;
  op.handle = (*v)->handle;
  op.offset = 4096;
  op.len = buf.size();
  op.dst = buf.data();
  ASSERT_TRUE(client_->Run({op})[0].status.ok());

  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Exit codes say which check failed.
    if (!client_->forked()) ::_exit(10);
    auto r = client_->Run({op});
    if (r[0].status.code() != absl::StatusCode::kFailedPrecondition) ::_exit(11);
    if (client_->Open("exp").status().code() != absl::StatusCode::kFailedPrecondition) ::_exit(12);
    if (client_->Watch("exp").status().code() != absl::StatusCode::kFailedPrecondition) ::_exit(13);
    client_.reset();  // the child's copy closes its descriptors only
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);

  // The parent's session is untouched.
  EXPECT_FALSE(client_->forked());
  std::fill(buf.begin(), buf.end(), 0);
  auto r = client_->Run({op});
  ASSERT_TRUE(r[0].status.ok()) << r[0].status;
  for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], (4096 + i) % 251) << i;
  EXPECT_EQ(server_->sessions(), 1u);
}

// What a client counts of the reads it served from an import's shared cache
// reaches the import's figures when svmd harvests (a scrape) and when the
// session ends; a counter the client moved backwards adds nothing until it
// passes what was already added; an export's handle counts nothing.
TEST_F(SessionServerTest, ClientCacheHitsAreHarvestedNeverBackwardsAndKeptWhenTheSessionEnds) {
  StartServer({});
  auto imp = client_->Open("imp");
  ASSERT_TRUE(imp.ok()) << imp.status();
  auto exp = client_->Open("exp");
  ASSERT_TRUE(exp.ok()) << exp.status();
  const uint32_t h = (*imp)->handle;
  client_->CountCacheHits(h, 3, 12);
  client_->CountCacheHits((*exp)->handle, 5, 5);
  server_->HarvestClientCounters();
  EXPECT_EQ(backend_.hits("imp"), std::make_pair(uint64_t{3}, uint64_t{12}));
  EXPECT_EQ(backend_.hits("exp"), std::make_pair(uint64_t{0}, uint64_t{0}));
  server_->HarvestClientCounters();  // nothing new: nothing added
  EXPECT_EQ(backend_.hits("imp"), std::make_pair(uint64_t{3}, uint64_t{12}));
  // A lying client: both counters down by one (adding 2^64 - 1 wraps).
  client_->CountCacheHits(h, UINT64_MAX, UINT64_MAX);
  server_->HarvestClientCounters();
  EXPECT_EQ(backend_.hits("imp"), std::make_pair(uint64_t{3}, uint64_t{12}));
  client_->CountCacheHits(h, 2, 2);  // 4 and 13: one past what was added
  server_->HarvestClientCounters();
  EXPECT_EQ(backend_.hits("imp"), std::make_pair(uint64_t{4}, uint64_t{13}));
  // Counted, never harvested by a scrape: the session's end adds it.
  client_->CountCacheHits(h, 1, 4);
  client_.reset();
  EXPECT_TRUE(Eventually([&] { return server_->sessions() == 0; }));
  EXPECT_EQ(backend_.hits("imp"), std::make_pair(uint64_t{5}, uint64_t{17}));
}

// A read svmd completes "in the cache" (kDoneInCache) is copied by the
// client from its mapping of the shared cache, each page checked against
// its version word, with nothing in the data area.
TEST_F(SessionServerTest, AReadCompletedInTheCacheIsCopiedFromTheCache) {
  StartServer({});
  ReadInCacheAndCheck(/*install=*/true, 50, 3 * abi::kPageSize - 100);
  EXPECT_EQ(backend_.imp_reads(), std::vector<bool>{true});
  EXPECT_EQ(client_->in_cache_retries(), 0u);
}

// A read completed in the cache whose pages are not there when the client
// copies (never installed: the fetch raced an invalidation; or punched
// since) is never returned from the cache: the client reads it again,
// without kInCache, and gets the bytes in the data area.
TEST_F(SessionServerTest, AReadCompletedInTheCacheWhosePagesAreGoneIsReadAgain) {
  StartServer({});
  ReadInCacheAndCheck(/*install=*/false, abi::kPageSize, 2 * abi::kPageSize);
  EXPECT_EQ(backend_.imp_reads(), (std::vector<bool>{true, false}));
  EXPECT_EQ(client_->in_cache_retries(), 1u);
}

// A session whose client is killed while a read that registered the
// session's data area on a channel is in flight: the registration stays
// while the read can still land in the area, and goes when the read
// completes, before svmd unmaps the area (invalidate, drain, then retire).
TEST_F(SessionServerTest, ADataAreaRegistrationGoesAfterItsLastReadAndBeforeTheUnmap) {
  StartServer({});
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto c = Session::Connect(absl::StrCat(::testing::TempDir(), "/svm-session-", ::getppid(), ".sock"));
    if (!c.ok()) ::_exit(10);
    auto v = (*c)->Open("held");
    if (!v.ok()) ::_exit(11);
    std::vector<uint8_t> buf(4096);
    Session::Op op;
    op.handle = (*v)->handle;
    op.len = buf.size();
    op.dst = buf.data();
    (*c)->Run({op});  // never answered: the parent kills this process
    ::_exit(12);
  }
  const bool held = Eventually([&] { return backend_.held() == 1; });
  ::kill(child, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(held) << "the child's read never reached the backend (child status " << status << ")";
  ASSERT_TRUE(Eventually([&] { return server_->sessions() == 1; })) << server_->sessions();
  {
    AreaFate& f = backend_.fate();
    absl::MutexLock l(&f.mu);
    ASSERT_TRUE(f.registered);
    EXPECT_FALSE(f.destroyed) << "deregistered while a read could still land in the data area";
  }
  backend_.Release();
  ASSERT_TRUE(Eventually([&] {
    AreaFate& f = backend_.fate();
    absl::MutexLock l(&f.mu);
    return f.destroyed;
  })) << "the registration outlived the session";
  AreaFate& f = backend_.fate();
  absl::MutexLock l(&f.mu);
  EXPECT_TRUE(f.read_done_before);
  EXPECT_TRUE(f.mapped_at_destruction) << "the data area was unmapped before its registration was destroyed";
}

// A client of another session protocol (an older libsvm) is refused with an
// error that names both versions, and the session goes.
TEST_F(SessionServerTest, AClientOfAnotherProtocolVersionIsRefusedClearly) {
  StartServer({});
  const std::string path = absl::StrCat(::testing::TempDir(), "/svm-session-", ::getpid(), ".sock");
  UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(sock.valid());
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::connect(sock.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
  const timeval patience{5, 0};  // a session that was not closed fails the test instead of hanging it
  ASSERT_EQ(::setsockopt(sock.get(), SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof(patience)), 0);
  abi::HelloMsg h{};
  h.h.type = abi::kHello;
  h.h.len = sizeof(h);
  h.magic = abi::kMagic;
  h.version = abi::kVersion - 1;
  ASSERT_EQ(abi::SendMsg(sock.get(), &h, sizeof(h), nullptr, 0), 0);
  alignas(8) char buf[abi::kMaxMsg];
  int fds[4], nfds = 0;
  const ssize_t n = abi::RecvMsg(sock.get(), buf, sizeof(buf), fds, &nfds);
  ASSERT_GE(n, static_cast<ssize_t>(offsetof(abi::ErrorMsg, text)));
  EXPECT_EQ(nfds, 0);
  abi::ErrorMsg e{};
  std::memcpy(&e, buf, std::min(sizeof(e), static_cast<size_t>(n)));
  EXPECT_EQ(e.h.type, abi::kError);
  EXPECT_EQ(e.code, static_cast<uint32_t>(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(std::string(e.text, e.text_len),
            absl::StrCat("session protocol ", abi::kVersion - 1, "; this svmd speaks ", abi::kVersion));
  EXPECT_EQ(abi::RecvMsg(sock.get(), buf, sizeof(buf), fds, &nfds), 0);  // and it closed the session
}

}  // namespace
}  // namespace svm::session
