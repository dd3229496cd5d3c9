// Two daemons on 127.0.0.1: node A exports memory of real processes, node
// B imports and reads it. Every scenario of "what a user must be able to
// do" and "bad input and faults" from the foundation issue.
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <future>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/net.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/integration/two_daemons.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

std::string Page(char c) { return std::string(kPage, c); }

// The first page of buf (holding pages first, first + 1, ...) that is not
// stamped the way svm-exporter stamps page p without --fill (version p + 1
// in every 8-byte word), or -1 when all are.
int64_t FirstUnstampedPage(const std::string& buf, uint64_t first) {
  for (uint64_t p = 0; p < buf.size() / kPage; ++p) {
    const char* page = buf.data() + p * kPage;
    for (uint64_t w = 0; w < kPage / 8; ++w) {
      uint64_t v;
      std::memcpy(&v, page + w * 8, 8);
      if (v != first + p + 1) return static_cast<int64_t>(first + p);
    }
  }
  return -1;
}

uint64_t Counter(Client& c, const std::string& name) {
  auto st = c.Status();
  if (!st.ok()) return 0;
  auto it = st->counters.find(name);
  return it == st->counters.end() ? 0 : it->second;
}

// One body per scenario, instantiated per data transport (the parameter:
// "tcp", "rdma"); the rdma instances skip without an active RDMA port.
class TwoNodes : public TwoDaemons {
 protected:
  std::unique_ptr<Exporter> StartExporter(const std::string& name, uint64_t pages, int fill = -1,
                                          uid_t uid = static_cast<uid_t>(-1),
                                          gid_t gid = static_cast<gid_t>(-1)) {
    auto e = Exporter::Start({.daemon = a_.get(), .name = name, .pages = pages, .fill = fill,
                              .uid = uid, .gid = gid,
                              .log_path = absl::StrCat(dir_.path(), "/exporter-", name, ".log")});
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  // Exports, imports on B and checks the first read.
  std::unique_ptr<Exporter> ExportAndImport(const std::string& name, uint64_t pages, int fill) {
    auto e = StartExporter(name, pages, fill);
    if (!e) return nullptr;
    auto imp = cb_->Import(a_->peer(), name);
    EXPECT_TRUE(imp.ok()) << imp.status();
    return e;
  }

  RunResult Ctl(const Daemon& d, std::vector<std::string> args) {
    args.insert(args.begin(), {SvmctlPath(), "--daemon", d.control()});
    return RunCommand(args);
  }

};

TEST_P(TwoNodes, ImportReadsLiveMemory) {
  auto e = ExportAndImport("mem", 4, 'A');
  ASSERT_NE(e, nullptr);
  auto r = ReadBytes(*cb_, "mem", 0, 4 * kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(4 * kPage, 'A'));
  // Unaligned offset and length inside a page and across pages.
  auto r2 = ReadBytes(*cb_, "mem", 100, kPage + 5);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(*r2, std::string(kPage + 5, 'A'));
  // The exporting node reads its own export by name, too.
  auto local = ReadBytes(*ca_, "mem", kPage, 16);
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_EQ(*local, std::string(16, 'A'));
}

// Issue 8, cause 1: an invalidation the exporter pushes between registering
// a subscription and the importer learning that it is registered (it
// arrives on the data channel before the gRPC answer) is applied: counted
// (and published, with the count), and part of the import's sequence. (It was
// acknowledged but skipped before the import was live from the moment its
// subscription was sent.) A's --fault-subscribe-inval-ms pushes one at
// every subscription and holds the answer.
TEST_P(TwoNodes, AnInvalidationThatOvertakesTheSubscriptionAnswerIsApplied) {
  auto a = Daemon::Start(Node("A2", {"--fault-subscribe-inval-ms", "300"}));
  ASSERT_TRUE(a.ok()) << a.status();
  auto ca = (*a)->Connect();
  auto e = Exporter::Start({.daemon = a->get(), .name = "early", .pages = 4, .fill = 'E',
                            .log_path = absl::StrCat(dir_.path(), "/exporter-early.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto imp = cb_->Import((*a)->peer(), "early");
  ASSERT_TRUE(imp.ok()) << imp.status();
  // It arrived while the answer was held: applied before Import returned.
  EXPECT_EQ(Counter(*cb_, "invalidations_received"), 1u);
  auto imports = cb_->ListImports();
  ASSERT_TRUE(imports.ok()) << imports.status();
  ASSERT_EQ(imports->size(), 1u);
  EXPECT_EQ((*imports)[0].invalidations, 1u);
  EXPECT_EQ((*imports)[0].seq, 1u) << "the import's sequence includes it";
  EXPECT_EQ((*imports)[0].state, "connected");
  auto r = ReadBytes(*cb_, "early", 0, 4 * kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(4 * kPage, 'E'));
}

TEST_P(TwoNodes, CacheServesRepeatedReadsAndFreshBypassesIt) {
  auto e = ExportAndImport("cache", 4, 'A');
  ASSERT_NE(e, nullptr);
  std::string buf(2 * kPage, '\0');
  auto span = absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size());
  auto r1 = cb_->Read("cache", 0, span);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->pages_fetched, 2u);
  auto r2 = cb_->Read("cache", 0, span);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->pages_from_cache, 2u);
  EXPECT_EQ(r2->pages_fetched, 0u);
  ReadOptions fresh;
  fresh.fresh = true;
  auto r3 = cb_->Read("cache", 0, span, fresh);
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(r3->pages_from_cache, 0u);
  EXPECT_EQ(r3->pages_fetched, 2u);
}

// A read's missing pages travel in pieces, all in flight at once
// (PeerChannel::FetchV), each landing in its own place: reads that start
// and end inside a page, span several pieces and skip cached pages return
// every byte where it belongs, fresh and cached.
TEST_P(TwoNodes, PipelinedReadsReturnEveryPageInItsPlace) {
  constexpr uint64_t kN = 200;  // page p is stamped p + 1 in every 8-byte word
  auto e = StartExporter("pipe", kN);
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(cb_->Import(a_->peer(), "pipe").ok());
  auto check = [](const std::vector<uint8_t>& buf, uint64_t offset) {
    for (size_t i = 0; i < buf.size(); ++i) {
      const uint64_t at = offset + i;
      const uint8_t want = static_cast<uint8_t>((at / kPage + 1) >> (8 * (at % 8)));
      if (buf[i] != want) {
        ADD_FAILURE() << "byte " << at << " (page " << at / kPage << ") is " << int{buf[i]} << ", want "
                      << int{want};
        return;
      }
    }
  };
  auto read = [&](uint64_t offset, uint64_t len, bool fresh) {
    std::vector<uint8_t> buf(len, 0xee);
    ReadOptions o;
    o.fresh = fresh;
    auto r = cb_->Read("pipe", offset, absl::MakeSpan(buf), o);
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok()) check(buf, offset);
    return r;
  };
  // Scattered cached pages: around the pieces' boundaries.
  for (uint64_t p : {3, 31, 32, 33, 64, 100, 199}) ASSERT_TRUE(read(p * kPage, kPage, false).ok());
  EXPECT_TRUE(read(100, kN * kPage - 150, false).ok());  // unaligned, across everything
  auto whole = read(0, kN * kPage, true);
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->pages_fetched, kN);
  EXPECT_TRUE(read(kPage - 1, 33 * kPage + 2, true).ok());  // one byte of page 0 to two of page 34
  EXPECT_TRUE(read(5 * kPage, 97 * kPage, true).ok());
}

