# The one entry point for building, checking, testing and benchmarking xdevice.
# `make check` is what CI runs (.ci/run); it never modifies the tree.

CARGO     ?= cargo
TEST_ARGS ?=

.PHONY: build run check test test-long bench guest-smoke fmt clean

build:
	$(CARGO) build --release

# The README's first command: serve the embedded default as /dev/ublkbN, put ext4 on it, show
# status (ublk/guest/demo). Root. On a kernel without ublk it runs inside a QEMU guest; the first
# run installs QEMU and downloads the guest kernel (docs/guest.md).
run: build
	XDEVICE_BIN=$(CURDIR)/target/release/xdevice ublk/guest/test-e2e ublk/guest/demo

# --locked: fail, rather than rewrite Cargo.lock, if it is out of date.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(MAKE) test

# Release mode keeps the crash and fault-injection tests fast.
# Pass filters or harness flags through: make test TEST_ARGS='wal -- --nocapture'
test:
	$(CARGO) test --release --workspace $(TEST_ARGS)

test-long:
	XDEVICE_LONG=1 $(CARGO) test --release --workspace $(TEST_ARGS)

bench:
	$(CARGO) bench --bench wal-append --bench group-commit --bench replay --bench replicated-commit

# The ublk smoke test (docs/guest.md): natively when this kernel has ublk, otherwise inside a
# QEMU guest with Debian's backports kernel. Root; the first run downloads the kernel and
# builds rublk (minutes). Not part of `check` until the ublk frontend exists.
guest-smoke:
	ublk/guest/test-e2e --rublk

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
