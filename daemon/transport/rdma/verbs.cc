#include "daemon/transport/rdma/verbs.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/random.h"

namespace svm::transport::rdma {
namespace {

bool IsZeroGid(const ibv_gid& gid) {
  static constexpr uint8_t kZero[16] = {};
  return std::memcmp(gid.raw, kZero, sizeof(kZero)) == 0;
}

bool IsIpv4Mapped(const uint8_t* raw) {
  static constexpr uint8_t kPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(raw, kPrefix, sizeof(kPrefix)) == 0;
}

std::string GidToString(const uint8_t* raw) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (inet_ntop(AF_INET6, raw, buf, sizeof(buf)) == nullptr) return "?";
  return buf;
}

GidType FromVerbsGidType(uint32_t t) {
  switch (t) {
    case IBV_GID_TYPE_IB:
      return GidType::kIb;
    case IBV_GID_TYPE_ROCE_V1:
      return GidType::kRoceV1;
    case IBV_GID_TYPE_ROCE_V2:
      return GidType::kRoceV2;
    default:
      return GidType::kUnknown;
  }
}

// Older kernels/libraries without the GID-entry ioctl: the type is in sysfs
// ("IB/RoCE v1", "RoCE v2").
GidType SysfsGidType(absl::string_view dev, uint8_t port, uint32_t index) {
  std::ifstream in(absl::StrFormat("/sys/class/infiniband/%s/ports/%d/gid_attrs/types/%d",
                                   std::string(dev), port, index));
  std::string line;
  if (!std::getline(in, line)) return GidType::kUnknown;
  if (line == "RoCE v2") return GidType::kRoceV2;
  if (line == "IB/RoCE v1") return GidType::kRoceV1;
  return GidType::kUnknown;
}

struct GidChoice {
  uint32_t index = 0;
  ibv_gid gid{};
  GidType type = GidType::kUnknown;
  int score = -1;
};

// Scores: RoCE v2 + IPv4-mapped 3, RoCE v2 2, anything else valid 1.
absl::StatusOr<GidChoice> ChooseGid(ibv_context* ctx, absl::string_view dev, uint8_t port,
                                    int table_len) {
  GidChoice best;
  bool use_legacy = false;
  for (int i = 0; i < table_len; ++i) {
    GidChoice c;
    c.index = static_cast<uint32_t>(i);
    if (!use_legacy) {
      ibv_gid_entry entry{};
      int rc = ibv_query_gid_ex(ctx, port, c.index, &entry, 0);
      if (rc == ENODATA || rc == EINVAL) continue;  // empty slot
      if (rc == EOPNOTSUPP || rc == ENOSYS) {
        SPDLOG_DEBUG("{}: ibv_query_gid_ex unsupported, using ibv_query_gid and sysfs", dev);
        use_legacy = true;
      } else if (rc != 0) {
        return absl::ErrnoToStatus(
            rc, absl::StrFormat("query gid %d of %s port %d", i, std::string(dev), port));
      } else {
        c.gid = entry.gid;
        c.type = FromVerbsGidType(entry.gid_type);
      }
    }
    if (use_legacy) {
      if (ibv_query_gid(ctx, port, i, &c.gid) != 0) continue;
      c.type = SysfsGidType(dev, port, c.index);
    }
    if (IsZeroGid(c.gid)) continue;
    c.score = c.type == GidType::kRoceV2 ? (IsIpv4Mapped(c.gid.raw) ? 3 : 2) : 1;
    if (c.score > best.score) best = c;
  }
  if (best.score < 0) {
    return absl::NotFoundError(
        absl::StrFormat("%s port %d has no valid gid (is the netdev under it up and addressed?)",
                        std::string(dev), port));
  }
  return best;
}

// CAP_IPC_LOCK in the effective set exempts from RLIMIT_MEMLOCK in the
// kernel's pinning accounting (ib_umem_get).
bool HasCapIpcLock() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &hdr, data) != 0) return false;
  return (data[CAP_IPC_LOCK / 32].effective & (1u << (CAP_IPC_LOCK % 32))) != 0;
}

// Pages this process already has pinned (VmPin, the counter the RDMA core
// charges against RLIMIT_MEMLOCK), in bytes; 0 if unknown.
uint64_t PinnedBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    unsigned long long kb = 0;
    if (std::sscanf(line.c_str(), "VmPin: %llu kB", &kb) == 1) return kb * 1024;
  }
  return 0;
}

