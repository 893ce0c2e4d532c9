#!/usr/bin/env bash
# Build a bootable Debian 6.1 kernel + initramfs for the guest tests (kTLS, second kernel).
# Everything goes to the cache dir (outside the repo), reused when already built.
#   build-image.sh CACHE_DIR     -> CACHE_DIR/<kver>/{vmlinuz,initrd.img}, path printed last
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${1:?usage: build-image.sh CACHE_DIR}
# never hard-code the ABI: Debian drops old kernel packages
kver() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*\)$/\1/p' | head -1; }
KVER=$(kver || true)
if [ -z "$KVER" ]; then  # a machine whose package lists are missing (never fetched, or cleaned): fetch them once
    apt-get update -qq >&2 || true
    KVER=$(kver || true)
fi
[ -n "$KVER" ] || { echo "build-image: cannot resolve linux-image-amd64 even after apt-get update" >&2; exit 1; }
OUT=$CACHE/$KVER
STAMP=$OUT/.built-$(sha256sum "$HERE/init" "$0" | sha256sum | cut -c1-12)
if [ -e "$STAMP" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT/debs"
# the modules the guest loads: kTLS + AES-GCM, veth + bridge for pods, 9p + overlay for the root
MODDIRS="net/tls crypto arch/x86/crypto lib/crypto drivers/virtio drivers/char/hw_random
         net/9p fs/9p fs/netfs fs/fscache fs/overlayfs drivers/net/veth.ko net/bridge net/802 net/llc"
if [ ! -e "$OUT/x/boot/vmlinuz-$KVER" ]; then
    (cd "$OUT/debs" && apt-get download "linux-image-$KVER" busybox-static >/dev/null)
    rm -rf "$OUT/x" "$OUT/bb"; mkdir -p "$OUT/x" "$OUT/bb"
    pats=("./boot/vmlinuz-$KVER" "./lib/modules/$KVER/modules.*")
    for d in $MODDIRS; do pats+=("./lib/modules/$KVER/kernel/$d"); done
    dpkg-deb --fsys-tarfile "$OUT"/debs/linux-image-"$KVER"_*.deb | tar -x -C "$OUT/x" --wildcards "${pats[@]}"
    dpkg -x "$OUT"/debs/busybox-static_*.deb "$OUT/bb"
fi
R=$OUT/root
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,lower,rw,newroot} "$R/lib/modules/$KVER/kernel"
cp "$OUT/bb/bin/busybox" "$R/bin/"
ln -s ../bin/busybox "$R/sbin/modprobe"   # the kernel's request_module() helper
for d in $MODDIRS; do
    mkdir -p "$R/lib/modules/$KVER/kernel/$(dirname "$d")"
    cp -a "$OUT/x/lib/modules/$KVER/kernel/$d" "$R/lib/modules/$KVER/kernel/$d"
done
cp "$OUT"/x/lib/modules/"$KVER"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KVER/"
depmod -b "$R" "$KVER"
install -m 755 "$HERE/init" "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.img"
cp "$OUT/x/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
rm -rf "$R"
rm -f "$OUT"/.built-*; touch "$STAMP"
echo "$OUT"
