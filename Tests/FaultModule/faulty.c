/* faulty.c: a PKCS#11 module for tests that forwards to a real module and, per token, fails or hangs calls on command.
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra $(pkg-config --cflags p11-kit-1) -o faulty.so faulty.c -ldl -lpthread
 * Environment: FAULTY_TARGET (the real module, default SoftHSM), FAULTY_CONTROL (directory of per-token
 * command files; unset = pure pass-through), FAULTY_LOG (file that gets "label function rv" per call).
 * FAULTY_CONTROL and FAULTY_LOG are read when the module is loaded and again at each C_Initialize.
 * The command language is described in README.md next to this file.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"
#define HANG_POLL_NS (5 * 1000 * 1000)
#define LABEL_SIZE 33 /* 32 bytes of CK_TOKEN_INFO.label and a NUL */

#define EXPORTED __attribute__((visibility("default")))

/* Every function of the 2.40 table, in table order; names the enum and the strings of the command language. */
#define FUNCTIONS(X) \
    X(C_Initialize) X(C_Finalize) X(C_GetInfo) X(C_GetFunctionList) X(C_GetSlotList) X(C_GetSlotInfo) \
    X(C_GetTokenInfo) X(C_GetMechanismList) X(C_GetMechanismInfo) X(C_InitToken) X(C_InitPIN) X(C_SetPIN) \
    X(C_OpenSession) X(C_CloseSession) X(C_CloseAllSessions) X(C_GetSessionInfo) X(C_GetOperationState) \
    X(C_SetOperationState) X(C_Login) X(C_Logout) X(C_CreateObject) X(C_CopyObject) X(C_DestroyObject) \
    X(C_GetObjectSize) X(C_GetAttributeValue) X(C_SetAttributeValue) X(C_FindObjectsInit) X(C_FindObjects) \
    X(C_FindObjectsFinal) X(C_EncryptInit) X(C_Encrypt) X(C_EncryptUpdate) X(C_EncryptFinal) X(C_DecryptInit) \
    X(C_Decrypt) X(C_DecryptUpdate) X(C_DecryptFinal) X(C_DigestInit) X(C_Digest) X(C_DigestUpdate) \
    X(C_DigestKey) X(C_DigestFinal) X(C_SignInit) X(C_Sign) X(C_SignUpdate) X(C_SignFinal) \
    X(C_SignRecoverInit) X(C_SignRecover) X(C_VerifyInit) X(C_Verify) X(C_VerifyUpdate) X(C_VerifyFinal) \
    X(C_VerifyRecoverInit) X(C_VerifyRecover) X(C_DigestEncryptUpdate) X(C_DecryptDigestUpdate) \
    X(C_SignEncryptUpdate) X(C_DecryptVerifyUpdate) X(C_GenerateKey) X(C_GenerateKeyPair) X(C_WrapKey) \
    X(C_UnwrapKey) X(C_DeriveKey) X(C_SeedRandom) X(C_GenerateRandom) X(C_GetFunctionStatus) \
    X(C_CancelFunction) X(C_WaitForSlotEvent)

#define AS_ENUM(name) FN_##name,
#define AS_STRING(name) #name,
enum function { FUNCTIONS(AS_ENUM) FUNCTION_COUNT };
static const char *const function_names[FUNCTION_COUNT] = { FUNCTIONS(AS_STRING) };

/* ---- state ---------------------------------------------------------------------------------------- */

/* Guards every table below. Held only for table work and for reading a command file: never while the
 * target is called or a call hangs. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST_PTR target; /* set once, under load_lock */

/* Read from the environment; replaced (never freed: a call in flight may still use the old one) at C_Initialize. */
struct settings {
    char control[PATH_MAX]; /* "" = no fault injection */
    int log_fd;             /* -1 = no log */
};
static struct settings *settings;

struct session_entry {
    CK_SESSION_HANDLE session;
    CK_SLOT_ID slot;
};
static struct session_entry *sessions;
static size_t session_count, session_capacity;

struct slot_label {
    CK_SLOT_ID slot;
    char label[LABEL_SIZE];
};
static struct slot_label *slot_labels;
static size_t slot_label_count, slot_label_capacity;

/* What identifies one version of a command file; a rename, rewrite or truncation changes it. */
struct file_key {
    int present;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
};

enum verb { VERB_OK, VERB_FAIL, VERB_FAIL_AFTER, VERB_HANG, VERB_WEDGE, VERB_SLOW };

/* Successful C_Initialize calls of this process: a wedge holds until the next one. */
static unsigned long starts;

struct command {
    enum verb verb;
    CK_RV code;
    unsigned long let_through; /* fail-after: matching calls still to let through */
    unsigned long wedged_start; /* wedge: the value of `starts` when this version of the file was read */
    unsigned long micros;       /* slow: the service time of one matching call */
    int every_function;        /* no function listed */
    unsigned char functions[FUNCTION_COUNT];
};

