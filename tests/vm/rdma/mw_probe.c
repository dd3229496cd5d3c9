// Memory-window probe (not built by CMake, not a test): what a type 2
// memory window over an importer's registration gives on this device, for
// landing staged fetches without a copy (docs/design.md, "What is not built
// yet"). For a pinned and an ODP registration of 1 MiB (LOCAL_WRITE |
// MW_BIND), it binds a window over 4 KiB in the middle to one queue pair
// (REMOTE_WRITE) and reports:
//   - whether the peer's RDMA WRITE through the window lands, and only there;
//   - whether the same rkey is refused on another connection;
//   - whether a WRITE below or above the window is refused;
//   - whether the rkey is refused after the importer's LOCAL_INV.
// Run it in a guest of each kernel (rxe0 on the guest's loopback pair):
//   gcc -O2 -Wall -o /tmp/mw_probe tests/vm/rdma/mw_probe.c -libverbs
//   tests/vm/run-vm.sh --kernel unstable --cache build/vm-cache -- /tmp/mw_probe
#include <infiniband/verbs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { kArea = 1 << 20, kPage = 4096, kWindow = 2 * kPage };

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static int gid_index = -1;
static union ibv_gid gid;
static enum ibv_mtu mtu;

static void die(const char *what) {
  perror(what);
  exit(2);
}

static struct ibv_qp *make_qp(struct ibv_cq *cq) {
  struct ibv_qp_init_attr a = {.send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                               .cap = {.max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1,
                                       .max_recv_sge = 1}};
  struct ibv_qp *q = ibv_create_qp(pd, &a);
  if (q == NULL) die("ibv_create_qp");
  struct ibv_qp_attr m = {.qp_state = IBV_QPS_INIT, .port_num = 1,
                          .qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE};
  if (ibv_modify_qp(q, &m, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
    die("INIT");
  }
  return q;
}

static void connect_qp(struct ibv_qp *q, uint32_t remote) {
  struct ibv_qp_attr m = {.qp_state = IBV_QPS_RTR, .path_mtu = mtu, .dest_qp_num = remote,
                          .max_dest_rd_atomic = 4, .min_rnr_timer = 12};
  m.ah_attr.is_global = 1;
  m.ah_attr.grh.dgid = gid;
  m.ah_attr.grh.sgid_index = (uint8_t)gid_index;
  m.ah_attr.grh.hop_limit = 1;
  m.ah_attr.port_num = 1;
  if (ibv_modify_qp(q, &m, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                               IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)) {
    die("RTR");
  }
  struct ibv_qp_attr s = {.qp_state = IBV_QPS_RTS, .timeout = 14, .retry_cnt = 7, .rnr_retry = 7,
                          .max_rd_atomic = 4};
  if (ibv_modify_qp(q, &s, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                               IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC)) {
    die("RTS");
  }
}

// A connected pair: `importer` owns the window, `exporter` WRITEs.
struct pair {
  struct ibv_cq *cq;
  struct ibv_qp *importer, *exporter;
};
static struct pair make_pair(void) {
  struct pair p;
  p.cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
  if (p.cq == NULL) die("ibv_create_cq");
  p.importer = make_qp(p.cq);
  p.exporter = make_qp(p.cq);
  connect_qp(p.importer, p.exporter->qp_num);
  connect_qp(p.exporter, p.importer->qp_num);
  return p;
}

// The status of work request id on cq ("timeout" after 10 s).
static const char *await(struct ibv_cq *cq, uint64_t id) {
  struct ibv_wc wc;
  for (int i = 0; i < 1000000; ++i) {
    if (ibv_poll_cq(cq, 1, &wc) > 0 && wc.wr_id == id) return ibv_wc_status_str(wc.status);
    usleep(10);
  }
  return "timeout";
}

static const char *post(struct ibv_qp *q, struct ibv_cq *cq, struct ibv_send_wr *wr) {
  struct ibv_send_wr *bad;
  if (ibv_post_send(q, wr, &bad)) return "post failed";
  return await(cq, wr->wr_id);
}

static const char *write_at(struct pair *p, struct ibv_mr *src, char *dst, uint32_t rkey, uint64_t id) {
  struct ibv_sge sge = {.addr = (uintptr_t)src->addr, .length = kPage, .lkey = src->lkey};
  struct ibv_send_wr w = {.wr_id = id, .opcode = IBV_WR_RDMA_WRITE, .send_flags = IBV_SEND_SIGNALED,
                          .sg_list = &sge, .num_sge = 1};
  w.wr.rdma.remote_addr = (uintptr_t)dst;
  w.wr.rdma.rkey = rkey;
  return post(p->exporter, p->cq, &w);
}

static int all(const char *p, size_t n, char c) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != c) return 0;
  }
  return 1;
}