TEST_P(TwoNodes, RemapInvalidatesAndRereadSeesNewContent) {
  auto e = ExportAndImport("remap", 8, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_EQ(*ReadBytes(*cb_, "remap", 0, 8 * kPage), std::string(8 * kPage, 'A'));
  auto w = cb_->Watch("remap");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(*e->Command("remap 3 2 66"), "ok");  // munmap + mmap + fill 'B'
  auto ev = WaitForPage(**w, 3, absl::Seconds(5));
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_EQ(ev->name, "remap");
  auto r = ReadBytes(*cb_, "remap", 3 * kPage, 2 * kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(2 * kPage, 'B'));
  // Untouched pages are still the old content.
  EXPECT_EQ(*ReadBytes(*cb_, "remap", 0, kPage), Page('A'));
}

TEST_P(TwoNodes, MadviseDontneedInvalidates) {
  auto e = ExportAndImport("dn", 4, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_EQ(*ReadBytes(*cb_, "dn", 0, 4 * kPage), std::string(4 * kPage, 'A'));
  auto w = cb_->Watch("dn");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(*e->Command("dontneed 1 1"), "ok");
  auto ev = WaitForPage(**w, 1, absl::Seconds(5));
  ASSERT_TRUE(ev.ok()) << ev.status();
  // procfs sees the page leave (unmap) unless the daemon's own scrub read
  // faulted the zero page in first (then: a new frame, or new content).
  // When both reach the exporter's queue before the first is sent, they
  // leave as one INVAL of kind OVERFLOW (kinds differ: MergeInvalFrame).
  EXPECT_TRUE(ev->kind == InvalidationKind::kUnmap || ev->kind == InvalidationKind::kRemap ||
              ev->kind == InvalidationKind::kWrite || ev->kind == InvalidationKind::kOverflow)
      << InvalidationKindName(ev->kind);
  EXPECT_EQ(*ReadBytes(*cb_, "dn", kPage, kPage), Page('\0'));  // anonymous memory reads as zero
}

TEST_P(TwoNodes, MprotectInvalidatesAndProtNoneFailsLikeACpuAccess) {
  auto e = ExportAndImport("prot", 4, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "prot", 0, 4 * kPage).ok());
  auto w = cb_->Watch("prot");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(*e->Command("protect 2 1 none"), "ok");
  auto ev = WaitForPage(**w, 2, absl::Seconds(5));
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_EQ(ev->kind, InvalidationKind::kProtection);
  auto r = ReadBytes(*cb_, "prot", 2 * kPage, kPage);
  EXPECT_TRUE(absl::IsFailedPrecondition(r.status())) << r.status();
  EXPECT_TRUE(ReadBytes(*cb_, "prot", 0, kPage).ok());  // other pages still readable
}

TEST_P(TwoNodes, StoresBecomeVisibleAtSync) {
  auto e = ExportAndImport("sync", 4, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_EQ(*ReadBytes(*cb_, "sync", 0, 4 * kPage), std::string(4 * kPage, 'A'));
  auto w = cb_->Watch("sync");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(*e->Command("fill 2 1 67"), "ok");  // a plain store: no notifier fires
  auto reply = e->Command("sync");
  ASSERT_TRUE(reply.ok());
  ASSERT_TRUE(absl::StartsWith(*reply, "ok")) << *reply;
  // Sync returned: B has dropped page 2 (maybe found earlier by the scrub).
  auto ev = WaitForPage(**w, 2, absl::Seconds(1));
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_EQ(*ReadBytes(*cb_, "sync", 2 * kPage, kPage), Page('C'));
  EXPECT_EQ(*ReadBytes(*cb_, "sync", 0, kPage), Page('A'));
}

TEST_P(TwoNodes, SyncFromTheImportingNodeIsForwarded) {
  auto e = ExportAndImport("fwd", 2, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "fwd", 0, 2 * kPage).ok());
  ASSERT_EQ(*e->Command("fill 0 1 68"), "ok");
  auto s = cb_->Sync("fwd");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->subscribers_acked, 1u);
  EXPECT_EQ(*ReadBytes(*cb_, "fwd", 0, kPage), Page('D'));
}

