/*
 * p11bench: throughput and latency of common operations of any PKCS#11 module,
 * with every thread working in its own logged-in session.
 *
 *   cc -Wall -Wextra -O2 $(pkg-config --cflags p11-kit-1) \
 *      -o p11bench p11bench.c -ldl -lpthread
 *   p11bench --module PATH --token LABEL --pin PIN [--threads N[,N...]]   (or the PIN in P11BENCH_PIN)
 *            [--seconds S] [--ops ecdsa,rsa,aes-gcm,sha256,random,getattr,create]
 *
 * For each operation and each thread count it runs the operation for S seconds
 * (default 3) in N threads started together, and prints one line:
 *
 *   RESULT op=ecdsa-p256-sign threads=1 ops_per_s=1234.5 p50_us=800.1 p99_us=950.2
 *
 * Each timed operation is the whole call sequence an application makes for it
 * (for example C_SignInit + C_Sign), since that is what a caller waits for.
 * Keys are session objects generated at start, one set per session, so the
 * token is left as it was found, except by "create" (not run unless asked for), which
 * creates token data objects labelled "p11bench-create" and leaves them: the rate at which
 * the token stores new objects, for comparisons such as a member's resynchronization.
 * Progress goes to stderr, results to stdout.
 * Any failed call ends the run with the call's name and CK_RV, exit status 1.
 */

#include <dlfcn.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

enum op { OP_ECDSA, OP_RSA, OP_AES_GCM, OP_SHA256, OP_RANDOM, OP_GETATTR, OP_CREATE, OP_COUNT };

static const struct {
    const char *option;   /* name in --ops */
    const char *name;     /* name in RESULT lines */
} op_names[OP_COUNT] = {
    [OP_ECDSA]   = { "ecdsa",   "ecdsa-p256-sign" },
    [OP_RSA]     = { "rsa",     "rsa2048-sha256-sign" },
    [OP_AES_GCM] = { "aes-gcm", "aes256-gcm-encrypt-1k" },
    [OP_SHA256]  = { "sha256",  "sha256-digest-1k" },
    [OP_RANDOM]  = { "random",  "random-32" },
    [OP_GETATTR] = { "getattr", "get-attribute-value" },
    [OP_CREATE]  = { "create",  "create-token-data-object" },
};

#define MAX_THREAD_COUNTS 16
#define MAX_THREADS 1024
#define PAYLOAD_SIZE 1024

struct options {
    const char *module;
    const char *token;
    const char *pin;
    int thread_counts[MAX_THREAD_COUNTS];
    int thread_count_count;
    int max_threads;
    double seconds;
    int selected[OP_COUNT];
};

/* One session with its keys, and the measurements of the run it is in. */
struct worker {
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE ec_key, rsa_key, aes_key;
    uint64_t gcm_counter;           /* makes every GCM IV unique under one key */
    uint64_t created;               /* create: objects made by this session, for their values */

    enum op op;                     /* what the current run measures */
    double seconds;
    uint64_t *latencies_ns;
    size_t count, capacity;
    struct timespec started, finished;

    const char *failed_call;        /* set when a call fails */
    CK_RV failed_rv;
    pthread_t thread;
};

static CK_FUNCTION_LIST_PTR p11;
static struct options options;
static struct worker *workers;
static pthread_barrier_t start_line;
static atomic_int stop_everyone;    /* one failed worker ends the run for all */
static CK_BYTE payload[PAYLOAD_SIZE];

static void die(const char *call, CK_RV rv)
{
    fprintf(stderr, "p11bench: %s failed: CK_RV 0x%08lx\n", call, (unsigned long)rv);
    exit(1);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: p11bench --module PATH --token LABEL --pin PIN [--threads N[,N...]]\n"
            "                [--seconds S] [--ops ecdsa,rsa,aes-gcm,sha256,random,getattr,create]\n"
            "  (create, which leaves token data objects, runs only when asked for)\n");
    exit(2);
}

/* ---- time ---- */

static uint64_t ns_between(const struct timespec *a, const struct timespec *b)
{
    return (uint64_t)(b->tv_sec - a->tv_sec) * 1000000000u + (uint64_t)b->tv_nsec
         - (uint64_t)a->tv_nsec;
}

static int timespec_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* ---- command line ---- */