std::string Bytes(uint64_t n) {
  if (n >= (1ull << 30) && n % (1ull << 30) == 0) return absl::StrCat(n >> 30, " GiB");
  if (n >= (1ull << 20) && n % (1ull << 20) == 0) return absl::StrCat(n >> 20, " MiB");
  if (n >= (1ull << 10) && n % (1ull << 10) == 0) return absl::StrCat(n >> 10, " KiB");
  return absl::StrCat(n, " bytes");
}

constexpr const char kMemlockHint[] =
    "raise LimitMEMLOCK= in the svmd unit (or `ulimit -l`), grant CAP_IPC_LOCK, "
    "or use a device with ODP";

}  // namespace

void LogDestroyFailure(const char* what, int rc) {
  // Verbs destroy calls return an errno value (some providers return -1 and
  // set errno).
  int err = rc > 0 ? rc : errno;
  spdlog::error("destroying verbs object {} failed: {}", what, std::strerror(err));
}

uint32_t MtuBytes(ibv_mtu mtu) {
  switch (mtu) {
    case IBV_MTU_256:
      return 256;
    case IBV_MTU_512:
      return 512;
    case IBV_MTU_1024:
      return 1024;
    case IBV_MTU_2048:
      return 2048;
    case IBV_MTU_4096:
      return 4096;
  }
  return 0;
}

ibv_mtu MtuFromBytes(uint32_t bytes) {
  switch (bytes) {
    case 256:
      return IBV_MTU_256;
    case 512:
      return IBV_MTU_512;
    case 2048:
      return IBV_MTU_2048;
    case 4096:
      return IBV_MTU_4096;
    default:
      return IBV_MTU_1024;
  }
}

absl::string_view GidTypeName(GidType t) {
  switch (t) {
    case GidType::kIb:
      return "IB";
    case GidType::kRoceV1:
      return "RoCE v1";
    case GidType::kRoceV2:
      return "RoCE v2";
    case GidType::kUnknown:
      break;
  }
  return "unknown";
}

absl::string_view ModeName(Mode m) {
  switch (m) {
    case Mode::kAuto:
      return "auto";
    case Mode::kOdp:
      return "odp";
    case Mode::kPinned:
      return "pinned";
  }
  return "?";
}

std::string Capabilities::ToString() const {
  std::vector<absl::string_view> rc;
  if (odp_rc_send) rc.push_back("send");
  if (odp_rc_recv) rc.push_back("recv");
  if (odp_rc_write) rc.push_back("write");
  if (odp_rc_read) rc.push_back("read");
  std::string odp_text =
      odp ? absl::StrCat("yes (rc: ", rc.empty() ? "none" : absl::StrJoin(rc, " "), ")") : "no";
  if (odp_check == OdpCheck::kPassed) absl::StrAppend(&odp_text, " data check passed");
  if (odp_check == OdpCheck::kFailed) {
    absl::StrAppend(&odp_text, " data check FAILED, not used (", odp_check_detail, ")");
  }
  if (advise_mr == AdviseMr::kSupported) absl::StrAppend(&odp_text, ", prefetch (advise_mr) yes");
  if (advise_mr == AdviseMr::kUnsupported) {
    absl::StrAppend(&odp_text, ", prefetch (advise_mr) no: ", advise_mr_detail);
  }
  return absl::StrFormat("odp %s, max_mr %u, qp_wr %d, sge %d, rd_atom %d, cqe %d", odp_text,
                         max_mr_size, max_qp_wr, max_sge, max_qp_rd_atom, max_cqe);
}

