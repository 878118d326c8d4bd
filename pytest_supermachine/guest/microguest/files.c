/*
 * The RAM file store behind PUT_FILE/GET_FILE and the `write`/`cat` built-ins:
 * a flat table of FS_MAX_FILES paths (no directories: a path is just bytes),
 * each at most FS_MAX_SIZE bytes, their data in page runs of a heap that a
 * bitmap allocates first-fit. Files grow by doubling (in place when the next
 * pages are free). Beyond any limit the answer is ENOSPC, never a crash. The
 * store lives in guest RAM, so snapshots capture it and reset rolls it back.
 */
#include "agent.h"

#define PAGE 4096u

struct mfile {
    int used;
    uint32_t mode, plen;
    uint8_t path[FS_MAX_PATH];
    uint8_t *data;
    uint64_t size, cap; /* cap: bytes of pages owned */
};

static struct mfile files[FS_MAX_FILES];
static uint8_t *heap;
static uint64_t heap_pages, free_pages;
static uint64_t *bitmap; /* 1 = page in use */

void fs_init(uint64_t base, uint64_t bytes)
{
    heap_pages = bytes / PAGE;
    bitmap = ag_alloc((heap_pages + 63) / 64 * 8);
    heap = (uint8_t *)base;
    free_pages = heap_pages;
}

static int page_used(uint64_t p) { return (bitmap[p / 64] >> (p % 64)) & 1; }

static void mark(uint64_t first, uint64_t n, int used)
{
    for (uint64_t p = first; p < first + n; p++) {
        if (used)
            bitmap[p / 64] |= 1ull << (p % 64);
        else
            bitmap[p / 64] &= ~(1ull << (p % 64));
    }
    free_pages = used ? free_pages - n : free_pages + n;
}

/* First fit; the whole heap is a few thousand pages, scanned natively. */
static uint8_t *pages_alloc(uint64_t n)
{
    uint64_t run = 0;
    for (uint64_t p = 0; p < heap_pages; p++) {
        if (!(p % 64) && bitmap[p / 64] == ~0ull && p + 64 <= heap_pages) {
            run = 0;
            p += 63;
            continue;
        }
        run = page_used(p) ? 0 : run + 1;
        if (run == n) {
            mark(p + 1 - n, n, 1);
            return heap + (p + 1 - n) * PAGE;
        }
    }
    return 0;
}

static void pages_free(uint8_t *data, uint64_t bytes)
{
    if (data && bytes)
        mark((uint64_t)(data - heap) / PAGE, bytes / PAGE, 0);
}

/* Grow in place if the pages right after are free. */
static int pages_extend(uint8_t *data, uint64_t old_bytes, uint64_t new_bytes)
{
    uint64_t first = (uint64_t)(data - heap) / PAGE + old_bytes / PAGE;
    uint64_t n = (new_bytes - old_bytes) / PAGE;
    if (first + n > heap_pages)
        return 0;
    for (uint64_t p = first; p < first + n; p++)
        if (page_used(p))
            return 0;
    mark(first, n, 1);
    return 1;
}

int fs_lookup(const uint8_t *path, uint32_t plen)
{
    for (int i = 0; i < FS_MAX_FILES; i++)
        if (files[i].used && files[i].plen == plen && !memcmp(files[i].path, path, plen))
            return i;
    return -1;
}

int fs_open(const uint8_t *path, uint32_t plen, uint32_t mode, int truncate)
{
    if (plen > FS_MAX_PATH)
        return -E_NAMETOOLONG;
    int f = fs_lookup(path, plen);
    if (f >= 0) {
        if (truncate)
            files[f].size = 0; /* keep the pages: the usual rewrite is about as big */
        return f;
    }
    for (int i = 0; i < FS_MAX_FILES; i++) {
        struct mfile *m = &files[i];
        if (m->used)
            continue;
        m->used = 1;
        m->mode = mode;
        m->plen = plen;
        ag_copy(m->path, path, plen);
        m->data = 0;
        m->size = m->cap = 0;
        return i;
    }
    return -E_NOSPC;
}

int fs_append(int f, const void *data, uint32_t n)
{
    struct mfile *m = &files[f];
    uint64_t need = m->size + n;
    if (need > FS_MAX_SIZE)
        return -E_NOSPC;
    if (need > m->cap) {
        uint64_t cap = MG_MAX(m->cap * 2, (need + PAGE - 1) & ~(uint64_t)(PAGE - 1));
        cap = MG_MIN(cap, (uint64_t)FS_MAX_SIZE);
        if (m->data && pages_extend(m->data, m->cap, cap)) {
            m->cap = cap;
        } else {
            uint8_t *fresh = pages_alloc(cap / PAGE);
            if (!fresh && cap > ((need + PAGE - 1) & ~(uint64_t)(PAGE - 1))) {
                cap = (need + PAGE - 1) & ~(uint64_t)(PAGE - 1); /* no room to double: exact */
                fresh = pages_alloc(cap / PAGE);
            }
            if (!fresh)
                return -E_NOSPC;
            ag_copy(fresh, m->data, m->size);
            pages_free(m->data, m->cap);
            m->data = fresh;
            m->cap = cap;
        }
    }
    ag_copy(m->data + m->size, data, n);
    m->size = need;
    return 0;
}

const uint8_t *fs_data(int f, uint64_t *size)
{
    if (f < 0 || f >= FS_MAX_FILES || !files[f].used) {
        *size = 0;
        return 0;
    }
    *size = files[f].size;
    return files[f].data;
}

uint64_t fs_heap_free(void) { return free_pages * PAGE; }

uint32_t fs_count(void)
{
    uint32_t n = 0;
    for (int i = 0; i < FS_MAX_FILES; i++)
        n += files[i].used != 0;
    return n;
}