static void parse_thread_counts(char *list)
{
    options.thread_count_count = 0;
    for (char *item = strtok(list, ","); item != NULL; item = strtok(NULL, ",")) {
        int n = atoi(item);
        if (n < 1 || n > MAX_THREADS || options.thread_count_count == MAX_THREAD_COUNTS)
            usage();
        options.thread_counts[options.thread_count_count++] = n;
    }
    if (options.thread_count_count == 0)
        usage();
}

static void parse_ops(char *list)
{
    memset(options.selected, 0, sizeof options.selected);
    for (char *item = strtok(list, ","); item != NULL; item = strtok(NULL, ",")) {
        int known = 0;
        for (int op = 0; op < OP_COUNT; op++)
            if (strcmp(item, op_names[op].option) == 0)
                options.selected[op] = known = 1;
        if (!known) {
            fprintf(stderr, "p11bench: unknown operation \"%s\"\n", item);
            usage();
        }
    }
}

static void parse_options(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "module", required_argument, NULL, 'm' },
        { "token", required_argument, NULL, 't' },
        { "pin", required_argument, NULL, 'p' },
        { "threads", required_argument, NULL, 'n' },
        { "seconds", required_argument, NULL, 's' },
        { "ops", required_argument, NULL, 'o' },
        { NULL, 0, NULL, 0 },
    };
    options.seconds = 3;
    options.thread_counts[0] = 1;
    options.thread_count_count = 1;
    for (int op = 0; op < OP_COUNT; op++)
        options.selected[op] = op != OP_CREATE;

    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'm': options.module = optarg; break;
        case 't': options.token = optarg; break;
        case 'p': options.pin = optarg; break;
        case 'n': parse_thread_counts(optarg); break;
        case 's': options.seconds = atof(optarg); break;
        case 'o': parse_ops(optarg); break;
        default: usage();
        }
    }
    /* The PIN may come from the environment (P11BENCH_PIN), out of other users' sight in ps. */
    if (!options.pin)
        options.pin = getenv("P11BENCH_PIN");
    if (optind != argc || !options.module || !options.token || !options.pin
        || options.seconds <= 0)
        usage();
    options.max_threads = 0;
    for (int i = 0; i < options.thread_count_count; i++)
        if (options.thread_counts[i] > options.max_threads)
            options.max_threads = options.thread_counts[i];
}

/* ---- module, slot, sessions ---- */

static void load_and_initialize(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "p11bench: cannot load %s: %s\n", path, dlerror());
        exit(1);
    }
    CK_C_GetFunctionList get_function_list =
        (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_function_list == NULL) {
        fprintf(stderr, "p11bench: %s has no C_GetFunctionList\n", path);
        exit(1);
    }
    CK_RV rv = get_function_list(&p11);
    if (rv != CKR_OK)
        die("C_GetFunctionList", rv);

    /* The threads call the module concurrently, so it must lock for itself. */
    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    if ((rv = p11->C_Initialize(&init_args)) != CKR_OK)
        die("C_Initialize", rv);
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
    CK_SLOT_ID slots[256];
    CK_ULONG count = sizeof slots / sizeof slots[0];
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK)
        die("C_GetSlotList", rv);
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        if ((rv = p11->C_GetTokenInfo(slots[i], &info)) != CKR_OK)
            die("C_GetTokenInfo", rv);
        if (label_matches(info.label, token_label))
            return slots[i];
    }
    fprintf(stderr, "p11bench: no token labelled \"%s\"\n", token_label);
    exit(1);
}

/* Login is per application, not per session: after the first session logged
 * in, the others may answer CKR_USER_ALREADY_LOGGED_IN, which is fine. */