// --- Device -----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Device>> Device::Open(absl::string_view name) {
  int count = 0;
  std::unique_ptr<ibv_device*, decltype(&ibv_free_device_list)> list(ibv_get_device_list(&count),
                                                                     &ibv_free_device_list);
  if (list == nullptr) {
    if (errno == ENOSYS) {
      return absl::NotFoundError("no rdma device: no kernel support (is ib_uverbs loaded?)");
    }
    return absl::ErrnoToStatus(errno, "list rdma devices");
  }
  if (count == 0) {
    return absl::NotFoundError("no rdma device (is ib_uverbs loaded and an rdma link configured?)");
  }
  std::vector<std::string> tried;
  for (int d = 0; d < count; ++d) {
    ibv_device* dev = list.get()[d];
    std::string dev_name = ibv_get_device_name(dev);
    if (!name.empty() && dev_name != name) continue;
    ContextPtr ctx(ibv_open_device(dev));
    if (ctx == nullptr) {
      absl::Status st = absl::ErrnoToStatus(errno, absl::StrCat("open rdma device ", dev_name));
      if (!name.empty()) return st;
      tried.push_back(std::string(st.message()));
      continue;
    }
    ibv_device_attr_ex attr{};
    if (int rc = ibv_query_device_ex(ctx.get(), nullptr, &attr); rc != 0) {
      return absl::ErrnoToStatus(rc, absl::StrCat("query rdma device ", dev_name));
    }
    for (uint8_t port = 1; port <= attr.orig_attr.phys_port_cnt; ++port) {
      ibv_port_attr pattr{};
      if (int rc = ibv_query_port(ctx.get(), port, &pattr); rc != 0) {
        return absl::ErrnoToStatus(rc, absl::StrFormat("query %s port %d", dev_name, port));
      }
      if (pattr.state != IBV_PORT_ACTIVE) {
        tried.push_back(
            absl::StrFormat("%s port %d is %s", dev_name, port, ibv_port_state_str(pattr.state)));
        continue;
      }
      absl::StatusOr<GidChoice> gid = ChooseGid(ctx.get(), dev_name, port, pattr.gid_tbl_len);
      if (!gid.ok()) return gid.status();

      auto device = std::unique_ptr<Device>(new Device());
      device->name_ = dev_name;
      device->port_ = port;
      device->active_mtu_ = pattr.active_mtu;
      device->gid_index_ = gid->index;
      device->gid_ = gid->gid;
      device->gid_type_ = gid->type;
      Capabilities& caps = device->caps_;
      caps.odp = (attr.odp_caps.general_caps & IBV_ODP_SUPPORT) != 0;
      uint32_t rc_odp = caps.odp ? attr.odp_caps.per_transport_caps.rc_odp_caps : 0;
      caps.odp_rc_send = (rc_odp & IBV_ODP_SUPPORT_SEND) != 0;
      caps.odp_rc_recv = (rc_odp & IBV_ODP_SUPPORT_RECV) != 0;
      caps.odp_rc_write = (rc_odp & IBV_ODP_SUPPORT_WRITE) != 0;
      caps.odp_rc_read = (rc_odp & IBV_ODP_SUPPORT_READ) != 0;
      caps.max_mr_size = attr.orig_attr.max_mr_size;
      caps.max_qp_wr = attr.orig_attr.max_qp_wr;
      caps.max_sge = attr.orig_attr.max_sge;
      caps.max_qp_rd_atom = attr.orig_attr.max_qp_rd_atom;
      caps.max_cqe = attr.orig_attr.max_cqe;
      device->context_ = std::move(ctx);
      if (gid->score < 3 && pattr.link_layer == IBV_LINK_LAYER_ETHERNET) {
        spdlog::warn(
            "{}: no RoCE v2 gid with an IPv4-mapped address, falling back to gid[{}] "
            "{} ({}); peers must use the same gid type",
            dev_name, gid->index, GidToString(gid->gid.raw), GidTypeName(gid->type));
      }
      spdlog::info("rdma device {}, {}", device->Describe(), device->caps_.ToString());
      return device;
    }
  }
  if (!name.empty() && tried.empty()) {
    return absl::NotFoundError(absl::StrCat("no rdma device named ", std::string(name)));
  }
  return absl::NotFoundError(
      absl::StrCat("no rdma device with an active port (", absl::StrJoin(tried, "; "), ")"));
}

bool Device::gid_ipv4_mapped() const { return IsIpv4Mapped(gid_.raw); }

std::string Device::Describe() const {
  return absl::StrFormat("%s port %d gid[%d] %s (%s) mtu %d", name_, port_, gid_index_,
                         GidToString(gid_.raw), GidTypeName(gid_type_), MtuBytes(active_mtu_));
}

absl::StatusOr<PdPtr> Device::AllocPd() const {
  PdPtr pd(ibv_alloc_pd(context_.get()));
  if (pd == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("allocate pd on ", name_));
  return pd;
}

