/*
 * A cooperative scheduler at CPL3: each agent request (EXEC, GET_FILE) runs
 * as a task on its own stack and gives the CPU back with task_yield()
 * whenever it has to wait (output room, stdin, a timer, a disk request).
 *
 * Waiting is polling: the main loop resumes every live task once per pass
 * and a task re-checks its own condition. That keeps the wake-up logic in
 * one place (the waiting code) and costs a few dozen native instructions
 * per task per pass; a pass only happens when something arrived or a timer
 * is due, because an idle guest halts (MG_SYS_WAIT) until an interrupt.
 */
#include "agent.h"

#define STACK_CANARY 0x6b636174735f676dull /* "mg_stack" */

static struct task tasks[TASK_MAX];
static uint64_t sched_sp;

void task_init(void)
{
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        tasks[i].stack = ag_alloc(TASK_STACK);
        tasks[i].args = ag_alloc(TASK_ARGS);
        *(uint64_t *)tasks[i].stack = STACK_CANARY;
    }
}

struct task *task_new(struct vs_conn *c, uint32_t rid, task_fn fn)
{
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        struct task *t = &tasks[i];
        if (t->used)
            continue;
        uint8_t *stack = t->stack, *args = t->args;
        ag_zero(t, sizeof(*t));
        t->stack = stack;
        t->args = args;
        t->used = 1;
        t->fn = fn;
        t->conn = c;
        t->conn_gen = c->gen;
        t->rid = rid;
        t->file = -1;
        t->start_tsc = ag_rdtsc();
        return t;
    }
    return 0;
}

static void task_main(struct task *t)
{
    int status = t->fn(t);
    agent_task_exit(t, status);
    t->finished = 1;
    mg_ctx_switch(&t->sp, sched_sp);
    __builtin_unreachable();
}

/*
 * The first switch to a task pops six callee-saved registers and "returns"
 * to mg_ctx_start with r12 = t and r13 = task_main, on a 16-byte aligned
 * stack (so task_main is entered as if called).
 */
void task_start(struct task *t)
{
    uint64_t top = ((uint64_t)t->stack + TASK_STACK - 16) & ~15ull;
    uint64_t *sp = (uint64_t *)(top - 56);
    sp[0] = 0;                       /* r15 */
    sp[1] = 0;                       /* r14 */
    sp[2] = (uint64_t)task_main;     /* r13 */
    sp[3] = (uint64_t)t;             /* r12 */
    sp[4] = 0;                       /* rbx */
    sp[5] = 0;                       /* rbp */
    sp[6] = (uint64_t)mg_ctx_start;  /* return address */
    t->sp = (uint64_t)sp;
    ag_progress++;
}

struct task *task_find(struct vs_conn *c, uint32_t rid)
{
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        struct task *t = &tasks[i];
        if (t->used && !t->finished && t->conn == c && t->conn_gen == c->gen && t->rid == rid)
            return t;
    }
    return 0;
}

int task_count(struct vs_conn *c)
{
    int n = 0;
    for (uint32_t i = 0; i < TASK_MAX; i++)
        n += tasks[i].used && !tasks[i].finished && tasks[i].conn == c &&
             tasks[i].conn_gen == c->gen;
    return n;
}

/* Its connection is the one it was started on and still takes frames (not closing). */
int task_alive(struct task *t)
{
    struct vs_conn *c = t->conn;
    return c->gen == t->conn_gen && c->state == VS_OPEN && !c->close_when_drained;
}

void task_yield(struct task *t) { mg_ctx_switch(&t->sp, sched_sp); }

/* Orphans: tasks of a connection that is going away are killed (their output is dropped). */
void task_kill_conn(struct vs_conn *c)
{
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        struct task *t = &tasks[i];
        if (t->used && t->conn == c && t->conn_gen == c->gen && !t->killed) {
            t->killed = 1;
            t->kill_signal = 9;
        }
    }
}

void sched_run(void)
{
    uint64_t now = ag_rdtsc();
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        struct task *t = &tasks[i];
        if (!t->used)
            continue;
        if (t->deadline_tsc && now >= t->deadline_tsc && !t->killed) {
            t->killed = 1;
            t->kill_signal = 9; /* SIGKILL, as the Linux agent does on a timeout */
            t->timed_out = 1;
            ag_progress++;
        }
        mg_ctx_switch(&sched_sp, t->sp);
        if (*(uint64_t *)t->stack != STACK_CANARY)
            ag_panic(MG_PANIC_AGENT_STACK, "an agent task overflowed its stack");
        if (t->finished) {
            t->used = 0;
            agent_task_done(t);
            ag_progress++;
        }
    }
}

/* The earliest TSC at which a task wants to run again (0: none), for MG_SYS_WAIT. */
uint64_t sched_next_deadline(void)
{
    uint64_t next = 0;
    for (uint32_t i = 0; i < TASK_MAX; i++) {
        struct task *t = &tasks[i];
        if (!t->used)
            continue;
        if (t->wake_tsc && (!next || t->wake_tsc < next))
            next = t->wake_tsc;
        if (t->deadline_tsc && !t->killed && (!next || t->deadline_tsc < next))
            next = t->deadline_tsc;
    }
    return next;
}

int task_sleep_until(struct task *t, uint64_t tsc)
{
    t->wake_tsc = tsc;
    while (ag_rdtsc() < tsc) {
        if (t->killed || !task_alive(t)) {
            t->wake_tsc = 0;
            return -1;
        }
        task_yield(t);
    }
    t->wake_tsc = 0;
    return 0;
}
