/*
 * virtio-vsock driver and stream sockets, at CPL3 (virtio 1.2 section 5.10).
 *
 * The reference for every packet sent here is tests/vsock_guest.py (what a
 * guest must send) and the device's docstring in vmm/devices/virtio/vsock/device.py:
 * rx buffers stay posted (4 KiB, header included, like Linux); every packet is
 * one tx descriptor holding header and payload; we send at most the host's
 * credit; CREDIT_REQUEST is answered; a SHUTDOWN from the host or anything
 * unexpected on a connection ends it with RST; a TRANSPORT_RESET event (after
 * a snapshot restore or an in-place reset) forgets every connection but keeps
 * the listener, so the host simply connects again.
 *
 * Each connection has two byte buffers: `rx` holds what the host sent and the
 * agent has not consumed yet (its size is the buf_alloc we advertise, so the
 * host's credit can never overflow it), `tx` is a ring the agent writes whole
 * frames into and vsock_flush() packetises as the host's credit allows.
 */
#include "agent.h"

#define VS_RXQ 128u
#define VS_RX_BUF 4096u
#define VS_TXQ 32u
#define VS_TX_SLOT (64u * 1024) /* header + up to 64 KiB - 44 of payload per packet */
#define VS_EVQ 4u
#define VS_EV_BUF 8u
#define VS_HDR 44u
#define VS_RX_CAP (AG_MAX_FRAME + AG_HDR + 4096u)
#define VS_TX_CAP (256u * 1024)
#define VS_STRAYS 16u
#define VS_FIRST_PORT 1024u

#define TYPE_STREAM 1
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define SHUTDOWN_BOTH 3u
#define EVENT_TRANSPORT_RESET 0u

#define CTRL_REQUEST 1u
#define CTRL_RESPONSE 2u
#define CTRL_CREDIT_UPDATE 4u
#define CTRL_CREDIT_REQUEST 8u

#define Q_RX 0
#define Q_TX 1
#define Q_EV 2

struct vs_conn vs_conns[VS_MAX_CONNS];

static struct virtio_dev dev;
static struct vq rxq, txq, evq;
static uint8_t *rx_bufs, *tx_slots, *ev_bufs;
static uint16_t tx_free[VS_TXQ];
static uint32_t tx_nfree;
static uint64_t cid;
static uint32_t listen_port;
static uint32_t next_port = VS_FIRST_PORT;
static int tx_pushed;
static int credit_requested[VS_MAX_CONNS];

/* RSTs owed for connections we do not (or no longer) have: (our port, host port). */
static struct {
    uint32_t local, peer;
} strays[VS_STRAYS];
static uint32_t nstrays;

int vsock_init(const struct sm_boot_device *bd, uint32_t irq_index)
{
    if (virtio_init(&dev, bd->mmio_base, SM_DEV_VIRTIO_VSOCK, 0, irq_index) < 0 ||
        virtio_setup_queue(&dev, &rxq, Q_RX, VS_RXQ) < 0 ||
        virtio_setup_queue(&dev, &txq, Q_TX, VS_TXQ) < 0 ||
        virtio_setup_queue(&dev, &evq, Q_EV, VS_EVQ) < 0)
        return -1;
    cid = virtio_config32(&dev, 0) | (uint64_t)virtio_config32(&dev, 4) << 32;
    rx_bufs = ag_alloc((uint64_t)VS_RXQ * VS_RX_BUF);
    tx_slots = ag_alloc((uint64_t)VS_TXQ * VS_TX_SLOT);
    ev_bufs = ag_alloc(VS_EVQ * VS_EV_BUF);
    for (uint16_t i = 0; i < VS_RXQ; i++) {
        rxq.desc[i] = (struct vq_desc){(uint64_t)(rx_bufs + i * VS_RX_BUF), VS_RX_BUF,
                                       VQ_DESC_F_WRITE, 0};
        vq_push(&rxq, i);
    }
    for (uint16_t i = 0; i < VS_EVQ; i++) {
        evq.desc[i] = (struct vq_desc){(uint64_t)(ev_bufs + i * VS_EV_BUF), VS_EV_BUF,
                                       VQ_DESC_F_WRITE, 0};
        vq_push(&evq, i);
    }
    for (uint16_t i = 0; i < VS_TXQ; i++) {
        txq.desc[i] = (struct vq_desc){(uint64_t)(tx_slots + (uint64_t)i * VS_TX_SLOT), 0, 0, 0};
        tx_free[tx_nfree++] = i;
    }
    for (uint32_t i = 0; i < VS_MAX_CONNS; i++) {
        struct vs_conn *c = &vs_conns[i];
        c->id = i;
        c->rx = ag_alloc(VS_RX_CAP);
        c->rx_cap = VS_RX_CAP;
        c->tx = ag_alloc(VS_TX_CAP);
        c->tx_cap = VS_TX_CAP;
    }
    virtio_driver_ok(&dev);
    return 0;
}