absl::Status Device::VerifyOdp() {
  if (!caps_.odp || !caps_.odp_rc_read) {
    return absl::FailedPreconditionError(absl::StrCat(name_, " has no rc read odp"));
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t len = 2 * page;
  // Four page-aligned buffers: ODP read source, pinned read destination,
  // pinned write source, ODP write destination. Unmapped on every return.
  void* mem = mmap(nullptr, 4 * len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return absl::ErrnoToStatus(errno, "odp check: mmap");
  std::unique_ptr<void, std::function<void(void*)>> unmap(mem,
                                                          [&](void* p) { munmap(p, 4 * len); });
  auto* odp_src = static_cast<uint8_t*>(mem);
  uint8_t* pin_dst = odp_src + len;
  uint8_t* pin_src = pin_dst + len;
  uint8_t* odp_dst = pin_src + len;
  for (size_t i = 0; i < len; ++i) {
    odp_src[i] = static_cast<uint8_t>(i * 7 + i / 251);
    pin_src[i] = static_cast<uint8_t>(i * 13 + i / 241 + 1);
  }
  std::memset(pin_dst, 0, len);
  std::memset(odp_dst, 0, len);

  absl::StatusOr<PdPtr> pd = AllocPd();
  if (!pd.ok()) return pd.status();
  absl::StatusOr<std::unique_ptr<Poller>> poller = Poller::Create(*this, 16);
  if (!poller.ok()) return poller.status();
  absl::StatusOr<std::unique_ptr<Qp>> a = Qp::Create(*this, pd->get(), **poller);
  if (!a.ok()) return a.status();
  absl::StatusOr<std::unique_ptr<Qp>> b = Qp::Create(*this, pd->get(), **poller);
  if (!b.ok()) return b.status();
  if (absl::Status st = (*a)->Connect((*b)->local()); !st.ok()) return st;
  if (absl::Status st = (*b)->Connect((*a)->local()); !st.ok()) return st;
  absl::StatusOr<Registration> r_odp_src =
      Register(*this, pd->get(), odp_src, len, Access::kRemoteRead, Mode::kOdp);
  absl::StatusOr<Registration> r_pin_dst =
      Register(*this, pd->get(), pin_dst, len, Access::kLocal, Mode::kPinned);
  absl::StatusOr<Registration> r_pin_src =
      Register(*this, pd->get(), pin_src, len, Access::kLocal, Mode::kPinned);
  absl::StatusOr<Registration> r_odp_dst =
      Register(*this, pd->get(), odp_dst, len, Access::kRemoteReadWrite, Mode::kOdp);
  for (const auto* r : {&r_odp_src, &r_pin_dst, &r_pin_src, &r_odp_dst}) {
    if (!r->ok()) return r->status();
  }
  // Whether the device prefetches ODP pages on request: the write
  // destination is advised before the WRITE below lands in it.
  if (absl::Status adv = Prefetch(pd->get(), *r_odp_dst, /*write=*/true, /*flush=*/true); adv.ok()) {
    caps_.advise_mr = Capabilities::AdviseMr::kSupported;
    caps_.advise_mr_detail.clear();
    spdlog::info("{}: odp pages are prefetched (ibv_advise_mr)", name_);
  } else {
    caps_.advise_mr = Capabilities::AdviseMr::kUnsupported;
    caps_.advise_mr_detail = std::string(adv.message());
    spdlog::info("{}: odp pages cannot be prefetched ({}); they fault in on first access", name_,
                 adv.message());
  }
  auto run = [&](uint64_t wr_id) -> absl::Status {
    absl::StatusOr<ibv_wc> wc = (*poller)->WaitFor(wr_id, absl::Seconds(10));
    if (!wc.ok()) return wc.status();
    if (wc->status != IBV_WC_SUCCESS) {
      return absl::InternalError(absl::StrCat("odp check: ", DescribeCompletion(*wc)));
    }
    return absl::OkStatus();
  };
  absl::Status st = (*a)->PostRead(1, *r_pin_dst, 0, len, r_odp_src->addr(), r_odp_src->rkey());
  if (st.ok()) st = run(1);
  if (st.ok()) st = (*a)->PostWrite(2, *r_pin_src, 0, len, r_odp_dst->addr(), r_odp_dst->rkey());
  if (st.ok()) st = run(2);
  if (!st.ok()) return st;

  std::vector<std::string> bad;
  if (std::memcmp(pin_dst, odp_src, len) != 0) bad.push_back("rdma read from an odp mr");
  if (std::memcmp(odp_dst, pin_src, len) != 0) bad.push_back("rdma write into an odp mr");
  if (bad.empty()) {
    caps_.odp_check = Capabilities::OdpCheck::kPassed;
    caps_.odp_check_detail.clear();
    return absl::OkStatus();
  }
  caps_.odp_check = Capabilities::OdpCheck::kFailed;
  caps_.odp_check_detail = absl::StrFormat("%s corrupted data at mtu %d",
                                           absl::StrJoin(bad, " and "), MtuBytes(active_mtu_));
  spdlog::error("{}: odp data check failed: {}; registering pinned instead", name_,
                caps_.odp_check_detail);
  return absl::DataLossError(absl::StrCat(name_, ": ", caps_.odp_check_detail));
}

// --- registration -------------------------------------------------------------

absl::Status CheckMemlockBudget(size_t len) {
  rlimit lim{};
  if (getrlimit(RLIMIT_MEMLOCK, &lim) != 0) {
    return absl::ErrnoToStatus(errno, "getrlimit(RLIMIT_MEMLOCK)");
  }
  if (lim.rlim_cur == RLIM_INFINITY || HasCapIpcLock()) return absl::OkStatus();
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t want = (len + page - 1) / page * page;
  const uint64_t pinned = PinnedBytes();
  const uint64_t limit = lim.rlim_cur / page * page;
  if (pinned + want <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "pinning %s would exceed RLIMIT_MEMLOCK of %s (%s already pinned by this process); %s",
      Bytes(want), Bytes(lim.rlim_cur), Bytes(pinned), kMemlockHint));
}

absl::StatusOr<Registration> Register(const Device& device, ibv_pd* pd, void* addr, size_t len,
                                      Access access, Mode mode) {
  if (len == 0) return absl::InvalidArgumentError("register: zero length");
  if (mode == Mode::kAuto) mode = device.caps().OdpUsable() ? Mode::kOdp : Mode::kPinned;
  if (mode == Mode::kOdp && !device.caps().odp) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "register %s as odp: %s has no on-demand paging", Bytes(len), device.name()));
  }
  int flags = access == Access::kRemoteReadOnly ? 0 : IBV_ACCESS_LOCAL_WRITE;
  if (access != Access::kLocal) flags |= IBV_ACCESS_REMOTE_READ;
  if (access == Access::kRemoteReadWrite) flags |= IBV_ACCESS_REMOTE_WRITE;
  if (mode == Mode::kOdp) {
    flags |= IBV_ACCESS_ON_DEMAND;
  } else if (absl::Status st = CheckMemlockBudget(len); !st.ok()) {
    spdlog::error("register {} pinned on {}: {}", Bytes(len), device.name(), st.message());
    return st;
  }
  MrPtr mr(ibv_reg_mr(pd, addr, len, flags));
  if (mr == nullptr) {
    int err = errno;
    std::string what =
        absl::StrFormat("register %s (%s) on %s", Bytes(len), ModeName(mode), device.name());
    if (err == ENOMEM && mode == Mode::kPinned) {
      // The budget check passed but the kernel still refused (limit counted
      // differently, or real memory pressure): say what usually helps.
      return absl::ResourceExhaustedError(
          absl::StrCat(what, ": ", std::strerror(err), "; ", kMemlockHint));
    }
    return absl::ErrnoToStatus(err, what);
  }
  return Registration(std::move(mr), mode);
}

