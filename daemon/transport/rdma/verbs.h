// The verbs foundation of the RDMA data plane: RAII handles for every verbs
// object, device/port/GID discovery, capability probing, memory registration
// (ODP or pinned), RC queue pair bring-up from exchanged endpoint info, and a
// completion poller that sleeps when idle.
//
// Lifetimes: a Device outlives every PD, Poller, Qp and Registration created
// from it; a PD outlives the Qps and Registrations that use it; a Poller (its
// CQ) outlives the Qps attached to it. Nothing here is thread-safe: callers
// serialize each object's use (the rdma transport polls a Poller and posts a
// QP's receives on its completion context's thread, and posts a QP's sends
// under its connection's mutex from whichever thread queues work).
#ifndef SVM_DAEMON_TRANSPORT_RDMA_VERBS_H_
#define SVM_DAEMON_TRANSPORT_RDMA_VERBS_H_

#include <infiniband/verbs.h>
#include <poll.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace svm::transport::rdma {

// Calls a verbs destroy function; a failure there is logged (it usually means
// a dependent object is still alive, i.e. a lifetime bug) but cannot be
// propagated from a destructor.
void LogDestroyFailure(const char* what, int rc);

template <auto kDestroy>
struct VerbsDeleter {
  template <typename T>
  void operator()(T* p) const {
    if (p == nullptr) return;
    int rc = kDestroy(p);
    if (rc != 0) LogDestroyFailure(typeid(T).name(), rc);
  }
};

using ContextPtr = std::unique_ptr<ibv_context, VerbsDeleter<ibv_close_device>>;
using PdPtr = std::unique_ptr<ibv_pd, VerbsDeleter<ibv_dealloc_pd>>;
using CompChannelPtr = std::unique_ptr<ibv_comp_channel, VerbsDeleter<ibv_destroy_comp_channel>>;
using CqPtr = std::unique_ptr<ibv_cq, VerbsDeleter<ibv_destroy_cq>>;
using QpPtr = std::unique_ptr<ibv_qp, VerbsDeleter<ibv_destroy_qp>>;
using MrPtr = std::unique_ptr<ibv_mr, VerbsDeleter<ibv_dereg_mr>>;

// What the device can do, probed once with ibv_query_device_ex.
struct Capabilities {
  // General on-demand paging support (IBV_ODP_SUPPORT).
  bool odp = false;
  // ODP per RC operation (the side that is *served*: an RC READ ODP target can
  // serve RDMA READs from non-resident pages of an ODP MR).
  bool odp_rc_send = false;
  bool odp_rc_recv = false;
  bool odp_rc_write = false;
  bool odp_rc_read = false;
  uint64_t max_mr_size = 0;
  int max_qp_wr = 0;
  int max_sge = 0;
  int max_qp_rd_atom = 0;  // outstanding RDMA READs we may issue / serve per QP
  int max_cqe = 0;
  // Outcome of Device::VerifyOdp() (a loopback data check), if it was run.
  enum class OdpCheck { kNotRun, kPassed, kFailed };
  OdpCheck odp_check = OdpCheck::kNotRun;
  std::string odp_check_detail;  // why it failed
  // ibv_advise_mr(PREFETCH) on an ODP registration, probed by VerifyOdp()
  // (rxe did not implement it before Linux 6.15; older kernels answer
  // EOPNOTSUPP). Unsupported: ODP pages fault in on first access instead.
  enum class AdviseMr { kNotProbed, kSupported, kUnsupported };
  AdviseMr advise_mr = AdviseMr::kNotProbed;
  std::string advise_mr_detail;  // why it is unsupported

  // True when ODP registrations can serve the data paths (remote RDMA READ)
  // and the data check, if run, did not fail.
  bool OdpUsable() const { return odp && odp_rc_read && odp_check != OdpCheck::kFailed; }
  // One line, for `svmctl status`, e.g. (rxe on 7.2 after a failed VerifyOdp)
  //   odp yes (rc: send recv write read) data check FAILED, not used (...),
  //   max_mr 18446744073709551615, qp_wr 1048576, sge 32, rd_atom 128, cqe 32767
  std::string ToString() const;
};

