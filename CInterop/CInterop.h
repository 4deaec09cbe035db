/* C declarations p11ha needs: PKCS#11 2.40 (p11-kit's header), the 3.0 interface types it lacks, p11-kit's URI API. No logic. */
#ifndef P11HA_CINTEROP_H
#define P11HA_CINTEROP_H

#include <p11-kit/pkcs11.h>
#include <p11-kit/uri.h>
#include <dlfcn.h>
#include <syslog.h>

/* PKCS#11 3.0 interface discovery (absent from p11-kit 0.24's 2.40 header). */
typedef struct CK_INTERFACE {
    CK_CHAR *pInterfaceName;
    CK_VOID_PTR pFunctionList;
    CK_FLAGS flags;
} CK_INTERFACE;
typedef CK_INTERFACE *CK_INTERFACE_PTR;
typedef CK_INTERFACE **CK_INTERFACE_PTR_PTR;

/* PKCS#11 3.0's parameter of CKM_EDDSA (absent from p11-kit 0.24's header). */
typedef struct CK_EDDSA_PARAMS {
    CK_BBOOL phFlag;
    CK_ULONG ulContextDataLen;
    CK_BYTE_PTR pContextData;
} CK_EDDSA_PARAMS;

/* Macros the Swift importer cannot see through a cast. */
static const CK_ULONG P11HA_CK_UNAVAILABLE_INFORMATION = (CK_ULONG)~0UL;
static const CK_ULONG P11HA_CKF_ARRAY_ATTRIBUTE = 0x40000000UL;

#endif