absl::Status Prefetch(ibv_pd* pd, const Registration& reg, bool write, bool flush) {
  if (reg.mode() != Mode::kOdp) return absl::FailedPreconditionError("prefetch: not an odp registration");
  // One SGE covers less than 4 GiB: advise in pieces.
  constexpr size_t kPiece = size_t{1} << 30;
  for (size_t done = 0; done < reg.length(); done += kPiece) {
    ibv_sge sge{};
    sge.addr = reg.addr() + done;
    sge.length = static_cast<uint32_t>(std::min(kPiece, reg.length() - done));
    sge.lkey = reg.lkey();
    const int rc = ibv_advise_mr(pd, write ? IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE : IBV_ADVISE_MR_ADVICE_PREFETCH,
                                 flush ? IBV_ADVISE_MR_FLAG_FLUSH : 0, &sge, 1);
    if (rc == 0) continue;
    // Returns an errno value (rdma-core), or -1 with errno from older providers.
    const int err = rc > 0 ? rc : errno;
    const std::string what = absl::StrFormat("ibv_advise_mr(%s) of %s", write ? "prefetch write" : "prefetch",
                                             Bytes(sge.length));
    if (err == EOPNOTSUPP || err == ENOSYS || err == ENOTSUP) {
      return absl::UnimplementedError(absl::StrCat(what, ": ", std::strerror(err)));
    }
    return absl::ErrnoToStatus(err, what);
  }
  return absl::OkStatus();
}

// --- Poller -----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Poller>> Poller::Create(const Device& device, int cqe,
                                                       absl::Duration spin) {
  auto p = std::unique_ptr<Poller>(new Poller(spin));
  p->channel_.reset(ibv_create_comp_channel(device.context()));
  if (p->channel_ == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("create completion channel on ", device.name()));
  }
  // Non-blocking so a spurious poll() wake-up never blocks in ibv_get_cq_event.
  int fl = fcntl(p->channel_->fd, F_GETFL);
  if (fl < 0 || fcntl(p->channel_->fd, F_SETFL, fl | O_NONBLOCK) != 0) {
    return absl::ErrnoToStatus(errno, "make completion channel non-blocking");
  }
  p->cq_.reset(ibv_create_cq(device.context(), cqe, nullptr, p->channel_.get(), 0));
  if (p->cq_ == nullptr) {
    return absl::ErrnoToStatus(
        errno, absl::StrFormat("create cq of %d entries on %s", cqe, device.name()));
  }
  return p;
}