uint64_t vsock_cid(void) { return cid; }
void vsock_listen(uint32_t port) { listen_port = port; }
void vsock_check(void)
{
    if (virtio_needs_reset(&dev))
        ag_panic(MG_PANIC_AGENT_DEVICE, "virtio-vsock needs a reset (driver bug)");
}

/* ------------------------------------------------------------ connections -- */

static struct vs_conn *conn_find(uint32_t local, uint32_t peer)
{
    for (uint32_t i = 0; i < VS_MAX_CONNS; i++) {
        struct vs_conn *c = &vs_conns[i];
        if (c->state != VS_FREE && c->local_port == local && c->peer_port == peer)
            return c;
    }
    return 0;
}

static struct vs_conn *conn_new(uint32_t local, uint32_t peer, uint32_t state)
{
    for (uint32_t i = 0; i < VS_MAX_CONNS; i++) {
        struct vs_conn *c = &vs_conns[i];
        if (c->state != VS_FREE)
            continue;
        c->state = state;
        c->local_port = local;
        c->peer_port = peer;
        c->rx_start = c->rx_end = 0;
        c->fwd_cnt = c->last_fwd_sent = c->rx_cnt = 0;
        c->tx_head = c->tx_tail = 0;
        c->tx_cnt = c->peer_buf_alloc = c->peer_fwd_cnt = 0;
        c->ctrl = 0;
        c->close_when_drained = 0;
        credit_requested[i] = 0;
        return c;
    }
    return 0;
}

static void stray_rst(uint32_t local, uint32_t peer)
{
    if (nstrays < VS_STRAYS) {
        strays[nstrays].local = local;
        strays[nstrays].peer = peer;
        nstrays++;
    }
}

/* Forget c (the agent first). The generation tells tasks their connection is gone. */
static void conn_drop(struct vs_conn *c)
{
    agent_on_close(c);
    c->state = VS_FREE;
    c->gen++;
    ag_progress++;
}

void vsock_abort(struct vs_conn *c)
{
    if (c->state == VS_FREE)
        return;
    stray_rst(c->local_port, c->peer_port);
    conn_drop(c);
}

void vsock_close(struct vs_conn *c) { c->close_when_drained = 1; }

struct vs_conn *vsock_connect(uint32_t port)
{
    struct vs_conn *c = conn_new(next_port++, port, VS_CONNECTING);
    if (c)
        c->ctrl |= CTRL_REQUEST;
    return c;
}

void vs_rx_consume(struct vs_conn *c, uint32_t n)
{
    c->rx_start += n;
    c->fwd_cnt += n;
    if (c->rx_start == c->rx_end)
        c->rx_start = c->rx_end = 0;
    ag_progress++;
}

void vs_tx_put(struct vs_conn *c, const void *data, uint32_t n)
{
    uint32_t pos = (uint32_t)c->tx_head & (c->tx_cap - 1);
    uint32_t first = MG_MIN(n, c->tx_cap - pos);
    ag_copy(c->tx + pos, data, first);
    ag_copy(c->tx, (const uint8_t *)data + first, n - first);
    c->tx_head += n;
    ag_progress++;
}