/* One token's command file as last read. Entries are never freed, so pointers to them stay valid. */
struct control {
    struct control *next;
    char label[LABEL_SIZE];
    struct file_key key;
    struct command command;
    /* slow: the token's one engine, which serves one matching call at a time. */
    pthread_mutex_t engine;
};
static struct control *controls;

/* ---- small helpers -------------------------------------------------------------------------------- */

__attribute__((format(printf, 1, 2))) static void warn(const char *format, ...)
{
    char line[PATH_MAX + 256];
    va_list arguments;
    va_start(arguments, format);
    int n = vsnprintf(line, sizeof line, format, arguments);
    va_end(arguments);
    if (n > 0) {
        ssize_t ignored = write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)ignored;
    }
}

static void *grow(void *array, size_t *capacity, size_t element_size)
{
    size_t wanted = *capacity ? *capacity * 2 : 16;
    void *bigger = realloc(array, wanted * element_size);
    if (bigger)
        *capacity = wanted;
    return bigger;
}

static struct settings *current_settings(void)
{
    return __atomic_load_n(&settings, __ATOMIC_ACQUIRE);
}

/* Reads FAULTY_CONTROL and FAULTY_LOG; keeps the old settings when nothing changed. */
static void load_settings(void)
{
    const char *control = getenv("FAULTY_CONTROL");
    const char *log_path = getenv("FAULTY_LOG");
    static char last_log_path[PATH_MAX];

    pthread_mutex_lock(&lock);
    struct settings *old = settings;
    int same_log = old && strcmp(last_log_path, log_path ? log_path : "") == 0;
    if (old && same_log && strcmp(old->control, control ? control : "") == 0) {
        pthread_mutex_unlock(&lock);
        return;
    }
    struct settings *fresh = calloc(1, sizeof *fresh);
    if (!fresh) {
        pthread_mutex_unlock(&lock);
        return;
    }
    snprintf(fresh->control, sizeof fresh->control, "%s", control ? control : "");
    if (same_log) {
        fresh->log_fd = old->log_fd;
    } else {
        fresh->log_fd = -1;
        if (log_path && *log_path) {
            fresh->log_fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
            if (fresh->log_fd < 0)
                warn("faulty: cannot open FAULTY_LOG %s: %s\n", log_path, strerror(errno));
        }
        snprintf(last_log_path, sizeof last_log_path, "%s", log_path ? log_path : "");
    }
    __atomic_store_n(&settings, fresh, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
}

/* A module initialized afresh has new sessions, and its slots may carry other tokens. */
static void forget_sessions_and_labels(void)
{
    pthread_mutex_lock(&lock);
    session_count = 0;
    slot_label_count = 0;
    pthread_mutex_unlock(&lock);
}

/* ---- session and slot tables ------------------------------------------------------------------------ */

static void remember_session(CK_SESSION_HANDLE session, CK_SLOT_ID slot)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < session_count; i++) {
        if (sessions[i].session == session) { /* a handle the module reused */
            sessions[i].slot = slot;
            pthread_mutex_unlock(&lock);
            return;
        }
    }
    if (session_count == session_capacity) {
        struct session_entry *bigger = grow(sessions, &session_capacity, sizeof *sessions);
        if (!bigger) {
            pthread_mutex_unlock(&lock);
            return;
        }
        sessions = bigger;
    }
    sessions[session_count++] = (struct session_entry){ session, slot };
    pthread_mutex_unlock(&lock);
}

static void forget_session(CK_SESSION_HANDLE session)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < session_count; i++) {
        if (sessions[i].session == session) {
            sessions[i] = sessions[--session_count];
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

static void forget_sessions_of_slot(CK_SLOT_ID slot)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < session_count;) {
        if (sessions[i].slot == slot)
            sessions[i] = sessions[--session_count];
        else
            i++;
    }
    pthread_mutex_unlock(&lock);
}