Poller::~Poller() { AckEvents(/*all=*/true); }

absl::Status Poller::Arm() {
  if (armed_) return absl::OkStatus();
  if (int rc = ibv_req_notify_cq(cq_.get(), 0); rc != 0) {
    return absl::ErrnoToStatus(rc, "arm cq notification");
  }
  armed_ = true;
  return absl::OkStatus();
}

absl::Status Poller::ConsumeEvent() {
  ibv_cq* ev_cq = nullptr;
  void* ev_ctx = nullptr;
  if (ibv_get_cq_event(channel_.get(), &ev_cq, &ev_ctx) == 0) {
    ++unacked_events_;
    armed_ = false;
    AckEvents(/*all=*/false);
  } else if (errno != EAGAIN) {
    return absl::ErrnoToStatus(errno, "get cq event");
  }
  return absl::OkStatus();
}

void Poller::AckEvents(bool all) {
  if (unacked_events_ == 0 || (!all && unacked_events_ < kAckBatch)) return;
  ibv_ack_cq_events(cq_.get(), unacked_events_);
  unacked_events_ = 0;
}

absl::StatusOr<int> Poller::Drain() {
  int total = 0;
  ibv_wc wcs[16];
  for (;;) {
    int n = ibv_poll_cq(cq_.get(), 16, wcs);
    if (n < 0) return absl::InternalError("ibv_poll_cq failed");
    for (int i = 0; i < n; ++i) pending_[wcs[i].wr_id] = wcs[i];
    total += n;
    if (n < 16) return total;
  }
}

absl::StatusOr<ibv_wc> Poller::WaitFor(uint64_t wr_id, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  auto take = [&](ibv_wc* out) {
    auto it = pending_.find(wr_id);
    if (it == pending_.end()) return false;
    *out = it->second;
    pending_.erase(it);
    return true;
  };
  ibv_wc wc;
  for (;;) {
    // Bounded spin (the clock is read every 16 polls).
    const absl::Time spin_end = std::min(deadline, absl::Now() + spin_);
    for (int i = 0;; ++i) {
      if (take(&wc)) return wc;
      if (absl::StatusOr<int> n = Drain(); !n.ok()) return n.status();
      if (i % 16 == 15 && absl::Now() >= spin_end) break;
    }
    if (take(&wc)) return wc;
    // Arm, then poll once more: a completion that arrived between the last
    // poll and the arming would otherwise raise no event.
    if (absl::Status st = Arm(); !st.ok()) return st;
    if (absl::StatusOr<int> n = Drain(); !n.ok()) return n.status();
    if (take(&wc)) return wc;

    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "no completion for work request %d within %s", wr_id, absl::FormatDuration(timeout)));
    }
    pollfd pfd{channel_->fd, POLLIN, 0};
    ++sleeps_;
    int rc = poll(&pfd, 1,
                  static_cast<int>(absl::ToInt64Milliseconds(left + absl::Milliseconds(1) -
                                                             absl::Nanoseconds(1))));
    if (rc < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "poll completion channel");
    if (rc > 0) {
      if (absl::Status st = ConsumeEvent(); !st.ok()) return st;
    }
  }
}

absl::StatusOr<int> Poller::Harvest(ibv_wc* out, int max, absl::Span<pollfd> fds,
                                    absl::Duration timeout) {
  for (pollfd& p : fds) p.revents = 0;
  int got = 0;
  for (auto it = pending_.begin(); it != pending_.end() && got < max;) {
    out[got++] = it->second;
    pending_.erase(it++);
  }
  if (got > 0) return got;
  auto poll_cq = [&]() -> absl::StatusOr<int> {
    int n = ibv_poll_cq(cq_.get(), max, out);
    if (n < 0) return absl::InternalError("ibv_poll_cq failed");
    return n;
  };
  const absl::Time deadline = absl::Now() + timeout;
  const absl::Time spin_end = std::min(deadline, absl::Now() + spin_);
  for (int i = 0;; ++i) {
    absl::StatusOr<int> n = poll_cq();
    if (!n.ok() || *n > 0) return n;
    if (i % 16 == 15 && absl::Now() >= spin_end) break;
  }
  if (absl::Status st = Arm(); !st.ok()) return st;
  if (absl::StatusOr<int> n = poll_cq(); !n.ok() || *n > 0) return n;
  const absl::Duration left = std::max(absl::ZeroDuration(), deadline - absl::Now());
  std::vector<pollfd> pfd;
  pfd.reserve(fds.size() + 1);
  pfd.push_back({channel_->fd, POLLIN, 0});
  pfd.insert(pfd.end(), fds.begin(), fds.end());
  ++sleeps_;
  int rc = poll(pfd.data(), pfd.size(),
                static_cast<int>(absl::ToInt64Milliseconds(left + absl::Milliseconds(1) -
                                                           absl::Nanoseconds(1))));
  if (rc < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "poll completion channel");
  if (rc > 0) {
    for (size_t i = 0; i < fds.size(); ++i) fds[i].revents = pfd[i + 1].revents;
  }
  if (rc > 0 && (pfd[0].revents & POLLIN) != 0) {
    if (absl::Status st = ConsumeEvent(); !st.ok()) return st;
  }
  return poll_cq();
}

