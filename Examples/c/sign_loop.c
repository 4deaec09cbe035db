/*
 * sign_loop: a signing workload for watching a PKCS#11 module under load.
 * Several threads, each with its own session, sign random digests with an EC
 * key and verify each signature, for a given number of seconds.
 *
 *   cc -Wall -Wextra -O2 $(pkg-config --cflags p11-kit-1) -o sign_loop sign_loop.c -ldl -lpthread
 *   ./sign_loop MODULE_PATH TOKEN_LABEL PIN KEY_LABEL SECONDS [THREADS=2]
 *
 * The token must already hold an EC private key and its public key, both
 * labelled KEY_LABEL (for example made with
 * `pkcs11-tool --keypairgen --key-type EC:prime256v1 --label KEY_LABEL`).
 *
 * Every second it prints one line:
 *
 *   t=3s ops=1234 errors=0 served=410,412,412
 *
 * ops and errors count since the start; served is how many operations each
 * member of the group has served, from p11ha's extension function
 * p11ha_member_counters, or "n/a" for a module without it (any other module).
 * A failed call is reported on stderr with its CK_RV and counted; the loop
 * goes on. At the end it prints "sign_loop: N signatures, M errors".
 *
 * Exit status: 0 if there was no error, 1 otherwise, 2 on a usage error.
 */

/* clock_nanosleep, rand_r and friends under a strict -std=c99 too. */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

/* p11ha's extension: operations served per member of a slot's group, in
 * member order. Two-call convention on count, like C_GetSlotList. */
typedef CK_RV (*member_counters_fn)(CK_SLOT_ID slot, CK_ULONG *served, CK_ULONG *count);

static CK_FUNCTION_LIST_PTR p11;
static member_counters_fn member_counters;

static const char *pin;
static const char *key_label;
static CK_SLOT_ID slot;
static struct timespec deadline;   /* CLOCK_MONOTONIC */

/* Totals of every thread: the reporter reads them while the workers run. */
static pthread_mutex_t totals_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long total_signatures;
static unsigned long total_errors;
static char last_error[96];        /* "C_Sign:0x00000030", shown on the next report line */

static void count_signature(void)
{
    pthread_mutex_lock(&totals_lock);
    total_signatures++;
    pthread_mutex_unlock(&totals_lock);
}

/* `what` is "C_Sign:0x00000030" or the like: short, no spaces. */
static void count_error(const char *what)
{
    pthread_mutex_lock(&totals_lock);
    total_errors++;
    snprintf(last_error, sizeof last_error, "%s", what);
    pthread_mutex_unlock(&totals_lock);
}

/* Reports a failed call, counts it, and returns whether the call worked. */
static int ok(int thread, const char *what, CK_RV rv)
{
    if (rv == CKR_OK)
        return 1;
    char error[sizeof last_error];
    fprintf(stderr, "sign_loop (thread %d): %s failed: CK_RV 0x%08lx\n",
            thread, what, (unsigned long)rv);
    snprintf(error, sizeof error, "%s:0x%08lx", what, (unsigned long)rv);
    count_error(error);
    return 0;
}

static int time_is_up(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > deadline.tv_sec
        || (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec);
}

/* After a failure, a short pause: a module that fails every call at once
 * should not flood stderr with millions of lines. */
static void pause_after_error(void)
{
    struct timespec pause = { 0, 10 * 1000 * 1000 };
    nanosleep(&pause, NULL);
}

static void die(const char *what, CK_RV rv)
{
    fprintf(stderr, "sign_loop: %s failed: CK_RV 0x%08lx\n", what, (unsigned long)rv);
    exit(1);
}

static void load_module(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "sign_loop: cannot load %s: %s\n", path, dlerror());
        exit(1);
    }
    CK_C_GetFunctionList get_function_list =
        (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_function_list == NULL) {
        fprintf(stderr, "sign_loop: %s has no C_GetFunctionList\n", path);
        exit(1);
    }
    CK_RV rv = get_function_list(&p11);
    if (rv != CKR_OK)
        die("C_GetFunctionList", rv);
    /* Absent from every module but p11ha: then served is shown as n/a. */
    member_counters = (member_counters_fn)dlsym(handle, "p11ha_member_counters");
}