// Path MTU in bytes <-> the verbs enum. Unknown values map to 0 / IBV_MTU_1024.
uint32_t MtuBytes(ibv_mtu mtu);
ibv_mtu MtuFromBytes(uint32_t bytes);

enum class GidType { kIb, kRoceV1, kRoceV2, kUnknown };
absl::string_view GidTypeName(GidType t);

// An opened RDMA device with one selected port and GID.
class Device {
 public:
  // Opens `name`, or with "" the first device that has an ACTIVE port. Picks
  // the first ACTIVE port, then a GID: RoCE v2 with an IPv4-mapped address,
  // else RoCE v2, else (with a warning) whatever valid GID comes first.
  static absl::StatusOr<std::unique_ptr<Device>> Open(absl::string_view name);

  ibv_context* context() const { return context_.get(); }
  const std::string& name() const { return name_; }
  uint8_t port() const { return port_; }
  // The port's active MTU (what both ends negotiate down to).
  ibv_mtu active_mtu() const { return active_mtu_; }
  uint32_t gid_index() const { return gid_index_; }
  const ibv_gid& gid() const { return gid_; }
  GidType gid_type() const { return gid_type_; }
  bool gid_ipv4_mapped() const;
  // "rxe0 port 1 gid[3] ::ffff:10.77.0.1 (RoCE v2) mtu 1024"
  std::string Describe() const;
  const Capabilities& caps() const { return caps_; }

  absl::StatusOr<PdPtr> AllocPd() const;

  // Moves data through ODP registrations over a loopback RC connection on
  // this device (RDMA READ from and WRITE into a 2-page ODP MR, at the port's
  // MTU) and compares it byte for byte. Records the outcome in caps(): after
  // a failure OdpUsable() is false, so Mode::kAuto registers pinned. Returns
  // DATA_LOSS on corrupted data (seen: rxe on Linux 7.2.13 with a 1024-byte
  // MTU ignores the offset within a page for every packet of a message), and
  // FAILED_PRECONDITION without ODP. Call once at start-up, before the data
  // plane registers memory; takes a few milliseconds.
  absl::Status VerifyOdp();

 private:
  Device() = default;

  ContextPtr context_;
  std::string name_;
  uint8_t port_ = 0;
  ibv_mtu active_mtu_ = IBV_MTU_1024;
  uint32_t gid_index_ = 0;
  ibv_gid gid_{};
  GidType gid_type_ = GidType::kUnknown;
  Capabilities caps_;
};

// --- registration -----------------------------------------------------------

enum class Mode {
  kAuto,    // ODP when caps().OdpUsable() (RC READ ODP, VerifyOdp not failed), else pinned
  kOdp,     // on-demand paging; fails if the device cannot do it
  kPinned,  // pages pinned at registration (subject to RLIMIT_MEMLOCK)
};
absl::string_view ModeName(Mode m);

enum class Access {
  kLocal,            // LOCAL_WRITE only: no remote access at all
  kRemoteRead,       // + REMOTE_READ (the default for exported memory)
  kRemoteReadWrite,  // + REMOTE_WRITE (receive buffers of the staged path)
  kRemoteReadOnly,   // REMOTE_READ without LOCAL_WRITE: registers read-only
                     // mappings (the exported objects of the zero-copy path)
};

// A registered memory range. Mode is what was actually used (never kAuto).
class Registration {
 public:
  Registration(MrPtr mr, Mode mode) : mr_(std::move(mr)), mode_(mode) {}
  Registration(Registration&&) = default;
  Registration& operator=(Registration&&) = default;

  Mode mode() const { return mode_; }
  ibv_mr* mr() const { return mr_.get(); }
  uint32_t lkey() const { return mr_->lkey; }
  uint32_t rkey() const { return mr_->rkey; }
  uint64_t addr() const { return reinterpret_cast<uint64_t>(mr_->addr); }
  size_t length() const { return mr_->length; }