/* ------------------------------------------------------------------ rx -- */

static void rx_append(struct vs_conn *c, const uint8_t *data, uint32_t n)
{
    if (c->rx_end + n > c->rx_cap) { /* compact: the unread bytes move to the front */
        uint32_t len = vs_rx_len(c);
        ag_copy(c->rx, c->rx + c->rx_start, len); /* forward copy, dst < src: safe */
        c->rx_start = 0;
        c->rx_end = len;
    }
    ag_copy(c->rx + c->rx_end, data, n);
    c->rx_end += n;
    c->rx_cnt += n;
}

/* `after_reset`: a TRANSPORT_RESET came in this batch (see vsock_poll). */
static void handle_packet(const uint8_t *h, uint32_t total, int after_reset)
{
    if (total < VS_HDR)
        return;
    uint64_t src_cid = ld64(h), dst_cid = ld64(h + 8);
    uint32_t sport = ld32(h + 16), dport = ld32(h + 20), len = ld32(h + 24);
    uint16_t type = ld16(h + 28), op = ld16(h + 30);
    if (len > total - VS_HDR || src_cid != VS_HOST_CID || dst_cid != cid)
        return; /* not for us or truncated: the device never does this, drop it */
    ag_progress++;
    struct vs_conn *c = conn_find(dport, sport);
    if (type != TYPE_STREAM) {
        if (op != OP_RST)
            stray_rst(dport, sport);
        return;
    }
    if (!c) {
        if (op == OP_REQUEST && listen_port && dport == listen_port &&
            (c = conn_new(dport, sport, VS_OPEN))) {
            c->peer_buf_alloc = ld32(h + 36);
            c->peer_fwd_cnt = ld32(h + 40);
            c->ctrl |= CTRL_RESPONSE;
            agent_on_accept(c);
        } else if (op != OP_RST && !after_reset) {
            stray_rst(dport, sport); /* refused: nobody listens, or no free connection */
        }
        return;
    }
    c->peer_buf_alloc = ld32(h + 36);
    c->peer_fwd_cnt = ld32(h + 40);
    if (c->state == VS_CONNECTING) {
        if (op == OP_RESPONSE) {
            c->state = VS_OPEN;
            agent_on_connected(c);
        } else if (op == OP_RST) {
            conn_drop(c); /* refused */
        } else {
            vsock_abort(c);
        }
        return;
    }
    switch (op) {
    case OP_RW:
        if (c->state != VS_OPEN || len > c->rx_cap - vs_rx_len(c)) {
            vsock_abort(c); /* beyond the credit we gave: a broken peer */
            return;
        }
        if (len) {
            rx_append(c, h + VS_HDR, len);
            agent_on_data(c);
        }
        break;
    case OP_CREDIT_UPDATE:
        break; /* the credit fields were all it carried */
    case OP_CREDIT_REQUEST:
        c->ctrl |= CTRL_CREDIT_UPDATE;
        break;
    case OP_RST:
        conn_drop(c);
        break;
    case OP_SHUTDOWN: /* the host closes (or answers our close): RST completes it */
    default:          /* REQUEST/RESPONSE on an open connection */
        vsock_abort(c);
        break;
    }
}

/*
 * A tx slot is reused only once a later tx completion is visible. The VMM's
 * vsock device (vsock/device.py, _drain_tx) publishes a chain as used *before* it
 * reads the packet out of it, and this driver polls the used ring natively
 * while the host thread is in between: reusing the newest slot at once
 * overwrote packets in flight (measured: corrupt streams under load). The
 * device drains strictly in order, used entry k+1 is published after chain k
 * was read, so holding back only the newest completed slot is enough; it
 * costs one of VS_TXQ slots. Freed slots are not progress: completions wait
 * in the ring without an interrupt until the next wake-up, so counting them
 * would hide that wake-up's real cause (agent.c); what waited for a slot makes
 * progress when it sends.
 */