static void open_sessions(CK_SLOT_ID slot)
{
    for (int i = 0; i < options.max_threads; i++) {
        CK_SESSION_HANDLE *session = &workers[i].session;
        CK_RV rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                      NULL, NULL, session);
        if (rv != CKR_OK)
            die("C_OpenSession", rv);
        rv = p11->C_Login(*session, CKU_USER, (CK_UTF8CHAR_PTR)options.pin,
                          strlen(options.pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
            die("C_Login", rv);
    }
}

/* ---- keys ---- */

static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

static CK_RV generate_ec_key(struct worker *w)
{
    /* DER encoding of the OID prime256v1, i.e. NIST P-256. */
    static CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_ATTRIBUTE public_template[] = {
        { CKA_EC_PARAMS, p256, sizeof p256 },
        { CKA_VERIFY, &yes, sizeof yes },
        { CKA_TOKEN, &no, sizeof no },
    };
    CK_ATTRIBUTE private_template[] = {
        { CKA_SIGN, &yes, sizeof yes },
        { CKA_TOKEN, &no, sizeof no },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
    };
    CK_MECHANISM mechanism = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE public_key;
    return p11->C_GenerateKeyPair(w->session, &mechanism, public_template, 3,
                                  private_template, 4, &public_key, &w->ec_key);
}

static CK_RV generate_rsa_key(struct worker *w)
{
    CK_ULONG bits = 2048;
    CK_BYTE exponent[] = { 0x01, 0x00, 0x01 };
    CK_ATTRIBUTE public_template[] = {
        { CKA_MODULUS_BITS, &bits, sizeof bits },
        { CKA_PUBLIC_EXPONENT, exponent, sizeof exponent },
        { CKA_VERIFY, &yes, sizeof yes },
        { CKA_TOKEN, &no, sizeof no },
    };
    CK_ATTRIBUTE private_template[] = {
        { CKA_SIGN, &yes, sizeof yes },
        { CKA_TOKEN, &no, sizeof no },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
    };
    CK_MECHANISM mechanism = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE public_key;
    return p11->C_GenerateKeyPair(w->session, &mechanism, public_template, 4,
                                  private_template, 4, &public_key, &w->rsa_key);
}

static CK_RV generate_aes_key(struct worker *w)
{
    CK_OBJECT_CLASS class = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG length = 32;
    CK_ATTRIBUTE template[] = {
        { CKA_CLASS, &class, sizeof class },
        { CKA_KEY_TYPE, &type, sizeof type },
        { CKA_VALUE_LEN, &length, sizeof length },
        { CKA_ENCRYPT, &yes, sizeof yes },
        { CKA_TOKEN, &no, sizeof no },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
    };
    CK_MECHANISM mechanism = { CKM_AES_KEY_GEN, NULL, 0 };
    return p11->C_GenerateKey(w->session, &mechanism, template, 7, &w->aes_key);
}

/* Thread body: key generation is slow (RSA), so every session makes its own
 * keys at the same time as the others. */
static void *generate_keys(void *arg)
{
    struct worker *w = arg;
    CK_RV rv = CKR_OK;
    if ((options.selected[OP_ECDSA] || options.selected[OP_GETATTR]) && (rv = generate_ec_key(w)) != CKR_OK)
        w->failed_call = "C_GenerateKeyPair (EC P-256)";
    else if (options.selected[OP_RSA] && (rv = generate_rsa_key(w)) != CKR_OK)
        w->failed_call = "C_GenerateKeyPair (RSA-2048)";
    else if (options.selected[OP_AES_GCM] && (rv = generate_aes_key(w)) != CKR_OK)
        w->failed_call = "C_GenerateKey (AES-256)";
    w->failed_rv = rv;
    return NULL;
}

/* ---- the operations, each a complete call sequence ---- */

static CK_RV sign_once(struct worker *w, CK_MECHANISM_TYPE type, CK_OBJECT_HANDLE key,
                       const char **call)
{
    CK_MECHANISM mechanism = { type, NULL, 0 };
    CK_BYTE signature[512];
    CK_ULONG signature_len = sizeof signature;
    CK_RV rv;
    *call = "C_SignInit";
    if ((rv = p11->C_SignInit(w->session, &mechanism, key)) != CKR_OK)
        return rv;
    *call = "C_Sign";   /* 32 bytes: a SHA-256 digest for ECDSA, a message for RSA */
    return p11->C_Sign(w->session, payload, 32, signature, &signature_len);
}

static CK_RV encrypt_once(struct worker *w, const char **call)
{
    /* A GCM IV must never repeat under one key: 4 fixed bytes, 8 of counter. */
    CK_BYTE iv[12] = { 0 };
    uint64_t counter = w->gcm_counter++;
    for (int i = 0; i < 8; i++)
        iv[11 - i] = (CK_BYTE)(counter >> (8 * i));

    CK_GCM_PARAMS gcm = { 0 };
    gcm.pIv = iv;
    gcm.ulIvLen = sizeof iv;
    gcm.ulIvBits = 8 * sizeof iv;
    gcm.ulTagBits = 128;
    CK_MECHANISM mechanism = { CKM_AES_GCM, &gcm, sizeof gcm };
    CK_BYTE ciphertext[PAYLOAD_SIZE + 16];
    CK_ULONG ciphertext_len = sizeof ciphertext;
    CK_RV rv;
    *call = "C_EncryptInit (AES-GCM)";
    if ((rv = p11->C_EncryptInit(w->session, &mechanism, w->aes_key)) != CKR_OK)
        return rv;
    *call = "C_Encrypt (AES-GCM)";
    return p11->C_Encrypt(w->session, payload, PAYLOAD_SIZE, ciphertext, &ciphertext_len);
}

static CK_RV digest_once(struct worker *w, const char **call)
{
    CK_MECHANISM mechanism = { CKM_SHA256, NULL, 0 };
    CK_BYTE digest[32];
    CK_ULONG digest_len = sizeof digest;
    CK_RV rv;
    *call = "C_DigestInit";
    if ((rv = p11->C_DigestInit(w->session, &mechanism)) != CKR_OK)
        return rv;
    *call = "C_Digest";
    return p11->C_Digest(w->session, payload, PAYLOAD_SIZE, digest, &digest_len);
}

static CK_RV run_once(struct worker *w, const char **call)
{
    CK_BYTE random[32];
    switch (w->op) {
    case OP_ECDSA:   return sign_once(w, CKM_ECDSA, w->ec_key, call);
    case OP_RSA:     return sign_once(w, CKM_SHA256_RSA_PKCS, w->rsa_key, call);
    case OP_AES_GCM: return encrypt_once(w, call);
    case OP_SHA256:  return digest_once(w, call);
    case OP_RANDOM:
        *call = "C_GenerateRandom";
        return p11->C_GenerateRandom(w->session, random, sizeof random);
    case OP_GETATTR: {
        /* What an application asks of a key before it uses it (an OpenSSL engine: its type and ID). */
        CK_KEY_TYPE type;
        CK_BYTE id[64];
        CK_ATTRIBUTE template[] = { { CKA_KEY_TYPE, &type, sizeof type }, { CKA_ID, id, sizeof id } };
        *call = "C_GetAttributeValue";
        return p11->C_GetAttributeValue(w->session, w->ec_key, template, 2);
    }
    case OP_CREATE: {
        CK_OBJECT_CLASS data = CKO_DATA;
        CK_BBOOL yes = CK_TRUE;
        static const char label[] = "p11bench-create";
        uint64_t value[2] = { (uint64_t)(uintptr_t)w, w->created++ };
        CK_ATTRIBUTE template[] = {
            { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &yes, sizeof yes },
            { CKA_LABEL, (void *)label, sizeof label - 1 }, { CKA_VALUE, value, sizeof value },
        };
        CK_OBJECT_HANDLE object;
        *call = "C_CreateObject";
        return p11->C_CreateObject(w->session, template, 4, &object);
    }
    default:
        *call = "unknown operation";
        return CKR_GENERAL_ERROR;
    }
}

/* ---- one timed run ---- */

static void record(struct worker *w, uint64_t ns)
{
    if (w->count == w->capacity) {
        w->capacity = w->capacity ? 2 * w->capacity : 65536;
        w->latencies_ns = realloc(w->latencies_ns, w->capacity * sizeof *w->latencies_ns);
        if (w->latencies_ns == NULL) {
            fprintf(stderr, "p11bench: out of memory for latencies\n");
            exit(1);
        }
    }
    w->latencies_ns[w->count++] = ns;
}

static int fail(struct worker *w, const char *call, CK_RV rv)
{
    w->failed_call = call;
    w->failed_rv = rv;
    atomic_store(&stop_everyone, 1);
    return 0;
}

static void *measure(void *arg)
{
    struct worker *w = arg;
    const char *call;
    CK_RV rv;

    /* One untimed call first: checks the operation works and warms caches. */
    if ((rv = run_once(w, &call)) != CKR_OK)
        fail(w, call, rv);
    pthread_barrier_wait(&start_line);
    if (w->failed_call != NULL)
        return NULL;

    clock_gettime(CLOCK_MONOTONIC, &w->started);
    struct timespec deadline = w->started, before, after = w->started;
    deadline.tv_sec += (time_t)w->seconds;
    deadline.tv_nsec += (long)((w->seconds - (double)(time_t)w->seconds) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    while (timespec_before(&after, &deadline) && !atomic_load(&stop_everyone)) {
        clock_gettime(CLOCK_MONOTONIC, &before);
        rv = run_once(w, &call);
        clock_gettime(CLOCK_MONOTONIC, &after);
        if (rv != CKR_OK) {
            fail(w, call, rv);
            break;
        }
        record(w, ns_between(&before, &after));
    }
    w->finished = after;
    return NULL;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted values, in microseconds. */
static double percentile_us(const uint64_t *sorted, size_t n, double p)
{
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    return (double)sorted[rank - 1] / 1000.0;
}

static void report(enum op op, int threads)
{
    size_t total = 0;
    struct timespec first = workers[0].started, last = workers[0].finished;
    for (int i = 0; i < threads; i++) {
        total += workers[i].count;
        if (timespec_before(&workers[i].started, &first))
            first = workers[i].started;
        if (timespec_before(&last, &workers[i].finished))
            last = workers[i].finished;
    }
    uint64_t *all = malloc((total ? total : 1) * sizeof *all);
    if (all == NULL) {
        fprintf(stderr, "p11bench: out of memory for latencies\n");
        exit(1);
    }
    size_t n = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + n, workers[i].latencies_ns, workers[i].count * sizeof *all);
        n += workers[i].count;
    }
    qsort(all, n, sizeof *all, compare_u64);

    /* Wall time from the first thread's start to the last one's end: ops/s is
     * what the whole process achieved, not a sum of per-thread rates. */
    double seconds = (double)ns_between(&first, &last) / 1e9;
    printf("RESULT op=%s threads=%d ops_per_s=%.1f p50_us=%.1f p99_us=%.1f\n",
           op_names[op].name, threads, seconds > 0 ? (double)n / seconds : 0.0,
           n ? percentile_us(all, n, 0.50) : 0.0, n ? percentile_us(all, n, 0.99) : 0.0);
    fflush(stdout);
    free(all);
}

static void run(enum op op, int threads)
{
    atomic_store(&stop_everyone, 0);
    if (pthread_barrier_init(&start_line, NULL, (unsigned)threads) != 0) {
        fprintf(stderr, "p11bench: pthread_barrier_init failed\n");
        exit(1);
    }
    for (int i = 0; i < threads; i++) {
        struct worker *w = &workers[i];
        w->op = op;
        w->seconds = options.seconds;
        w->count = 0;
        w->failed_call = NULL;
        if (pthread_create(&w->thread, NULL, measure, w) != 0) {
            fprintf(stderr, "p11bench: pthread_create failed\n");
            exit(1);
        }
    }
    for (int i = 0; i < threads; i++)
        pthread_join(workers[i].thread, NULL);
    pthread_barrier_destroy(&start_line);

    for (int i = 0; i < threads; i++)
        if (workers[i].failed_call != NULL) {
            fprintf(stderr, "p11bench: %s with %d threads: %s failed: CK_RV 0x%08lx\n",
                    op_names[op].name, threads, workers[i].failed_call,
                    (unsigned long)workers[i].failed_rv);
            exit(1);
        }
    report(op, threads);
}

static void prepare_workers(void)
{
    struct timespec begin, end;
    clock_gettime(CLOCK_MONOTONIC, &begin);
    open_sessions(find_slot(options.token));
    for (int i = 0; i < options.max_threads; i++)
        if (pthread_create(&workers[i].thread, NULL, generate_keys, &workers[i]) != 0) {
            fprintf(stderr, "p11bench: pthread_create failed\n");
            exit(1);
        }
    for (int i = 0; i < options.max_threads; i++)
        pthread_join(workers[i].thread, NULL);
    for (int i = 0; i < options.max_threads; i++)
        if (workers[i].failed_call != NULL)
            die(workers[i].failed_call, workers[i].failed_rv);
    clock_gettime(CLOCK_MONOTONIC, &end);
    fprintf(stderr, "p11bench: token \"%s\": sessions: %d, keys generated in %.1f s\n",
            options.token, options.max_threads, (double)ns_between(&begin, &end) / 1e9);
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (CK_BYTE)i;

    workers = calloc((size_t)options.max_threads, sizeof *workers);
    if (workers == NULL) {
        fprintf(stderr, "p11bench: out of memory\n");
        return 1;
    }
    load_and_initialize(options.module);
    prepare_workers();

    for (int op = 0; op < OP_COUNT; op++)
        if (options.selected[op])
            for (int i = 0; i < options.thread_count_count; i++)
                run((enum op)op, options.thread_counts[i]);

    /* Closing the sessions destroys the session keys; C_Finalize does both. */
    CK_RV rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK)
        die("C_Finalize", rv);
    for (int i = 0; i < options.max_threads; i++)
        free(workers[i].latencies_ns);
    free(workers);
    return 0;
}
