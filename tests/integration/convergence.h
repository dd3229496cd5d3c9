// The convergence check (DESIGN.md section 3: "once changes stop and
// invalidations have drained, every cached read and every mapped page on
// every importer equals the exporter's memory"), shared by the tests that
// end with it: the exporter's pages carry svm-exporter's stamps (one
// version in every 8-byte word; `storm`, `stamp`), its `dump` says what each
// page holds, and every importer's reads are compared with that, page by
// page.
#ifndef SVM_TESTS_INTEGRATION_CONVERGENCE_H_
#define SVM_TESTS_INTEGRATION_CONVERGENCE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "svm/client.h"
#include "tests/integration/harness.h"

namespace svm::testing {

inline constexpr uint64_t kStampPage = 4096;

// The version stamped into every word of a page, or nullopt when its words
// differ (a torn read: never acceptable after the storm).
std::optional<uint64_t> StampOf(const char* page);

// True for a page read while svm-exporter's storm was stamping it: the
// storm zeroes a page (munmap + mmap, or MADV_DONTNEED) and then writes its
// new version into every word, so a copy racing those stores holds that one
// version and zeros, nothing else. That is the exporter's own memory at the
// moment of the read (a CPU store in flight), not something svm made; a
// torn page holding two different versions, or anything else, is svm's.
bool TornByAStoreInFlight(const char* page);

// svm-exporter's `dump` reply ("ok V0 V1 ..."), for an export of npages.
absl::StatusOr<std::vector<uint64_t>> ParseDump(const std::string& reply, uint64_t npages);

// The pages of buf that differ from expected, described; empty when none.
std::vector<std::string> WrongPages(const std::string& buf, const std::vector<uint64_t>& expected);

// What importers must converge to: the exporter's own view of its pages
// (`dump`), checked against what its daemon reads locally.
absl::StatusOr<std::vector<uint64_t>> ExporterPages(Exporter& e, Daemon& exporting,
                                                    const std::string& name, uint64_t npages);

// Reads the import `name` whole through client c in the given ways
// ("mapped": Client::Map, "cached", "fresh") and returns one description
// per read that failed or differs from expected; empty when it converged.
std::vector<std::string> Diverging(Client& c, const std::string& name,
                                   const std::vector<uint64_t>& expected,
                                   const std::vector<std::string>& ways);

// A counter from the daemon's Status, 0 when absent or unreachable.
uint64_t Counter(Client& c, const std::string& name);

}  // namespace svm::testing

#endif  // SVM_TESTS_INTEGRATION_CONVERGENCE_H_