 private:
  MrPtr mr_;
  Mode mode_;
};

// Registers [addr, addr+len). For a pinned registration the length is first
// checked against RLIMIT_MEMLOCK (minus what this process already pins) unless
// the process has CAP_IPC_LOCK, so a too-low limit is reported as
// RESOURCE_EXHAUSTED naming LimitMEMLOCK= instead of ibv_reg_mr's ENOMEM.
absl::StatusOr<Registration> Register(const Device& device, ibv_pd* pd, void* addr, size_t len,
                                      Access access, Mode mode = Mode::kAuto);

// Asks the device to map the pages of an ODP registration now
// (ibv_advise_mr, IBV_ADVISE_MR_ADVICE_PREFETCH or PREFETCH_WRITE), so
// that the first remote access does not take a page fault in the NIC.
// flush: return only once the pages are mapped; else best effort, in the
// background. UNIMPLEMENTED when the device or kernel does not support it
// (EOPNOTSUPP, ENOSYS), FAILED_PRECONDITION for a pinned registration.
absl::Status Prefetch(ibv_pd* pd, const Registration& reg, bool write, bool flush);

// The pinned-memory budget check on its own (exposed for tests and status):
// OK, or RESOURCE_EXHAUSTED with the explanation.
absl::Status CheckMemlockBudget(size_t len);

// --- completions ------------------------------------------------------------

// Owns a completion channel and a CQ bound to it. WaitFor() polls for at most
// `spin` (bounded busy-poll, cheap when a completion is imminent: a few
// microseconds on hardware) and then arms the CQ and sleeps in poll() on the
// channel fd, so an idle waiter costs no CPU. Completions for other work
// requests seen on the way are kept and handed out by later WaitFor() calls,
// so wr_ids must be unique among the work requests outstanding on this CQ.
class Poller {
 public:
  static absl::StatusOr<std::unique_ptr<Poller>> Create(
      const Device& device, int cqe, absl::Duration spin = absl::Microseconds(50));
  ~Poller();  // acks outstanding CQ events before the CQ is destroyed

  ibv_cq* cq() const { return cq_.get(); }

  // Waits for the completion of `wr_id`. The completion is returned whatever
  // its status (the caller decides what an error means); DEADLINE_EXCEEDED if
  // it did not arrive within `timeout`, INTERNAL if the CQ or channel fails.
  absl::StatusOr<ibv_wc> WaitFor(uint64_t wr_id, absl::Duration timeout);

  // For a thread that drives whole connections (any wr_id): stores up to
  // `max` completions in `out`, first those WaitFor() kept. With none ready it
  // spins for `spin`, then arms the CQ and sleeps on the channel and on
  // `fds` (the caller's events; revents are set, cleared first; entries
  // with fd < 0 are ignored) for at most `timeout`. 0 means woken by one of
  // fds or timed out (the caller drains or handles them).
  absl::StatusOr<int> Harvest(ibv_wc* out, int max, absl::Span<pollfd> fds, absl::Duration timeout);

  // How many times WaitFor went to sleep on the channel (tests, metrics).
  uint64_t sleeps() const { return sleeps_; }

 private:
  static constexpr unsigned kAckBatch = 16;  // ibv_ack_cq_events batch

  explicit Poller(absl::Duration spin) : spin_(spin) {}
  // Drains the CQ into pending_; returns how many completions were read.
  absl::StatusOr<int> Drain();
  void AckEvents(bool all);
  // Requests a completion event unless one is requested already.
  absl::Status Arm();
  // Takes the event the channel fd signalled (EAGAIN: a spurious wake-up).
  absl::Status ConsumeEvent();

  // Declaration order is teardown order in reverse: cq_ (bound to the
  // channel) is destroyed before channel_.
  CompChannelPtr channel_;
  CqPtr cq_;
  absl::Duration spin_;
  bool armed_ = false;
  unsigned unacked_events_ = 0;
  uint64_t sleeps_ = 0;
  absl::flat_hash_map<uint64_t, ibv_wc> pending_;
};