static int tx_held = -1;

static void tx_reclaim(void)
{
    uint32_t id, len;
    while (vq_pop_used(&txq, &id, &len)) {
        if (id >= VS_TXQ)
            continue;
        if (tx_held >= 0)
            tx_free[tx_nfree++] = (uint16_t)tx_held;
        tx_held = (int)id;
    }
}

/*
 * Events before packets. The device queues TRANSPORT_RESET (after a restore or
 * an in-place reset) before anything of the new connections, but from its own
 * thread while we poll: had we looked at the (empty) event ring and then found
 * a new REQUEST in rx, the reset seen on the next pass would drop that fresh
 * connection. So the rx used index is read first and rx handled only up to it:
 * the device stores the event before those rx entries, x86 keeps its stores
 * and our loads in order, so any reset that precedes them is seen first.
 * Packets for unknown connections in the same batch as a reset are leftovers
 * from before it and get no RST: after a restore the host numbers its ports
 * afresh, so one could hit a new connection that happens to have the same ports.
 */
void vsock_poll(void)
{
    tx_reclaim();
    uint16_t rx_seen = rxq.used[1];
    MG_BARRIER();
    uint32_t id, len;
    int after_reset = 0;
    while (vq_pop_used(&evq, &id, &len)) {
        if (id >= VS_EVQ)
            continue;
        if (len >= 4 && ld32(ev_bufs + id * VS_EV_BUF) == EVENT_TRANSPORT_RESET) {
            for (uint32_t i = 0; i < VS_MAX_CONNS; i++)
                if (vs_conns[i].state != VS_FREE)
                    conn_drop(&vs_conns[i]); /* the host already forgot them: no RST */
            nstrays = 0;
            after_reset = 1;
        }
        vq_push(&evq, (uint16_t)id);
        vq_kick(&evq);
        ag_progress++;
    }
    uint16_t before = rxq.avail_idx;
    int reposted = 0;
    while (rxq.last_used != rx_seen && vq_pop_used(&rxq, &id, &len)) {
        if (id >= VS_RXQ)
            continue;
        handle_packet(rx_bufs + id * VS_RX_BUF, MG_MIN(len, VS_RX_BUF), after_reset);
        vq_push(&rxq, (uint16_t)id);
        reposted = 1;
    }
    /*
     * The device stops reading host sockets when it finds no rx buffer and
     * waits for a kick. It may have found none only if it used every buffer
     * we had posted; otherwise this kick (an exit) is saved.
     */
    if (reposted && rxq.used[1] == before)
        vq_kick(&rxq);
}

/* ------------------------------------------------------------------ tx -- */

static uint8_t *tx_slot(uint16_t id) { return tx_slots + (uint64_t)id * VS_TX_SLOT; }

static void fill_hdr(uint8_t *h, uint32_t local, uint32_t peer, uint16_t op, uint32_t flags,
                     uint32_t len, const struct vs_conn *c)
{
    st64(h, cid);
    st64(h + 8, VS_HOST_CID);
    st32(h + 16, local);
    st32(h + 20, peer);
    st32(h + 24, len);
    st16(h + 28, TYPE_STREAM);
    st16(h + 30, op);
    st32(h + 32, flags);
    st32(h + 36, c ? c->rx_cap : 0);
    st32(h + 40, c ? c->fwd_cnt : 0);
}

static void tx_send(uint16_t id, uint32_t len)
{
    txq.desc[id].len = len;
    vq_push(&txq, id);
    tx_pushed = 1;
    ag_progress++;
}

/* A header-only packet for c (its credit fields go along). 0 if no tx slot is free. */
static int send_ctrl(struct vs_conn *c, uint16_t op, uint32_t flags)
{
    if (!tx_nfree)
        return 0;
    uint16_t id = tx_free[--tx_nfree];
    fill_hdr(tx_slot(id), c->local_port, c->peer_port, op, flags, 0, c);
    c->last_fwd_sent = c->fwd_cnt;
    tx_send(id, VS_HDR);
    return 1;
}

