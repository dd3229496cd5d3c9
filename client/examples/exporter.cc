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
//   truncate              (memfd) ftruncate the object to 0: pages past the end are gone
//   regrow                (memfd) ftruncate it back to the export's length (zero pages)
//   exit
//
// mutate: for SECONDS, page after page is replaced atomically (a new page,
// stamped with a fresh version number in every 8-byte word, is mremap'ed
// over the old one), and every replaced version is logged to LOG as
// "PAGE VERSION DESTROYED_NS" (CLOCK_MONOTONIC after the mremap returned).
// Page p starts with version p + 1.
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
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
                                       r->pages_invalidated(), r->subscribers_acked())
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
