/*
 * store_probe: how soon one process sees a token object another process created, on any PKCS#11 module: the fact
 * p11ha's replication rests on (docs/REPLICATION.md, "What the stores do"). Used by
 * Tests/IntegrationTests/StoreProbeTests.swift; an operator can run it against a member's module too.
 *
 *   cc $(pkg-config --cflags p11-kit-1) -o store_probe store_probe.c -ldl
 *   ./store_probe MODULE_PATH TOKEN_LABEL PIN_FILE [WINDOW_SECONDS]
 *
 * Two processes (forked before either loads the module), each with its own C_Initialize, session and login (the
 * PIN is read from the file's first line and zeroed after use, never printed):
 *   1. the creator creates public data object A; the watcher, which wrote nothing, searches for it;
 *   2. the creator creates B; the watcher then creates and destroys an object of its own, and searches for B,
 *      writing nothing more, for WINDOW_SECONDS (default 3);
 *   3. the creator creates C; the watcher searches for B again.
 * Each step prints "STEP seen SECONDS SEARCHES" or "STEP never SECONDS SEARCHES" (STEP: idle, after-own-write,
 * after-other-write). Exit 0 when the probe ran, 1 when a call failed (its CK_RV printed), 2 on usage errors.
 * The objects it creates are destroyed before it exits.
 */

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p11;
static const char *role = "store_probe";

static void check(const char *what, CK_RV rv)
{
    if (rv != CKR_OK) {
        fprintf(stderr, "store_probe (%s): %s failed: CK_RV 0x%08lx\n", role, what, (unsigned long)rv);
        exit(1);
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static CK_SESSION_HANDLE open_session(const char *module, const char *label, const char *pin_file)
{
    void *handle = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fprintf(stderr, "store_probe: cannot load %s: %s\n", module, dlerror());
        exit(1);
    }
    CK_RV (*get)(CK_FUNCTION_LIST_PTR_PTR) = (CK_RV (*)(CK_FUNCTION_LIST_PTR_PTR))dlsym(handle, "C_GetFunctionList");
    if (!get) {
        fprintf(stderr, "store_probe: %s has no C_GetFunctionList\n", module);
        exit(1);
    }
    check("C_GetFunctionList", get(&p11));
    check("C_Initialize", p11->C_Initialize(NULL));
    CK_SLOT_ID slots[64];
    CK_ULONG count = 64;
    check("C_GetSlotList", p11->C_GetSlotList(CK_TRUE, slots, &count));
    size_t len = strlen(label);
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        check("C_GetTokenInfo", p11->C_GetTokenInfo(slots[i], &info));
        if (len > 32 || memcmp(info.label, label, len) != 0 || (len < 32 && info.label[len] != ' '))
            continue;
        CK_SESSION_HANDLE session;
        check("C_OpenSession", p11->C_OpenSession(slots[i], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session));
        char pin[256] = {0};
        FILE *file = fopen(pin_file, "r");
        if (!file || !fgets(pin, sizeof pin, file)) {
            fprintf(stderr, "store_probe: cannot read the PIN from %s\n", pin_file);
            exit(1);
        }
        fclose(file);
        pin[strcspn(pin, "\r\n")] = 0;
        CK_RV rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        explicit_bzero(pin, sizeof pin);
        if (rv != CKR_USER_ALREADY_LOGGED_IN)
            check("C_Login", rv);
        return session;
    }
    fprintf(stderr, "store_probe: no token labelled \"%s\" in %s\n", label, module);
    exit(1);
}

static CK_OBJECT_HANDLE create(CK_SESSION_HANDLE session, const char *label)
{
    CK_OBJECT_CLASS data = CKO_DATA;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_BYTE value[] = "store probe";
    CK_ATTRIBUTE template[] = {
        {CKA_CLASS, &data, sizeof data}, {CKA_TOKEN, &yes, sizeof yes}, {CKA_PRIVATE, &no, sizeof no},
        {CKA_LABEL, (void *)label, strlen(label)}, {CKA_VALUE, value, sizeof value - 1},
    };
    CK_OBJECT_HANDLE object;
    check("C_CreateObject", p11->C_CreateObject(session, template, 5, &object));
    return object;
}

