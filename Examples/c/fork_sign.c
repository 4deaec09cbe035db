/*
 * fork_sign: checks that a PKCS#11 module survives the nginx master/worker
 * pattern: a process initializes the module, logs in and uses keys, then
 * forks a worker that starts the module afresh and signs with the same keys,
 * while the parent keeps using its own session and handles.
 *
 *   cc $(pkg-config --cflags p11-kit-1) -o fork_sign fork_sign.c -ldl
 *   ./fork_sign MODULE_PATH TOKEN_LABEL PIN
 *
 * PKCS#11 says a child must call C_Initialize before using a module it
 * inherited; a module that ignores fork answers CKR_CRYPTOKI_ALREADY_INITIALIZED
 * there and fails this test. (SoftHSM does so unless its configuration sets
 * library.reset_on_fork = true.)
 *
 * The key pair is made of token objects labelled "fork-<pid>" because the child
 * cannot see the parent's session objects; the parent destroys them at the end.
 * Prints "fork_sign: ok" and exits 0 only if every step worked, in both
 * processes; otherwise exits 1.
 */

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p11;
static const char *role = "parent";     /* which process is talking, for messages */

/* Reports a failed call; returns whether the call worked so callers can chain. */
static int ok(const char *what, CK_RV rv)
{
    if (rv != CKR_OK)
        fprintf(stderr, "fork_sign (%s): %s failed: CK_RV 0x%08lx\n",
                role, what, (unsigned long)rv);
    return rv == CKR_OK;
}

static void load_module(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "fork_sign: cannot load %s: %s\n", path, dlerror());
        exit(1);
    }
    CK_C_GetFunctionList get_function_list =
        (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_function_list == NULL) {
        fprintf(stderr, "fork_sign: %s has no C_GetFunctionList\n", path);
        exit(1);
    }
    if (!ok("C_GetFunctionList", get_function_list(&p11)))
        exit(1);
}

static CK_RV initialize(void)
{
    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    return p11->C_Initialize(&init_args);
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

static int find_slot(const char *token_label, CK_SLOT_ID *slot)
{
    CK_SLOT_ID slots[64];
    CK_ULONG count = sizeof slots / sizeof slots[0];
    if (!ok("C_GetSlotList", p11->C_GetSlotList(CK_TRUE, slots, &count)))
        return 0;
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        if (!ok("C_GetTokenInfo", p11->C_GetTokenInfo(slots[i], &info)))
            return 0;
        if (label_matches(info.label, token_label)) {
            *slot = slots[i];
            return 1;
        }
    }
    fprintf(stderr, "fork_sign (%s): no token labelled \"%s\"\n", role, token_label);
    return 0;
}

/* Login state belongs to the application, so a session opened after another
 * one logged in may already be logged in: both answers mean "you may sign". */
static int open_and_login(CK_SLOT_ID slot, const char *pin, CK_SESSION_HANDLE *session)
{
    if (!ok("C_OpenSession", p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                                NULL, NULL, session)))
        return 0;
    CK_RV rv = p11->C_Login(*session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv == CKR_USER_ALREADY_LOGGED_IN)
        rv = CKR_OK;
    return ok("C_Login", rv);
}

static int generate_token_key_pair(CK_SESSION_HANDLE session, const char *label,
                                   CK_OBJECT_HANDLE *public_key,
                                   CK_OBJECT_HANDLE *private_key)
{
    /* DER encoding of the OID prime256v1 (1.2.840.10045.3.1.7), i.e. NIST P-256. */
    static CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE public_template[] = {
        { CKA_EC_PARAMS, p256, sizeof p256 },
        { CKA_VERIFY, &yes, sizeof yes },
        { CKA_TOKEN, &yes, sizeof yes },
        { CKA_LABEL, (void *)label, strlen(label) },
    };
    CK_ATTRIBUTE private_template[] = {
        { CKA_SIGN, &yes, sizeof yes },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
        { CKA_TOKEN, &yes, sizeof yes },
        { CKA_LABEL, (void *)label, strlen(label) },
    };
    CK_MECHANISM mechanism = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    return ok("C_GenerateKeyPair",
              p11->C_GenerateKeyPair(session, &mechanism,
                                     public_template, sizeof public_template / sizeof public_template[0],
                                     private_template, sizeof private_template / sizeof private_template[0],
                                     public_key, private_key));
}

/* The child cannot use the parent's handles: it looks the keys up by label. */
static int find_key(CK_SESSION_HANDLE session, CK_OBJECT_CLASS class, const char *label,
                    CK_OBJECT_HANDLE *key)
{
    CK_ATTRIBUTE template[] = {
        { CKA_CLASS, &class, sizeof class },
        { CKA_LABEL, (void *)label, strlen(label) },
    };
    CK_ULONG found = 0;
    if (!ok("C_FindObjectsInit", p11->C_FindObjectsInit(session, template, 2)))
        return 0;
    CK_RV rv = p11->C_FindObjects(session, key, 1, &found);
    /* Always end the search: an open search blocks other operations on the session. */
    CK_RV final_rv = p11->C_FindObjectsFinal(session);
    if (!ok("C_FindObjects", rv) || !ok("C_FindObjectsFinal", final_rv))
        return 0;
    if (found != 1) {
        fprintf(stderr, "fork_sign (%s): no %s key labelled \"%s\"\n", role,
                class == CKO_PRIVATE_KEY ? "private" : "public", label);
        return 0;
    }
    return 1;
}

