// svm-rdma-reg-bench: ODP vs pinned on the verbs layer (daemon/transport/rdma)
// of one RDMA device, pinned being the reference measured in the same run:
//
//   - registration time of a 1 GiB anonymous private range, never touched and
//     CPU-touched (pinned registration faults in and pins every page; ODP
//     registration maps nothing);
//   - the cost of the first RDMA READ of each page (ODP: the responder faults
//     the page into the MR's device page table; "untouched": the process never
//     touched it either, "cpu-touched": resident in the process, not yet in
//     the MR) vs the steady state (pages already mapped), in 4 KiB READs (one
//     per page) and 1 MiB READs.
//
// Two RC QPs on the device are connected to each other (rxe loops back); the
// reader busy-polls its CQ. Without ODP on the device (rxe on Linux 6.1) only
// the pinned rows are printed.
//
//   svm-rdma-reg-bench [--device rxe0] [--reg-mb 1024] [--lat-pages 256]
//                      [--bw-mb 64] [--read-kb 1024]
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/args.h"
#include "daemon/transport/rdma/verbs.h"
#include "tests/bench/reference.h"

namespace {

namespace rdma = svm::transport::rdma;
using svm::bench::NowUs;
using svm::bench::Stats;
using svm::bench::Summarize;

constexpr size_t kPage = 4096;

// An anonymous private mapping (4 KiB pages: no THP), unmapped on destruction.
class Mapping {
 public:
  explicit Mapping(size_t len) : len_(len) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p_ = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
    if (p_ != nullptr) madvise(p_, len, MADV_NOHUGEPAGE);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (p_ != nullptr) munmap(p_, len_);
  }
  uint8_t* data() const { return p_; }
  size_t size() const { return len_; }

 private:
  uint8_t* p_;
  size_t len_;
};

// Two RC QPs on one device connected to each other; a reads from b.
struct Loopback {
  std::unique_ptr<rdma::Poller> poller_a, poller_b;
  std::unique_ptr<rdma::Qp> a, b;
  uint64_t wr = 0;

  static absl::StatusOr<Loopback> Create(const rdma::Device& dev, ibv_pd* pd) {
    Loopback l;
    for (auto* p : {&l.poller_a, &l.poller_b}) {
      auto r = rdma::Poller::Create(dev, 256);
      if (!r.ok()) return r.status();
      *p = std::move(*r);
    }
    auto a = rdma::Qp::Create(dev, pd, *l.poller_a);
    if (!a.ok()) return a.status();
    auto b = rdma::Qp::Create(dev, pd, *l.poller_b);
    if (!b.ok()) return b.status();
    l.a = std::move(*a);
    l.b = std::move(*b);
    if (auto st = l.a->Connect(l.b->local()); !st.ok()) return st;
    if (auto st = l.b->Connect(l.a->local()); !st.ok()) return st;
    return l;
  }

  // One READ of len bytes at src+offset into dst, busy-polled; microseconds.
  absl::StatusOr<double> Read(const rdma::Registration& dst, const rdma::Registration& src,
                              size_t offset, size_t len) {
    const double t0 = NowUs();
    if (auto st = a->PostRead(++wr, dst, 0, len, src.addr() + offset, src.rkey()); !st.ok()) return st;
    ibv_wc wc{};
    int n = 0;
    while ((n = ibv_poll_cq(poller_a->cq(), 1, &wc)) == 0) {
      if (NowUs() - t0 > 60e6) return absl::DeadlineExceededError("READ did not complete in 60 s");
    }
    const double t1 = NowUs();
    if (n < 0) return absl::InternalError("ibv_poll_cq failed");
    if (wc.status != IBV_WC_SUCCESS || wc.wr_id != wr) {
      return absl::InternalError(absl::StrCat("READ: ", rdma::DescribeCompletion(wc)));
    }
    return t1 - t0;
  }
};

struct Row {
  std::string variant;
  size_t bytes;
  Stats s;
  std::string ref_key;  // the pinned row this one is compared with ("" = itself a reference)
};

}  // namespace