static int found(CK_SESSION_HANDLE session, const char *label)
{
    CK_OBJECT_CLASS data = CKO_DATA;
    CK_ATTRIBUTE template[] = {{CKA_CLASS, &data, sizeof data}, {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE objects[4];
    CK_ULONG count = 0;
    check("C_FindObjectsInit", p11->C_FindObjectsInit(session, template, 2));
    check("C_FindObjects", p11->C_FindObjects(session, objects, 4, &count));
    check("C_FindObjectsFinal", p11->C_FindObjectsFinal(session));
    return count > 0;
}

/* Searches for `label` without writing, for at most `window` seconds, and prints the step's line. */
static void watch(CK_SESSION_HANDLE session, const char *step, const char *label, double window)
{
    double started = now();
    long searches = 0;
    int seen = 0;
    while (!seen && now() - started < window) {
        searches++;
        seen = found(session, label);
    }
    printf("%s %s %.3f %ld\n", step, seen ? "seen" : "never", now() - started, searches);
    fflush(stdout);
}

/* One byte through a pipe: the other process's turn. A process that ends closes its pipes: the other exits. */
static void signal_to(int fd) { if (write(fd, "x", 1) != 1) exit(1); }
static void wait_for(int fd) { char c; if (read(fd, &c, 1) != 1) exit(1); }

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: store_probe MODULE_PATH TOKEN_LABEL PIN_FILE [WINDOW_SECONDS]\n");
        return 2;
    }
    double window = argc == 5 ? atof(argv[4]) : 3.0;
    if (window <= 0) {
        fprintf(stderr, "store_probe: WINDOW_SECONDS must be a positive number\n");
        return 2;
    }
    char a[64], b[64], c[64], own[64];
    snprintf(a, sizeof a, "store-probe-%d-a", (int)getpid());
    snprintf(b, sizeof b, "store-probe-%d-b", (int)getpid());
    snprintf(c, sizeof c, "store-probe-%d-c", (int)getpid());
    snprintf(own, sizeof own, "store-probe-%d-own", (int)getpid());
    int to_creator[2], to_watcher[2];
    if (pipe(to_creator) || pipe(to_watcher)) return 1;
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        role = "creator";
        close(to_creator[1]);
        close(to_watcher[0]);
        CK_SESSION_HANDLE session = open_session(argv[1], argv[2], argv[3]);
        signal_to(to_watcher[1]);
        wait_for(to_creator[0]);
        CK_OBJECT_HANDLE objects[3];
        objects[0] = create(session, a);
        signal_to(to_watcher[1]);
        wait_for(to_creator[0]);
        objects[1] = create(session, b);
        signal_to(to_watcher[1]);
        wait_for(to_creator[0]);
        objects[2] = create(session, c);
        signal_to(to_watcher[1]);
        wait_for(to_creator[0]);
        for (int i = 0; i < 3; i++) check("C_DestroyObject", p11->C_DestroyObject(session, objects[i]));
        check("C_Finalize", p11->C_Finalize(NULL));
        return 0;
    }
    role = "watcher";
    close(to_creator[0]);
    close(to_watcher[1]);
    /* One after the other: SoftHSM rewrites the token's file at each login, and a process that reads it meanwhile
     * is answered CKR_GENERAL_ERROR. */
    wait_for(to_watcher[0]);
    CK_SESSION_HANDLE session = open_session(argv[1], argv[2], argv[3]);
    found(session, "store-probe: nothing");
    signal_to(to_creator[1]);
    wait_for(to_watcher[0]);
    watch(session, "idle", a, window);
    signal_to(to_creator[1]);
    wait_for(to_watcher[0]);
    check("C_DestroyObject", p11->C_DestroyObject(session, create(session, own)));
    watch(session, "after-own-write", b, window);
    signal_to(to_creator[1]);
    wait_for(to_watcher[0]);
    watch(session, "after-other-write", b, window);
    signal_to(to_creator[1]);
    check("C_Finalize", p11->C_Finalize(NULL));
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
