/*
 * virtio-mmio (version 2, modern only) and split virtqueues, driver side, at CPL3.
 *
 * Register accesses are MMIO exits (~26 us each from CPL3), so they are kept
 * to initialisation and kicks; the rings are plain RAM that the VMM reads and
 * writes, and are handled natively. Descriptor ids are not allocated here:
 * each driver ties its buffers to fixed ids (vsock: buffer i is descriptor i).
 * Only VIRTIO_F_VERSION_1 is negotiated at the transport level (no indirect
 * descriptors, no event index); interrupts are suppressed with
 * VIRTQ_AVAIL_F_NO_INTERRUPT while the agent is busy anyway.
 */
#include "agent.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_NEEDS_RESET 64u
#define STATUS_FAILED 128u

#define MMIO_MAGIC 0x74726976u /* "virt" */
#define F_VERSION_1_HIGH 1u    /* feature bit 32: bit 0 of the high word */

static uint32_t rd(struct virtio_dev *d, uint32_t reg) { return *(volatile uint32_t *)(d->mmio + reg); }
static void wr(struct virtio_dev *d, uint32_t reg, uint32_t v) { *(volatile uint32_t *)(d->mmio + reg) = v; }

int virtio_init(struct virtio_dev *d, uint64_t mmio_base, uint32_t device_id, uint32_t want,
                uint32_t irq_index)
{
    d->mmio = (volatile uint8_t *)mmio_base;
    d->irq_index = irq_index;
    if (rd(d, REG_MAGIC) != MMIO_MAGIC || rd(d, REG_VERSION) != 2 ||
        rd(d, REG_DEVICE_ID) != device_id) {
        ag_printf("microguest: agent: no virtio-mmio v2 device %u at %lx\n", device_id, mmio_base);
        return -1;
    }
    wr(d, REG_STATUS, 0);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(d, REG_DEVICE_FEATURES_SEL, 1);
    if (!(rd(d, REG_DEVICE_FEATURES) & F_VERSION_1_HIGH)) {
        ag_printf("microguest: agent: device %u does not offer VIRTIO_F_VERSION_1\n", device_id);
        wr(d, REG_STATUS, STATUS_FAILED);
        return -1;
    }
    wr(d, REG_DEVICE_FEATURES_SEL, 0);
    uint32_t low = rd(d, REG_DEVICE_FEATURES) & want & 0xffffffu;
    d->features = low;
    wr(d, REG_DRIVER_FEATURES_SEL, 0);
    wr(d, REG_DRIVER_FEATURES, low);
    wr(d, REG_DRIVER_FEATURES_SEL, 1);
    wr(d, REG_DRIVER_FEATURES, F_VERSION_1_HIGH);
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(d, REG_STATUS) & STATUS_FEATURES_OK)) {
        ag_printf("microguest: agent: device %u refused our features\n", device_id);
        wr(d, REG_STATUS, STATUS_FAILED);
        return -1;
    }
    return 0;
}

/* Rings from the bump allocator: zeroed, so avail/used flags and indices start at 0. */
int virtio_setup_queue(struct virtio_dev *d, struct vq *q, uint16_t index, uint16_t size)
{
    wr(d, REG_QUEUE_SEL, index);
    uint32_t max = rd(d, REG_QUEUE_NUM_MAX);
    if (max < size) {
        ag_printf("microguest: agent: queue %u holds %u entries, need %u\n", index, max, size);
        return -1;
    }
    q->index = index;
    q->size = size;
    q->desc = ag_alloc(16u * size);
    q->avail = ag_alloc(6u + 2u * size);
    q->used = ag_alloc(6u + 8u * size);
    q->avail_idx = 0;
    q->last_used = 0;
    q->notify = (volatile uint32_t *)(d->mmio + REG_QUEUE_NOTIFY);
    uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)q->avail, used = (uint64_t)q->used;
    wr(d, REG_QUEUE_NUM, size);
    wr(d, REG_QUEUE_DESC_LOW, (uint32_t)desc);
    wr(d, REG_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    wr(d, REG_QUEUE_DRIVER_LOW, (uint32_t)avail);
    wr(d, REG_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    wr(d, REG_QUEUE_DEVICE_LOW, (uint32_t)used);
    wr(d, REG_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    wr(d, REG_QUEUE_READY, 1);
    q->avail[0] = VQ_AVAIL_F_NO_INTERRUPT; /* the main loop enables interrupts before it idles */
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

uint32_t virtio_config32(struct virtio_dev *d, uint32_t offset) { return rd(d, REG_CONFIG + offset); }

/*
 * Did this device's interrupt (the last wake-up brought nothing to do, agent.c)
 * report DEVICE_NEEDS_RESET? One Status read, an exit, only if it interrupted.
 */
int virtio_needs_reset(struct virtio_dev *d)
{
    if (!mg_irq_seen[d->irq_index])
        return 0;
    return (rd(d, REG_STATUS) & STATUS_NEEDS_RESET) != 0;
}

/* x86 keeps stores in order: a compiler barrier publishes the entry before the index. */
void vq_push(struct vq *q, uint16_t head)
{
    q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
    MG_BARRIER();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
}

int vq_pop_used(struct vq *q, uint32_t *id, uint32_t *len)
{
    if (q->last_used == q->used[1])
        return 0;
    MG_BARRIER(); /* loads are not reordered with older loads on x86 */
    const volatile struct vq_used_elem *e =
        (const volatile struct vq_used_elem *)((const volatile uint8_t *)q->used + 4) +
        (q->last_used & (q->size - 1));
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

/*
 * Enabling is a store followed by the caller's check of the used rings: the
 * mfence keeps the device from adding a used entry after our check but
 * before it could see the flag cleared (store-load order is the one x86
 * reorders).
 */
void vq_irq(struct vq *q, int enable)
{
    q->avail[0] = enable ? 0 : VQ_AVAIL_F_NO_INTERRUPT;
    if (enable)
        __asm__ volatile("mfence" ::: "memory");
}
