/*
 * virtio-blk driver, at CPL3 (virtio 1.2 section 5.2): one request queue,
 * BLK_SLOTS requests in flight, each a fixed chain of three descriptors
 * (header, data, status byte) over its own bounce buffer. A task takes a slot
 * (blk_begin), runs requests on it (blk_run sleeps until the device answers)
 * and gives it back (blk_end); the completion is found by
 * blk_poll() in the main loop (after the device's interrupt, or while busy).
 */
#include "agent.h"

#define BLK_SLOTS 4u
#define BLK_QSIZE 16u /* >= 3 descriptors per slot */
#define F_RO 5u
#define F_FLUSH 9u

struct blk_slot {
    int busy, done;
    uint8_t *hdr; /* 16-byte request header, then the status byte at +16 */
    uint8_t *data;
};

static struct virtio_dev dev;
static struct vq q;
static struct blk_slot slots[BLK_SLOTS];
static uint64_t capacity;
static int present;

int blk_init(const struct sm_boot_device *bd, uint32_t irq_index)
{
    if (virtio_init(&dev, bd->mmio_base, SM_DEV_VIRTIO_BLK, 1u << F_RO | 1u << F_FLUSH,
                    irq_index) < 0 ||
        virtio_setup_queue(&dev, &q, 0, BLK_QSIZE) < 0)
        return -1;
    capacity = virtio_config32(&dev, 0) | (uint64_t)virtio_config32(&dev, 4) << 32;
    uint8_t *hdrs = ag_alloc(BLK_SLOTS * 32u);
    for (uint32_t i = 0; i < BLK_SLOTS; i++) {
        slots[i].hdr = hdrs + 32u * i;
        slots[i].data = ag_alloc(BLK_CHUNK);
    }
    virtio_driver_ok(&dev);
    present = 1;
    return 0;
}

int blk_present(void) { return present; }
uint64_t blk_capacity(void) { return capacity; }
int blk_read_only(void) { return (dev.features >> F_RO) & 1; }

/* A free request slot's bounce buffer (BLK_CHUNK bytes), or NULL if the task was killed waiting. */
uint8_t *blk_begin(struct task *t, int *slot)
{
    for (;;) {
        for (uint32_t i = 0; i < BLK_SLOTS; i++) {
            if (!slots[i].busy) {
                slots[i].busy = 1;
                *slot = (int)i;
                return slots[i].data;
            }
        }
        if (t->killed)
            return 0;
        task_yield(t);
    }
}

void blk_end(int slot)
{
    slots[slot].busy = 0;
    ag_progress++;
}

/*
 * One request over the slot's buffer (`len` bytes from its start; 0 for
 * FLUSH); the task sleeps until the device answers. Not killable: the device
 * owns the buffer until then. Returns the status byte.
 */
int blk_run(struct task *t, int slot, uint32_t type, uint64_t sector, uint32_t len)
{
    struct blk_slot *s = &slots[slot];
    s->done = 0;
    st32(s->hdr, type);
    st32(s->hdr + 4, 0);
    st64(s->hdr + 8, sector);
    s->hdr[16] = 0xff; /* the device overwrites it */
    uint16_t d0 = (uint16_t)(3 * slot);
    uint16_t dir = type == BLK_T_IN || type == BLK_T_GET_ID ? VQ_DESC_F_WRITE : 0;
    q.desc[d0] = (struct vq_desc){(uint64_t)s->hdr, 16, VQ_DESC_F_NEXT, (uint16_t)(d0 + 1)};
    if (len)
        q.desc[d0 + 1] = (struct vq_desc){(uint64_t)s->data, len, (uint16_t)(VQ_DESC_F_NEXT | dir),
                                          (uint16_t)(d0 + 2)};
    else
        q.desc[d0].next = (uint16_t)(d0 + 2);
    q.desc[d0 + 2] = (struct vq_desc){(uint64_t)(s->hdr + 16), 1, VQ_DESC_F_WRITE, 0};
    vq_push(&q, d0);
    vq_kick(&q);
    ag_progress++;
    while (!s->done)
        task_yield(t);
    return s->hdr[16];
}

void blk_poll(void)
{
    if (!present)
        return;
    uint32_t id, len;
    while (vq_pop_used(&q, &id, &len)) {
        if (id % 3 == 0 && id / 3 < BLK_SLOTS)
            slots[id / 3].done = 1;
        ag_progress++;
    }
}

void blk_irq(int enable)
{
    if (present)
        vq_irq(&q, enable);
}

int blk_pending(void) { return present && vq_has_used(&q); }

void blk_check(void)
{
    if (present && virtio_needs_reset(&dev))
        ag_panic(MG_PANIC_AGENT_DEVICE, "virtio-blk needs a reset (driver bug)");
}