// Binds a new type 2 window over [addr, addr + kWindow) of mr to p's
// importer QP (REMOTE_WRITE); returns its rkey, 0 when refused.
static uint32_t bind_window(struct pair *p, struct ibv_mr *mr, char *addr, const char *mode) {
  struct ibv_mw *mw = ibv_alloc_mw(pd, IBV_MW_TYPE_2);
  if (mw == NULL) {
    printf("%-6s type 2 window: refused (%m)\n", mode);
    return 0;
  }
  const uint32_t rkey = ibv_inc_rkey(mw->rkey);
  struct ibv_send_wr bind = {.wr_id = 1, .opcode = IBV_WR_BIND_MW, .send_flags = IBV_SEND_SIGNALED};
  bind.bind_mw.mw = mw;
  bind.bind_mw.rkey = rkey;
  bind.bind_mw.bind_info.mr = mr;
  bind.bind_mw.bind_info.addr = (uintptr_t)addr;
  bind.bind_mw.bind_info.length = kWindow;
  bind.bind_mw.bind_info.mw_access_flags = IBV_ACCESS_REMOTE_WRITE;
  const char *st = post(p->importer, p->cq, &bind);
  if (strcmp(st, "success") != 0) {
    printf("%-6s bind: %s\n", mode, st);
    return 0;
  }
  return rkey;
}

static void probe(int odp) {
  const char *mode = odp ? "ODP" : "pinned";
  char *area = mmap(NULL, kArea, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char *src = mmap(NULL, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (area == MAP_FAILED || src == MAP_FAILED) die("mmap");
  memset(src, 'W', kPage);
  struct ibv_mr *mr = ibv_reg_mr(pd, area, kArea,
                                 IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_MW_BIND | (odp ? IBV_ACCESS_ON_DEMAND : 0));
  if (mr == NULL) {
    printf("%-6s registration with MW_BIND: refused (%m)\n", mode);
    return;
  }
  struct ibv_mr *smr = ibv_reg_mr(pd, src, kPage, IBV_ACCESS_LOCAL_WRITE);
  if (smr == NULL) die("ibv_reg_mr");

  // Revocation, on a window of its own: WRITE, LOCAL_INV, WRITE again.
  struct pair p = make_pair();
  char *first = area + 16 * kPage;
  uint32_t rkey = bind_window(&p, mr, first, mode);
  if (rkey == 0) return;
  const char *inside = write_at(&p, smr, first, rkey, 2);
  printf("%-6s WRITE inside a window: %s, %s\n", mode, inside,
         all(first, kPage, 'W') && all(first - kPage, kPage, 0) ? "landed there only" : "WRONG BYTES");
  struct ibv_send_wr inv = {.wr_id = 3, .opcode = IBV_WR_LOCAL_INV, .send_flags = IBV_SEND_SIGNALED,
                            .invalidate_rkey = rkey};
  printf("%-6s LOCAL_INV: %s\n", mode, post(p.importer, p.cq, &inv));
  printf("%-6s WRITE after LOCAL_INV: %s\n", mode, write_at(&p, smr, first, rkey, 4));

  // Another connection, then the range: below and above the window.
  p = make_pair();
  char *win = area + 64 * kPage;
  rkey = bind_window(&p, mr, win, mode);
  if (rkey == 0) return;
  struct pair other = make_pair();
  printf("%-6s same rkey on another connection: %s\n", mode, write_at(&other, smr, win, rkey, 5));
  const char *below = write_at(&p, smr, win - kPage, rkey, 6);
  printf("%-6s WRITE just below the window: %s (bytes there %s)\n", mode, below,
         all(win - kPage, kPage, 'W') ? "written" : "untouched");
  if (strcmp(below, "success") != 0) {  // that QP is in error now: a window of its own
    p = make_pair();
    win = area + 128 * kPage;
    rkey = bind_window(&p, mr, win, mode);
    if (rkey == 0) return;
  }
  const char *above = write_at(&p, smr, win + kWindow, rkey, 7);
  printf("%-6s WRITE just above the window: %s (bytes there %s)\n", mode, above,
         all(win + kWindow, kPage, 'W') ? "written" : "untouched");
}

int main(void) {
  int n = 0;
  struct ibv_device **list = ibv_get_device_list(&n);
  if (list == NULL || n == 0) {
    fprintf(stderr, "no rdma device\n");
    return 2;
  }
  ctx = ibv_open_device(list[0]);
  if (ctx == NULL) die("ibv_open_device");
  pd = ibv_alloc_pd(ctx);
  if (pd == NULL) die("ibv_alloc_pd");
  struct ibv_device_attr_ex dx;
  if (ibv_query_device_ex(ctx, NULL, &dx)) die("ibv_query_device_ex");
  for (int i = 0; i < 16 && gid_index < 0; ++i) {
    struct ibv_gid_entry e;
    if (ibv_query_gid_ex(ctx, 1, (uint32_t)i, &e, 0)) continue;
    if (e.gid_type == IBV_GID_TYPE_ROCE_V2 && e.gid.raw[10] == 0xff && e.gid.raw[11] == 0xff) {
      gid_index = i;
      gid = e.gid;
    }
  }
  if (gid_index < 0) {
    fprintf(stderr, "no RoCE v2 IPv4 gid\n");
    return 2;
  }
  struct ibv_port_attr pa;
  if (ibv_query_port(ctx, 1, &pa)) die("ibv_query_port");
  // The port's MTU: rxe ODP on 7.2 corrupts multi-packet messages below a
  // page (tests/vm/rdma/CMakeLists.txt); the guest's link runs 9000.
  mtu = pa.active_mtu;
  printf("%s: max_mw %d, type 2B windows %s, active MTU %d\n", ibv_get_device_name(list[0]),
         dx.orig_attr.max_mw, (dx.orig_attr.device_cap_flags & IBV_DEVICE_MEM_WINDOW_TYPE_2B) ? "yes" : "no",
         128 << pa.active_mtu);
  probe(0);
  probe(1);
  return 0;
}