TEST_P(TwoNodes, ExporterKilledInvalidatesWholeRangeAndReadsSayGone) {
  auto e = ExportAndImport("dies", 4, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "dies", 0, 4 * kPage).ok());
  auto w = cb_->Watch("dies");
  ASSERT_TRUE(w.ok()) << w.status();
  e->process().Signal(SIGKILL);
  // The address space may be seen going away (unmap events, or pages the
  // scrub can no longer read) before the exit itself.
  absl::StatusOr<Invalidation> ev;
  do {
    ev = (*w)->Next(Scaled(absl::Seconds(5)));
    ASSERT_TRUE(ev.ok()) << ev.status();
  } while (ev->kind != InvalidationKind::kExit);
  EXPECT_EQ(ev->kind, InvalidationKind::kExit);
  EXPECT_EQ(ev->first_page, 0u);
  EXPECT_EQ(ev->npages, 4u);
  auto r = ReadBytes(*cb_, "dies", 0, kPage);
  ASSERT_TRUE(absl::IsFailedPrecondition(r.status())) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "gone")) << r.status();
  // The cache was dropped too: nothing is served from it.
  auto imports = cb_->ListImports();
  ASSERT_TRUE(imports.ok());
  EXPECT_EQ((*imports)[0].cached_pages, 0u);
  EXPECT_EQ((*imports)[0].state, "gone");
}

