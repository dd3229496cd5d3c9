// svm-exporter: an example exporting process, scriptable from stdin, used
// by the demo and the integration tests. It allocates pages, exports them
// through the client library and changes them on command.
//
//   svm-exporter --daemon unix:PATH --name NAME --pages N [--fill BYTE] [--backing anon|memfd]
//
// --backing memfd allocates with svm::ExportableMemory (the zero-copy path's
// allocator); anon (the default) is private anonymous memory.
//
// Prints "ready pid=PID addr=0xADDR len=LEN", then answers each command
// line with "ok ..." or "err ...":
//   fill FIRST N BYTE     store BYTE into the pages (a CPU store: no notifier)
//   remap FIRST N BYTE    munmap the pages, mmap new ones at the same address, fill
//   dontneed FIRST N      madvise(MADV_DONTNEED)
//   protect FIRST N MODE  mprotect: none | r | rw
//   sync                  Sync the export
//   unexport
//   mutate SECONDS LOG    replace pages with new versions in a loop (see below)
//   stamp VERSION         store (VERSION << 32 | page) into every word of every page
//   storm SECONDS SEED [THREADS [PAUSE_US]]
//                         remap or drop random pages in a loop (see below)
//   dump                  "ok V0 V1 ...": each page's stamp (see below)
//   truncate              (memfd) ftruncate the object to 0: pages past the end are gone
//   regrow                (memfd) ftruncate it back to the export's length (zero pages)
//   exit
//
// mutate: for SECONDS, page after page is replaced atomically (a new page,
// stamped with a fresh version number in every 8-byte word, is mremap'ed
// over the old one), and every replaced version is logged to LOG as
// "PAGE VERSION DESTROYED_NS" (CLOCK_MONOTONIC after the mremap returned).
// Page p starts with version p + 1.
//
// storm: for SECONDS, THREADS threads (default 1; thread t owns the pages
// p with p % THREADS == t, so no page is touched by two threads) pick one
// of their pages at random (seeded with SEED + t) and either munmap it and
// mmap a new anonymous page at the same address (MAP_FIXED) or drop it with
// madvise(MADV_DONTNEED), then stamp it with a fresh version (every 8-byte
// word; versions continue from the highest one in memory, across threads
// and storms), sleeping PAUSE_US (default 500) between mutations. Replies
// "ok N mutations (R remaps, D dontneeds)".
//
// dump: the stamp of every page in page order ("-" for a page that is not
// mapped, "torn" for one whose words differ), read by this process itself:
// what importers must converge to once the storm has stopped.
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/args.h"
#include "common/numbers.h"
#include "svm/client.h"