// --- RC queue pairs ---------------------------------------------------------

// What one side of an RC connection tells the other (carried by the control
// plane: the rdma transport encodes it as svm.v1.RdmaEndpoint). gid_index is
// informational (the sender's own table). RoCE only: addressing is always
// by GID (GRH); there is no LID for an IB fabric.
struct Endpoint {
  uint32_t qpn = 0;
  uint32_t psn = 0;  // 24 bits
  std::array<uint8_t, 16> gid{};
  uint32_t gid_index = 0;
  uint32_t mtu = 0;  // bytes

  // INVALID_ARGUMENT unless qpn and psn fit 24 bits (qpn not 0) and mtu is
  // an IB MTU: what a peer's endpoint must pass before Qp::Connect uses it.
  absl::Status Validate() const;
  std::string ToString() const;
  bool operator==(const Endpoint&) const = default;
};

struct QpCaps {
  uint32_t max_send_wr = 128;
  uint32_t max_recv_wr = 128;
  uint32_t max_sge = 1;
  uint32_t max_inline = 0;
  // Outstanding RDMA READs issued (and served); clamped to the device's limit.
  uint8_t max_rd_atomic = 16;
  // The local ACK timeout as the verbs exponent (4.096 us * 2^ack_timeout;
  // AckTimeoutExponent below): how long a request waits for its ACK before
  // the QP retransmits, 7 times at most, then fails. 14 = 67 ms.
  uint8_t ack_timeout = 14;
};

// The smallest verbs ACK timeout exponent t in [1, 31] with
// 4.096 us * 2^t >= `d` (31 for anything longer than 2^31 * 4.096 us, 1 for
// anything shorter than 8.2 us; 0, "infinite", is never returned).
uint8_t AckTimeoutExponent(absl::Duration d);
// 4.096 us * 2^exponent.
absl::Duration AckTimeoutOf(uint8_t exponent);

class Qp {
 public:
  // Creates an RC QP in RESET, send and receive completions on `poller`.
  static absl::StatusOr<std::unique_ptr<Qp>> Create(const Device& device, ibv_pd* pd,
                                                    Poller& poller, const QpCaps& caps = {});

  // This side's endpoint, to be sent to the peer.
  const Endpoint& local() const { return local_; }

  // INIT -> RTR -> RTS towards `remote`. The path MTU is the smaller of both
  // sides'. RNR retries are infinite (7) so a receiver-not-ready or an ODP
  // page fault on the remote side stalls instead of failing the QP.
  absl::Status Connect(const Endpoint& remote);

  ibv_qp* qp() const { return qp_.get(); }

  // Work requests; all signalled. `remote_addr`/`rkey` name the peer's MR.
  absl::Status PostRecv(uint64_t wr_id, const Registration& mr, size_t offset, size_t len);
  absl::Status PostSend(uint64_t wr_id, const Registration& mr, size_t offset, size_t len);
  absl::Status PostWrite(uint64_t wr_id, const Registration& mr, size_t offset, size_t len,
                         uint64_t remote_addr, uint32_t rkey);
  absl::Status PostRead(uint64_t wr_id, const Registration& mr, size_t offset, size_t len,
                        uint64_t remote_addr, uint32_t rkey);

 private:
  Qp(const Device& device, uint8_t max_rd_atomic, uint8_t ack_timeout)
      : device_(device), max_rd_atomic_(max_rd_atomic), ack_timeout_(ack_timeout) {}
  absl::Status PostOneSided(ibv_wr_opcode op, uint64_t wr_id, const Registration& mr, size_t offset,
                            size_t len, uint64_t remote_addr, uint32_t rkey);

  const Device& device_;
  uint8_t max_rd_atomic_;
  uint8_t ack_timeout_;
  QpPtr qp_;
  Endpoint local_;
};

// "success", "remote access error", ... plus the vendor error, for messages.
std::string DescribeCompletion(const ibv_wc& wc);

}  // namespace svm::transport::rdma

#endif  // SVM_DAEMON_TRANSPORT_RDMA_VERBS_H_