static int slot_of_session(CK_SESSION_HANDLE session, CK_SLOT_ID *slot)
{
    int found = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < session_count; i++) {
        if (sessions[i].session == session) {
            *slot = sessions[i].slot;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static void forget_label(CK_SLOT_ID slot)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < slot_label_count; i++) {
        if (slot_labels[i].slot == slot) {
            slot_labels[i] = slot_labels[--slot_label_count];
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

/* The label of the token in `slot`, trailing spaces trimmed; 0 when the slot has no initialized token.
 * Asked of the target once per slot (that call is neither faulted nor logged). */
static int label_of_slot(CK_SLOT_ID slot, char label[LABEL_SIZE])
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < slot_label_count; i++) {
        if (slot_labels[i].slot == slot) {
            memcpy(label, slot_labels[i].label, LABEL_SIZE);
            pthread_mutex_unlock(&lock);
            return 1;
        }
    }
    pthread_mutex_unlock(&lock);

    CK_TOKEN_INFO info;
    if (!target->C_GetTokenInfo || target->C_GetTokenInfo(slot, &info) != CKR_OK)
        return 0;
    if (!(info.flags & CKF_TOKEN_INITIALIZED))
        return 0;
    size_t length = sizeof info.label;
    while (length > 0 && (info.label[length - 1] == ' ' || info.label[length - 1] == '\0'))
        length--;
    if (length == 0)
        return 0;
    memcpy(label, info.label, length);
    label[length] = '\0';

    pthread_mutex_lock(&lock);
    int known = 0;
    for (size_t i = 0; i < slot_label_count; i++)
        known |= slot_labels[i].slot == slot;
    if (!known) {
        if (slot_label_count == slot_label_capacity) {
            struct slot_label *bigger = grow(slot_labels, &slot_label_capacity, sizeof *slot_labels);
            if (bigger)
                slot_labels = bigger;
        }
        if (slot_label_count < slot_label_capacity) {
            slot_labels[slot_label_count].slot = slot;
            memcpy(slot_labels[slot_label_count].label, label, LABEL_SIZE);
            slot_label_count++;
        }
    }
    pthread_mutex_unlock(&lock);
    return 1;
}

/* ---- the command language ------------------------------------------------------------------------- */

static const struct {
    const char *name;
    CK_RV value;
} rv_names[] = {
    { "CKR_GENERAL_ERROR", CKR_GENERAL_ERROR },
    { "CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED },
    { "CKR_DEVICE_ERROR", CKR_DEVICE_ERROR },
    { "CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY },
    { "CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED },
    { "CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT },
    { "CKR_SESSION_CLOSED", CKR_SESSION_CLOSED },
    { "CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID },
    { "CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED },
    { "CKR_HOST_MEMORY", CKR_HOST_MEMORY },
};

/* 0x30, 48 or CKR_DEVICE_ERROR. */
static int parse_number(const char *word, unsigned long *value)
{
    char *end;
    errno = 0;
    if (word[0] == '0' && (word[1] == 'x' || word[1] == 'X'))
        *value = strtoul(word + 2, &end, 16);
    else if (isdigit((unsigned char)word[0]))
        *value = strtoul(word, &end, 10);
    else
        return 0;
    return errno == 0 && *end == '\0' && end != word;
}

static int parse_code(const char *word, CK_RV *code)
{
    for (size_t i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++) {
        if (strcmp(word, rv_names[i].name) == 0) {
            *code = rv_names[i].value;
            return 1;
        }
    }
    unsigned long value;
    if (!parse_number(word, &value))
        return 0;
    *code = value;
    return 1;
}

/* Parses the first line of a command file. A line it cannot read is reported on stderr and means "ok",
 * so that a typo shows up in the test's output instead of faulting calls nobody meant to fault. */
static struct command parse_command(char *text, const char *label)
{
    struct command command;
    memset(&command, 0, sizeof command);
    command.verb = VERB_OK;

    char *newline = strchr(text, '\n');
    if (newline)
        *newline = '\0';
    char *words[FUNCTION_COUNT + 4];
    size_t count = 0;
    char *save = NULL;
    for (char *word = strtok_r(text, " \t\r", &save); word && count < sizeof words / sizeof words[0];
         word = strtok_r(NULL, " \t\r", &save))
        words[count++] = word;

    if (count == 0 || (count == 1 && strcmp(words[0], "ok") == 0))
        return command;

    struct command parsed = command;
    size_t first_function;
    if (strcmp(words[0], "fail") == 0 && count >= 2 && parse_code(words[1], &parsed.code)) {
        parsed.verb = VERB_FAIL;
        first_function = 2;
    } else if (strcmp(words[0], "fail-after") == 0 && count >= 3 && parse_number(words[1], &parsed.let_through) &&
               parse_code(words[2], &parsed.code)) {
        parsed.verb = VERB_FAIL_AFTER;
        first_function = 3;
    } else if (strcmp(words[0], "wedge") == 0 && count >= 2 && parse_code(words[1], &parsed.code)) {
        parsed.verb = VERB_WEDGE;
        parsed.wedged_start = __atomic_load_n(&starts, __ATOMIC_ACQUIRE);
        first_function = 2;
    } else if (strcmp(words[0], "slow") == 0 && count >= 2 && parse_number(words[1], &parsed.micros)) {
        parsed.verb = VERB_SLOW;
        first_function = 2;
    } else if (strcmp(words[0], "hang") == 0) {
        parsed.verb = VERB_HANG;
        first_function = 1;
    } else {
        warn("faulty: cannot read the command for token %s: '%s' (treated as ok)\n", label, words[0]);
        return command;
    }

    parsed.every_function = first_function == count;
    for (size_t i = first_function; i < count; i++) {
        int known = 0;
        for (int f = 0; f < FUNCTION_COUNT; f++) {
            if (strcmp(words[i], function_names[f]) == 0) {
                parsed.functions[f] = 1;
                known = 1;
            }
        }
        if (!known)
            warn("faulty: unknown function %s in the command for token %s (ignored)\n", words[i], label);
    }
    return parsed;
}

static struct file_key key_of(const struct stat *st)
{
    struct file_key key;
    memset(&key, 0, sizeof key);
    key.present = 1;
    key.dev = st->st_dev;
    key.ino = st->st_ino;
    key.size = st->st_size;
    key.mtime = st->st_mtim;
    key.ctime = st->st_ctim;
    return key;
}

static int same_key(const struct file_key *a, const struct file_key *b)
{
    if (a->present != b->present)
        return 0;
    if (!a->present)
        return 1;
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size && a->mtime.tv_sec == b->mtime.tv_sec &&
           a->mtime.tv_nsec == b->mtime.tv_nsec && a->ctime.tv_sec == b->ctime.tv_sec &&
           a->ctime.tv_nsec == b->ctime.tv_nsec;
}

/* Reads the file at `path` into `control` (called with the lock held; the file is a line of text).
 * The key comes from the open file, checked before and after reading, so a write racing with the read
 * is seen as a change on the next call rather than lost. */
static void reload(struct control *control, const char *path)
{
    for (int attempt = 0; attempt < 5; attempt++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat before, after;
        if (fd < 0 || fstat(fd, &before) != 0) {
            if (fd >= 0)
                close(fd);
            memset(&control->key, 0, sizeof control->key);
            memset(&control->command, 0, sizeof control->command);
            control->command.verb = VERB_OK;
            return;
        }
        char text[4096];
        size_t length = 0;
        ssize_t n;
        while (length < sizeof text - 1 && (n = read(fd, text + length, sizeof text - 1 - length)) > 0)
            length += (size_t)n;
        text[length] = '\0';
        int stable = fstat(fd, &after) == 0;
        close(fd);
        struct file_key key_before = key_of(&before), key_after = key_of(&after);
        if (stable && same_key(&key_before, &key_after)) {
            control->key = key_after;
            control->command = parse_command(text, control->label);
            return;
        }
    }
    /* Still changing: leave the key stale so the next call reads it again. */
}

enum decision { FORWARD, INJECT, HANG, SLOW };

/* What to do now with a call of `function` on the token `label`, per its command file. SLOW names the token's
 * engine and the service time. */
static enum decision decide(const char *control_dir, const char *label, enum function function, CK_RV *code,
                            pthread_mutex_t **engine, unsigned long *micros)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", control_dir, label) >= (int)sizeof path)
        return FORWARD;
    struct stat st;
    struct file_key now;
    if (stat(path, &st) == 0) {
        now = key_of(&st);
    } else {
        memset(&now, 0, sizeof now);
    }

    pthread_mutex_lock(&lock);
    struct control *control = controls;
    while (control && strcmp(control->label, label) != 0)
        control = control->next;
    if (!control) {
        control = calloc(1, sizeof *control);
        if (!control) {
            pthread_mutex_unlock(&lock);
            return FORWARD;
        }
        snprintf(control->label, sizeof control->label, "%s", label);
        pthread_mutex_init(&control->engine, NULL);
        control->command.verb = VERB_OK; /* key.present == 0: an absent file, until read */
        control->next = controls;
        controls = control;
    }
    if (!same_key(&control->key, &now))
        reload(control, path);

    struct command *command = &control->command;
    enum decision decision = FORWARD;
    if (command->verb != VERB_OK && (command->every_function || command->functions[function])) {
        switch (command->verb) {
        case VERB_FAIL:
            decision = INJECT;
            break;
        case VERB_FAIL_AFTER:
            if (command->let_through > 0)
                command->let_through--;
            else
                decision = INJECT;
            break;
        case VERB_HANG:
            decision = HANG;
            break;
        case VERB_WEDGE:
            if (command->wedged_start == __atomic_load_n(&starts, __ATOMIC_ACQUIRE))
                decision = INJECT;
            break;
        case VERB_SLOW:
            decision = SLOW;
            *engine = &control->engine;
            *micros = command->micros;
            break;
        case VERB_OK:
            break;
        }
        *code = command->code;
    }
    pthread_mutex_unlock(&lock);
    return decision;
}

/* ---- one call --------------------------------------------------------------------------------------- */

struct call {
    enum function function;
    struct settings *settings;
    int concerns_token;
    char label[LABEL_SIZE];
    CK_RV rv;
};

static int usable_as_file_name(const char *label)
{
    return strchr(label, '/') == NULL && strcmp(label, ".") != 0 && strcmp(label, "..") != 0;
}

/* Starts a call concerning `slot`. Returns 1 to forward it, 0 when call->rv holds the injected code.
 * Blocks while the token's command says hang. */
static int enter_slot(struct call *call, enum function function, CK_SLOT_ID slot)
{
    call->function = function;
    call->settings = current_settings();
    call->concerns_token = 0;
    call->rv = CKR_OK;
    if (!call->settings || (call->settings->control[0] == '\0' && call->settings->log_fd < 0))
        return 1;
    if (!label_of_slot(slot, call->label))
        return 1;
    call->concerns_token = 1;
    if (call->settings->control[0] == '\0' || !usable_as_file_name(call->label))
        return 1;

    for (;;) {
        CK_RV code = CKR_OK;
        pthread_mutex_t *engine = NULL;
        unsigned long micros = 0;
        switch (decide(call->settings->control, call->label, function, &code, &engine, &micros)) {
        case FORWARD:
            return 1;
        case SLOW: {
            /* The engine is busy for the service time, then the call goes on to the real module. */
            struct timespec service = { (time_t)(micros / 1000000), (long)(micros % 1000000) * 1000 };
            pthread_mutex_lock(engine);
            while (nanosleep(&service, &service) != 0 && errno == EINTR) {
            }
            pthread_mutex_unlock(engine);
            return 1;
        }
        case INJECT:
            call->rv = code;
            return 0;
        case HANG: {
            struct timespec pause = { 0, HANG_POLL_NS };
            nanosleep(&pause, NULL);
            break;
        }
        }
    }
}

static int enter_session(struct call *call, enum function function, CK_SESSION_HANDLE session)
{
    CK_SLOT_ID slot;
    struct settings *now = current_settings();
    if (now && (now->control[0] != '\0' || now->log_fd >= 0) && slot_of_session(session, &slot))
        return enter_slot(call, function, slot);
    call->function = function;
    call->settings = now;
    call->concerns_token = 0;
    call->rv = CKR_OK;
    return 1;
}

/* Ends a call: logs it if it concerned a token, and returns its result. */
static CK_RV leave(struct call *call)
{
    if (call->concerns_token && call->settings->log_fd >= 0) {
        char line[LABEL_SIZE + 64];
        int n = snprintf(line, sizeof line, "%s %s 0x%lx\n", call->label, function_names[call->function],
                         (unsigned long)call->rv);
        if (n > 0 && (size_t)n < sizeof line) {
            ssize_t ignored = write(call->settings->log_fd, line, (size_t)n);
            (void)ignored;
        }
    }
    return call->rv;
}

#define CALL_TARGET(name, args) (target->name ? target->name args : CKR_FUNCTION_NOT_SUPPORTED)

/* ---- functions that concern no token: plain forwarding ------------------------------------------------ */

static CK_RV fy_C_Initialize(CK_VOID_PTR init_args)
{
    load_settings();
    CK_RV rv = CALL_TARGET(C_Initialize, (init_args));
    if (rv == CKR_OK) {
        forget_sessions_and_labels();
        __atomic_add_fetch(&starts, 1, __ATOMIC_ACQ_REL);
    }
    return rv;
}

static CK_RV fy_C_Finalize(CK_VOID_PTR reserved)
{
    CK_RV rv = CALL_TARGET(C_Finalize, (reserved));
    if (rv == CKR_OK)
        forget_sessions_and_labels();
    return rv;
}

static CK_RV fy_C_GetInfo(CK_INFO_PTR info)
{
    return CALL_TARGET(C_GetInfo, (info));
}

static CK_RV fy_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static CK_RV fy_C_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID_PTR slot_list, CK_ULONG_PTR count)
{
    return CALL_TARGET(C_GetSlotList, (token_present, slot_list, count));
}

static CK_RV fy_C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved)
{
    return CALL_TARGET(C_WaitForSlotEvent, (flags, slot, reserved));
}

/* ---- functions that take a slot ID ---------------------------------------------------------------- */

#define SLOT_FUNCTION(name, params, args)             \
    static CK_RV fy_##name params                     \
    {                                                 \
        struct call call;                             \
        if (enter_slot(&call, FN_##name, slot))       \
            call.rv = CALL_TARGET(name, args);            \
        return leave(&call);                          \
    }

SLOT_FUNCTION(C_GetSlotInfo, (CK_SLOT_ID slot, CK_SLOT_INFO_PTR info), (slot, info))
SLOT_FUNCTION(C_GetTokenInfo, (CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info), (slot, info))
SLOT_FUNCTION(C_GetMechanismList, (CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count),
              (slot, list, count))
SLOT_FUNCTION(C_GetMechanismInfo, (CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info),
              (slot, type, info))

static CK_RV fy_C_InitToken(CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR label)
{
    struct call call;
    if (enter_slot(&call, FN_C_InitToken, slot)) {
        call.rv = CALL_TARGET(C_InitToken, (slot, pin, pin_len, label));
        if (call.rv == CKR_OK)
            forget_label(slot); /* the token has a new label now */
    }
    return leave(&call);
}

static CK_RV fy_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify,
                              CK_SESSION_HANDLE_PTR session)
{
    struct call call;
    if (enter_slot(&call, FN_C_OpenSession, slot)) {
        call.rv = CALL_TARGET(C_OpenSession, (slot, flags, application, notify, session));
        if (call.rv == CKR_OK && session)
            remember_session(*session, slot);
    }
    return leave(&call);
}

static CK_RV fy_C_CloseAllSessions(CK_SLOT_ID slot)
{
    struct call call;
    if (enter_slot(&call, FN_C_CloseAllSessions, slot)) {
        call.rv = CALL_TARGET(C_CloseAllSessions, (slot));
        if (call.rv == CKR_OK)
            forget_sessions_of_slot(slot);
    }
    return leave(&call);
}

/* ---- functions that take a session handle ----------------------------------------------------------- */

#define SESSION_FUNCTION(name, params, args)              \
    static CK_RV fy_##name params                         \
    {                                                     \
        struct call call;                                 \
        if (enter_session(&call, FN_##name, session))     \
            call.rv = CALL_TARGET(name, args);                \
        return leave(&call);                              \
    }

static CK_RV fy_C_CloseSession(CK_SESSION_HANDLE session)
{
    struct call call;
    if (enter_session(&call, FN_C_CloseSession, session)) {
        call.rv = CALL_TARGET(C_CloseSession, (session));
        if (call.rv == CKR_OK || call.rv == CKR_SESSION_HANDLE_INVALID || call.rv == CKR_SESSION_CLOSED)
            forget_session(session);
    }
    return leave(&call);
}

SESSION_FUNCTION(C_InitPIN, (CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len),
                 (session, pin, pin_len))
SESSION_FUNCTION(C_SetPIN,
                 (CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len, CK_UTF8CHAR_PTR new_pin,
                  CK_ULONG new_len),
                 (session, old_pin, old_len, new_pin, new_len))
SESSION_FUNCTION(C_GetSessionInfo, (CK_SESSION_HANDLE session, CK_SESSION_INFO_PTR info), (session, info))
SESSION_FUNCTION(C_GetOperationState, (CK_SESSION_HANDLE session, CK_BYTE_PTR state, CK_ULONG_PTR state_len),
                 (session, state, state_len))
SESSION_FUNCTION(C_SetOperationState,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR state, CK_ULONG state_len, CK_OBJECT_HANDLE encryption_key,
                  CK_OBJECT_HANDLE authentication_key),
                 (session, state, state_len, encryption_key, authentication_key))
SESSION_FUNCTION(C_Login, (CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len),
                 (session, user, pin, pin_len))
SESSION_FUNCTION(C_Logout, (CK_SESSION_HANDLE session), (session))
SESSION_FUNCTION(C_CreateObject,
                 (CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE_PTR object),
                 (session, templ, count, object))
SESSION_FUNCTION(C_CopyObject,
                 (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ, CK_ULONG count,
                  CK_OBJECT_HANDLE_PTR new_object),
                 (session, object, templ, count, new_object))
SESSION_FUNCTION(C_DestroyObject, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object), (session, object))
SESSION_FUNCTION(C_GetObjectSize, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ULONG_PTR size),
                 (session, object, size))
SESSION_FUNCTION(C_GetAttributeValue,
                 (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ, CK_ULONG count),
                 (session, object, templ, count))
SESSION_FUNCTION(C_SetAttributeValue,
                 (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ, CK_ULONG count),
                 (session, object, templ, count))
SESSION_FUNCTION(C_FindObjectsInit, (CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR templ, CK_ULONG count),
                 (session, templ, count))
SESSION_FUNCTION(C_FindObjects,
                 (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE_PTR objects, CK_ULONG max_count, CK_ULONG_PTR count),
                 (session, objects, max_count, count))
SESSION_FUNCTION(C_FindObjectsFinal, (CK_SESSION_HANDLE session), (session))
SESSION_FUNCTION(C_EncryptInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_Encrypt,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, data, data_len, out, out_len))
SESSION_FUNCTION(C_EncryptUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_EncryptFinal, (CK_SESSION_HANDLE session, CK_BYTE_PTR out, CK_ULONG_PTR out_len),
                 (session, out, out_len))
SESSION_FUNCTION(C_DecryptInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_Decrypt,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, data, data_len, out, out_len))
SESSION_FUNCTION(C_DecryptUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_DecryptFinal, (CK_SESSION_HANDLE session, CK_BYTE_PTR out, CK_ULONG_PTR out_len),
                 (session, out, out_len))
SESSION_FUNCTION(C_DigestInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism), (session, mechanism))
SESSION_FUNCTION(C_Digest,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR digest,
                  CK_ULONG_PTR digest_len),
                 (session, data, data_len, digest, digest_len))
