/*
 * fork_storm: forks many children from a process whose threads are signing
 * through a PKCS#11 module, as nginx, a CA or a preforking server does; each
 * child starts the module afresh (C_Initialize), logs in, signs (20 times, or
 * FORK_STORM_CHILD_SIGNATURES) and exits.
 *
 *   cc $(pkg-config --cflags p11-kit-1) -o fork_storm fork_storm.c -ldl -lpthread
 *   ./fork_storm MODULE TOKEN PIN KEY_LABEL CHILDREN THREADS MODE CHILD_SECONDS
 *
 * MODE "sequential": the parent, with THREADS threads signing, forks CHILDREN
 * children one after another and waits for each.
 * MODE "daemon": the nginx pattern. The parent forks once and exits at once
 * (exit(3), so its atexit handlers run while the module's threads work); the
 * child, which never calls C_Initialize itself, forks CHILDREN workers one
 * after another, each of which starts the module and signs.
 *
 * With FORK_STORM_GO=PATH in the environment, the threads sign until the file
 * PATH exists before the first fork (so a test can fail members meanwhile).
 *
 * A child that has not exited after CHILD_SECONDS is a hang (killed, counted);
 * one killed by a signal is a crash; one that exits non-zero failed a step.
 * Prints "fork_storm: children=N crashes=C hangs=H failures=F parent_signatures=S
 * parent_errors=E" at the end and exits 0 only when C, H and F are 0.
 */

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p11;
static const char *token_label, *pin, *key_label;
static int child_signatures = 20;
static volatile int stop_signing;
static unsigned long parent_signatures, parent_errors;
static pthread_mutex_t counts = PTHREAD_MUTEX_INITIALIZER;

static void load_module(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "fork_storm: cannot load %s: %s\n", path, dlerror());
        exit(1);
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get == NULL || get(&p11) != CKR_OK) {
        fprintf(stderr, "fork_storm: %s: no usable C_GetFunctionList\n", path);
        exit(1);
    }
}

static CK_RV initialize(void)
{
    CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    return p11->C_Initialize(&args);
}

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

/* Opens a session on the token labelled token_label; CK_INVALID_HANDLE on failure (reported). */
static CK_SESSION_HANDLE open_session(const char *who)
{
    CK_SLOT_ID slots[16];
    CK_ULONG count = 16;
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK) {
        fprintf(stderr, "fork_storm (%s): C_GetSlotList: 0x%lx\n", who, rv);
        return CK_INVALID_HANDLE;
    }
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK || !label_matches(info.label, token_label))
            continue;
        CK_SESSION_HANDLE session;
        rv = p11->C_OpenSession(slots[i], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session);
        if (rv != CKR_OK) {
            fprintf(stderr, "fork_storm (%s): C_OpenSession: 0x%lx\n", who, rv);
            return CK_INVALID_HANDLE;
        }
        return session;
    }
    fprintf(stderr, "fork_storm (%s): no token labelled %s\n", who, token_label);
    return CK_INVALID_HANDLE;
}

static CK_OBJECT_HANDLE find_private_key(CK_SESSION_HANDLE session, const char *who)
{
    CK_OBJECT_CLASS class = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE template[] = {
        {CKA_CLASS, &class, sizeof class},
        {CKA_LABEL, (void *)key_label, strlen(key_label)},
    };
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    CK_ULONG found = 0;
    CK_RV rv = p11->C_FindObjectsInit(session, template, 2);
    if (rv == CKR_OK)
        rv = p11->C_FindObjects(session, &key, 1, &found);
    p11->C_FindObjectsFinal(session);
    if (rv != CKR_OK || found != 1) {
        fprintf(stderr, "fork_storm (%s): private key %s: 0x%lx, found %lu\n", who, key_label, rv, found);
        return CK_INVALID_HANDLE;
    }
    return key;
}

static CK_RV sign_once(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key)
{
    CK_MECHANISM mechanism = {CKM_ECDSA, NULL, 0};
    unsigned char digest[32], signature[256];
    CK_ULONG length = sizeof signature;
    memset(digest, 0x5a, sizeof digest);
    CK_RV rv = p11->C_SignInit(session, &mechanism, key);
    if (rv == CKR_OK)
        rv = p11->C_Sign(session, digest, sizeof digest, signature, &length);
    return rv;
}

static void *signer(void *unused)
{
    (void)unused;
    CK_SESSION_HANDLE session = open_session("parent thread");
    CK_OBJECT_HANDLE key = session == CK_INVALID_HANDLE ? CK_INVALID_HANDLE : find_private_key(session, "parent thread");
    while (!stop_signing) {
        CK_RV rv = key == CK_INVALID_HANDLE ? CKR_GENERAL_ERROR : sign_once(session, key);
        pthread_mutex_lock(&counts);
        if (rv == CKR_OK)
            parent_signatures++;
        else
            parent_errors++;
        pthread_mutex_unlock(&counts);
        if (rv != CKR_OK) {
            if (parent_errors <= 5)
                fprintf(stderr, "fork_storm (parent thread): sign: 0x%lx\n", rv);
            usleep(10000);
        }
    }
    if (session != CK_INVALID_HANDLE)
        p11->C_CloseSession(session);
    return NULL;
}