int main(int argc, char** argv) {
  auto a = svm::Args::Parse(argc, argv, {"device", "reg-mb", "lat-pages", "bw-mb", "read-kb"}, {});
  if (!a.ok()) {
    std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", std::string(a.status().message()).c_str());
    return 2;
  }
  const size_t reg_len = *a->GetU64("reg-mb", 1024) << 20;
  const size_t lat_pages = *a->GetU64("lat-pages", 256);
  const size_t bw_len = *a->GetU64("bw-mb", 64) << 20;
  const size_t read_len = *a->GetU64("read-kb", 1024) << 10;
  if (read_len == 0 || bw_len < read_len || lat_pages * kPage + bw_len > reg_len) {
    std::fprintf(stderr, "svm-rdma-reg-bench: need lat-pages*4 KiB + bw-mb <= reg-mb and read-kb <= bw-mb\n");
    return 2;
  }
  auto dev = rdma::Device::Open(a->Get("device", ""));
  if (!dev.ok()) {
    std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", dev.status().ToString().c_str());
    return 1;
  }
  const absl::Status odp_check = (*dev)->VerifyOdp();
  const bool odp = (*dev)->caps().odp && (*dev)->caps().odp_rc_read;
  std::printf("# %s; %s\n", (*dev)->Describe().c_str(), (*dev)->caps().ToString().c_str());
  if (odp && !odp_check.ok()) {
    std::printf("# note: the ODP data check failed (%s); ODP rows are still measured\n",
                std::string(odp_check.message()).c_str());
  }
  auto pd = (*dev)->AllocPd();
  if (!pd.ok()) {
    std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", pd.status().ToString().c_str());
    return 1;
  }
  auto lb = Loopback::Create(**dev, pd->get());
  if (!lb.ok()) {
    std::fprintf(stderr, "svm-rdma-reg-bench: loopback QPs: %s\n", lb.status().ToString().c_str());
    return 1;
  }
  Mapping dst_mem(read_len);
  std::memset(dst_mem.data(), 0, read_len);
  auto dst = rdma::Register(**dev, pd->get(), dst_mem.data(), read_len, rdma::Access::kLocal,
                            rdma::Mode::kPinned);
  if (!dst.ok()) {
    std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", dst.status().ToString().c_str());
    return 1;
  }

  struct RegRow {
    std::string mode, memory;
    double reg_ms, dereg_ms;
  };
  std::vector<RegRow> regs;
  std::vector<Row> rows;
  std::vector<rdma::Mode> modes = {rdma::Mode::kPinned};
  if (odp) modes.push_back(rdma::Mode::kOdp);

  for (rdma::Mode mode : modes) {
    const std::string mname(rdma::ModeName(mode));
    for (bool touched : {false, true}) {
      const std::string memory = touched ? "cpu-touched" : "untouched";
      Mapping src_mem(reg_len);
      if (src_mem.data() == nullptr) {
        std::fprintf(stderr, "svm-rdma-reg-bench: mmap %zu MiB failed\n", reg_len >> 20);
        return 1;
      }
      if (touched) std::memset(src_mem.data(), 0x5a, reg_len);
      double t0 = NowUs();
      auto src = rdma::Register(**dev, pd->get(), src_mem.data(), reg_len, rdma::Access::kRemoteRead, mode);
      const double reg_ms = (NowUs() - t0) / 1e3;
      if (!src.ok()) {
        std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", src.status().ToString().c_str());
        return 1;
      }
      // READs: pages [0, lat_pages) one by one, then [lat_pages*4K, +bw_len)
      // in read_len READs; first pass = first touch, second = steady state.
      for (int pass = 0; pass < 2; ++pass) {
        std::vector<double> lat, big;
        for (size_t p = 0; p < lat_pages; ++p) {
          auto us = lb->Read(*dst, *src, p * kPage, kPage);
          if (!us.ok()) {
            std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", us.status().ToString().c_str());
            return 1;
          }
          lat.push_back(*us);
        }
        for (size_t off = 0; off < bw_len; off += read_len) {
          auto us = lb->Read(*dst, *src, lat_pages * kPage + off, read_len);
          if (!us.ok()) {
            std::fprintf(stderr, "svm-rdma-reg-bench: %s\n", us.status().ToString().c_str());
            return 1;
          }
          big.push_back(*us);
        }
        const std::string phase = pass == 0 ? "first-read/" + memory : "steady/" + memory;
        const std::string ref_key = mode == rdma::Mode::kPinned ? "" : "pinned " + phase;
        rows.push_back({mname + " " + phase, kPage, Summarize(lat), ref_key});
        rows.push_back({mname + " " + phase, read_len, Summarize(big), ref_key});
      }
      std::optional<rdma::Registration> reg(std::move(*src));
      t0 = NowUs();
      reg.reset();  // ibv_dereg_mr
      regs.push_back({mname, memory, reg_ms, (NowUs() - t0) / 1e3});
    }
  }

  std::printf("\n# registration of %zu MiB of anonymous private memory (4 KiB pages), one sample each; "
              "reference: pinned, same memory state\n",
              reg_len >> 20);
  std::printf("%-10s %-14s %-12s %-12s %-16s %s\n", "#mode", "memory", "reg[msec]", "dereg[msec]",
              "ref reg[msec]", "ratio(reg)");
  for (const RegRow& r : regs) {
    double ref = -1;
    for (const RegRow& p : regs) {
      if (p.mode == "pinned" && p.memory == r.memory) ref = p.reg_ms;
    }
    std::printf("%-10s %-14s %-12.2f %-12.2f %-16.2f %.4f\n", r.mode.c_str(), r.memory.c_str(), r.reg_ms,
                r.dereg_ms, ref, r.reg_ms / ref);
  }
  std::printf("\n# RDMA READ latency: 4 KiB READs over %zu pages, %zu KiB READs over %zu MiB; "
              "reference: pinned, same phase and memory state\n",
              lat_pages, read_len >> 10, bw_len >> 20);
  std::printf("%-30s %-10s %-12s %-12s %-16s %-12s %-20s %-14s %-18s %s\n", "#variant", "#bytes",
              "#iterations", "t_min[usec]", "t_typical[usec]", "t_avg[usec]", "99% percentile[usec]",
              "BW[MB/sec]", "ref_typical[usec]", "ratio(typical)");
  for (const Row& r : rows) {
    const size_t n = r.bytes == kPage ? lat_pages : bw_len / read_len;
    const std::string key = r.ref_key.empty() ? r.variant : r.ref_key;
    double ref = -1;
    for (const Row& p : rows) {
      if (p.variant == key && p.bytes == r.bytes) ref = p.s.typical;
    }
    std::printf("%-30s %-10zu %-12zu %-12.2f %-16.2f %-12.2f %-20.2f %-14.1f %-18.2f %.2f\n",
                r.variant.c_str(), r.bytes, n, r.s.min, r.s.typical, r.s.avg, r.s.p99,
                static_cast<double>(r.bytes) / r.s.avg / 1.048576, ref, r.s.typical / ref);
  }
  if (!odp) std::printf("# no ODP on %s: pinned rows only\n", (*dev)->name().c_str());
  return 0;
}