// The exporting process is SIGKILLed while a 64 MiB read of its memory is
// in flight: the read fails within the fetch timeout or returns complete,
// intact data (as of an instant before the death), never a mix and never a
// hang; the import then reports the export gone, and the importing daemon
// goes on serving other imports.
TEST_P(TwoNodes, ExporterKilledDuringALargeReadFailsPromptlyOrReturnsIntactData) {
  constexpr uint64_t kPages = 16384;  // 64 MiB: 16 or more fetches (4 MiB at most)
  // Node C holds every fetch reply this long after its copy, so the read
  // lasts at least 16 x kDelayMs and the kill, once the first fetch was
  // served, lands with most of it to go.
  constexpr int kDelayMs = 100;
  auto c = Daemon::Start(Node("C", {"--fault-fetch-delay-ms", std::to_string(kDelayMs)}));
  ASSERT_TRUE(c.ok()) << c.status();
  auto cc = (*c)->Connect();
  ASSERT_NE(cc, nullptr);
  auto e = Exporter::Start({.daemon = c->get(), .name = "big", .pages = kPages,
                            .log_path = absl::StrCat(dir_.path(), "/exporter-big.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE(cb_->Import((*c)->peer(), "big").ok());
  auto w = cb_->Watch("big");
  ASSERT_TRUE(w.ok()) << w.status();

  // Garbage the read must overwrite completely if it succeeds.
  std::string buf(kPages * kPage, '\xee');
  auto reader_client = b_->Connect();
  ASSERT_NE(reader_client, nullptr);
  std::promise<absl::StatusOr<ReadResult>> result;
  auto done = result.get_future();
  absl::Time read_start, read_end;
  std::thread reader([&] {
    ReadOptions fresh;
    fresh.fresh = true;
    read_start = absl::Now();
    auto r = reader_client->Read("big", 0,
                                 absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()), fresh);
    read_end = absl::Now();
    result.set_value(std::move(r));
  });
  // Kill once the first fetch has been served: mid-read, by construction.
  uint64_t served_at_kill = 0;
  const absl::Time started_wait = absl::Now();
  while ((served_at_kill = Counter(*cc, "pages_served")) == 0 &&
         absl::Now() - started_wait < Scaled(absl::Seconds(20))) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const bool finished_before_kill =
      done.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  const absl::Time killed = absl::Now();
  (*e)->process().Signal(SIGKILL);
  // A correct daemon answers within one fetch timeout of the kill; a hung
  // read is unblocked by killing its daemon so this test ends either way.
  const absl::Duration fetch_timeout = Scaled(absl::Milliseconds(1500));
  const bool hung = done.wait_for(std::chrono::milliseconds(
                        absl::ToInt64Milliseconds(fetch_timeout + Scaled(absl::Seconds(20))))) !=
                    std::future_status::ready;
  if (hung) b_->Kill();
  reader.join();
  ASSERT_FALSE(hung) << "the read did not return after the exporter was killed";
  ASSERT_FALSE(finished_before_kill) << "the read was over before the kill: the test proved nothing";
  ASSERT_GT(served_at_kill, 0u) << "no fetch was served before the kill";
  ASSERT_LT(served_at_kill, kPages) << "the kill did not land mid-read";
  auto r = done.get();
  const absl::Duration after_kill = read_end - killed;
  EXPECT_LT(after_kill, fetch_timeout) << r.status();
  // Promptly, not merely before a timeout: the first piece the exporter
  // refuses ends the read. Seen: about 0.1 s natively and 0.2-0.4 s in the
  // VM tier (rdma under TCG); 2.5-7.3 s in the VM when every later piece of
  // the read was still asked for (and refused) after the first refusal.
  // The bound is 4x the native figure, and under the regression in the VM.
  EXPECT_LT(after_kill, Scaled(absl::Milliseconds(400)))
      << r.status() << ": the read went on after the export was gone";
  if (r.ok()) {
    EXPECT_EQ(r->len, kPages * kPage);
    EXPECT_EQ(FirstUnstampedPage(buf, 0), -1) << "a successful read returned garbage";
  } else {
    // The process is gone (NotFound from the source, or the export marked
    // gone): not a timeout or an internal error.
    EXPECT_TRUE(absl::IsFailedPrecondition(r.status()) || absl::IsNotFound(r.status()))
        << r.status();
  }
  std::printf("exporter killed %.0f ms into a %llu MiB read after %llu of %llu pages were served; "
              "the read returned %s %.0f ms after the kill\n",
              absl::ToDoubleMilliseconds(killed - read_start),
              static_cast<unsigned long long>(kPages * kPage >> 20),
              static_cast<unsigned long long>(served_at_kill),
              static_cast<unsigned long long>(kPages), r.ok() ? "complete data" : r.status().ToString().c_str(),
              absl::ToDoubleMilliseconds(after_kill));

  // The import reports the export gone, through the exit invalidation.
  absl::StatusOr<Invalidation> ev;
  do {
    ev = (*w)->Next(Scaled(absl::Seconds(5)));
    ASSERT_TRUE(ev.ok()) << ev.status();
  } while (ev->kind != InvalidationKind::kExit);
  EXPECT_EQ(ev->first_page, 0u);
  EXPECT_EQ(ev->npages, kPages);
  auto gone = ReadBytes(*cb_, "big", 0, kPage);
  EXPECT_TRUE(absl::IsFailedPrecondition(gone.status())) << gone.status();
  EXPECT_TRUE(absl::StrContains(gone.status().message(), "gone")) << gone.status();
  auto imports = cb_->ListImports();
  ASSERT_TRUE(imports.ok()) << imports.status();
  ASSERT_EQ(imports->size(), 1u);
  EXPECT_EQ((*imports)[0].state, "gone");
  EXPECT_EQ((*imports)[0].cached_pages, 0u);

  // The importing daemon is healthy: another import (4 MiB, one full fetch)
  // reads intact data.
  EXPECT_TRUE(b_->process().running());
  auto other = StartExporter("after", 1024);
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(cb_->Import(a_->peer(), "after").ok());
  auto again = ReadBytes(*cb_, "after", 0, 1024 * kPage, /*fresh=*/true);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(FirstUnstampedPage(*again, 0), -1);
}

TEST_P(TwoNodes, UnexportInvalidatesImporters) {
  auto e = ExportAndImport("wd", 2, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "wd", 0, kPage).ok());
  auto w = cb_->Watch("wd");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(ca_->Unexport("wd").ok());
  auto ev = (*w)->Next(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_EQ(ev->kind, InvalidationKind::kUnexport);
  auto r = ReadBytes(*cb_, "wd", 0, kPage);
  EXPECT_TRUE(absl::IsFailedPrecondition(r.status())) << r.status();
  // Exported again under the same name: the import reattaches by name.
  ASSERT_EQ(*e->Command("unexport"), "err NOT_FOUND: no export named 'wd'");
  auto again = ca_->ExportPid("wd", e->pid(), e->addr(), e->len());
  ASSERT_TRUE(again.ok()) << again.status();
  auto r2 = ReadBytes(*cb_, "wd", 0, kPage);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(*r2, Page('A'));
}

TEST_P(TwoNodes, PeerDaemonKilledFailsFastAndRecovers) {
  auto e = ExportAndImport("peer", 2, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "peer", 0, kPage).ok());
  a_->Kill();
  const absl::Time t0 = absl::Now();
  auto r = ReadBytes(*cb_, "peer", 0, kPage, /*fresh=*/true);
  const absl::Duration took = absl::Now() - t0;
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  EXPECT_LT(took, absl::Seconds(2));
  // Cached pages were dropped with the connection: no stale data either.
  auto r_cached = ReadBytes(*cb_, "peer", 0, kPage);
  EXPECT_TRUE(absl::IsUnavailable(r_cached.status())) << r_cached.status();
  // The peer returns (same address); its exports are re-created.
  ASSERT_TRUE(a_->Restart().ok());
  ca_ = a_->Connect();
  auto again = ca_->ExportPid("peer", e->pid(), e->addr(), e->len());
  ASSERT_TRUE(again.ok()) << again.status();
  absl::StatusOr<std::string> rec = absl::UnavailableError("not tried");
  for (int i = 0; i < 50 && !rec.ok(); ++i) {
    rec = ReadBytes(*cb_, "peer", 0, kPage);
    if (!rec.ok()) usleep(100000);
  }
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(*rec, Page('A'));
}

TEST_P(TwoNodes, HungPeerDaemonFailsReadsWithinTwoSecondsAndRecovers) {
  auto e = ExportAndImport("hung", 2, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(ReadBytes(*cb_, "hung", 0, kPage).ok());
  ASSERT_TRUE(a_->process().Stop(Scaled(absl::Seconds(5))).ok());
  const absl::Time t0 = absl::Now();
  auto r = ReadBytes(*cb_, "hung", 0, kPage, /*fresh=*/true);
  const absl::Duration took = absl::Now() - t0;
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  EXPECT_LT(took, Scaled(absl::Seconds(2)));
  // The connection was given up: nothing cached from it is served either.
  auto imports = cb_->ListImports();
  ASSERT_TRUE(imports.ok());
  EXPECT_EQ((*imports)[0].cached_pages, 0u);
  a_->process().Signal(SIGCONT);
  absl::StatusOr<std::string> rec = absl::UnavailableError("not tried");
  for (int i = 0; i < 50 && !rec.ok(); ++i) {
    rec = ReadBytes(*cb_, "hung", 0, kPage);
    if (!rec.ok()) usleep(100000);
  }
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(*rec, Page('A'));
}

TEST_P(TwoNodes, SyncDisconnectsAnImporterThatDoesNotAcknowledge) {
  auto e = ExportAndImport("stuck", 2, 'A');
  ASSERT_NE(e, nullptr);
  ASSERT_EQ(*ReadBytes(*cb_, "stuck", 0, 2 * kPage), std::string(2 * kPage, 'A'));
  ASSERT_TRUE(b_->process().Stop(Scaled(absl::Seconds(5))).ok());
  ASSERT_EQ(*e->Command("fill 0 1 69"), "ok");
  const absl::Time t0 = absl::Now();
  auto s = ca_->Sync("stuck");  // default --sync-timeout-ms 5000
  const absl::Duration took = absl::Now() - t0;
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->subscribers_acked, 0u);
  EXPECT_LT(took, absl::Seconds(8));
  b_->process().Signal(SIGCONT);
  // Disconnected, node B must not serve the page it cached before the store.
  absl::StatusOr<std::string> r = absl::UnavailableError("not tried");
  for (int i = 0; i < 50; ++i) {
    r = ReadBytes(*cb_, "stuck", 0, kPage);
    if (r.ok()) break;
    usleep(100000);
  }
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, Page('E'));
  // It was disconnected and came back on a new data connection.
  auto st = cb_->Status();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->counters.at("data_connections_opened"), 2u);
}

