# shellcheck shell=bash
# Shared by the scripts in ublk/guest/. Sourced, never run.
#
# The cache (XDEVICE_GUEST_CACHE, default /var/cache/xdevice-guest) holds, once `prepare` ran:
#   apt/                     private apt state (sources, lists, downloaded .debs)
#   linux-<kver>/            the unpacked kernel package: boot/vmlinuz-<kver>, lib/modules/<kver>
#                            (with modules.dep from depmod); usable with `modprobe -d`
#   current -> linux-<kver>  the kernel `run` boots
#   initramfs.cpio           busybox, the 9p/overlay modules, ublk/guest/init
#   initramfs.stamp          what that initramfs was built from
#   rublk/bin/rublk          (prepare --rublk) the reference ublk target

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${XDEVICE_GUEST_CACHE:-/var/cache/xdevice-guest}
BUSYBOX=${XDEVICE_GUEST_BUSYBOX:-/bin/busybox}
# Modules the initramfs loads before it can mount the 9p root: 9p over virtio, and overlay for
# a writable root. Their dependencies (netfs, 9pnet, ...) follow from modules.dep.
INITRAMFS_MODULES=(virtio_pci 9pnet_virtio 9p overlay)

die() { echo "${0##*/}: error: $*" >&2; exit 1; }
say() { echo "${0##*/}: $*" >&2; }

# The prepared kernel tree and its version, or a clear error.
load_kernel() {
    [[ -e $CACHE/current ]] || die "no prepared guest kernel in $CACHE; run ublk/guest/prepare (as root)"
    TREE=$(readlink -f "$CACHE/current")
    KVER=$(basename "$TREE"); KVER=${KVER#linux-}
    VMLINUZ=$TREE/boot/vmlinuz-$KVER
    [[ -r $VMLINUZ && -r $TREE/lib/modules/$KVER/modules.dep ]] \
        || die "guest kernel in $TREE is incomplete; run ublk/guest/prepare again"
}

# What an initramfs for $KVER built from this checkout would be built from.
initramfs_stamp() {
    {
        echo "kver $KVER"
        echo "modules ${INITRAMFS_MODULES[*]}"
        sha256sum "$GUEST_DIR/init" "$BUSYBOX" "$GUEST_DIR/lib.sh" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
}

# build_initramfs OUT: a newc cpio (uncompressed: nothing to inflate under TCG) with a static
# busybox, the modules of INITRAMFS_MODULES and their dependencies (decompressed, in load order),
# and ublk/guest/init as /init.
build_initramfs() {
    local out=$1 stage line path name dst n=0
    command -v modprobe >/dev/null || die "modprobe not found; install kmod (ublk/guest/prepare does)"
    command -v cpio >/dev/null || die "cpio not found; install cpio (ublk/guest/prepare does)"
    [[ -x $BUSYBOX ]] || die "$BUSYBOX not found; install busybox-static (ublk/guest/prepare does)"
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; the initramfs needs busybox-static"
    fi
    stage=$(mktemp -d "${TMPDIR:-/tmp}/xdevice-initramfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$stage'" RETURN
    mkdir -p "$stage"/{bin,dev,proc,sys,mnt/root,mnt/rw,mnt/out,newroot,modules}
    cp "$BUSYBOX" "$stage/bin/busybox"
    : >"$stage/modules/order"
    local deps m
    deps=$(for m in "${INITRAMFS_MODULES[@]}"; do
               modprobe -d "$TREE" -S "$KVER" --show-depends "$m" || exit 1
           done) || die "a module of ${INITRAMFS_MODULES[*]} is missing from $TREE"
    while read -r line; do
        case $line in
            builtin\ *) continue ;;
            insmod\ *) path=${line#insmod }; path=${path%% *} ;;
            *) die "unexpected modprobe --show-depends output: $line" ;;
        esac
        name=$(basename "$path"); name=${name%%.ko*}
        # Each request lists its whole chain; load a shared dependency once.
        grep -qx "[0-9]*-$name.ko" "$stage/modules/order" && continue
        n=$((n + 1))
        dst=$(printf '%02d-%s.ko' "$n" "$name")
        case $path in
            *.ko.xz) xz -dc "$path" >"$stage/modules/$dst" ;;
            *.ko.zst) zstd -qdc "$path" >"$stage/modules/$dst" ;;
            *.ko.gz) gzip -dc "$path" >"$stage/modules/$dst" ;;
            *.ko) cp "$path" "$stage/modules/$dst" ;;
            *) die "unknown module file type: $path" ;;
        esac
        echo "$dst" >>"$stage/modules/order"
    done <<<"$deps"
    install -m 0755 "$GUEST_DIR/init" "$stage/init"
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) \
        >"$out.tmp"
    mv "$out.tmp" "$out"
}
