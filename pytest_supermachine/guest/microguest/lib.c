/*
 * Console (COM1), control port, and the few libc functions gcc may emit calls
 * to even in freestanding code (struct copies, zeroing loops).
 */
#include "microguest.h"

#define COM1 0x3f8

/* One lock for the console so lines of different CPUs do not interleave. */
static volatile uint32_t console_lock;

static void lock_console(void)
{
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&console_lock, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static void unlock_console(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

/*
 * THR is written without polling LSR: the VMM's 16550 transmits at once, and
 * every poll would be one more emulated instruction and one more exit (~9 µs).
 */
static void con_putc(char c) { mg_outb(COM1, (uint8_t)c); }

/*
 * One formatter for the console (CPL0, one `out` per character) and for
 * buffers (any CPL: the agent formats at CPL3 and prints through a syscall).
 */
struct sink {
    void (*put)(struct sink *, char);
    char *buf;
    size_t size, len;
};

static void sink_console(struct sink *s, char c)
{
    (void)s;
    con_putc(c);
}

static void sink_buffer(struct sink *s, char c)
{
    if (s->len + 1 < s->size)
        s->buf[s->len] = c;
    s->len++;
}

static void put_str(struct sink *s, const char *str)
{
    while (*str)
        s->put(s, *str++);
}

static void put_unsigned(struct sink *s, uint64_t v, unsigned base, int prefix)
{
    char buf[24];
    int i = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (prefix)
        put_str(s, "0x");
    while (i)
        s->put(s, buf[--i]);
}

/*
 * A tiny printf: %s, %c, %u/%x/%d (int), %lu/%lx/%ld (64-bit); %x and %lx
 * print a 0x prefix so every address in the log reads the same way.
 */
static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            s->put(s, *fmt);
            continue;
        }
        int is_long = 0;
        if (*++fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            put_str(s, va_arg(ap, const char *));
            break;
        case 'c':
            s->put(s, (char)va_arg(ap, int));
            break;
        case 'u':
            put_unsigned(s, is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0);
            break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) {
                s->put(s, '-');
                put_unsigned(s, -(uint64_t)v, 10, 0);
            } else {
                put_unsigned(s, (uint64_t)v, 10, 0);
            }
            break;
        }
        case 'x':
            put_unsigned(s, is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 1);
            break;
        case '\0':
            return;
        default:
            s->put(s, '%');
            s->put(s, *fmt);
        }
    }
}

void mg_vprintf(const char *fmt, va_list ap)
{
    struct sink s = {sink_console, 0, 0, 0};
    format(&s, fmt, ap);
}

/* Like vsnprintf: always NUL-terminates (size > 0), returns the untruncated length. */
size_t mg_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = {sink_buffer, buf, size, 0};
    format(&s, fmt, ap);
    if (size)
        buf[s.len < size ? s.len : size - 1] = '\0';
    return s.len;
}

size_t mg_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t n = mg_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

void mg_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lock_console();
    mg_vprintf(fmt, ap);
    unlock_console();
    va_end(ap);
}

void mg_printf_nolock(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mg_vprintf(fmt, ap);
    va_end(ap);
}

void mg_control(uint32_t cmd, uint32_t arg) { mg_outl(SM_CONTROL_PORT, (arg << 8) | (cmd & 0xff)); }

void mg_halt_forever(void)
{
    /* With the in-kernel irqchip HLT does not exit; the VMM stops us by the control port. */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void mg_poweroff(uint32_t status)
{
    mg_control(SM_CTL_POWEROFF, status);
    mg_halt_forever();
}

void mg_panic(uint32_t code)
{
    mg_control(SM_CTL_PANIC, code);
    mg_halt_forever();
}

void *memcpy(void *dst, const void *src, size_t n)
{
    char *d = dst;
    const char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    char *d = dst;
    const char *s = src;
    if (d < s)
        while (n--)
            *d++ = *s++;
    else
        while (n--)
            d[n] = s[n];
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    char *d = dst;
    while (n--)
        *d++ = (char)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}