SESSION_FUNCTION(C_DigestUpdate, (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len),
                 (session, part, part_len))
SESSION_FUNCTION(C_DigestKey, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key), (session, key))
SESSION_FUNCTION(C_DigestFinal, (CK_SESSION_HANDLE session, CK_BYTE_PTR digest, CK_ULONG_PTR digest_len),
                 (session, digest, digest_len))
SESSION_FUNCTION(C_SignInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_Sign,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                  CK_ULONG_PTR signature_len),
                 (session, data, data_len, signature, signature_len))
SESSION_FUNCTION(C_SignUpdate, (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len),
                 (session, part, part_len))
SESSION_FUNCTION(C_SignFinal, (CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG_PTR signature_len),
                 (session, signature, signature_len))
SESSION_FUNCTION(C_SignRecoverInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_SignRecover,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                  CK_ULONG_PTR signature_len),
                 (session, data, data_len, signature, signature_len))
SESSION_FUNCTION(C_VerifyInit, (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_Verify,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                  CK_ULONG signature_len),
                 (session, data, data_len, signature, signature_len))
SESSION_FUNCTION(C_VerifyUpdate, (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len),
                 (session, part, part_len))
SESSION_FUNCTION(C_VerifyFinal, (CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG signature_len),
                 (session, signature, signature_len))