TEST_P(TwoNodes, UnprivilegedProcessExportsItsOwnMemory) {
  auto e = StartExporter("mine", 2, 'N', kNobody, kNogroup);
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(cb_->Import(a_->peer(), "mine").ok());
  auto r = ReadBytes(*cb_, "mine", 0, 2 * kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(2 * kPage, 'N'));
}

TEST_P(TwoNodes, ExportingAnotherUsersProcessNeedsPrivilege) {
  // A root-owned process (this test's exporter) exported by svmctl running as nobody.
  auto e = StartExporter("victim", 2, 'V');
  ASSERT_NE(e, nullptr);
  auto r = RunCommand({SvmctlPath(), "--daemon", a_->control(), "export", "--pid", std::to_string(e->pid()),
                "--addr", absl::StrCat("0x", absl::Hex(e->addr())), "--len", std::to_string(e->len()),
                "--name", "stolen"},
               Scaled(absl::Seconds(10)), kNobody, kNogroup);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "PERMISSION_DENIED")) << r.err;
  auto list = ca_->ListExports();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 1u);  // nothing else changed
  // Root may.
  auto ok = Ctl(*a_, {"export", "--pid", std::to_string(e->pid()), "--addr",
                      absl::StrCat("0x", absl::Hex(e->addr())), "--len", std::to_string(e->len()),
                      "--name", "byroot"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
}

TEST_P(TwoNodes, BadExportRequestsAreRejectedAndChangeNothing) {
  auto e = StartExporter("good", 4, 'A');
  ASSERT_NE(e, nullptr);
  const pid_t pid = e->pid();
  const uint64_t a = e->addr();
  struct Case {
    std::string what;
    std::string name;
    pid_t pid;
    uint64_t addr, len;
    absl::StatusCode want;
  } cases[] = {
      {"unaligned addr", "x1", pid, a + 1, kPage, absl::StatusCode::kInvalidArgument},
      {"unaligned len", "x2", pid, a, kPage + 1, absl::StatusCode::kInvalidArgument},
      {"zero len", "x3", pid, a, 0, absl::StatusCode::kInvalidArgument},
      {"overflow", "x4", pid, ~uint64_t{0} - kPage + 1, 2 * kPage, absl::StatusCode::kInvalidArgument},
      {"not mapped", "x5", pid, 0x10000, kPage, absl::StatusCode::kInvalidArgument},
      {"range runs into a hole", "x6", pid, a, uint64_t{1} << 36, absl::StatusCode::kInvalidArgument},
      {"no such pid", "x7", 0x3ffffff, a, kPage, absl::StatusCode::kNotFound},
      {"duplicate name", "good", pid, a, kPage, absl::StatusCode::kAlreadyExists},
      {"bad name", "a b/c", pid, a, kPage, absl::StatusCode::kInvalidArgument},
      {"empty name", "", pid, a, kPage, absl::StatusCode::kInvalidArgument},
      {"name starting with a dot", ".x", pid, a, kPage, absl::StatusCode::kInvalidArgument},
      {"129-character name", std::string(129, 'n'), pid, a, kPage, absl::StatusCode::kInvalidArgument},
      {"name with a NUL", std::string("x\0y", 3), pid, a, kPage, absl::StatusCode::kInvalidArgument},
      {"negative pid", "x8", -5, a, kPage, absl::StatusCode::kInvalidArgument},
  };
  for (const auto& c : cases) {
    auto r = ca_->ExportPid(c.name, c.pid, c.addr, c.len);
    EXPECT_EQ(r.status().code(), c.want) << c.what << ": " << r.status();
  }
  // The longest name, with every allowed character, is accepted.
  const std::string longest = "A-z_0." + std::string(122, 'n');
  ASSERT_TRUE(ca_->ExportPid(longest, pid, a, kPage).ok());
  ASSERT_TRUE(ca_->Unexport(longest).ok());
  auto list = ca_->ListExports();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, "good");
  // And it still serves.
  EXPECT_TRUE(ReadBytes(*ca_, "good", 0, kPage).ok());
}

