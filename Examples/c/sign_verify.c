/*
 * sign_verify: the smallest complete PKCS#11 client: load a module, log in to
 * a token, make an EC P-256 key pair, sign a SHA-256 digest and verify it.
 *
 * It works with any PKCS#11 2.40 module: p11ha (libp11ha.so) or a token's own
 * module such as SoftHSM's.
 *
 *   cc $(pkg-config --cflags p11-kit-1) -o sign_verify sign_verify.c -ldl
 *   ./sign_verify MODULE_PATH TOKEN_LABEL PIN [KEY_LABEL]
 *
 * Without KEY_LABEL the keys are session objects and vanish when the session
 * closes. With KEY_LABEL they are token objects that stay on the token under
 * that label (delete them with `pkcs11-tool --delete-object` or p11tool).
 *
 * Exit status: 0 on success, 1 on any failure (a failed call prints its CK_RV),
 * 2 on a usage error.
 */

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p11;

/* Every failure ends the program: this keeps the happy path readable. */
static void fail(const char *what, CK_RV rv)
{
    fprintf(stderr, "sign_verify: %s failed: CK_RV 0x%08lx\n", what, (unsigned long)rv);
    exit(1);
}

static void check(const char *what, CK_RV rv)
{
    if (rv != CKR_OK)
        fail(what, rv);
}

static void load_module(const char *path)
{
    /* RTLD_NOW: a module with a missing symbol should fail here, not mid-call. */
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "sign_verify: cannot load %s: %s\n", path, dlerror());
        exit(1);
    }
    CK_C_GetFunctionList get_function_list =
        (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_function_list == NULL) {
        fprintf(stderr, "sign_verify: %s has no C_GetFunctionList\n", path);
        exit(1);
    }
    check("C_GetFunctionList", get_function_list(&p11));
    printf("loaded %s (Cryptoki %d.%d)\n", path,
           p11->version.major, p11->version.minor);
}

/* Token labels are fixed 32-byte fields padded with spaces, not C strings. */
static int label_matches(const unsigned char field[32], const char *label)
{
    size_t len = strlen(label);
    if (len > 32)
        return 0;
    if (memcmp(field, label, len) != 0)
        return 0;
    for (size_t i = len; i < 32; i++)
        if (field[i] != ' ')
            return 0;
    return 1;
}

static CK_SLOT_ID find_slot(const char *token_label)
{
    CK_ULONG count = 0;
    check("C_GetSlotList", p11->C_GetSlotList(CK_TRUE, NULL, &count));
    CK_SLOT_ID *slots = calloc(count ? count : 1, sizeof *slots);
    if (slots == NULL)
        fail("calloc", CKR_HOST_MEMORY);
    check("C_GetSlotList", p11->C_GetSlotList(CK_TRUE, slots, &count));

    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        check("C_GetTokenInfo", p11->C_GetTokenInfo(slots[i], &info));
        if (label_matches(info.label, token_label)) {
            CK_SLOT_ID slot = slots[i];
            free(slots);
            printf("token \"%s\" is in slot %lu\n", token_label, (unsigned long)slot);
            return slot;
        }
    }
    fprintf(stderr, "sign_verify: no token labelled \"%s\" (%lu slots with a token)\n",
            token_label, (unsigned long)count);
    exit(1);
}

static void generate_p256_key_pair(CK_SESSION_HANDLE session, const char *key_label,
                                   CK_OBJECT_HANDLE *public_key,
                                   CK_OBJECT_HANDLE *private_key)
{
    /* DER encoding of the OID prime256v1 (1.2.840.10045.3.1.7), i.e. NIST P-256. */
    static CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL on_token = key_label != NULL ? CK_TRUE : CK_FALSE;
    CK_ULONG label_len = key_label != NULL ? strlen(key_label) : 0;

    /* The label goes last so that it can be left out by shortening the count. */
    CK_ATTRIBUTE public_template[] = {
        { CKA_EC_PARAMS, p256, sizeof p256 },
        { CKA_VERIFY, &yes, sizeof yes },
        { CKA_TOKEN, &on_token, sizeof on_token },
        { CKA_LABEL, (void *)key_label, label_len },
    };
    /* Sensitive: the private key can be used but never read out of the token. */
    CK_ATTRIBUTE private_template[] = {
        { CKA_SIGN, &yes, sizeof yes },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
        { CKA_TOKEN, &on_token, sizeof on_token },
        { CKA_LABEL, (void *)key_label, label_len },
    };
    CK_ULONG public_count = sizeof public_template / sizeof public_template[0];
    CK_ULONG private_count = sizeof private_template / sizeof private_template[0];
    if (key_label == NULL) {
        public_count--;
        private_count--;
    }

    CK_MECHANISM mechanism = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    check("C_GenerateKeyPair",
          p11->C_GenerateKeyPair(session, &mechanism,
                                 public_template, public_count,
                                 private_template, private_count,
                                 public_key, private_key));
    if (key_label != NULL)
        printf("generated EC P-256 key pair \"%s\" (token objects, kept)\n", key_label);
    else
        printf("generated EC P-256 key pair (session objects)\n");
}