// --- Endpoint ---------------------------------------------------------------

absl::Status Endpoint::Validate() const {
  if (psn > 0xffffff) return absl::InvalidArgumentError("rdma endpoint: psn wider than 24 bits");
  if (qpn == 0 || qpn > 0xffffff) {
    return absl::InvalidArgumentError(absl::StrFormat("rdma endpoint: bad qpn %d", qpn));
  }
  if (MtuBytes(MtuFromBytes(mtu)) != mtu) {
    return absl::InvalidArgumentError(absl::StrFormat("rdma endpoint: bad mtu %d", mtu));
  }
  return absl::OkStatus();
}

std::string Endpoint::ToString() const {
  return absl::StrFormat("qpn 0x%06x psn 0x%06x gid[%d] %s mtu %d", qpn, psn, gid_index,
                         GidToString(gid.data()), mtu);
}

// --- Qp ---------------------------------------------------------------------

uint8_t AckTimeoutExponent(absl::Duration d) {
  for (uint8_t t = 1; t < 31; ++t) {
    if (AckTimeoutOf(t) >= d) return t;
  }
  return 31;
}

absl::Duration AckTimeoutOf(uint8_t exponent) {
  return absl::Nanoseconds(4096) * (int64_t{1} << exponent);
}

absl::StatusOr<std::unique_ptr<Qp>> Qp::Create(const Device& device, ibv_pd* pd, Poller& poller,
                                               const QpCaps& caps) {
  const uint8_t rd_atomic = static_cast<uint8_t>(
      std::clamp<int>(caps.max_rd_atomic, 1, std::max(1, device.caps().max_qp_rd_atom)));
  auto qp = std::unique_ptr<Qp>(new Qp(device, rd_atomic, std::clamp<uint8_t>(caps.ack_timeout, 1, 31)));
  ibv_qp_init_attr init{};
  init.send_cq = poller.cq();
  init.recv_cq = poller.cq();
  init.cap.max_send_wr = caps.max_send_wr;
  init.cap.max_recv_wr = caps.max_recv_wr;
  init.cap.max_send_sge = caps.max_sge;
  init.cap.max_recv_sge = caps.max_sge;
  init.cap.max_inline_data = caps.max_inline;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;  // every WR we post asks for its own completion
  qp->qp_.reset(ibv_create_qp(pd, &init));
  if (qp->qp_ == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("create rc qp on ", device.name()));
  }
  Endpoint& l = qp->local_;
  l.qpn = qp->qp_->qp_num;
  l.psn = static_cast<uint32_t>(RandomU64() & 0xffffff);
  std::memcpy(l.gid.data(), device.gid().raw, 16);
  l.gid_index = device.gid_index();
  l.mtu = MtuBytes(device.active_mtu());
  return qp;
}

