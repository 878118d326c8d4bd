/*
 * SEED (docs/agent-protocol.md §4): the per-test seed and wall clock the host
 * gives the guest before a test's first command.
 *
 * - The seed is added to the kernel's input pool (RNDADDENTROPY on
 *   /dev/urandom, crediting no entropy); with SEED_RESEED the CRNG is also
 *   reseeded from that pool (RNDRESEEDCRNG). That makes two tests' random
 *   state differ, but not reproducible: Linux 6.1's reseed hashes the pool
 *   with RDSEED, RDRAND or, hidden as they are under PVM, the TSC (see
 *   extract_entropy in drivers/char/random.c), and the pool has interrupt
 *   timings in it. So for replay the host sets the CRNG key itself, in guest
 *   RAM before the guest runs (images/kernel_rng.py), and sends no RESEED.
 * - The wall clock becomes `wall_ns` (clock_settime), so a test sees the time
 *   of its handout, and a replay the time of the failing run's handout.
 * - busybox ash seeds $RANDOM from its pid and the monotonic clock in
 *   microseconds, which no replay can repeat; it takes a RANDOM=N in its
 *   environment as the seed instead. So each later command gets RANDOM=<the
 *   next number of the seed's splitmix64 sequence> in its base environment
 *   (a RANDOM in the request's env wins), the same numbers in the same order
 *   on every replay.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

static int seeded;
static uint64_t rng_state;

static int add_entropy(const struct ag_seed *s)
{
    union {
        struct rand_pool_info info;
        uint8_t bytes[sizeof(struct rand_pool_info) + AG_MAX_SEED];
    } req;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    req.info.entropy_count = 0; /* mixed in, never credited: it is no secret */
    req.info.buf_size = (int)s->seed_len;
    memcpy(req.bytes + sizeof(struct rand_pool_info), s->seed, s->seed_len);
    int err = 0;
    if (ioctl(fd, RNDADDENTROPY, &req) < 0)
        err = errno;
    else if ((s->flags & SEED_RESEED) && ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA)
        err = errno; /* ENODATA: the CRNG is not ready yet, and will seed from the pool */
    close(fd);
    return err;
}

int seed_apply(const struct ag_seed *s)
{
    int err = add_entropy(s);
    if (err)
        return err;
    if (s->wall_ns) {
        struct timespec ts = {(time_t)(s->wall_ns / 1000000000u), (long)(s->wall_ns % 1000000000u)};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0)
            return errno;
    }
    rng_state = ag_seed_state(s->seed, s->seed_len);
    seeded = 1;
    return 0;
}

void seed_before_exec(void)
{
    if (!seeded)
        return;
    char value[24];
    /* ash: a RANDOM of 0 means 1; 1..2^31-1 keeps it a positive int everywhere */
    snprintf(value, sizeof(value), "%" PRIu64, (ag_splitmix64(&rng_state) & 0x7fffffffu) | 1u);
    setenv("RANDOM", value, 1);
}
