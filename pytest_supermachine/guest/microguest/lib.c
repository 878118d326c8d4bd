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

static void con_puts(const char *s)
{
    while (*s)
        con_putc(*s++);
}

static void put_unsigned(uint64_t v, unsigned base, int prefix)
{
    char buf[24];
    int i = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (prefix)
        con_puts("0x");
    while (i)
        con_putc(buf[--i]);
}

/*
 * A tiny printf: %s, %c, %u/%x (unsigned int), %lu/%lx (uint64_t); %x and %lx
 * print a 0x prefix so every address in the log reads the same way.
 */
void mg_vprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            con_putc(*fmt);
            continue;
        }
        int is_long = 0;
        if (*++fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            con_puts(va_arg(ap, const char *));
            break;
        case 'c':
            con_putc((char)va_arg(ap, int));
            break;
        case 'u':
            put_unsigned(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0);
            break;
        case 'x':
            put_unsigned(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 1);
            break;
        case '\0':
            return;
        default:
            con_putc('%');
            con_putc(*fmt);
        }
    }
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