/* What each child does: start the module afresh, log in, sign, finalize, exit. */
static void child(void)
{
    CK_RV rv = initialize();
    if (rv != CKR_OK) {
        fprintf(stderr, "fork_storm (child %d): C_Initialize: 0x%lx\n", getpid(), rv);
        exit(3);
    }
    CK_SESSION_HANDLE session = open_session("child");
    if (session == CK_INVALID_HANDLE)
        exit(4);
    rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        fprintf(stderr, "fork_storm (child %d): C_Login: 0x%lx\n", getpid(), rv);
        exit(5);
    }
    CK_OBJECT_HANDLE key = find_private_key(session, "child");
    if (key == CK_INVALID_HANDLE)
        exit(6);
    /* Several signatures: p11ha's own threads in the child (recovery of the member that is down) work beside
       this thread meanwhile, so that the locks both take meet. */
    for (int i = 0; i < child_signatures; i++) {
        rv = sign_once(session, key);
        if (rv != CKR_OK) {
            fprintf(stderr, "fork_storm (child %d): C_Sign: 0x%lx\n", getpid(), rv);
            exit(7);
        }
    }
    rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK) {
        fprintf(stderr, "fork_storm (child %d): C_Finalize: 0x%lx\n", getpid(), rv);
        exit(8);
    }
    exit(0);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Forks `children` children one after another; returns the number of crashes, hangs and failures. */
static void storm(int children, double child_seconds, int *crashes, int *hangs, int *failures)
{
    for (int i = 0; i < children; i++) {
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork_storm: fork");
            (*failures)++;
            continue;
        }
        if (pid == 0)
            child();
        int status = 0;
        double deadline = now() + child_seconds;
        pid_t done;
        while ((done = waitpid(pid, &status, WNOHANG)) == 0 && now() < deadline)
            usleep(1000);
        if (done == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fprintf(stderr, "fork_storm: child %d (#%d) hung: killed after %.1f s\n", pid, i, child_seconds);
            (*hangs)++;
        } else if (WIFSIGNALED(status)) {
            fprintf(stderr, "fork_storm: child %d (#%d) crashed: signal %d\n", pid, i, WTERMSIG(status));
            (*crashes)++;
        } else if (WEXITSTATUS(status) != 0) {
            fprintf(stderr, "fork_storm: child %d (#%d) failed: exit status %d\n", pid, i, WEXITSTATUS(status));
            (*failures)++;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: fork_storm MODULE TOKEN PIN KEY_LABEL CHILDREN THREADS sequential|daemon CHILD_SECONDS\n");
        return 2;
    }
    token_label = argv[2];
    pin = argv[3];
    key_label = argv[4];
    int children = atoi(argv[5]), threads = atoi(argv[6]);
    int daemon_mode = strcmp(argv[7], "daemon") == 0;
    double child_seconds = atof(argv[8]);
    /* A child's messages must not be lost in a pipe buffer when it is killed. */
    setvbuf(stdout, NULL, _IONBF, 0);

    load_module(argv[1]);
    CK_RV rv = initialize();
    if (rv != CKR_OK) {
        fprintf(stderr, "fork_storm: C_Initialize: 0x%lx\n", rv);
        return 1;
    }
    CK_SESSION_HANDLE session = open_session("parent");
    if (session == CK_INVALID_HANDLE)
        return 1;
    rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK) {
        fprintf(stderr, "fork_storm: C_Login: 0x%lx\n", rv);
        return 1;
    }

    pthread_t signers[64];
    if (threads > 64)
        threads = 64;
    for (int i = 0; i < threads; i++)
        pthread_create(&signers[i], NULL, signer, NULL);
    printf("fork_storm: %d threads signing\n", threads);
    const char *go = getenv("FORK_STORM_GO");
    if (getenv("FORK_STORM_CHILD_SIGNATURES") != NULL)
        child_signatures = atoi(getenv("FORK_STORM_CHILD_SIGNATURES"));
    double waited = now();
    while (go != NULL && access(go, F_OK) != 0 && now() - waited < 120)
        usleep(10000);
    /* Let the threads get going before the first fork. */
    usleep(200000);

    int crashes = 0, hangs = 0, failures = 0;
    if (daemon_mode) {
        /* nginx: the process that read the configuration (no thread of its own signing) forks and exits; the
           daemon forks the workers. p11ha's own threads may still be at work when the parent exits. */
        stop_signing = 1;
        for (int i = 0; i < threads; i++)
            pthread_join(signers[i], NULL);
        pid_t daemon = fork();
        if (daemon < 0) {
            perror("fork_storm: fork");
            return 1;
        }
        if (daemon > 0) {
            printf("fork_storm: parent exits, daemon %d goes on\n", daemon);
            exit(0);
        }
        setsid();
        storm(children, child_seconds, &crashes, &hangs, &failures);
    } else {
        storm(children, child_seconds, &crashes, &hangs, &failures);
        stop_signing = 1;
        for (int i = 0; i < threads; i++)
            pthread_join(signers[i], NULL);
        p11->C_Finalize(NULL);
    }
    printf("fork_storm: children=%d crashes=%d hangs=%d failures=%d parent_signatures=%lu parent_errors=%lu\n",
           children, crashes, hangs, failures, parent_signatures, parent_errors);
    return crashes == 0 && hangs == 0 && failures == 0 ? 0 : 1;
}