/* Token labels are fixed 32-byte fields padded with spaces, not C strings. */
static int label_matches(const unsigned char field[32], const char *label)
{
    size_t len = strlen(label);
    if (len > 32 || memcmp(field, label, len) != 0)
        return 0;
    for (size_t i = len; i < 32; i++)
        if (field[i] != ' ')
            return 0;
    return 1;
}

static CK_SLOT_ID find_slot(const char *token_label)
{
    CK_ULONG count = 0;
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, NULL, &count);
    if (rv != CKR_OK)
        die("C_GetSlotList", rv);
    CK_SLOT_ID *slots = calloc(count ? count : 1, sizeof *slots);
    if (slots == NULL)
        die("calloc", CKR_HOST_MEMORY);
    rv = p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK)
        die("C_GetSlotList", rv);
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        rv = p11->C_GetTokenInfo(slots[i], &info);
        if (rv != CKR_OK)
            die("C_GetTokenInfo", rv);
        if (label_matches(info.label, token_label)) {
            CK_SLOT_ID found = slots[i];
            free(slots);
            return found;
        }
    }
    fprintf(stderr, "sign_loop: no token labelled \"%s\" (%lu slots with a token)\n",
            token_label, (unsigned long)count);
    exit(1);
}

/* The one object of this class with the key label, or CK_INVALID_HANDLE. */
static CK_OBJECT_HANDLE find_key(int thread, CK_SESSION_HANDLE session, CK_OBJECT_CLASS class)
{
    CK_KEY_TYPE ec = CKK_EC;
    CK_ATTRIBUTE template[] = {
        { CKA_CLASS, &class, sizeof class },
        { CKA_KEY_TYPE, &ec, sizeof ec },
        { CKA_LABEL, (void *)key_label, strlen(key_label) },
    };
    CK_OBJECT_HANDLE found[2];
    CK_ULONG count = 0;
    const char *kind = class == CKO_PRIVATE_KEY ? "private" : "public";

    if (!ok(thread, "C_FindObjectsInit",
            p11->C_FindObjectsInit(session, template, sizeof template / sizeof template[0])))
        return CK_INVALID_HANDLE;
    CK_RV rv = p11->C_FindObjects(session, found, 2, &count);
    ok(thread, "C_FindObjectsFinal", p11->C_FindObjectsFinal(session));
    if (!ok(thread, "C_FindObjects", rv))
        return CK_INVALID_HANDLE;
    if (count != 1) {
        fprintf(stderr, "sign_loop (thread %d): %lu EC %s keys labelled \"%s\", expected 1\n",
                thread, (unsigned long)count, kind, key_label);
        count_error(class == CKO_PRIVATE_KEY ? "C_FindObjects:no-private-key" : "C_FindObjects:no-public-key");
        return CK_INVALID_HANDLE;
    }
    return found[0];
}

/* A random digest per signature, so that no member can answer from a cache. */
static void random_digest(unsigned int *seed, CK_BYTE digest[32])
{
    for (int i = 0; i < 32; i++)
        digest[i] = (CK_BYTE)rand_r(seed);
}

static void *worker(void *argument)
{
    int thread = (int)(long)argument;
    CK_SESSION_HANDLE session;
    CK_MECHANISM ecdsa = { CKM_ECDSA, NULL, 0 };
    unsigned int seed = (unsigned int)time(NULL) ^ ((unsigned int)getpid() << 8) ^ (unsigned int)thread;

    if (!ok(thread, "C_OpenSession",
            p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session)))
        return NULL;
    /* Login state is per token, shared by the process's sessions: whichever
     * thread logs in first does it for all. */
    CK_RV rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_USER_ALREADY_LOGGED_IN && !ok(thread, "C_Login", rv))
        goto close;

    CK_OBJECT_HANDLE private_key = find_key(thread, session, CKO_PRIVATE_KEY);
    CK_OBJECT_HANDLE public_key = find_key(thread, session, CKO_PUBLIC_KEY);
    if (private_key == CK_INVALID_HANDLE || public_key == CK_INVALID_HANDLE)
        goto close;   /* already counted: no key pair, no workload */

    while (!time_is_up()) {
        CK_BYTE digest[32];
        CK_BYTE signature[132];   /* enough for r || s of P-521 */
        CK_ULONG signature_len = sizeof signature;

        random_digest(&seed, digest);
        if (!ok(thread, "C_SignInit", p11->C_SignInit(session, &ecdsa, private_key))
            || !ok(thread, "C_Sign", p11->C_Sign(session, digest, sizeof digest,
                                                  signature, &signature_len))) {
            pause_after_error();
            continue;
        }
        count_signature();
        if (!ok(thread, "C_VerifyInit", p11->C_VerifyInit(session, &ecdsa, public_key))
            || !ok(thread, "C_Verify", p11->C_Verify(session, digest, sizeof digest,
                                                      signature, signature_len)))
            pause_after_error();
    }

