# The one entry point for building, checking, testing and benchmarking xdevice.
# `make check` is what CI runs (.ci/run); it never modifies the tree.

CARGO     ?= cargo
TEST_ARGS ?=

.PHONY: build run check test test-long bench e2e guest-smoke install fmt clean deps-build deps-test \
	fuzz fuzz-seeds

# The Debian packages each target needs (scripts/deps: installs what is missing, as root, and
# says so; with nothing missing it is silent).
deps-build:
	scripts/deps build

deps-test:
	scripts/deps test

build: deps-build
	$(CARGO) build --release

# The README's first command: serve the embedded default as /dev/ublkbN, put ext4 on it, show
# status (ublk/guest/demo). Root. On a kernel without ublk it runs inside a QEMU guest; the first
# run installs QEMU and downloads the guest kernel (docs/guest.md).
run: build
	XDEVICE_BIN=$(CURDIR)/target/release/xdevice ublk/guest/test-e2e ublk/guest/demo

# --locked: fail, rather than rewrite Cargo.lock, if it is out of date.
check: deps-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(MAKE) test

# Release mode keeps the crash and fault-injection tests fast. It includes the ublk end-to-end
# tests (tests/ublk_e2e.rs: about 8 minutes in the QEMU guest; skipped without root or QEMU).
# Pass filters or harness flags through: make test TEST_ARGS='wal -- --nocapture'
test:
	$(CARGO) test --release --workspace $(TEST_ARGS)

test-long:
	XDEVICE_LONG=1 $(CARGO) test --release --workspace $(TEST_ARGS)

# ublk-device needs root; on a kernel without ublk it runs itself in the QEMU guest (docs/guest.md).
# pgbench always runs in the guest, on a virtio disk backed by a file here (docs/benchmarks.md).
bench:
	$(CARGO) bench --bench wal-append --bench group-commit --bench replay --bench replicated-commit --bench embedded-commit \
		--bench ublk-device --bench cache-read --bench cache-hit-ratio --bench cache-memory --bench pgbench

# The ublk end-to-end tests alone (docs/guest.md), natively when this kernel has ublk, otherwise
# in the QEMU guest; as root. Pick tests or groups: make e2e E2E='ext4 kill'
E2E ?=
e2e:
	$(CARGO) build --release --bin xdevice
	XDEVICE_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release/xdevice XDEVICE_GUEST_MEM=$${XDEVICE_GUEST_MEM:-6G} \
	    ublk/guest/test-e2e ublk/guest/e2e $(E2E)

# The ublk smoke test (docs/guest.md): natively when this kernel has ublk, otherwise inside a
# QEMU guest with Debian's backports kernel. Root; the first run downloads the kernel and
# builds rublk (minutes). Not part of `check`: the end-to-end tests above are.
guest-smoke:
	ublk/guest/test-e2e --rublk

# Installs the release build, the systemd units, the udev rule, the modules-load entry, shell
# completions and the man page (scripts/install). As root; stage with DESTDIR, relocate the
# binary and man page with PREFIX: make install DESTDIR=/tmp/stage PREFIX=/usr
DESTDIR ?=
PREFIX  ?= /usr/local
install: build
	BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/release/xdevice DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" scripts/install

# The cargo-fuzz targets (fuzz/, docs/testing.md "Fuzzing"), one at a time for FUZZ_SECS seconds
# each, starting from the committed seeds (fuzz/corpus/<target>, only read) with what they find
# kept under fuzz/target/corpus/<target>. Fails at the first target that crashes; libFuzzer
# leaves the input in fuzz/artifacts/<target>/. Nightly Rust; installs cargo-fuzz if missing.
# One target or a longer run: make fuzz FUZZ_TARGETS=frame FUZZ_SECS=600
FUZZ_CARGO   ?= cargo +nightly
FUZZ_SECS    ?= 60
FUZZ_TARGETS ?= frame wal_record entry superblock state_slot snapshot_chunk config raft_rpc request
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	$(FUZZ_CARGO) fuzz build
	@set -e; for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/target/corpus/$$t; \
	    echo "== fuzz $$t: $(FUZZ_SECS) s"; \
	    $(FUZZ_CARGO) fuzz run $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
	        -max_total_time=$(FUZZ_SECS) -rss_limit_mb=2048 -print_final_stats=1; \
	done

# Rewrites the seed files (fuzz/corpus/<target>/seed-*) from the library's encoders, after a
# format changes; crash reproducers kept beside them are left alone.
fuzz-seeds:
	$(FUZZ_CARGO) run --manifest-path fuzz/Cargo.toml --bin seeds

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