absl::Status Qp::Connect(const Endpoint& remote) {
  if (MtuBytes(MtuFromBytes(remote.mtu)) != remote.mtu) {
    return absl::InvalidArgumentError(absl::StrFormat("connect: bad remote mtu %d", remote.mtu));
  }
  ibv_qp_attr a{};
  // RESET -> INIT: the QP may be the target of remote READ and WRITE; each MR
  // still decides what it allows.
  a.qp_state = IBV_QPS_INIT;
  a.pkey_index = 0;
  a.port_num = device_.port();
  a.qp_access_flags = IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
  if (int rc = ibv_modify_qp(qp_.get(), &a,
                             IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
      rc != 0) {
    return absl::ErrnoToStatus(rc, absl::StrFormat("qp 0x%x to INIT", local_.qpn));
  }

  // INIT -> RTR: addressing of the peer (RoCE: always a GRH), its PSN, how
  // many READs we serve at once, and the RNR NAK delay we ask the peer to wait.
  a = {};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = MtuFromBytes(std::min(local_.mtu, remote.mtu));
  a.dest_qp_num = remote.qpn;
  a.rq_psn = remote.psn;
  a.max_dest_rd_atomic = max_rd_atomic_;
  a.min_rnr_timer = 12;  // 0.64 ms
  a.ah_attr.is_global = 1;
  std::memcpy(a.ah_attr.grh.dgid.raw, remote.gid.data(), 16);
  a.ah_attr.grh.sgid_index = static_cast<uint8_t>(device_.gid_index());
  a.ah_attr.grh.hop_limit = 64;
  a.ah_attr.sl = 0;
  a.ah_attr.src_path_bits = 0;
  a.ah_attr.port_num = device_.port();
  if (int rc = ibv_modify_qp(qp_.get(), &a,
                             IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                 IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
      rc != 0) {
    return absl::ErrnoToStatus(
        rc, absl::StrFormat("qp 0x%x to RTR towards %s", local_.qpn, remote.ToString()));
  }

  // RTR -> RTS: ack timeout from the caps (--rdma-ack-timeout-ms, 67 ms by
  // default, perftest's: rxe recovers a lost packet or acknowledgement only
  // when it fires, so a long one stalls a lossy link; see docs/operations.md),
  // 7 transport retries, infinite RNR retries (7): an ODP fault or an empty
  // receive queue on the peer stalls the request instead of breaking the
  // connection.
  a = {};
  a.qp_state = IBV_QPS_RTS;
  a.timeout = ack_timeout_;
  a.retry_cnt = 7;
  a.rnr_retry = 7;
  a.sq_psn = local_.psn;
  a.max_rd_atomic = max_rd_atomic_;
  if (int rc = ibv_modify_qp(qp_.get(), &a,
                             IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                 IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
      rc != 0) {
    return absl::ErrnoToStatus(rc, absl::StrFormat("qp 0x%x to RTS", local_.qpn));
  }
  SPDLOG_DEBUG("qp {} connected to {}", local_.ToString(), remote.ToString());
  return absl::OkStatus();
}

absl::Status Qp::PostRecv(uint64_t wr_id, const Registration& mr, size_t offset, size_t len) {
  if (offset + len > mr.length()) return absl::OutOfRangeError("post recv beyond the registration");
  ibv_sge sge{mr.addr() + offset, static_cast<uint32_t>(len), mr.lkey()};
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (int rc = ibv_post_recv(qp_.get(), &wr, &bad); rc != 0) {
    return absl::ErrnoToStatus(rc, absl::StrFormat("post recv on qp 0x%x", local_.qpn));
  }
  return absl::OkStatus();
}

absl::Status Qp::PostSend(uint64_t wr_id, const Registration& mr, size_t offset, size_t len) {
  return PostOneSided(IBV_WR_SEND, wr_id, mr, offset, len, 0, 0);
}

absl::Status Qp::PostWrite(uint64_t wr_id, const Registration& mr, size_t offset, size_t len,
                           uint64_t remote_addr, uint32_t rkey) {
  return PostOneSided(IBV_WR_RDMA_WRITE, wr_id, mr, offset, len, remote_addr, rkey);
}

absl::Status Qp::PostRead(uint64_t wr_id, const Registration& mr, size_t offset, size_t len,
                          uint64_t remote_addr, uint32_t rkey) {
  return PostOneSided(IBV_WR_RDMA_READ, wr_id, mr, offset, len, remote_addr, rkey);
}

absl::Status Qp::PostOneSided(ibv_wr_opcode op, uint64_t wr_id, const Registration& mr,
                              size_t offset, size_t len, uint64_t remote_addr, uint32_t rkey) {
  if (offset + len > mr.length()) return absl::OutOfRangeError("post beyond the registration");
  ibv_sge sge{mr.addr() + offset, static_cast<uint32_t>(len), mr.lkey()};
  ibv_send_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = op;
  wr.send_flags = IBV_SEND_SIGNALED;
  if (op != IBV_WR_SEND) {
    wr.wr.rdma.remote_addr = remote_addr;
    wr.wr.rdma.rkey = rkey;
  }
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(qp_.get(), &wr, &bad); rc != 0) {
    return absl::ErrnoToStatus(rc, absl::StrFormat("post %s on qp 0x%x",
                                                   op == IBV_WR_SEND         ? "send"
                                                   : op == IBV_WR_RDMA_WRITE ? "rdma write"
                                                                             : "rdma read",
                                                   local_.qpn));
  }
  return absl::OkStatus();
}

std::string DescribeCompletion(const ibv_wc& wc) {
  return absl::StrFormat("wr %d: %s (vendor error 0x%x)", wc.wr_id, ibv_wc_status_str(wc.status),
                         wc.vendor_err);
}

}  // namespace svm::transport::rdma
