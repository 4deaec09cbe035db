# Builds p11ha and installs the module (Swift runtime linked in), p11hactl, the p11-kit registration, a sample config
# and a sample systemd-tmpfiles entry for a lock directory shared between users.
#
#   make                  swift build -c release (.build/release, for scripts/demo and scripts/bench)
#                         and the installable variant (Swift runtime static) in $(SCRATCH)/release
#   make install          PREFIX=/usr/local DESTDIR= P11KIT_MODULES=/usr/share/p11-kit/modules
#   make uninstall        the same variables as install
#
# The installable variant gets its own scratch path: its flags differ from a plain build's, and SwiftPM
# rebuilds everything when flags change, so sharing .build would throw away the developer's build each time.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
# A private directory, as Debian's softhsm2 does (/usr/lib/softhsm/libsofthsm2.so): the module is loaded by path
# (p11-kit module file, MODULE_PATH, --module), it is no library to link against, so it needs no soname or ldconfig.
MODULEDIR ?= $(PREFIX)/lib/p11ha
DOCDIR ?= $(PREFIX)/share/doc/p11ha
# p11bench, which p11hactl bench runs (found at ../libexec/p11ha/ beside p11hactl).
LIBEXECDIR ?= $(PREFIX)/libexec/p11ha
# Where packaged p11-kit module files go (pkg-config --variable=p11_module_configs p11-kit-1); an administrator's
# own registrations go to /etc/pkcs11/modules instead. Not under PREFIX: p11-kit looks only in its configured places.
P11KIT_MODULES ?= /usr/share/p11-kit/modules

SWIFT ?= swift
INSTALL ?= install
SCRATCH ?= .build-install
# --static-swift-stdlib applies to executables only (p11hactl); SwiftPM silently ignores it for the dynamic library,
# which needs the compiler's -static-stdlib at its link.
STATIC_BUILD = $(SWIFT) build -c release --scratch-path $(SCRATCH) --static-swift-stdlib -Xswiftc -static-stdlib

built = $(SCRATCH)/release
stamp = $(SCRATCH)/static.stamp
installed_module = $(MODULEDIR)/libp11ha.so
sources := Package.swift $(wildcard Package.resolved) $(shell find Sources CInterop -type f)

.PHONY: all build release static install uninstall clean

all: build

build: release static

release:
	$(SWIFT) build -c release

static: $(stamp)

# Rebuilt only when a source changed; the stamp also records that the module passed the runtime check.
$(stamp): $(sources)
	$(STATIC_BUILD) --product p11ha
	$(STATIC_BUILD) --product p11hactl
	@if readelf -d $(built)/libp11ha.so | grep -E 'NEEDED.*libswift|R(UN)?PATH.*/'; then \
	    echo "make: $(built)/libp11ha.so still needs the Swift toolchain's libraries (see above)" >&2; exit 1; fi
	touch $@

$(SCRATCH)/p11bench: Benchmarks/p11bench.c
	mkdir -p $(SCRATCH)
	$(CC) -O2 -Wall -Wextra $$(pkg-config --cflags p11-kit-1) -o $@ $< -ldl -lpthread

install: $(stamp) $(SCRATCH)/p11bench
	$(INSTALL) -d $(DESTDIR)$(MODULEDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(P11KIT_MODULES) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LIBEXECDIR)
	$(INSTALL) -m 0755 $(SCRATCH)/p11bench $(DESTDIR)$(LIBEXECDIR)/p11bench
	$(INSTALL) -s -m 0644 $(built)/libp11ha.so $(DESTDIR)$(installed_module)
	$(INSTALL) -s -m 0755 $(built)/p11hactl $(DESTDIR)$(BINDIR)/p11hactl
	printf '%s\n' \
	    '# p11ha: high-availability groups of PKCS#11 tokens, one virtual token per group.' \
	    '# Groups and members are configured in $$P11HA_CONF, else /etc/p11ha/p11ha.conf' \
	    '# (example: $(DOCDIR)/p11ha.conf.example). See pkcs11.conf(5) for this file.' \
	    'module: $(installed_module)' \
	    'critical: no' >$(DESTDIR)$(P11KIT_MODULES)/p11ha.module
	chmod 0644 $(DESTDIR)$(P11KIT_MODULES)/p11ha.module
	$(INSTALL) -m 0644 Examples/p11ha.conf $(DESTDIR)$(DOCDIR)/p11ha.conf.example
	$(INSTALL) -m 0644 Examples/tmpfiles.d/p11ha.conf $(DESTDIR)$(DOCDIR)/tmpfiles.d-p11ha.conf.example

uninstall:
	rm -f $(DESTDIR)$(installed_module) $(DESTDIR)$(BINDIR)/p11hactl $(DESTDIR)$(LIBEXECDIR)/p11bench \
	    $(DESTDIR)$(P11KIT_MODULES)/p11ha.module $(DESTDIR)$(DOCDIR)/p11ha.conf.example \
	    $(DESTDIR)$(DOCDIR)/tmpfiles.d-p11ha.conf.example
	-rmdir $(DESTDIR)$(MODULEDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LIBEXECDIR) 2>/dev/null

clean:
	rm -rf $(SCRATCH)
