/*
 * timed_writes: an application that writes and signs through a PKCS#11 module while the tests meddle with the
 * host's lock directory, timing every call, then stays alive (the module's background work goes on) until told
 * to finish. Used by Tests/IntegrationTests/HostFileTests.swift.
 *
 *   cc $(pkg-config --cflags p11-kit-1) -o timed_writes timed_writes.c -ldl
 *   ./timed_writes MODULE_PATH TOKEN_LABEL PIN ROUNDS FINISH_FILE
 *
 * It imports an HMAC key (C_CreateObject, a token object), then ROUNDS times creates a token data object and
 * signs with the key. Each call prints "duration NAME SECONDS"; once every write is done it prints
 * "writes N" (the token objects it created). It then waits (up to 300 s) until FINISH_FILE exists, calls
 * C_Finalize (timed too) and exits 0. Any failed call prints its CK_RV and exits 1; usage errors exit 2.
 */

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p11;

static void check(const char *what, CK_RV rv)
{
    if (rv != CKR_OK) {
        fprintf(stderr, "timed_writes: %s failed: CK_RV 0x%08lx\n", what, (unsigned long)rv);
        exit(1);
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Every call is timed the same way: the tests compare each duration with the operation-timeout. */
static void report(const char *name, double started)
{
    printf("duration %s %.3f\n", name, now() - started);
    fflush(stdout);
}

static CK_SLOT_ID find_slot(const char *label)
{
    CK_SLOT_ID slots[16];
    CK_ULONG count = 16;
    check("C_GetSlotList", p11->C_GetSlotList(CK_TRUE, slots, &count));
    size_t len = strlen(label);
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        check("C_GetTokenInfo", p11->C_GetTokenInfo(slots[i], &info));
        if (len <= 32 && memcmp(info.label, label, len) == 0 && (len == 32 || info.label[len] == ' '))
            return slots[i];
    }
    fprintf(stderr, "timed_writes: no token labelled \"%s\"\n", label);
    exit(1);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODULE_PATH TOKEN_LABEL PIN ROUNDS FINISH_FILE\n", argv[0]);
        return 2;
    }
    const char *pin = argv[3];
    int rounds = atoi(argv[4]);
    const char *finish = argv[5];

    void *handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "timed_writes: cannot load %s: %s\n", argv[1], dlerror());
        return 1;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get == NULL) {
        fprintf(stderr, "timed_writes: no C_GetFunctionList in %s\n", argv[1]);
        return 1;
    }
    check("C_GetFunctionList", get(&p11));

    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    double t = now();
    check("C_Initialize", p11->C_Initialize(&init_args));
    report("C_Initialize", t);

    CK_SLOT_ID slot = find_slot(argv[2]);
    CK_SESSION_HANDLE session;
    t = now();
    check("C_OpenSession", p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session));
    report("C_OpenSession", t);
    t = now();
    check("C_Login", p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    report("C_Login", t);

    /* A key imported by value is replayed on every member: a write like any other. */
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY, data = CKO_DATA;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE;
    CK_BYTE value[32];
    for (size_t i = 0; i < sizeof value; i++)
        value[i] = (CK_BYTE)(i * 7 + 3);
    char label[64];
    snprintf(label, sizeof label, "timed-writes-key-%ld", (long)getpid());
    CK_ATTRIBUTE key_template[] = {
        { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &yes, sizeof yes },       { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SIGN, &yes, sizeof yes },        { CKA_LABEL, label, strlen(label) },
        { CKA_VALUE, value, sizeof value },
    };
    CK_OBJECT_HANDLE key;
    t = now();
    check("C_CreateObject", p11->C_CreateObject(session, key_template, 7, &key));
    report("C_CreateObject", t);
    int writes = 1;

    for (int round = 0; round < rounds; round++) {
        char name[64];
        snprintf(name, sizeof name, "timed-writes-%ld-%d", (long)getpid(), round);
        CK_ATTRIBUTE object_template[] = {
            { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &yes, sizeof yes }, { CKA_PRIVATE, &yes, sizeof yes },
            { CKA_LABEL, name, strlen(name) }, { CKA_VALUE, name, strlen(name) },
        };
        CK_OBJECT_HANDLE object;
        t = now();
        check("C_CreateObject", p11->C_CreateObject(session, object_template, 5, &object));
        report("C_CreateObject", t);
        writes++;

        CK_MECHANISM hmac = { CKM_SHA256_HMAC, NULL, 0 };
        CK_BYTE signature[32];
        CK_ULONG signature_len = sizeof signature;
        t = now();
        check("C_SignInit", p11->C_SignInit(session, &hmac, key));
        check("C_Sign", p11->C_Sign(session, (CK_BYTE_PTR)name, strlen(name), signature, &signature_len));
        report("C_SignInit+C_Sign", t);
    }
    printf("writes %d\n", writes);
    fflush(stdout);

    /* Alive until told: what p11ha left for its background worker happens in this process. */
    for (int waited = 0; access(finish, F_OK) != 0; waited++) {
        if (waited >= 6000) {
            fprintf(stderr, "timed_writes: %s did not appear within 300 s\n", finish);
            return 1;
        }
        usleep(50000);
    }
    t = now();
    check("C_Finalize", p11->C_Finalize(NULL));
    report("C_Finalize", t);
    return 0;
}