TEST_P(TwoNodes, BadReadsImportsAndNamesGetClearStatuses) {
  auto e = ExportAndImport("r", 2, 'A');
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(absl::IsOutOfRange(ReadBytes(*cb_, "r", 2 * kPage, 1).status()));
  EXPECT_TRUE(absl::IsOutOfRange(ReadBytes(*cb_, "r", kPage, kPage + 1).status()));
  EXPECT_TRUE(absl::IsOutOfRange(ReadBytes(*ca_, "r", 0, 3 * kPage).status()));
  EXPECT_TRUE(absl::IsNotFound(ReadBytes(*cb_, "nope", 0, 1).status()));
  EXPECT_TRUE(absl::IsNotFound(cb_->Watch("nope").status()));
  EXPECT_TRUE(absl::IsNotFound(cb_->Sync("nope").status()));
  EXPECT_TRUE(absl::IsNotFound(ca_->Unexport("nope")));
  EXPECT_TRUE(absl::IsNotFound(cb_->Import(a_->peer(), "nope").status()));
  EXPECT_TRUE(absl::IsAlreadyExists(cb_->Import(a_->peer(), "r").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(cb_->Import("not-an-address", "r", "r2").status()));
  // A peer that does not answer: a closed port.
  const absl::Time t0 = absl::Now();
  auto dead = cb_->Import("127.0.0.1:1", "r", "r3");
  EXPECT_TRUE(absl::IsUnavailable(dead.status())) << dead.status();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  // Zero-length read.
  std::string b;
  EXPECT_TRUE(absl::IsInvalidArgument(cb_->Read("r", 0, absl::Span<uint8_t>()).status()));
  // Nothing changed: the import still works.
  EXPECT_TRUE(ReadBytes(*cb_, "r", 0, kPage).ok());
  auto imports = cb_->ListImports();
  ASSERT_TRUE(imports.ok());
  EXPECT_EQ(imports->size(), 1u);
}

TEST_P(TwoNodes, GarbageOnThePeerAndDataPortsIsSurvived) {
  auto e = ExportAndImport("g", 2, 'A');
  ASSERT_NE(e, nullptr);
  // The address node A listens on (127.0.0.1, or its NIC's in the two-guest tier).
  const std::string host = a_->peer().substr(0, a_->peer().rfind(':'));
  for (uint16_t port : {a_->peer_port(), a_->data_port()}) {
    for (int i = 0; i < 5; ++i) {
      auto fd = TcpConnect({host, port}, absl::Seconds(2));
      ASSERT_TRUE(fd.ok()) << fd.status();
      std::string junk(4096 + i * 1000, '\0');
      for (size_t k = 0; k < junk.size(); ++k) junk[k] = static_cast<char>((k * 131 + i * 7) & 0xff);
      (void)::send(fd->get(), junk.data(), junk.size(), MSG_NOSIGNAL);
    }
    // A well-formed frame header announcing an absurd payload, too.
    auto fd = TcpConnect({host, port}, absl::Seconds(2));
    ASSERT_TRUE(fd.ok());
    uint32_t hdr[8] = {0x444d5653, 0x0201, 0xffffffff, 0, 0, 0, 0, 0};
    (void)::send(fd->get(), hdr, sizeof(hdr), MSG_NOSIGNAL);
  }
  EXPECT_TRUE(a_->process().running());
  auto r = ReadBytes(*cb_, "g", 0, 2 * kPage, /*fresh=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(2 * kPage, 'A'));
  EXPECT_TRUE(cb_->Import(a_->peer(), "g", "g2").ok());
}

TEST_P(TwoNodes, PeerTokenIsRequiredWhenConfigured) {
  const std::string token_file = absl::StrCat(dir_.path(), "/token");
  ASSERT_EQ(RunCommand({"/bin/sh", "-c", absl::StrCat("echo s3cret > ", token_file)}).exit_code, 0);
  auto c = Daemon::Start(Node("C", {"--peer-token-file", token_file}));
  ASSERT_TRUE(c.ok()) << c.status();
  auto cc = (*c)->Connect();
  auto e = Exporter::Start({.daemon = c->get(), .name = "secret", .pages = 1, .fill = 'S'});
  ASSERT_TRUE(e.ok()) << e.status();
  // B has no token.
  auto denied = cb_->Import((*c)->peer(), "secret");
  EXPECT_TRUE(absl::IsUnauthenticated(denied.status())) << denied.status();
  auto d = Daemon::Start(Node("D", {"--peer-token-file", token_file}));
  ASSERT_TRUE(d.ok()) << d.status();
  auto cd = (*d)->Connect();
  ASSERT_TRUE(cd->Import((*c)->peer(), "secret").ok());
  EXPECT_EQ(*ReadBytes(*cd, "secret", 0, kPage), Page('S'));
}

TEST_P(TwoNodes, DaemonShutsDownCleanlyOnSigterm) {
  auto e = ExportAndImport("t", 1, 'A');
  ASSERT_NE(e, nullptr);
  b_->process().Signal(SIGTERM);
  auto st = b_->process().Wait(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << *st;
  EXPECT_NE(access(b_->control().substr(5).c_str(), F_OK), 0) << "socket left behind";
  // The exporter side notices the importer left and keeps serving.
  a_->process().Signal(SIGINT);
  st = a_->process().Wait(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << *st;
}

TEST_P(TwoNodes, SvmctlSpeaksTheCommandLineContract) {
  auto e = StartExporter("cli", 2, 'Q');
  ASSERT_NE(e, nullptr);
  auto imp = Ctl(*b_, {"import", "--peer", a_->peer(), "--name", "cli"});
  ASSERT_EQ(imp.exit_code, 0) << imp.err;
  auto rd = Ctl(*b_, {"read", "--name", "cli", "--offset", "0x1000", "--len", "10"});
  ASSERT_EQ(rd.exit_code, 0) << rd.err;
  EXPECT_EQ(rd.out, std::string(10, 'Q'));  // raw bytes on stdout
  auto bad = Ctl(*b_, {"read", "--name", "cli", "--offset", "0x2000", "--len", "1"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_TRUE(absl::StartsWith(bad.err, "svmctl: OUT_OF_RANGE:")) << bad.err;
  auto exports = Ctl(*a_, {"exports", "--json"});
  ASSERT_EQ(exports.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(exports.out, "\"name\": \"cli\"")) << exports.out;
  auto status = Ctl(*b_, {"status"});
  EXPECT_TRUE(absl::StrContains(status.out, "source:      " + TestSource())) << status.out;
  EXPECT_TRUE(absl::StrContains(status.out, "transport:   " + GetParam() + " ")) << status.out;
  auto imports = Ctl(*b_, {"imports"});
  EXPECT_TRUE(absl::StrContains(imports.out, "connected")) << imports.out;
  // watch prints NAME FIRST_PAGE NPAGES SEQ.
  Subprocess::Options wo;
  wo.argv = {SvmctlPath(), "--daemon", b_->control(), "watch", "--name", "cli", "--count", "1",
             "--timeout", "10"};
  wo.log_path = absl::StrCat(dir_.path(), "/watch.log");
  auto watch = Subprocess::Start(wo);
  ASSERT_TRUE(watch.ok());
  // Registered once "watching" was printed to stderr.
  for (int i = 0; i < 200; ++i) {
    auto log = RunCommand({"/bin/cat", wo.log_path});
    if (absl::StrContains(log.out, "watching cli")) break;
    usleep(10000);
  }
  ASSERT_EQ(*e->Command("remap 1 1 82"), "ok");
  auto line = (*watch)->ReadLine(Scaled(absl::Seconds(10)));
  ASSERT_TRUE(line.ok()) << line.status();
  std::vector<std::string> cols = absl::StrSplit(*line, ' ');
  ASSERT_EQ(cols.size(), 4u) << *line;
  EXPECT_EQ(cols[0], "cli");
  EXPECT_EQ(cols[1], "1");
  EXPECT_EQ(cols[2], "1");
  auto done = (*watch)->Wait(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(WEXITSTATUS(*done), 0);
  auto unknown = Ctl(*a_, {"frobnicate"});
  EXPECT_EQ(unknown.exit_code, 2);
}

INSTANTIATE_TEST_SUITE_P(Tcp, TwoNodes, ::testing::Values("tcp"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Rdma, TwoNodes, ::testing::Values("rdma"),
                         [](const auto& info) { return info.param; });

TEST(Svmd, RefusesBadOptionsWithAClearMessage) {
  TempDir dir;
  const std::string sock = absl::StrCat("unix:", dir.path(), "/x.sock");
  struct Case {
    std::vector<std::string> args;
    std::string says;
  } cases[] = {
      {{"--source", "bogus"}, "flag 'source'; 'bogus' is not one of"},
      {{"--transport", "carrier-pigeon"}, "flag 'transport'; 'carrier-pigeon' is not one of"},
      {{"--peer-listen", "nohost"}, "flag 'peer-listen'; expected HOST:PORT"},
      {{"--cache-mb", "lots"}, "flag 'cache-mb'"},
      {{"--frobnicate"}, "Unknown command line flag 'frobnicate'"},
      {{"--control", "/no/unix/prefix"}, "flag 'control'; must be unix:PATH"},
  };
  if (access("/dev/svm_shim", F_OK) != 0) cases[0] = {{"--source", "shim"}, "/dev/svm_shim does not exist"};
  for (const auto& c : cases) {
    std::vector<std::string> argv = {SvmdPath(), "--control", sock, "--peer-listen", "127.0.0.1:0"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto r = RunCommand(argv, Scaled(absl::Seconds(10)));
    EXPECT_NE(r.exit_code, 0) << c.args[0];
    EXPECT_TRUE(absl::StrContains(r.err, c.says)) << c.args[0] << ": " << r.err;
  }
  // Two daemons cannot share a control socket.
  auto first = Daemon::Start({.node = "one", .dir = dir.path()});
  ASSERT_TRUE(first.ok()) << first.status();
  auto r = RunCommand({SvmdPath(), "--control", (*first)->control(), "--peer-listen", "127.0.0.1:0",
                       "--source", TestSource()},
                      Scaled(absl::Seconds(10)));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "another daemon is listening")) << r.err;
  EXPECT_TRUE((*first)->Connect()->Status().ok());
}

}  // namespace
}  // namespace svm::testing