SESSION_FUNCTION(C_VerifyRecoverInit,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),
                 (session, mechanism, key))
SESSION_FUNCTION(C_VerifyRecover,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG signature_len, CK_BYTE_PTR data,
                  CK_ULONG_PTR data_len),
                 (session, signature, signature_len, data, data_len))
SESSION_FUNCTION(C_DigestEncryptUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_DecryptDigestUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_SignEncryptUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_DecryptVerifyUpdate,
                 (CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len),
                 (session, part, part_len, out, out_len))
SESSION_FUNCTION(C_GenerateKey,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR templ, CK_ULONG count,
                  CK_OBJECT_HANDLE_PTR key),
                 (session, mechanism, templ, count, key))
SESSION_FUNCTION(C_GenerateKeyPair,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR public_template,
                  CK_ULONG public_count, CK_ATTRIBUTE_PTR private_template, CK_ULONG private_count,
                  CK_OBJECT_HANDLE_PTR public_key, CK_OBJECT_HANDLE_PTR private_key),
                 (session, mechanism, public_template, public_count, private_template, private_count, public_key,
                  private_key))
SESSION_FUNCTION(C_WrapKey,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE wrapping_key,
                  CK_OBJECT_HANDLE key, CK_BYTE_PTR wrapped, CK_ULONG_PTR wrapped_len),
                 (session, mechanism, wrapping_key, key, wrapped, wrapped_len))
