#include "client/proto_convert.h"

namespace svm::internal {

ExportInfo FromProto(const v1::ExportInfo& m) {
  ExportInfo x;
  x.name = m.name();
  x.pid = m.pid();
  x.addr = m.addr();
  x.len = m.len();
  x.page_size = m.page_size();
  x.source = m.source();
  x.path = m.path();
  x.seq = m.seq();
  x.subscribers = m.subscribers();
  x.gone = m.gone();
  x.allow.assign(m.allow().begin(), m.allow().end());
  x.zero_copy_page_size = m.zero_copy_page_size();
  for (const v1::PageSizeBytes& p : m.mapped()) x.mapped.push_back({p.page_size(), p.bytes()});
  return x;
}

v1::ExportInfo ToProto(const ExportInfo& x) {
  v1::ExportInfo m;
  m.set_name(x.name);
  m.set_pid(x.pid);
  m.set_addr(x.addr);
  m.set_len(x.len);
  m.set_page_size(x.page_size);
  m.set_source(x.source);
  m.set_path(x.path);
  m.set_seq(x.seq);
  m.set_subscribers(x.subscribers);
  m.set_gone(x.gone);
  for (const std::string& id : x.allow) m.add_allow(id);
  m.set_zero_copy_page_size(x.zero_copy_page_size);
  for (const ExportInfo::PageSizeBytes& p : x.mapped) {
    v1::PageSizeBytes* out = m.add_mapped();
    out->set_page_size(p.page_size);
    out->set_bytes(p.bytes);
  }
  return m;
}

ImportInfo FromProto(const v1::ImportInfo& m) {
  ImportInfo x;
  x.name = m.name();
  x.remote_name = m.remote_name();
  x.peer = m.peer();
  x.len = m.len();
  x.page_size = m.page_size();
  x.path = m.path();
  x.state = m.state();
  x.seq = m.seq();
  x.cached_pages = m.cached_pages();
  x.invalidations = m.invalidations();
  x.fallback_reason = m.fallback_reason();
  return x;
}

v1::ImportInfo ToProto(const ImportInfo& x) {
  v1::ImportInfo m;
  m.set_name(x.name);
  m.set_remote_name(x.remote_name);
  m.set_peer(x.peer);
  m.set_len(x.len);
  m.set_page_size(x.page_size);
  m.set_path(x.path);
  m.set_state(x.state);
  m.set_seq(x.seq);
  m.set_cached_pages(x.cached_pages);
  m.set_invalidations(x.invalidations);
  m.set_fallback_reason(x.fallback_reason);
  return m;
}

Invalidation FromProto(const v1::Invalidation& m) {
  Invalidation x;
  x.name = m.name();
  x.first_page = m.first_page();
  x.npages = m.npages();
  x.seq = m.seq();
  x.kind = static_cast<InvalidationKind>(m.kind());
  x.detected_ns = m.detected_ns();
  x.received_ns = m.received_ns();
  return x;
}

v1::Invalidation ToProto(const Invalidation& x) {
  v1::Invalidation m;
  m.set_name(x.name);
  m.set_first_page(x.first_page);
  m.set_npages(x.npages);
  m.set_seq(x.seq);
  m.set_kind(static_cast<v1::InvalidationKind>(x.kind));
  m.set_detected_ns(x.detected_ns);
  m.set_received_ns(x.received_ns);
  return m;
}

SyncResult FromProto(const v1::SyncResponse& m) {
  SyncResult x;
  x.pages_invalidated = m.pages_invalidated();
  x.seq = m.seq();
  x.subscribers_acked = m.subscribers_acked();
  return x;
}

v1::SyncResponse ToProto(const SyncResult& x) {
  v1::SyncResponse m;
  m.set_pages_invalidated(x.pages_invalidated);
  m.set_seq(x.seq);
  m.set_subscribers_acked(x.subscribers_acked);
  return m;
}

DaemonStatus FromProto(const v1::StatusResponse& m) {
  DaemonStatus x;
  x.node = m.node();
  x.version = m.version();
  x.pid = m.pid();
  x.control = m.control();
  x.peer_listen = m.peer_listen();
  x.data_listen = m.data_listen();
  x.source = m.source();
  x.transport = m.transport();
  x.transports.assign(m.transports().begin(), m.transports().end());
  if (m.has_rdma()) {
    const v1::RdmaDeviceStatus& r = m.rdma();
    RdmaDeviceStatus& d = x.rdma.emplace();
    d.device = r.device();
    d.port = r.port();
    d.port_state = r.port_state();
    d.gid = r.gid();
    d.active_mtu = r.active_mtu();
    d.odp_rc_read = r.odp_rc_read();
    d.odp_check = r.odp_check();
    d.registration = r.registration();
    d.liveness_listen = r.liveness_listen();
  }
  x.rdma_unavailable = m.rdma_unavailable();
  x.exports = m.exports();
  x.imports = m.imports();
  x.peers = m.peers();
  x.uptime = absl::Milliseconds(m.uptime_ms());
  x.counters.insert(m.counters().begin(), m.counters().end());
  x.sync_detection = m.sync_detection();
  x.session_socket = m.session_socket();
  return x;
}

v1::StatusResponse ToProto(const DaemonStatus& x) {
  v1::StatusResponse m;
  m.set_node(x.node);
  m.set_version(x.version);
  m.set_pid(x.pid);
  m.set_control(x.control);
  m.set_peer_listen(x.peer_listen);
  m.set_data_listen(x.data_listen);
  m.set_source(x.source);
  m.set_transport(x.transport);
  for (const std::string& t : x.transports) m.add_transports(t);
  if (x.rdma.has_value()) {
    const RdmaDeviceStatus& d = *x.rdma;
    v1::RdmaDeviceStatus* r = m.mutable_rdma();
    r->set_device(d.device);
    r->set_port(d.port);
    r->set_port_state(d.port_state);
    r->set_gid(d.gid);
    r->set_active_mtu(d.active_mtu);
    r->set_odp_rc_read(d.odp_rc_read);
    r->set_odp_check(d.odp_check);
    r->set_registration(d.registration);
    r->set_liveness_listen(d.liveness_listen);
  }
  m.set_rdma_unavailable(x.rdma_unavailable);
  m.set_exports(x.exports);
  m.set_imports(x.imports);
  m.set_peers(x.peers);
  m.set_uptime_ms(static_cast<uint64_t>(absl::ToInt64Milliseconds(x.uptime)));
  m.mutable_counters()->insert(x.counters.begin(), x.counters.end());
  m.set_sync_detection(x.sync_detection);
  m.set_session_socket(x.session_socket);
  return m;
}

}  // namespace svm::internal
