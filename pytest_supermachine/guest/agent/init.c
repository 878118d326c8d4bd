/*
 * init: what PID 1 does before it serves the agent protocol.
 *
 * The agent binary is /init of the initramfs, so the kernel starts it as PID 1
 * and it never execs anything to boot: every busybox command an init script
 * would run costs a fork+exec, ~0.7 s each under nested PVM, while the same
 * work as system calls here costs microseconds. Being PID 1, the agent reaps
 * every orphan (waitpid(-1) on SIGCHLD) and never exits.
 *
 * Steps (a failure is logged to the console and the boot goes on: a half-set-up
 * guest that answers is far easier to debug than a kernel panic):
 *   1. mount devtmpfs /dev, proc /proc, sysfs /sys, tmpfs /tmp (1777) and /run,
 *      tmpfs /dev/shm (1777); /dev/fd, /dev/std{in,out,err} symlinks;
 *   2. hostname (sm.hostname=, default "supermachine"), loopback up; the
 *      kernel's random pool seeded and credited from sm.entropy=HEX (random
 *      bytes the host puts on the command line of each boot; see seed_entropy);
 *      free page reporting's chunk order from sm.page_reporting_order=N (the
 *      VMM's choice for this RAM size; see set_page_reporting_order);
 *   3. with sm.root=DEV: mount DEV read-only (sm.rootfstype=, default ext4) as
 *      the lower layer of an overlay whose upper layer is a tmpfs, or, with
 *      sm.overlay=0, DEV read-write by itself (sm.overlay_mib=N caps the tmpfs
 *      upper layer at N MiB: a full upper layer is ENOSPC in the guest); move /dev
 *      /proc /sys /run into it, and /tmp too without an overlay (with one, /tmp is the
 *      root's own, in the writable layer, as in a container, so the cap covers it),
 *      bind the initramfs /bin (busybox) at /.supermachine/bin, and
 *      switch root into it (mount --move + chroot, what busybox switch_root
 *      does; the initramfs files stay, ~3 MB, because that bind uses them);
 *   4. with sm.mounts=TAG:MODE:PATH[,...] (the VMM's virtio-fs mounts, vmm/fsmounts.py):
 *      mkdir -p PATH in the (switched) root and mount virtiofs TAG there, read-only
 *      (MS_RDONLY: writes fail with EROFS) unless MODE is rw; MODE ro+dax mounts
 *      with dax=always (file pages mapped from the device's DAX window);
 *   5. PATH (ending in /.supermachine/bin after a switch), HOME=/root; cwd /.
 *
 * The commands the agent runs then see the switched root. EXEC_SHELL uses
 * /bin/sh there, or /.supermachine/bin/sh when the root has none (distroless
 * images).
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define NEWROOT "/sysroot"
#define LOWER "/.sm-lower"
#define RW "/.sm-rw"
#define TOOLS_DIR "/.supermachine/bin"
#define DEFAULT_HOSTNAME "supermachine"
#define ROOT_WAIT_MS 5000

static char cmdline[4096];

/* The value of `key=` on the kernel command line (first match), or NULL. */
static const char *cmdline_get(const char *key, char *buf, size_t bufsz)
{
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        if (!*p)
            break;
        const char *tok = p;
        int quoted = 0;
        while (*p && (quoted || (*p != ' ' && *p != '\t' && *p != '\n'))) {
            if (*p == '"')
                quoted = !quoted;
            p++;
        }
        if ((size_t)(p - tok) > klen && !strncmp(tok, key, klen) && tok[klen] == '=') {
            const char *v = tok + klen + 1;
            size_t n = 0;
            for (; v < p && n + 1 < bufsz; v++)
                if (*v != '"') /* the kernel's quoting: "a b" is one value */
                    buf[n++] = *v;
            buf[n] = 0;
            return buf;
        }
    }
    return NULL;
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                     const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
        logmsg("init: mount %s on %s (%s): %s", src, dst, type ? type : "-", strerror(errno));
}

static void loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        logmsg("init: no IPv4 socket for lo: %s", strerror(errno));
        return;
    }
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    /* the kernel gives lo 127.0.0.1/8 by itself when it comes up */
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
        (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
        logmsg("init: lo up: %s", strerror(errno));
    close(s);
}

/*
 * The guest has no entropy source of its own here: no virtio-rng, RDRAND hidden
 * from it under PVM, and an idle tickless kernel sees few interrupts. Its crng is
 * then not ready when the base snapshot is taken, and every restored guest's
 * first /dev/urandom read (python3 reads it at startup for its hash seed) runs the
 * kernel's jitter-entropy loop, which under PVM's emulated kernel mode took over a
 * minute. Seeding it with host randomness (crediting the bits, as a boot loader's
 * or virtio-rng's seed is credited) makes it ready at boot. A snapshot carries the
 * crng state like the rest of RAM; reseeding restored guests is the host's call.
 */
