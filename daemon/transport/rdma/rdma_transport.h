// The staged RDMA data path behind the transport seam: one RC queue pair per
// importer/exporter data connection, on the device from Device::Open.
//
// - Control messages (HELLO, FETCH, FETCH_RESP, INVAL, INVAL_ACK: the
//   frame.h header and payloads; the importer's HELLO carries its receive
//   area, RdmaHelloPayload) travel as SENDs into pre-posted receive buffers.
// - Page data of a FETCH response is RDMA-WRITTEN by the exporter from a
//   registered staging buffer into the slot of the importer's registered
//   receive area that the FETCH named; the response SEND follows on the same
//   QP, so RC ordering lands the data before the response, and INVALs queued
//   behind a response arrive behind it (as on the tcp connection).
// - The exporter copies pages (ExportBackend::ServeFetch) on copy workers,
//   never on a completion thread: a copy that blocks (a page fault in the
//   exporting process) holds up only its own staging buffer; the worker
//   queues and posts the WRITE and the response itself.
// - Acknowledgements: the importer SENDs INVAL_ACK after
//   ImportBackend::OnInvalidation returned.
// - Flow control: at most kRecvDepth SENDs in flight per side (the peer's
//   receive queue depth); RNR retry 7 on the QP is the backstop.
// - Liveness: a failed completion, a Fetch timeout, or an idle keepalive
//   that cannot be delivered (transport retries exhaust in about 0.5 s)
//   closes the connection: OnChannelClosed / OnSubscriberClosed as on tcp.
//   OnSubscriberClosed comes after the connection's last ServeFetch
//   returned.
//
// Threads: a completion context per device (one CQ, its channel and one
// thread; more contexts once a CQ's budget is reserved) serves many
// connections. Its thread sleeps on the channel, an eventfd and the
// connections' liveness sockets (Poller::Harvest), so idle connections cost
// no CPU and threads do not grow with connections. It dispatches
// completions (receives, window updates, WRITE/READ completions), runs the
// exporter's OnAck, and closes connections. The importer's OnInvalidation
// runs on a delivery worker, one task per connection at a time, in arrival
// order (a FETCH response behind an invalidation completes after it was
// delivered): a slow callback holds up its own connection only. Work is posted by whichever thread queues it (a caller, a
// copy worker, the context), under the connection's mutex.
#ifndef SVM_DAEMON_TRANSPORT_RDMA_RDMA_TRANSPORT_H_
#define SVM_DAEMON_TRANSPORT_RDMA_RDMA_TRANSPORT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "daemon/transport/transport.h"

namespace svm::transport {

// How the data buffers (importer receive areas, exporter staging buffers)
// are registered.
enum class RdmaRegistration {
  kAuto,    // ODP when the device has RC READ ODP and passes the data check, else pinned
  kOdp,     // ODP or fail: CreateRdmaTransport fails when ODP is unusable
  kPinned,  // never ODP (pinned registrations count against RLIMIT_MEMLOCK)
};
// "auto" / "odp" / "pinned"; INVALID_ARGUMENT otherwise.
absl::StatusOr<RdmaRegistration> ParseRdmaRegistration(const std::string& s);

struct RdmaOptions {
  std::string device;  // "" = the first device with an active port
  RdmaRegistration registration = RdmaRegistration::kAuto;
  // Local ACK timeout of every QP (rounded up to 4.096 us * 2^t, at most 31).
  absl::Duration ack_timeout = absl::Milliseconds(67);
};

// Opens the device, runs the ODP data check (unless registration is pinned)
// and returns the transport; NOT_FOUND and friends when there is no usable
// device, FAILED_PRECONDITION (or the check's error) for kOdp without usable
// ODP.
absl::StatusOr<std::unique_ptr<Transport>> CreateRdmaTransport(const RdmaOptions& opts);

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_RDMA_RDMA_TRANSPORT_H_