namespace {

constexpr size_t kPage = 4096;

uint64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void Stamp(uint8_t* page, uint64_t version) {
  auto* w = reinterpret_cast<uint64_t*>(page);
  for (size_t i = 0; i < kPage / 8; ++i) w[i] = version;
}

// The version every word of page holds, or nullopt for a torn page.
std::optional<uint64_t> StampOf(const uint8_t* page) {
  const auto* w = reinterpret_cast<const uint64_t*>(page);
  for (size_t i = 1; i < kPage / 8; ++i) {
    if (w[i] != w[0]) return std::nullopt;
  }
  return w[0];
}

// Whether the page at p is mapped in this process (mincore fails with
// ENOMEM on an unmapped address).
bool Mapped(uint8_t* p) {
  unsigned char vec = 0;
  return mincore(p, kPage, &vec) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv, {"daemon", "name", "pages", "fill", "backing"}, {"no-export"});
  if (!a.ok()) {
    std::fprintf(stderr, "svm-exporter: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  auto pages = a->GetU64("pages", 16);
  auto fill = a->GetU64("fill", 0);
  if (!pages.ok() || !fill.ok() || *pages == 0) {
    std::fprintf(stderr, "svm-exporter: bad --pages or --fill\n");
    return 2;
  }
  const size_t len = *pages * kPage;
  const std::string name = a->Get("name", "demo");
  int fd = -1;
  uint8_t* base = nullptr;
  std::optional<svm::ExportableMemory> shared;
  if (a->Get("backing", "anon") == "memfd") {
    auto m = svm::ExportableMemory::Allocate(len, name);
    if (!m.ok()) {
      std::fprintf(stderr, "svm-exporter: %s\n", m.status().ToString().c_str());
      return 1;
    }
    shared.emplace(std::move(*m));
    base = shared->data();
    fd = shared->fd();
  } else {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("svm-exporter: mmap");
      return 1;
    }
    base = static_cast<uint8_t*>(p);
  }
  if (a->Has("fill")) {
    std::memset(base, static_cast<int>(*fill), len);
  } else {
    for (uint64_t p = 0; p < *pages; ++p) Stamp(base + p * kPage, p + 1);
  }

  std::unique_ptr<svm::Client> client;
  if (!a->Has("no-export")) {
    auto c = svm::Client::Connect(a->Get("daemon", "unix:/run/svm/svmd.sock"));
    if (!c.ok()) {
      std::fprintf(stderr, "svm-exporter: %s\n", c.status().ToString().c_str());
      return 1;
    }
    client = std::move(*c);
    auto info = client->Export(name, base, len);
    if (!info.ok()) {
      std::fprintf(stderr, "svm-exporter: export: %s\n", info.status().ToString().c_str());
      return 1;
    }
  }
  std::printf("ready pid=%d addr=%p len=%zu\n", getpid(), static_cast<void*>(base), len);
  std::fflush(stdout);

  auto range = [&](std::istringstream& in, uint64_t* first, uint64_t* n) {
    std::string f, c;
    in >> f >> c;
    auto pf = svm::ParseU64(f);
    auto pc = svm::ParseU64(c);
    if (!pf.ok() || !pc.ok() || *pc == 0 || *pf >= *pages || *pc > *pages - *pf) return false;
    *first = *pf;
    *n = *pc;
    return true;
  };

  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    uint64_t first = 0, n = 0;
    std::string reply = "ok";
    if (cmd == "fill" || cmd == "remap") {
      std::string b;
      if (!range(in, &first, &n) || !(in >> b) || !svm::ParseU64(b).ok()) {
        reply = "err usage: " + cmd + " FIRST N BYTE";
      } else {
        uint8_t* p = base + first * kPage;
        if (cmd == "remap") {
          if (munmap(p, n * kPage) != 0 ||
              mmap(p, n * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != p) {
            reply = absl::StrFormat("err remap: %s", std::strerror(errno));
          }
        }
        if (reply == "ok") std::memset(p, static_cast<int>(*svm::ParseU64(b)), n * kPage);
      }
    } else if (cmd == "dontneed") {
      if (!range(in, &first, &n)) {
        reply = "err usage: dontneed FIRST N";
      } else if (madvise(base + first * kPage, n * kPage, MADV_DONTNEED) != 0) {
        reply = absl::StrFormat("err madvise: %s", std::strerror(errno));
      }
    } else if (cmd == "protect") {
      std::string mode;
      const bool ok = range(in, &first, &n) && (in >> mode) &&
                      (mode == "none" || mode == "r" || mode == "rw");
      int prot = mode == "none" ? PROT_NONE : mode == "r" ? PROT_READ : PROT_READ | PROT_WRITE;
      if (!ok) {
        reply = "err usage: protect FIRST N none|r|rw";
      } else if (mprotect(base + first * kPage, n * kPage, prot) != 0) {
        reply = absl::StrFormat("err mprotect: %s", std::strerror(errno));
      }
    } else if (cmd == "sync") {
      auto r = client ? client->Sync(name) : absl::FailedPreconditionError("not exported");
      reply = r.ok() ? absl::StrFormat("ok %u pages invalidated, %u importers acknowledged",
                                       r->pages_invalidated, r->subscribers_acked)
                     : "err " + r.status().ToString();
    } else if (cmd == "unexport") {
      auto st = client ? client->Unexport(name) : absl::FailedPreconditionError("not exported");
      if (!st.ok()) reply = "err " + st.ToString();
    } else if (cmd == "mutate") {
      double seconds = 0;
      std::string log;
      in >> seconds >> log;
      FILE* out = std::fopen(log.c_str(), "w");
      if (seconds <= 0 || out == nullptr) {
        reply = "err usage: mutate SECONDS LOGFILE";
      } else {
        // Versions continue from the highest one in memory, so a second
        // mutate never reuses a version number.
        std::vector<uint64_t> version(*pages);
        uint64_t next = *pages + 1, iterations = 0;
        for (uint64_t p = 0; p < *pages; ++p) {
          version[p] = reinterpret_cast<uint64_t*>(base + p * kPage)[0];
          next = std::max(next, version[p] + 1);
        }
        const uint64_t end = NowNs() + static_cast<uint64_t>(seconds * 1e9);
        std::vector<std::string> lines;
        while (NowNs() < end) {
          for (uint64_t p = 0; p < *pages && NowNs() < end; ++p) {
            void* fresh = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            Stamp(static_cast<uint8_t*>(fresh), next);
            if (mremap(fresh, kPage, kPage, MREMAP_MAYMOVE | MREMAP_FIXED, base + p * kPage) == MAP_FAILED) {
              std::perror("svm-exporter: mremap");
              return 1;
            }
            lines.push_back(absl::StrFormat("%u %u %u\n", p, version[p], NowNs()));
            version[p] = next++;
            ++iterations;
            usleep(200);
          }
        }
        for (auto& l : lines) std::fputs(l.c_str(), out);
        std::fclose(out);
        reply = absl::StrFormat("ok %u replacements", iterations);
      }
    } else if (cmd == "storm") {
      double seconds = 0;
      uint64_t seed = 0, threads = 1, pause_us = 500;
      in >> seconds >> seed;
      const bool ok = !in.fail() && seconds > 0;
      if (ok && !(in >> threads)) threads = 1;
      if (ok && !(in >> pause_us)) pause_us = 500;
      if (!ok || threads == 0 || threads > *pages || fd >= 0) {
        reply = "err usage: storm SECONDS SEED [THREADS [PAUSE_US]] (anonymous backing)";
      } else {
        uint64_t highest = *pages;
        for (uint64_t p = 0; p < *pages; ++p) {
          if (auto v = StampOf(base + p * kPage)) highest = std::max(highest, *v);
        }
        std::atomic<uint64_t> next{highest + 1}, remaps{0}, dontneeds{0};
        std::atomic<bool> failed{false};
        const uint64_t end = NowNs() + static_cast<uint64_t>(seconds * 1e9);
        std::vector<std::thread> workers;
        for (uint64_t t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            std::mt19937_64 rng(seed + t);
            const uint64_t owned = (*pages - t + threads - 1) / threads;
            while (NowNs() < end && !failed) {
              uint8_t* p = base + (t + (rng() % owned) * threads) * kPage;
              if (rng() % 2 == 0) {
                if (munmap(p, kPage) != 0 ||
                    mmap(p, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                         -1, 0) != p) {
                  std::perror("svm-exporter: storm: remap");
                  failed = true;
                  return;
                }
                ++remaps;
              } else {
                if (madvise(p, kPage, MADV_DONTNEED) != 0) {
                  std::perror("svm-exporter: storm: madvise");
                  failed = true;
                  return;
                }
                ++dontneeds;
              }
              Stamp(p, next++);
              if (pause_us > 0) usleep(static_cast<useconds_t>(pause_us));
            }
          });
        }
        for (auto& w : workers) w.join();
        reply = failed ? "err storm: a mutation failed (see stderr)"
                       : absl::StrFormat("ok %u mutations (%u remaps, %u dontneeds)",
                                         remaps + dontneeds, remaps.load(), dontneeds.load());
      }
    } else if (cmd == "dump") {
      for (uint64_t p = 0; p < *pages; ++p) {
        uint8_t* page = base + p * kPage;
        if (!Mapped(page)) {
          reply += " -";
        } else if (auto v = StampOf(page)) {
          reply += absl::StrFormat(" %u", *v);
        } else {
          reply += " torn";
        }
      }
    } else if (cmd == "stamp") {
      std::string v;
      auto version = svm::ParseU64((in >> v, v));
      if (!version.ok()) {
        reply = "err usage: stamp VERSION";
      } else {
        for (uint64_t p = 0; p < *pages; ++p) Stamp(base + p * kPage, (*version << 32) | p);
      }
    } else if (cmd == "truncate" || cmd == "regrow") {
      const off_t size = cmd == "truncate" ? 0 : static_cast<off_t>(len);
      if (fd < 0) {
        reply = "err " + cmd + " needs --backing memfd";
      } else if (ftruncate(fd, size) != 0) {
        reply = absl::StrFormat("err ftruncate: %s", std::strerror(errno));
      }
    } else if (cmd == "exit") {
      std::printf("ok\n");
      return 0;
    } else if (!cmd.empty()) {
      reply = "err unknown command " + cmd;
    }
    std::printf("%s\n", reply.c_str());
    std::fflush(stdout);
  }
  return 0;
}