static void seed_entropy(const char *hex)
{
    struct {
        int entropy_count, buf_size;
        unsigned char buf[64];
    } seed = {0, 0, {0}};
    size_t n = 0;
    for (; n < sizeof(seed.buf) && hex[2 * n] && hex[2 * n + 1]; n++) {
        char byte[3] = {hex[2 * n], hex[2 * n + 1], 0};
        char *end;
        seed.buf[n] = (unsigned char)strtoul(byte, &end, 16);
        if (*end)
            break;
    }
    seed.buf_size = (int)n;
    seed.entropy_count = (int)n * 8;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (n < 16 || fd < 0 || ioctl(fd, RNDADDENTROPY, &seed) < 0)
        logmsg("init: sm.entropy (%zu bytes): %s", n, n < 16 ? "too short" : strerror(errno));
    if (fd >= 0)
        close(fd);
}

/*
 * sm.page_reporting_order=N: the order (2^N pages) of the free memory chunks the
 * kernel reports to the virtio-balloon. Linux 6.1 reports nothing while a zone
 * has less than its low watermark plus 32 chunks free, and without huge pages
 * its order is 10 (4 MiB chunks, 128 MiB): a 128 MiB guest never reported. The
 * module parameter is the only knob (the balloon driver's registration
 * overwrites a command-line value), so it is written here, before READY; the
 * VMM picks N (vmm/devices/virtio/balloon/device.py, reporting_order).
 */
static void set_page_reporting_order(const char *order)
{
    const char *param = "/sys/module/page_reporting/parameters/page_reporting_order";
    int fd = open(param, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, order, strlen(order)) < 0)
        logmsg("init: page reporting order %s: %s", order, strerror(errno));
    if (fd >= 0)
        close(fd);
}

static int wait_for(const char *path, int ms)
{
    struct stat st;
    for (int waited = 0; stat(path, &st) < 0; waited += 10) {
        if (waited >= ms)
            return -1;
        usleep(10000);
    }
    return 0;
}

static void move_into(const char *mnt)
{
    char dst[256];
    snprintf(dst, sizeof(dst), NEWROOT "%s", mnt);
    mkdir(dst, 0755);
    if (mount(mnt, dst, NULL, MS_MOVE, NULL) < 0)
        logmsg("init: move %s into the new root: %s", mnt, strerror(errno));
}

/* Step 3. 0 on success; on failure the initramfs stays the root. */
static int switch_root(const char *dev, const char *fstype, int overlay, unsigned long upper_mib)
{
    if (wait_for(dev, ROOT_WAIT_MS) < 0) {
        logmsg("init: root device %s did not appear in %d ms", dev, ROOT_WAIT_MS);
        return -1;
    }
    mkdir(NEWROOT, 0755);
    if (overlay) {
        mkdir(LOWER, 0755);
        if (mount(dev, LOWER, fstype, MS_RDONLY, NULL) < 0) {
            logmsg("init: mount %s (%s, read-only): %s", dev, fstype, strerror(errno));
            return -1;
        }
        char opts[64] = "mode=0755";
        if (upper_mib)
            snprintf(opts, sizeof(opts), "mode=0755,size=%lum", upper_mib);
        do_mount("tmpfs", RW, "tmpfs", MS_NOSUID | MS_NODEV, opts);
        mkdir(RW "/upper", 0755);
        mkdir(RW "/work", 0755);
        if (mount("overlay", NEWROOT, "overlay", 0,
                  "lowerdir=" LOWER ",upperdir=" RW "/upper,workdir=" RW "/work") < 0) {
            logmsg("init: overlay on %s: %s", NEWROOT, strerror(errno));
            umount(RW);
            umount(LOWER);
            return -1;
        }
    } else if (mount(dev, NEWROOT, fstype, 0, NULL) < 0) {
        logmsg("init: mount %s (%s): %s", dev, fstype, strerror(errno));
        return -1;
    }
    static const char *const moved[] = {"/dev", "/proc", "/sys", "/run"};
    for (size_t i = 0; i < sizeof(moved) / sizeof(moved[0]); i++)
        move_into(moved[i]);
    if (overlay) {
        /* /tmp is the root's own, in the writable layer as in a container: what is written
         * there counts against sm.overlay_mib (a tmpfs of its own would be a second, unbounded
         * budget of half the RAM). A root without one (distroless) gets it, 1777. */
        if (umount2("/tmp", MNT_DETACH) < 0)
            logmsg("init: unmount the initramfs /tmp: %s", strerror(errno));
        if (mkdir(NEWROOT "/tmp", 01777) == 0)
            chmod(NEWROOT "/tmp", 01777); /* mkdir's mode is masked by the umask */
        else if (errno != EEXIST)
            logmsg("init: mkdir /tmp in the new root: %s", strerror(errno));
    } else {
        move_into("/tmp");
    }
    /* busybox for the agent's shell fallback and for debugging: a bind, not a copy */
    if (mkdir(NEWROOT "/.supermachine", 0755) == 0 || errno == EEXIST) {
        mkdir(NEWROOT TOOLS_DIR, 0755);
        if (mount("/bin", NEWROOT TOOLS_DIR, NULL, MS_BIND | MS_RDONLY, NULL) < 0)
            logmsg("init: bind /bin at %s: %s", TOOLS_DIR, strerror(errno));
    }
    if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0) {
        logmsg("init: switching root to %s: %s", dev, strerror(errno));
        return -1; /* half-switched is not recoverable in general; keep serving */
    }
    logmsg("init: root is %s (%s%s)", dev, fstype, overlay ? ", read-only + tmpfs overlay" : "");
    return 0;
}