/* Hash on the token too, so the program needs nothing but the module. */
static void sha256(CK_SESSION_HANDLE session, const char *message, CK_BYTE digest[32])
{
    CK_MECHANISM mechanism = { CKM_SHA256, NULL, 0 };
    CK_ULONG digest_len = 32;
    check("C_DigestInit", p11->C_DigestInit(session, &mechanism));
    check("C_Digest", p11->C_Digest(session, (CK_BYTE_PTR)message, strlen(message),
                                    digest, &digest_len));
}

/* CKM_ECDSA signs a digest the caller made; its signature is r || s. */
static CK_ULONG sign(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE private_key,
                     CK_BYTE digest[32], CK_BYTE *signature, CK_ULONG capacity)
{
    CK_MECHANISM mechanism = { CKM_ECDSA, NULL, 0 };
    CK_ULONG signature_len = capacity;
    check("C_SignInit", p11->C_SignInit(session, &mechanism, private_key));
    check("C_Sign", p11->C_Sign(session, digest, 32, signature, &signature_len));
    return signature_len;
}

/* Returns the CK_RV of C_Verify: CKR_OK or CKR_SIGNATURE_INVALID are both answers. */
static CK_RV verify(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE public_key,
                    CK_BYTE digest[32], CK_BYTE *signature, CK_ULONG signature_len)
{
    CK_MECHANISM mechanism = { CKM_ECDSA, NULL, 0 };
    check("C_VerifyInit", p11->C_VerifyInit(session, &mechanism, public_key));
    return p11->C_Verify(session, digest, 32, signature, signature_len);
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s MODULE_PATH TOKEN_LABEL PIN [KEY_LABEL]\n", argv[0]);
        return 2;
    }
    const char *module_path = argv[1];
    const char *token_label = argv[2];
    const char *pin = argv[3];
    const char *key_label = argc == 5 ? argv[4] : NULL;

    load_module(module_path);

    /* Let the module use the OS's own locks: applications calling it from
     * several threads need this, and it is the usual choice. */
    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    check("C_Initialize", p11->C_Initialize(&init_args));

    CK_SLOT_ID slot = find_slot(token_label);

    /* CKF_SERIAL_SESSION is mandatory; CKF_RW_SESSION lets us create objects. */
    CK_SESSION_HANDLE session;
    check("C_OpenSession", p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                              NULL, NULL, &session));
    check("C_Login", p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    printf("logged in as user\n");

    CK_OBJECT_HANDLE public_key, private_key;
    generate_p256_key_pair(session, key_label, &public_key, &private_key);

    const char *message = "p11ha sign_verify example";
    CK_BYTE digest[32];
    sha256(session, message, digest);
    printf("SHA-256 of \"%s\" computed on the token\n", message);

    CK_BYTE signature[128];
    CK_ULONG signature_len = sign(session, private_key, digest, signature, sizeof signature);
    printf("signed with CKM_ECDSA: %lu-byte signature\n", (unsigned long)signature_len);

    check("C_Verify", verify(session, public_key, digest, signature, signature_len));
    printf("verified: signature is valid\n");

    /* Flip the lowest bit of s: still a well-formed signature, but a wrong one. */
    signature[signature_len - 1] ^= 0x01;
    CK_RV rv = verify(session, public_key, digest, signature, signature_len);
    if (rv != CKR_SIGNATURE_INVALID) {
        fprintf(stderr, "sign_verify: tampered signature: expected CKR_SIGNATURE_INVALID "
                        "(0x%08lx), got CK_RV 0x%08lx\n",
                (unsigned long)CKR_SIGNATURE_INVALID, (unsigned long)rv);
        return 1;
    }
    printf("verified: tampered signature is rejected (CKR_SIGNATURE_INVALID)\n");

    check("C_Logout", p11->C_Logout(session));
    check("C_CloseSession", p11->C_CloseSession(session));
    check("C_Finalize", p11->C_Finalize(NULL));
    printf("sign_verify: ok\n");
    return 0;
}