/* CKM_ECDSA signs a digest the caller made; any 32 bytes stand in for one here. */
static int sign_and_verify(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE private_key,
                           CK_OBJECT_HANDLE public_key)
{
    CK_BYTE digest[32];
    for (size_t i = 0; i < sizeof digest; i++)
        digest[i] = (CK_BYTE)(i * 7 + 1);
    CK_MECHANISM mechanism = { CKM_ECDSA, NULL, 0 };
    CK_BYTE signature[128];
    CK_ULONG signature_len = sizeof signature;

    return ok("C_SignInit", p11->C_SignInit(session, &mechanism, private_key))
        && ok("C_Sign", p11->C_Sign(session, digest, sizeof digest,
                                    signature, &signature_len))
        && ok("C_VerifyInit", p11->C_VerifyInit(session, &mechanism, public_key))
        && ok("C_Verify", p11->C_Verify(session, digest, sizeof digest,
                                        signature, signature_len));
}

/* The worker: starts the module afresh and finds everything again by name. */
static int run_child(const char *token_label, const char *pin, const char *key_label)
{
    role = "child";
    CK_RV rv = initialize();
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)
        fprintf(stderr, "fork_sign (child): the module kept the parent's state "
                        "across fork instead of starting afresh\n");
    if (!ok("C_Initialize", rv))
        return 1;

    CK_SLOT_ID slot;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE private_key, public_key;
    if (!find_slot(token_label, &slot)
        || !open_and_login(slot, pin, &session)
        || !find_key(session, CKO_PRIVATE_KEY, key_label, &private_key)
        || !find_key(session, CKO_PUBLIC_KEY, key_label, &public_key)
        || !sign_and_verify(session, private_key, public_key))
        return 1;
    printf("child %d: C_Initialize, login, find by label, sign, verify: ok\n", (int)getpid());

    if (!ok("C_CloseSession", p11->C_CloseSession(session))
        || !ok("C_Finalize", p11->C_Finalize(NULL)))
        return 1;
    return 0;
}

static int wait_for_child(pid_t child)
{
    int status;
    if (waitpid(child, &status, 0) != child) {
        perror("fork_sign (parent): waitpid");
        return 0;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 1;
    if (WIFSIGNALED(status))
        fprintf(stderr, "fork_sign (parent): child killed by signal %d\n", WTERMSIG(status));
    else
        fprintf(stderr, "fork_sign (parent): child exited with status %d\n", WEXITSTATUS(status));
    return 0;
}

/* Forks the worker and waits for it; returns whether it succeeded. */
static int fork_worker(const char *token_label, const char *pin, const char *key_label)
{
    /* Unflushed output would otherwise be printed twice, once by each process. */
    fflush(stdout);
    fflush(stderr);
    pid_t child = fork();
    if (child < 0) {
        perror("fork_sign (parent): fork");
        return 0;
    }
    if (child == 0) {
        int status = run_child(token_label, pin, key_label);
        fflush(stdout);
        exit(status);
    }
    return wait_for_child(child);
}

/* Runs every step even after a failure, so that no "fork-<pid>" keys pile up. */
static int clean_up(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE private_key,
                    CK_OBJECT_HANDLE public_key)
{
    int cleaned = ok("C_DestroyObject", p11->C_DestroyObject(session, private_key));
    cleaned &= ok("C_DestroyObject", p11->C_DestroyObject(session, public_key));
    cleaned &= ok("C_Logout", p11->C_Logout(session));
    cleaned &= ok("C_CloseSession", p11->C_CloseSession(session));
    cleaned &= ok("C_Finalize", p11->C_Finalize(NULL));
    return cleaned;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODULE_PATH TOKEN_LABEL PIN\n", argv[0]);
        return 2;
    }
    const char *module_path = argv[1];
    const char *token_label = argv[2];
    const char *pin = argv[3];
    char key_label[32];
    snprintf(key_label, sizeof key_label, "fork-%d", (int)getpid());

    load_module(module_path);
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE private_key, public_key;
    if (!ok("C_Initialize", initialize())
        || !find_slot(token_label, &slot)
        || !open_and_login(slot, pin, &session)
        || !generate_token_key_pair(session, key_label, &public_key, &private_key))
        return 1;
    printf("parent %d: key pair \"%s\" generated on the token\n", (int)getpid(), key_label);

    if (!sign_and_verify(session, private_key, public_key)) {
        clean_up(session, private_key, public_key);
        return 1;
    }
    printf("parent %d: sign, verify: ok\n", (int)getpid());

    int child_ok = fork_worker(token_label, pin, key_label);

    /* The same session and handles as before the fork, checked even when the
     * child failed: the child must not have closed, logged out or reused
     * anything of ours. */
    int parent_ok = sign_and_verify(session, private_key, public_key);
    if (parent_ok)
        printf("parent %d: sign, verify with the original session after the child: ok\n",
               (int)getpid());

    if (!clean_up(session, private_key, public_key) || !child_ok || !parent_ok)
        return 1;
    printf("fork_sign: ok\n");
    return 0;
}
