// Reference measurements for the benchmarks: perftest (ib_read_lat,
// ib_read_bw, ib_send_lat) and ucx_perftest, run as real server and client
// processes on the same RDMA device in the same run, and the statistics the
// benchmarks print in perftest's columns.
//
// A reference that cannot run (tool missing, device missing, UCX not driving
// the device) is reported as an error with the tool's own output, never
// replaced by a made-up number.
#ifndef SVM_TESTS_BENCH_REFERENCE_H_
#define SVM_TESTS_BENCH_REFERENCE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace svm::bench {

// CLOCK_MONOTONIC in microseconds / nanoseconds.
double NowUs();
uint64_t NowNs();

// perftest's latency columns, in the unit of the samples.
struct Stats {
  double min = 0, max = 0, typical = 0, avg = 0, p99 = 0;
};
// Median as "typical", like perftest. `v` must not be empty.
Stats Summarize(std::vector<double> v);

// Where the references run: server and client on one device (rxe loops back
// to its own address).
struct RdmaTarget {
  std::string device = "rxe0";
  int port = 1;
  int gid_index = 1;
  std::string addr = "10.77.0.1";
};

struct RefResult {
  std::string command;  // the client command, for the printout
  // Latency tools: t_typical / t_avg [usec]; bandwidth: BW average [MiB/s]
  // (perftest's and UCX's "MB/sec" are 2^20 bytes per second).
  double typical_usec = -1;
  double avg_usec = -1;
  double bw_mib_s = -1;
};

// Runs a perftest tool ("ib_read_lat", "ib_read_bw", "ib_send_lat") with
// `-s size -n iters` plus `extra` (e.g. {"-t", "1"}) as a server in the
// background and as the client, and parses the client's result row.
absl::StatusOr<RefResult> RunPerftest(const RdmaTarget& t, const std::string& tool, uint64_t size,
                                      uint64_t iters, const std::vector<std::string>& extra = {});

// Runs ucx_perftest between two processes on the device, one-sided get of
// `size` bytes, `iters` times. api "ucp": `-t ucp_get` with
// UCX_NET_DEVICES=DEV:PORT and UCX_TLS=tls; api "uct": `-t get -x tls
// -d DEV:PORT -D zcopy` (UCX's transport layer directly: no UCP wire-up, which
// needs an auxiliary transport that works on the device). The result carries
// both the latency (50th percentile and average per get) and the bandwidth.
absl::StatusOr<RefResult> RunUcxGet(const RdmaTarget& t, const std::string& api,
                                    const std::string& tls, uint64_t size, uint64_t iters);

// Mean of two measurements of a reference (taken before and after the
// measurement it is compared with: emulated timing drifts); an error when
// either failed.
absl::StatusOr<RefResult> Mean(const absl::StatusOr<RefResult>& a,
                               const absl::StatusOr<RefResult>& b);

}  // namespace svm::bench

#endif  // SVM_TESTS_BENCH_REFERENCE_H_