SESSION_FUNCTION(C_UnwrapKey,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE unwrapping_key,
                  CK_BYTE_PTR wrapped, CK_ULONG wrapped_len, CK_ATTRIBUTE_PTR templ, CK_ULONG count,
                  CK_OBJECT_HANDLE_PTR key),
                 (session, mechanism, unwrapping_key, wrapped, wrapped_len, templ, count, key))
SESSION_FUNCTION(C_DeriveKey,
                 (CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE base_key,
                  CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE_PTR key),
                 (session, mechanism, base_key, templ, count, key))
SESSION_FUNCTION(C_SeedRandom, (CK_SESSION_HANDLE session, CK_BYTE_PTR seed, CK_ULONG seed_len),
                 (session, seed, seed_len))
SESSION_FUNCTION(C_GenerateRandom, (CK_SESSION_HANDLE session, CK_BYTE_PTR out, CK_ULONG out_len),
                 (session, out, out_len))
SESSION_FUNCTION(C_GetFunctionStatus, (CK_SESSION_HANDLE session), (session))
SESSION_FUNCTION(C_CancelFunction, (CK_SESSION_HANDLE session), (session))

/* ---- the table and the one exported symbol ------------------------------------------------------------- */

/* Filled by field name: the header's field order is not the order of the functions' declarations. */
static CK_FUNCTION_LIST function_list = {
    .version = { 2, 40 },
    .C_Initialize = fy_C_Initialize,
    .C_Finalize = fy_C_Finalize,
    .C_GetInfo = fy_C_GetInfo,
    .C_GetFunctionList = fy_C_GetFunctionList,
    .C_GetSlotList = fy_C_GetSlotList,
    .C_GetSlotInfo = fy_C_GetSlotInfo,
    .C_GetTokenInfo = fy_C_GetTokenInfo,
    .C_GetMechanismList = fy_C_GetMechanismList,
    .C_GetMechanismInfo = fy_C_GetMechanismInfo,
    .C_InitToken = fy_C_InitToken,
    .C_InitPIN = fy_C_InitPIN,
    .C_SetPIN = fy_C_SetPIN,
    .C_OpenSession = fy_C_OpenSession,
    .C_CloseSession = fy_C_CloseSession,
    .C_CloseAllSessions = fy_C_CloseAllSessions,
    .C_GetSessionInfo = fy_C_GetSessionInfo,
    .C_GetOperationState = fy_C_GetOperationState,
    .C_SetOperationState = fy_C_SetOperationState,
    .C_Login = fy_C_Login,
    .C_Logout = fy_C_Logout,
    .C_CreateObject = fy_C_CreateObject,
    .C_CopyObject = fy_C_CopyObject,
    .C_DestroyObject = fy_C_DestroyObject,
    .C_GetObjectSize = fy_C_GetObjectSize,
    .C_GetAttributeValue = fy_C_GetAttributeValue,
    .C_SetAttributeValue = fy_C_SetAttributeValue,
    .C_FindObjectsInit = fy_C_FindObjectsInit,
    .C_FindObjects = fy_C_FindObjects,
    .C_FindObjectsFinal = fy_C_FindObjectsFinal,
    .C_EncryptInit = fy_C_EncryptInit,
    .C_Encrypt = fy_C_Encrypt,
    .C_EncryptUpdate = fy_C_EncryptUpdate,
    .C_EncryptFinal = fy_C_EncryptFinal,
    .C_DecryptInit = fy_C_DecryptInit,
    .C_Decrypt = fy_C_Decrypt,
    .C_DecryptUpdate = fy_C_DecryptUpdate,
    .C_DecryptFinal = fy_C_DecryptFinal,
    .C_DigestInit = fy_C_DigestInit,
    .C_Digest = fy_C_Digest,
    .C_DigestUpdate = fy_C_DigestUpdate,
    .C_DigestKey = fy_C_DigestKey,
    .C_DigestFinal = fy_C_DigestFinal,
    .C_SignInit = fy_C_SignInit,
    .C_Sign = fy_C_Sign,
    .C_SignUpdate = fy_C_SignUpdate,
    .C_SignFinal = fy_C_SignFinal,
    .C_SignRecoverInit = fy_C_SignRecoverInit,
    .C_SignRecover = fy_C_SignRecover,
    .C_VerifyInit = fy_C_VerifyInit,
    .C_Verify = fy_C_Verify,
    .C_VerifyUpdate = fy_C_VerifyUpdate,
    .C_VerifyFinal = fy_C_VerifyFinal,
    .C_VerifyRecoverInit = fy_C_VerifyRecoverInit,
    .C_VerifyRecover = fy_C_VerifyRecover,
    .C_DigestEncryptUpdate = fy_C_DigestEncryptUpdate,
    .C_DecryptDigestUpdate = fy_C_DecryptDigestUpdate,
    .C_SignEncryptUpdate = fy_C_SignEncryptUpdate,
    .C_DecryptVerifyUpdate = fy_C_DecryptVerifyUpdate,
    .C_GenerateKey = fy_C_GenerateKey,
    .C_GenerateKeyPair = fy_C_GenerateKeyPair,
    .C_WrapKey = fy_C_WrapKey,
    .C_UnwrapKey = fy_C_UnwrapKey,
    .C_DeriveKey = fy_C_DeriveKey,
    .C_SeedRandom = fy_C_SeedRandom,
    .C_GenerateRandom = fy_C_GenerateRandom,
    .C_GetFunctionStatus = fy_C_GetFunctionStatus,
    .C_CancelFunction = fy_C_CancelFunction,
    .C_WaitForSlotEvent = fy_C_WaitForSlotEvent,
};