static uint32_t peer_credit(const struct vs_conn *c)
{
    uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static void flush_conn(struct vs_conn *c)
{
    if ((c->ctrl & CTRL_REQUEST) && send_ctrl(c, OP_REQUEST, 0))
        c->ctrl &= ~CTRL_REQUEST;
    if ((c->ctrl & CTRL_RESPONSE) && send_ctrl(c, OP_RESPONSE, 0))
        c->ctrl &= ~CTRL_RESPONSE;
    if (c->state != VS_OPEN)
        return;
    while (c->tx_head != c->tx_tail && tx_nfree) {
        uint32_t credit = peer_credit(c);
        if (!credit) {
            /* The host updates credit on its own as it forwards; ask once anyway. */
            if (!credit_requested[c->id] && send_ctrl(c, OP_CREDIT_REQUEST, 0))
                credit_requested[c->id] = 1;
            break;
        }
        credit_requested[c->id] = 0;
        uint32_t n = MG_MIN((uint32_t)(c->tx_head - c->tx_tail), MG_MIN(credit, VS_TX_SLOT - VS_HDR));
        uint16_t id = tx_free[--tx_nfree];
        uint8_t *p = tx_slot(id);
        uint32_t pos = (uint32_t)c->tx_tail & (c->tx_cap - 1);
        uint32_t first = MG_MIN(n, c->tx_cap - pos);
        ag_copy(p + VS_HDR, c->tx + pos, first);
        ag_copy(p + VS_HDR + first, c->tx, n - first);
        fill_hdr(p, c->local_port, c->peer_port, OP_RW, 0, n, c);
        c->last_fwd_sent = c->fwd_cnt;
        c->tx_tail += n;
        c->tx_cnt += n;
        tx_send(id, VS_HDR + n);
    }
    /*
     * Credit back to the host: when it asked, or when what it believes we hold
     * unread is over half our buffer and we have consumed since we last said.
     * Request/response traffic piggybacks fwd_cnt on the answers instead.
     */
    uint32_t host_thinks_unread = c->rx_cnt - c->last_fwd_sent;
    if ((c->ctrl & CTRL_CREDIT_UPDATE) ||
        (c->fwd_cnt != c->last_fwd_sent && host_thinks_unread > c->rx_cap / 2)) {
        if (send_ctrl(c, OP_CREDIT_UPDATE, 0))
            c->ctrl &= ~CTRL_CREDIT_UPDATE;
    }
    if (c->close_when_drained && c->tx_head == c->tx_tail && send_ctrl(c, OP_SHUTDOWN, SHUTDOWN_BOTH))
        c->state = VS_CLOSING; /* the host answers with RST, which frees it */
}

void vsock_flush(void)
{
    tx_reclaim();
    while (nstrays && tx_nfree) {
        nstrays--;
        uint16_t id = tx_free[--tx_nfree];
        fill_hdr(tx_slot(id), strays[nstrays].local, strays[nstrays].peer, OP_RST, 0, 0, 0);
        tx_send(id, VS_HDR);
    }
    for (uint32_t i = 0; i < VS_MAX_CONNS; i++)
        if (vs_conns[i].state != VS_FREE)
            flush_conn(&vs_conns[i]);
    if (tx_pushed) {
        tx_pushed = 0;
        vq_kick(&txq);
    }
}

/* tx completions only matter (and only interrupt) while we are short of tx slots. */
void vsock_irq(int enable)
{
    vq_irq(&rxq, enable);
    vq_irq(&evq, enable);
    vq_irq(&txq, enable && tx_nfree < VS_TXQ / 2);
}

int vsock_pending(void) { return vq_has_used(&rxq) || vq_has_used(&evq) || vq_has_used(&txq); }