/* mkdir -p: every missing directory of `path` (absolute), 0755. */
static void mkdirs(const char *path)
{
    char buf[512];
    size_t n = strlen(path);
    if (n >= sizeof(buf))
        return;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(buf, 0755);
            *p = '/';
        }
    mkdir(buf, 0755);
}

/* Step 4: each TAG:MODE:PATH entry of sm.mounts, in order (the VMM sorts parents first). */
static void mount_virtiofs(void)
{
    static char spec[4096];
    if (!cmdline_get("sm.mounts", spec, sizeof(spec)) || !*spec)
        return;
    char *save = NULL;
    for (char *entry = strtok_r(spec, ",", &save); entry; entry = strtok_r(NULL, ",", &save)) {
        char *mode = strchr(entry, ':');
        char *path = mode ? strchr(mode + 1, ':') : NULL;
        if (!path || path[1] != '/') {
            logmsg("init: sm.mounts entry %s is not TAG:MODE:PATH", entry);
            continue;
        }
        *mode++ = 0;
        *path++ = 0;
        unsigned long flags = MS_NOSUID | MS_NODEV | (strncmp(mode, "rw", 2) ? MS_RDONLY : 0);
        const char *data = strstr(mode, "+dax") ? "dax=always" : NULL;
        mkdirs(path);
        if (mount(entry, path, "virtiofs", flags, data) < 0)
            logmsg("init: mount virtiofs %s on %s (%s): %s", entry, path, mode, strerror(errno));
    }
}

void init_system(const char *cmdline_override, struct init_result *out)
{
    /* 1. the usual mounts; /dev first so later failures can be diagnosed with it */
    do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    do_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    do_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    do_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");

    if (cmdline_override) {
        snprintf(cmdline, sizeof(cmdline), "%s", cmdline_override);
    } else {
        int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof(cmdline) - 1) : -1;
        cmdline[n > 0 ? n : 0] = 0;
        if (fd >= 0)
            close(fd);
    }

    /* 2. identity and loopback */
    char buf[256], fstype[32], dev[256];
    const char *host = cmdline_get("sm.hostname", buf, sizeof(buf));
    if (!host || !*host)
        host = DEFAULT_HOSTNAME;
    if (sethostname(host, strlen(host)) < 0)
        logmsg("init: hostname %s: %s", host, strerror(errno));
    loopback_up();
    char hex[129];
    if (cmdline_get("sm.entropy", hex, sizeof(hex)))
        seed_entropy(hex);
    if (cmdline_get("sm.page_reporting_order", buf, sizeof(buf)) && *buf)
        set_page_reporting_order(buf);

    /* 3. the optional root disk */
    if (cmdline_get("sm.root", dev, sizeof(dev)) && *dev) {
        const char *fs = cmdline_get("sm.rootfstype", fstype, sizeof(fstype));
        const char *ov = cmdline_get("sm.overlay", buf, sizeof(buf));
        int overlay = !(ov && (!strcmp(ov, "0") || !strcmp(ov, "no") || !strcmp(ov, "off")));
        const char *mib = cmdline_get("sm.overlay_mib", buf, sizeof(buf));
        switch_root(dev, fs && *fs ? fs : "ext4", overlay, mib ? strtoul(mib, NULL, 10) : 0);
    }

    /* 4. host directories (virtio-fs) */
    mount_virtiofs();

    /* 5. environment for the commands */
    /* the busybox tools come last: a root's own programs win, a distroless root has some */
    setenv("PATH",
           access(TOOLS_DIR "/busybox", X_OK) == 0
               ? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" TOOLS_DIR
               : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           1);
    setenv("HOME", "/root", 1);
    if (chdir("/") < 0)
        logmsg("init: chdir /: %s", strerror(errno));
    if (access("/bin/sh", X_OK) < 0 && access(TOOLS_DIR "/sh", X_OK) == 0)
        out->shell = TOOLS_DIR "/sh";
}

/*
 * sm.debug_shell=1: a busybox shell on the console next to the agent, for a
 * human at the serial port. It has no controlling terminal (the kernel makes
 * none for /dev/console), so no job control; good enough to look around.
 */
void init_debug_shell(void)
{
    char buf[16];
    const char *v = cmdline_get("sm.debug_shell", buf, sizeof(buf));
    if (!v || strcmp(v, "1") != 0)
        return;
    posix_spawnattr_t attr;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    char *argv[] = {(char *)opt_shell, NULL};
    extern char **environ;
    pid_t pid;
    int err = posix_spawn(&pid, opt_shell, NULL, &attr, argv, environ);
    if (err)
        logmsg("init: debug shell %s: %s", opt_shell, strerror(err));
    posix_spawnattr_destroy(&attr);
}