/* A child of fork must not inherit the lock held by a thread that does not exist in it. */
static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork(void) { pthread_mutex_unlock(&lock); }

/* Loads the target once; returns CKR_OK or why it could not. */
static CK_RV load_target(void)
{
    pthread_mutex_lock(&load_lock);
    if (target) {
        pthread_mutex_unlock(&load_lock);
        return CKR_OK;
    }
    const char *path = getenv("FAULTY_TARGET");
    if (!path || !*path)
        path = DEFAULT_TARGET;
    CK_RV rv = CKR_GENERAL_ERROR;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        warn("faulty: cannot load FAULTY_TARGET %s: %s\n", path, dlerror());
    } else {
        CK_C_GetFunctionList get_function_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
        CK_FUNCTION_LIST_PTR list = NULL;
        if (!get_function_list) {
            warn("faulty: %s exports no C_GetFunctionList\n", path);
        } else if ((rv = get_function_list(&list)) != CKR_OK || !list) {
            warn("faulty: C_GetFunctionList of %s returned 0x%lx\n", path, (unsigned long)rv);
            if (rv == CKR_OK)
                rv = CKR_GENERAL_ERROR;
        } else {
            load_settings();
            pthread_atfork(before_fork, after_fork, after_fork);
            __atomic_store_n(&target, list, __ATOMIC_RELEASE);
        }
        /* The target stays loaded, even on failure: unloading a module that started threads can crash. */
    }
    pthread_mutex_unlock(&load_lock);
    return rv;
}

static CK_RV fy_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (!list)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = load_target();
    if (rv != CKR_OK)
        return rv;
    *list = &function_list;
    return CKR_OK;
}

EXPORTED CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    return fy_C_GetFunctionList(list);
}
