#include "tests/integration/convergence.h"

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace svm::testing {

std::optional<uint64_t> StampOf(const char* page) {
  uint64_t first;
  std::memcpy(&first, page, 8);
  for (uint64_t w = 1; w < kStampPage / 8; ++w) {
    uint64_t v;
    std::memcpy(&v, page + w * 8, 8);
    if (v != first) return std::nullopt;
  }
  return first;
}

bool TornByAStoreInFlight(const char* page) {
  uint64_t version = 0;
  for (uint64_t w = 0; w < kStampPage / 8; ++w) {
    uint64_t v;
    std::memcpy(&v, page + w * 8, 8);
    if (v == 0) continue;
    if (version != 0 && v != version) return false;
    version = v;
  }
  return version != 0;
}

static std::string Describe(const std::optional<uint64_t>& v) {
  return v ? absl::StrCat("version ", *v) : "a torn page";
}

absl::StatusOr<std::vector<uint64_t>> ParseDump(const std::string& reply, uint64_t npages) {
  std::vector<std::string> words = absl::StrSplit(reply, ' ', absl::SkipEmpty());
  if (words.size() != npages + 1 || words[0] != "ok") {
    return absl::InternalError(absl::StrCat("exporter's dump: ", reply));
  }
  std::vector<uint64_t> versions(npages);
  for (uint64_t p = 0; p < npages; ++p) {
    if (!absl::SimpleAtoi(words[p + 1], &versions[p])) {
      return absl::InternalError(absl::StrCat("exporter's page ", p, " is ", words[p + 1],
                                              " after the storm: ", reply));
    }
  }
  return versions;
}

std::vector<std::string> WrongPages(const std::string& buf, const std::vector<uint64_t>& expected) {
  std::vector<std::string> wrong;
  for (uint64_t p = 0; p < expected.size(); ++p) {
    const auto got = StampOf(buf.data() + p * kStampPage);
    if (got != expected[p]) {
      wrong.push_back(absl::StrCat("page ", p, ": expected version ", expected[p], ", read ",
                                   Describe(got)));
    }
  }
  return wrong;
}

absl::StatusOr<std::vector<uint64_t>> ExporterPages(Exporter& e, Daemon& exporting,
                                                    const std::string& name, uint64_t npages) {
  auto dump = e.Command("dump");
  if (!dump.ok()) return dump.status();
  auto expected = ParseDump(*dump, npages);
  if (!expected.ok()) return expected.status();
  auto c = Client::Connect(exporting.control());
  if (!c.ok()) return c.status();
  auto local = ReadBytes(**c, name, 0, npages * kStampPage);
  if (!local.ok()) return local.status();
  if (const auto wrong = WrongPages(*local, *expected); !wrong.empty()) {
    return absl::InternalError(absl::StrCat(
        "the exporting daemon's local read disagrees with the process: ", absl::StrJoin(wrong, "; ")));
  }
  return expected;
}

std::vector<std::string> Diverging(Client& c, const std::string& name,
                                   const std::vector<uint64_t>& expected,
                                   const std::vector<std::string>& ways) {
  std::vector<std::string> bad;
  for (const std::string& how : ways) {
    std::string buf(expected.size() * kStampPage, '\0');
    absl::StatusOr<ReadResult> r;
    if (how == "mapped") {
      auto m = c.Map(name);
      if (m.ok()) {
        std::memcpy(buf.data(), (*m)->data(), buf.size());
        r = ReadResult{buf.size(), 0, 0, (*m)->pages_fetched()};
      } else {
        r = m.status();
      }
    } else {
      ReadOptions o;
      o.fresh = how == "fresh";
      r = c.Read(name, 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()), o);
    }
    if (!r.ok()) {
      bad.push_back(absl::StrCat(how, " read failed after the drain: ", r.status().ToString()));
      continue;
    }
    const auto wrong = WrongPages(buf, expected);
    if (wrong.empty()) continue;
    bad.push_back(absl::StrCat(how, " read (", r->pages_from_cache, " pages from cache, ",
                               r->pages_fetched, " fetched) differs from the exporter's memory in ",
                               wrong.size(), " of ", expected.size(),
                               " pages: ", absl::StrJoin(wrong, "; ")));
  }
  return bad;
}

uint64_t Counter(Client& c, const std::string& name) {
  auto st = c.Status();
  if (!st.ok()) return 0;
  auto it = st->counters.find(name);
  return it == st->counters.end() ? 0 : it->second;
}

}  // namespace svm::testing