close:
    /* Closing the last session also logs the token out. */
    ok(thread, "C_CloseSession", p11->C_CloseSession(session));
    return NULL;
}

/* "410,412,412" from p11ha_member_counters, or "n/a". */
static void format_served(char *text, size_t size)
{
    CK_ULONG served[32];
    CK_ULONG count = sizeof served / sizeof served[0];
    snprintf(text, size, "n/a");
    if (member_counters == NULL)
        return;
    CK_RV rv = member_counters(slot, served, &count);
    if (rv != CKR_OK) {
        snprintf(text, size, "n/a(CK_RV 0x%08lx)", (unsigned long)rv);
        return;
    }
    size_t used = 0;
    text[0] = '\0';
    for (CK_ULONG i = 0; i < count && used < size; i++)
        used += (size_t)snprintf(text + used, size - used, "%s%lu",
                                 i == 0 ? "" : ",", (unsigned long)served[i]);
}

/* Totals since the start; the last error, if one happened since the previous line. */
static void report(long elapsed)
{
    char served[512];
    char error[sizeof last_error];
    unsigned long signatures, errors;

    format_served(served, sizeof served);
    pthread_mutex_lock(&totals_lock);
    signatures = total_signatures;
    errors = total_errors;
    memcpy(error, last_error, sizeof error);
    last_error[0] = '\0';
    pthread_mutex_unlock(&totals_lock);
    printf("t=%lds ops=%lu errors=%lu served=%s%s%s\n", elapsed, signatures, errors, served,
           error[0] != '\0' ? " last-error=" : "", error);
    fflush(stdout);
}

static long parse_positive(const char *text, const char *what)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text || value < 1 || value > 100000) {
        fprintf(stderr, "sign_loop: %s must be a positive number, got \"%s\"\n", what, text);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: %s MODULE_PATH TOKEN_LABEL PIN KEY_LABEL SECONDS [THREADS=2]\n",
                argv[0]);
        return 2;
    }
    const char *module_path = argv[1];
    const char *token_label = argv[2];
    pin = argv[3];
    key_label = argv[4];
    long seconds = parse_positive(argv[5], "SECONDS");
    long thread_count = argc == 7 ? parse_positive(argv[6], "THREADS") : 2;
    if (thread_count > 256) {
        fprintf(stderr, "sign_loop: at most 256 threads\n");
        return 2;
    }

    load_module(module_path);

    /* The threads share the module: let it use the OS's own locks. */
    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    CK_RV rv = p11->C_Initialize(&init_args);
    if (rv != CKR_OK)
        die("C_Initialize", rv);
    slot = find_slot(token_label);

    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    deadline = start;
    deadline.tv_sec += seconds;

    pthread_t threads[256];
    long started = 0;
    for (; started < thread_count; started++) {
        int error = pthread_create(&threads[started], NULL, worker, (void *)started);
        if (error != 0) {
            fprintf(stderr, "sign_loop: pthread_create: %s\n", strerror(error));
            count_error("pthread_create");
            break;
        }
    }

    /* One line a second until the workers' time is up. */
    for (long elapsed = 1; elapsed <= seconds; elapsed++) {
        struct timespec tick = { start.tv_sec + elapsed, start.tv_nsec };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &tick, NULL) == EINTR)
            ;
        report(elapsed);
    }
    for (long i = 0; i < started; i++)
        pthread_join(threads[i], NULL);

    rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK) {
        fprintf(stderr, "sign_loop: C_Finalize failed: CK_RV 0x%08lx\n", (unsigned long)rv);
        total_errors++;
    }
    printf("sign_loop: %lu signatures, %lu errors\n", total_signatures, total_errors);
    return total_errors == 0 ? 0 : 1;
}
